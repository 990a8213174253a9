"""`edgevision plan MODEL`: the plan for a board or budgets, printed (`edgevision.moe.plan`), and with ``--measure``
what prune-to-fit costs: the model pruned to the planned experts per layer (REAP, `edgevision.moe.prune`) and
compared with the unpruned one on held-out questions, image rows included."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import ConfigError, ModelError
from edgevision.moe.plan import BOARDS, DEFAULT_SKEW, DEFAULT_STORAGE_GBPS, fit, read_header, render


def _cmd_plan(args) -> int:
    from edgevision.schema import parse_size

    def size(text: str | None, flag: str) -> int | None:
        if text is None:
            return None
        try:
            return parse_size(text)
        except ValueError:
            raise ConfigError(f"plan: {flag} {text!r} is not a size; write e.g. 10GiB or 512MiB") from None

    header = read_header(args.model)
    result = fit(
        header,
        board=BOARDS[args.board] if args.board else None,
        ram=size(args.ram, "--ram"),
        gpu=size(args.gpu, "--gpu") or 0,
        n_ctx=args.ctx,
        profile=args.profile,
        skew=args.skew,
        stages=size(args.stages, "--stages"),
        storage_gbps=args.storage_gbps,
        memory_gbps=args.memory_gbps,
    )
    print(render(result, profile=args.profile))
    if args.measure and result.keep_per_layer is not None and result.keep_per_layer >= header.layout.n_expert_used:
        quality = measure_prune(
            header.path, result.keep_per_layer, args.measure, tower=args.tower, n_threads=args.threads
        )
        print(f"prune-to-fit measured (keep {result.keep_per_layer}, REAP-ranked on {args.measure}): {quality.text}")
    return 0 if result.plan is not None else 1


@dataclass(frozen=True)
class PruneQuality:
    dropped_saliency: float  # share of the REAP ranking score of the dropped experts (mean over layers)
    text: str


def measure_prune(
    model: Path, keep: int, calibration: str, *, tower: str | None = None, n_threads: int = 0
) -> PruneQuality:
    """Prune `model` to `keep` experts per layer (REAP, ranked on the calibration set, image rows through `tower`)
    into a temporary file and compare it with the unpruned model on the held-out questions (heldout.txt)."""
    import sys
    import tempfile

    from edgevision.moe.calibrate import ImageSource, load_calibration, read_questions, run_calibration
    from edgevision.moe.prune import DEFAULT_CRITERION, SaliencyObserver, compare_models, prune_file

    if not model.is_file() or model.stat().st_blocks * 512 < model.stat().st_size // 2:
        raise ModelError(f"{model} has no weights (a header-only or sparse file): --measure needs the real model")
    calibration_set = load_calibration(calibration)
    heldout = read_questions(Path(calibration) / "heldout.txt")
    observer = SaliencyObserver.for_model(model)
    print(f"measuring prune-to-fit: calibrating on {len(calibration_set.questions)} questions", file=sys.stderr)
    run_calibration(model, calibration_set, observer, tower=tower, n_threads=n_threads)
    scores = observer.scores(DEFAULT_CRITERION)
    with tempfile.TemporaryDirectory(prefix="ev-plan-") as folder:
        out = Path(folder) / f"{model.stem}-keep{keep}.gguf"
        kept = prune_file(model, out, scores, keep, observer.mass.sum(axis=0))
        rows = None
        if tower is not None and calibration_set.images:
            images = ImageSource(tower, read_header(model).n_embd)
            try:
                rows = [images.embeddings(image) for image in calibration_set.images]
            finally:
                images.close()
        quality = compare_models(model, out, heldout, n_threads=n_threads, image_rows=rows)
    totals = scores.sum(axis=1)
    dropped = [1 - scores[il, kept[il]].sum() / totals[il] if totals[il] > 0 else 0.0 for il in range(scores.shape[0])]
    share = float(np.mean(dropped))
    images_note = "with image rows" if rows else "text only"
    return PruneQuality(share, f"drops {100 * share:.1f}% of the REAP score; held-out ({images_note}): {quality}")


def add_commands(sub, bench) -> None:
    plan = sub.add_parser(
        "plan",
        help="what a MoE decoder needs on a board, from its GGUF header: resident, paged, pruned, speed, config",
    )
    plan.add_argument("model", help="the MoE decoder (.gguf; only its header is read)")
    where = plan.add_mutually_exclusive_group(required=True)
    where.add_argument("--board", choices=sorted(BOARDS), help="plan for this board's memory, less the other stages")
    where.add_argument("--ram", help="RAM for the decoder's weights, e.g. 10GiB (as decoder.placement.ram_budget)")
    plan.add_argument("--gpu", help="GPU memory for expert tensors, e.g. 2GiB (default: none)")
    plan.add_argument("--profile", help="router profile from 'edgevision calibrate' (default: an assumed skew)")
    plan.add_argument(
        "--skew",
        type=float,
        default=DEFAULT_SKEW,
        help="without a profile: Zipf exponent of each layer's routing (default: %(default)s)",
    )
    plan.add_argument("--ctx", type=int, default=2048, help="context tokens for the KV cache (default: %(default)s)")
    plan.add_argument("--stages", help="memory of everything but the decoder, instead of the board's list")
    plan.add_argument(
        "--storage-gbps",
        type=float,
        default=DEFAULT_STORAGE_GBPS,
        help="storage read speed for whole experts, GB/s (default: %(default)s)",
    )
    plan.add_argument("--memory-gbps", type=float, help="memory bandwidth, GB/s (default: the board's, 102.4)")
    plan.add_argument(
        "--measure",
        metavar="CALIBRATION",
        help="prune to the planned experts per layer (REAP on this calibration folder) and measure top-1 agreement "
        "and KL on its heldout.txt against the unpruned model (needs the real weights)",
    )
    plan.add_argument("--tower", help="with --measure: vision tower ONNX, so image rows are included")
    plan.add_argument("--threads", type=int, default=0, help="with --measure: CPU threads (default: every core)")
    plan.set_defaults(func=_cmd_plan)
