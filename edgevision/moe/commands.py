"""Command line of the MoE tools: ``edgevision calibrate``, ``edgevision prune``, ``edgevision bench router``.

One ``_cmd_*`` function per command, registered in `add_commands`; the work is done in the modules beside
this one, imported inside each command so ``edgevision --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DECODER = "models/synthetic/gemma4-moe-synthetic-l4-e8k2-f32.gguf"
DEFAULT_TOWER = "models/synthetic/tower-gemma4-moe.onnx"
DEFAULT_CALIBRATION = "calibration"


def _progress(done: int, total: int, question: str) -> None:
    """One status line on stderr, rewritten in place on a terminal."""
    end = "\n" if done == total or not sys.stderr.isatty() else "\r"
    text = f"[{done:>3}/{total}] {question}" if question else f"[{done:>3}/{total}] done"
    print(f"{text[:100]:<100}", end=end, file=sys.stderr, flush=True)


def _tower(args: argparse.Namespace) -> Path | None:
    if args.no_images or not args.tower:
        return None
    tower = Path(args.tower)
    if not tower.is_file():
        from edgevision.errors import ModelError

        raise ModelError(f"vision tower {tower} does not exist; pass --tower, or --no-images to calibrate on text only")
    return tower


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from edgevision.moe.calibrate import load_calibration, run_calibration
    from edgevision.moe.heatmap import draw_heatmap
    from edgevision.moe.router import RouterObserver

    decoder = Path(args.decoder)
    observer = RouterObserver.for_model(decoder)
    calibration = load_calibration(args.calibration)
    tower = _tower(args)
    print(
        f"calibrating {decoder.name}: {len(calibration.questions)} questions, "
        f"{len(calibration.images) if tower else 0} images, {args.max_tokens} generated tokens each",
        file=sys.stderr,
    )
    run_calibration(
        decoder,
        calibration,
        observer,
        tower=tower,
        max_tokens=args.max_tokens,
        n_threads=args.threads,
        progress=_progress,
    )
    profile = observer.profile(decoder.name)
    out = Path(args.out) if args.out else Path("out") / f"{decoder.stem}.router.json"
    profile.save(out)
    picture = draw_heatmap(profile, out.with_suffix(".png"))
    print(profile.summary())
    print(f"router profile: {out}\nheat-map:       {picture}")
    return 0


def _cmd_bench_router(args: argparse.Namespace) -> int:
    from edgevision.moe.overhead import bench_router

    print(bench_router(Path(args.decoder), tokens=args.tokens, repeats=args.repeats, n_threads=args.threads))
    return 0


def _decoder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder", default=DEFAULT_DECODER, help="MoE decoder GGUF (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")


def _calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tower", default=DEFAULT_TOWER, help="vision tower ONNX for the images (default: %(default)s)"
    )
    parser.add_argument("--no-images", action="store_true", help="ask the questions as text only")
    parser.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help="folder with prompts.txt and images/ (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="tokens generated per question (default: %(default)s)"
    )


def add_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser(
        "calibrate",
        help="run the calibration set through a MoE decoder; write its router profile (JSON) and heat-map (PNG)",
    )
    _decoder_args(calibrate)
    _calibration_args(calibrate)
    calibrate.add_argument("--out", help="profile JSON to write (default: out/<decoder>.router.json; PNG beside it)")
    calibrate.set_defaults(func=_cmd_calibrate)

    router = bench.add_parser("router", help="decode speed with and without the router observer")
    _decoder_args(router)
    router.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default: %(default)s)")
    router.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved (default: %(default)s)")
    router.set_defaults(func=_cmd_bench_router)
