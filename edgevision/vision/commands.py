"""Command line of the vision stage: ``edgevision bench vision``.

For each tower and each available encoder back-end it prints the median time to encode one image
(preprocessing included) next to the same image through llama.cpp's own encoder (mtmd) on the same mmproj,
measured in one run. By default it makes two CLIP-L-like, scaled-down synthetic mmproj files (projector
types ``mlp`` and ``gemma4v``) and a synthetic decoder with tools/ in a temporary folder and exports the
towers from them; ``--mmproj/--tower/--decoder`` measure real files instead.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgevision.errors import EdgevisionError, MissingDependencyError

TOOLS = Path(__file__).resolve().parents[2] / "tools"

# Bench-sized synthetic towers with f16 matrices, as real mmproj files have: CLIP ViT-L/14-336's token grid
# at a quarter of its width and depth, and a Gemma 4 tower with a 12 x 12 token grid (576 px).
SYNTHETIC = {
    "mlp": ["--width", "256", "--n-head", "8", "--n-ff", "1024", "--n-layer", "7", "--patch", "14", "--grid", "24",
            "--ftype", "f16"],
    "gemma4v": ["--width", "256", "--n-head", "4", "--n-ff", "1024", "--n-layer", "6", "--patch", "16",
                "--grid", "12", "--pos-size", "40", "--ftype", "f16"],
}  # fmt: skip


def _tool(*argv: str) -> None:
    if not (TOOLS / argv[0]).is_file():
        raise MissingDependencyError(
            f"tools/{argv[0]} is not here (an installed package has no tools/): pass --mmproj, --tower and --decoder"
        )
    done = subprocess.run(
        [sys.executable, str(TOOLS / argv[0]), *argv[1:]], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise EdgevisionError(f"tools/{argv[0]} failed: {done.stderr.strip().splitlines()[-1:]}")


def _synthetic(folder: Path) -> tuple[Path, list[tuple[str, Path, Path]]]:
    _tool("make_synthetic.py", "decoder", "--out", str(folder), "--seed", "1")
    decoder = next(folder.glob("gemma4-moe-synthetic-*.gguf"))
    towers = []
    for kind, options in SYNTHETIC.items():
        mmproj, tower = folder / f"mmproj-{kind}.gguf", folder / f"tower-{kind}.onnx"
        _tool("make_mmproj.py", "--type", kind, "--out", str(mmproj), "--n-embd", "128", *options)
        _tool(
            "export_tower.py",
            "mmproj",
            str(mmproj),
            "--out",
            str(tower),
            *(["--llama-cpp-cls-last"] if kind == "mlp" else []),
        )
        towers.append((kind, mmproj, tower))
    return decoder, towers


def _median_ms(fns: dict[str, Callable], image, runs: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function on `image`, in ms. The paths take turns within each round, so a
    busy machine slows them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(image)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(image)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _test_image(size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def bench_vision(decoder: Path, towers: list[tuple[str, Path, Path]], *, runs: int, warmup: int, threads: int) -> str:
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.vision.encoder import BACKENDS, encode_image, open_encoder
    from edgevision.vision.mtmd import MtmdReference

    rows = [("tower", "tokens", "back-end", "ours ms", "mtmd ms", "ours/mtmd")]
    notes = []
    with LlamaDecoder(decoder, n_ctx=256, n_batch=256, n_threads=threads) as dec:
        for name, mmproj, tower in towers:
            with MtmdReference(mmproj, dec, n_threads=threads, flash_attn=None) as ref:  # llama.cpp's defaults
                encoders = {}
                for backend in BACKENDS:
                    try:
                        encoders[backend] = open_encoder(backend, tower, threads=threads)
                    except (EdgevisionError, ImportError, OSError) as exc:
                        notes.append(f"{backend}: skipped ({exc})")
                if not encoders:
                    continue
                spec = next(iter(encoders.values())).spec
                image = _test_image(spec.image_size)
                fns = {backend: (lambda im, e=enc: encode_image(e, im)) for backend, enc in encoders.items()}
                try:
                    ms = _median_ms({**fns, "mtmd": ref.encode}, image, runs, warmup)
                finally:
                    for enc in encoders.values():
                        enc.close()
                theirs = ms["mtmd"]
                for backend in encoders:
                    ours = ms[backend]
                    label = f"{name} {spec.image_size}px"
                    rows.append((label, str(spec.n_tokens), backend, _ms(ours), _ms(theirs), f"{ours / theirs:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    header = (
        f"vision encode: median of {runs} rounds (paths take turns) after {warmup} warm-up, one image, "
        "preprocessing included"
    )
    return "\n".join([header, *lines, *dict.fromkeys(notes)])


def _cmd_bench_vision(args: argparse.Namespace) -> int:
    if args.mmproj or args.tower:
        if not (args.mmproj and args.tower and args.decoder):
            raise EdgevisionError("give --mmproj, --tower and --decoder together (or none, for synthetic towers)")
        print(bench_vision(Path(args.decoder), [("tower", Path(args.mmproj), Path(args.tower))],
                           runs=args.runs, warmup=args.warmup, threads=args.threads))  # fmt: skip
        return 0
    with tempfile.TemporaryDirectory(prefix="edgevision-bench-") as tmp:
        print("making synthetic mmproj files, towers and a decoder ...", file=sys.stderr)
        decoder, towers = _synthetic(Path(tmp))
        print(bench_vision(decoder, towers, runs=args.runs, warmup=args.warmup, threads=args.threads))
    return 0


def add_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    vision = bench.add_parser("vision", help="encode time per image: our back-ends next to llama.cpp's mtmd")
    vision.add_argument("--mmproj", help="llama.cpp mmproj GGUF (default: synthetic ones)")
    vision.add_argument("--tower", help="the ONNX tower exported from --mmproj (tools/export_tower.py)")
    vision.add_argument("--decoder", help="a GGUF decoder of the projector's output width (mtmd needs one)")
    vision.add_argument("--runs", type=int, default=10, help="timed encodes per path (default: %(default)s)")
    vision.add_argument("--warmup", type=int, default=2, help="untimed encodes first (default: %(default)s)")
    vision.add_argument("--threads", type=int, default=0, help="CPU threads for both paths; 0: all cores")
    vision.set_defaults(func=_cmd_bench_vision)
