"""The CUDA checks of tools/cuda_check.sh, run with the CUDA build of llama-cpp-python: placement by tensor
overrides, router observation on the GPU, and ``edgevision bench router`` there. Writes what it found as
markdown lines to stdout (the shell script puts them in the report); each check is independent, so one
failing still leaves the others' results.

    python tools/cuda_check.py MODEL.gguf

llama_cpp is imported before numpy: on one CUDA image importing numpy first (its OpenMP runtime) made
llama.cpp's model loading segfault with an OpenMP build.
"""

from __future__ import annotations

import subprocess
import sys
import time
import traceback
from pathlib import Path

import llama_cpp  # noqa: F401  - first, before numpy (see the docstring)
import numpy as np

PROMPT = "The camera sees a person standing next to a table."


def _gpu_used_mib() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        return f"{int(out[0])} MiB"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "unknown"


def _greedy(decoder, n: int = 16) -> list[int]:
    decoder.reset()
    decoder.prefill_tokens(decoder.tokenize(PROMPT))
    out = []
    for _ in range(n):
        out.append(int(np.argmax(decoder.logits())))
        decoder.prefill_tokens([out[-1]])
    return out


def check_placement(model: Path) -> list[str]:
    """Experts of half the layers kept on the CPU by tensor overrides; the rest on the GPU; tokens agree."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.moe import buft
    from edgevision.moe.layout import read_layout
    from edgevision.moe.residency import plan_residency
    from edgevision.moe.router import RouterObserver

    lines = [f"- buffer types: {', '.join(sorted(buft.buffer_types()))}; has_gpu: {buft.has_gpu()}"]
    layout = read_layout(model)
    with LlamaDecoder(model, n_ctx=256, n_gpu_layers=0) as cpu:
        reference = _greedy(cpu)
    half = layout.layer_bytes(layout.moe_layers[0]) * (len(layout.moe_layers) // 2)
    plan = plan_residency(layout, np.ones((layout.n_layer, layout.n_expert)), ram_budget=10**12, gpu_budget=half)
    for label, overrides in (
        ("all on the GPU", []),
        ("planned: half the layers' experts on the CPU", plan.tensor_overrides(layout)),
    ):
        observer = RouterObserver.for_model(model)
        before = _gpu_used_mib()
        with LlamaDecoder(model, n_ctx=256, n_gpu_layers=-1, tensor_overrides=overrides, cb_eval=observer) as gpu:
            tokens = _greedy(gpu)
            during = _gpu_used_mib()
        kinds: dict[str, list[int]] = {}
        for name, (kind, _data) in observer.placement.items():
            kinds.setdefault(kind, []).append(int(name.split(".")[1]))
        placed = "; ".join(f"{kind}: layers {sorted(set(v))}" for kind, v in sorted(kinds.items()))
        agree = sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(reference)
        lines.append(
            f"- {label}: GPU memory {before} before, {during} loaded; expert weights in {placed or 'nothing seen'}; "
            f"GPU layers planned {list(plan.gpu_layers) if overrides else 'all'}; greedy tokens agree with the "
            f"CPU build's {100 * agree:.0f}% (first 8: {'same' if tokens[:8] == reference[:8] else 'differ'})"
        )
    return lines


def check_observation(model: Path) -> list[str]:
    """The router observer and the predicting observer on the GPU: rows seen, choices that match."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.moe.predict import PredictingObserver
    from edgevision.moe.router import RouterObserver

    lines = []
    seen: dict[str, list[np.ndarray]] = {"router": [], "predicting": []}
    for name, kind in (("router", RouterObserver), ("predicting", PredictingObserver)):
        observer = kind.for_model(model)
        observer.listeners.append(lambda layer, ids, w, name=name: seen[name].append(np.sort(ids, axis=1).copy()))
        with LlamaDecoder(model, n_ctx=256, n_gpu_layers=-1, cb_eval=observer) as gpu:
            _greedy(gpu, 8)
        lines.append(f"- {name} observer: {int(observer.tokens.sum())} rows seen, {len(seen[name])} layer reads")
    pairs = list(zip(seen["router"], seen["predicting"], strict=False))
    same = sum(np.array_equal(a, b) for a, b in pairs)
    lines.append(
        f"- the two observers agree on {same} of {len(pairs)} layer choices (top-k from logits vs llama.cpp's)"
    )
    return lines


def check_bench_router(model: Path) -> list[str]:
    from edgevision.moe.overhead import bench_router

    start = time.perf_counter()
    table = bench_router(model, tokens=64, repeats=3, n_threads=4)
    return ["```", table, "```", f"(bench router took {time.perf_counter() - start:.0f} s)"]


def main(argv: list[str]) -> int:
    model = Path(argv[1])
    failed = 0
    for title, check in (
        ("Placement (tensor overrides)", check_placement),
        ("Observation on the GPU", check_observation),
        ("edgevision bench router on the GPU", check_bench_router),
    ):
        print(f"\n### {title}\n", flush=True)
        try:
            print("\n".join(check(model)), flush=True)
        except Exception:  # noqa: BLE001 - a failed check is reported and the next one still runs
            failed += 1
            print("FAILED:\n```\n" + traceback.format_exc()[-3000:] + "```", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
