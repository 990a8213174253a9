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


def _cmd_prune(args: argparse.Namespace) -> int:
    from edgevision.moe.calibrate import ImageSource, load_calibration, read_questions, run_calibration
    from edgevision.moe.prune import (
        CRITERIA,
        SaliencyObserver,
        compare_models,
        keep_for_budget,
        parse_size,
        prune_file,
        saliency_table,
    )
    from edgevision.moe.slicing import inspect_moe

    decoder = Path(args.decoder)
    info = inspect_moe(decoder)
    keep = args.keep if args.keep is not None else keep_for_budget(info, parse_size(args.budget))
    out = Path(args.out) if args.out else Path("out") / f"{decoder.stem}-keep{keep}.gguf"
    calibration = load_calibration(args.calibration)
    heldout = read_questions(args.heldout) if not args.no_report else ()
    tower = _tower(args)
    observer = SaliencyObserver.for_model(decoder)
    print(f"measuring expert saliency of {decoder.name} on {len(calibration.questions)} questions", file=sys.stderr)
    run_calibration(
        decoder,
        calibration,
        observer,
        tower=tower,
        max_tokens=args.max_tokens,
        n_threads=args.threads,
        progress=_progress,
    )
    scores = observer.scores(args.criterion)
    kept = prune_file(decoder, out, scores, keep, observer.mass.sum(axis=0))
    print(f"ranked by {args.criterion}: {CRITERIA[args.criterion]}")
    print(saliency_table(scores, kept))
    size = out.stat().st_size
    print(
        f"pruned model: {out}: {keep} of {info.n_expert} experts per layer (top {info.n_expert_used} per token), "
        f"{size / 2**20:.2f} MiB, {size / info.size:.1%} of {info.size / 2**20:.2f} MiB"
    )
    if heldout:
        rows = None
        if tower is not None and calibration.images:
            images = ImageSource(tower, _embedding_width(decoder))
            try:
                rows = [images.embeddings(image) for image in calibration.images]
            finally:
                images.close()
        print(f"comparing with {decoder.name} on {len(heldout)} held-out questions ...", file=sys.stderr)
        quality = compare_models(
            decoder, out, heldout, max_tokens=args.report_tokens, n_threads=args.threads, image_rows=rows
        )
        print(f"quality vs unpruned: {quality}")
    return 0


def _embedding_width(decoder: Path) -> int:
    """The decoder's embedding width, from its metadata."""
    import gguf

    reader = gguf.GGUFReader(decoder)
    arch = reader.get_field("general.architecture").contents()
    return int(reader.get_field(f"{arch}.embedding_length").contents())


def _cmd_bench_router(args: argparse.Namespace) -> int:
    from edgevision.moe.overhead import bench_router

    print(bench_router(Path(args.decoder), tokens=args.tokens, repeats=args.repeats, n_threads=args.threads))
    return 0


def _cmd_bench_moe(args: argparse.Namespace) -> int:
    import signal
    import sys

    from edgevision.moe.bench import bench_moe

    # a terminated run still unmounts and detaches its loop device and removes its cgroups
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(
        bench_moe(
            args.model,
            cap_fraction=args.cap_fraction,
            cap_mib=args.cap_mib,
            tokens=args.tokens,
            calibration=args.calibration,
            profile=args.profile,
            n_threads=args.threads,
            headroom_mib=args.headroom_mib,
            repeats=args.repeats,
            storage=args.storage,
            read_ahead_kb=args.read_ahead_kb,
            read_mbps=args.read_mbps,
            latency_us=args.latency_us,
            backing=args.backing,
            pruned=args.pruned,
            policies=args.policies.split() if args.policies else None,
        )
    )
    return 0


def _cmd_bench_policy(args: argparse.Namespace) -> int:
    from edgevision.moe.replay import bench_policy

    fractions = [float(f) for f in args.capacity.split(",")]
    print(
        bench_policy(
            args.model, calibration=args.calibration, fractions=fractions, tokens=args.tokens, n_threads=args.threads
        )
    )
    return 0


def _cmd_bench_routing(args: argparse.Namespace) -> int:
    from edgevision.moe.routing import routing_report

    report = routing_report(args.model, args.calibration, tokens=args.tokens, n_threads=args.threads)
    print("\n".join(report.lines(Path(args.model).name)))
    return 0


def _add_bench_moe(bench: argparse._SubParsersAction) -> None:
    from edgevision.moe.bench import DEFAULT_MODEL  # a light module: the heavy imports are inside its functions

    moe = bench.add_parser(
        "moe",
        help="a MoE model under a memory cap (cgroup, about 60%% of the file) on board-like storage: plain mmap, "
        "expert LRU, router-aware and Belady's optimal replacement side by side (hit rate, bytes read, faults, "
        "tokens/s, top-1 agreement), plus the unconstrained speed",
    )
    moe.add_argument(
        "--model", default=DEFAULT_MODEL, help="MoE decoder GGUF (default: %(default)s, 'make bench-model')"
    )
    moe.add_argument(
        "--cap-fraction", type=float, default=0.6, help="cap as a share of the file (default: %(default)s)"
    )
    moe.add_argument("--cap-mib", type=int, help="cap in MiB instead of --cap-fraction")
    moe.add_argument("--tokens", type=int, default=16, help="decoded tokens per held-out prompt (default: %(default)s)")
    moe.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help="folder with prompts.txt (the prior) and heldout.txt (the measured prompts) (default: %(default)s)",
    )
    moe.add_argument("--profile", help="router profile to plan from (default: calibrate on prompts.txt first)")
    moe.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")
    moe.add_argument(
        "--headroom-mib", type=int, default=48, help="RAM left unpinned under the cap (default: %(default)s)"
    )
    moe.add_argument(
        "--repeats", type=int, default=2, help="runs of each configuration, interleaved; the best counts (default: 2)"
    )
    moe.add_argument(
        "--storage",
        choices=["nvme", "loop", "host"],
        default="nvme",
        help="nvme: the model on an emulated NVMe (a FUSE server adding an NVMe's latency and bandwidth per read "
        "request); loop: on a loop device with direct I/O and a blkio bandwidth throttle, no added latency; both "
        "need root; host: the VM's disk as it is, for comparison only (default: %(default)s)",
    )
    moe.add_argument("--read-ahead-kb", type=int, help="the storage's read_ahead_kb (default: 128)")
    moe.add_argument(
        "--read-mbps", type=int, help="read bandwidth in MB/s, 0 for none (default: 2000, an Orin-class NVMe)"
    )
    moe.add_argument(
        "--latency-us",
        type=float,
        help="nvme: a read's latency at queue depth 1 before its transfer (default: 80, an Orin-class NVMe)",
    )
    moe.add_argument(
        "--backing",
        choices=["ram", "disk"],
        default="ram",
        help="loop: where the loop device's backing file lives (default: %(default)s: no noise from the VM's disk)",
    )
    moe.add_argument("--pruned", action="store_true", help="also run the model pruned to fit the cap")
    moe.add_argument(
        "--policies",
        help="the policy rows, space-separated (default: 'expert-lru router-aware belady'); "
        "'router-aware:predict=0,evict=0' switches pieces off (predict, prefetch, evict, prior, follow, random); "
        "'router-aware:depth=2' predicts two layers ahead; 'router-aware:reroute=4.0' adds cache-aware routing "
        "(it changes the model: see the top-1 and KL columns)",
    )
    moe.set_defaults(func=_cmd_bench_moe)

    policy = bench.add_parser(
        "policy",
        help="record a MoE model's routing and replay it through the expert LRU, the router-aware policy (with "
        "and without its prior and predicted routing) and Belady's optimum: hit rate and bytes read per token",
    )
    policy.add_argument("--model", default=DEFAULT_MODEL, help="MoE decoder GGUF (default: %(default)s)")
    policy.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help="prompts.txt (the prior) and heldout.txt (default: %(default)s)",
    )
    policy.add_argument(
        "--capacity",
        default="0.3,0.45,0.6",
        help="expert cache sizes, shares of all experts' bytes (default: %(default)s)",
    )
    policy.add_argument("--tokens", type=int, default=16, help="generated tokens per question (default: %(default)s)")
    policy.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    policy.set_defaults(func=_cmd_bench_policy)

    routing = bench.add_parser(
        "routing",
        help="how a MoE model routes: hottest-quarter share, per-layer LRU hit rates, calibration-to-held-out "
        "transfer, image-like rows, beside the figures published for real models",
    )
    routing.add_argument("--model", default=DEFAULT_MODEL, help="MoE decoder GGUF (default: %(default)s)")
    routing.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help="folder with prompts.txt and heldout.txt (default: %(default)s)",
    )
    routing.add_argument("--tokens", type=int, default=16, help="tokens sampled per question (default: %(default)s)")
    routing.add_argument("--threads", type=int, default=0, help="CPU threads (default: every core)")
    routing.set_defaults(func=_cmd_bench_routing)


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

    prune = sub.add_parser(
        "prune",
        help="write a smaller GGUF without each layer's least salient experts (REAP), with a quality report",
    )
    _decoder_args(prune)
    size = prune.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, help="experts to keep per layer")
    size.add_argument("--budget", help="largest file size, e.g. 9GiB or 700MiB: keep as many experts as fit")
    prune.add_argument("--out", help="pruned GGUF to write (default: out/<decoder>-keep<N>.gguf)")
    prune.add_argument(
        "--criterion",
        choices=["reap-sum", "reap", "mass"],
        default="reap-sum",
        help="what ranks the experts: reap-sum (default; gate x output norm summed over the calibration tokens, "
        "so how often an expert runs counts), reap (the REAP paper's mean of it over the tokens routed to the "
        "expert), mass (summed gate weight)",
    )
    _calibration_args(prune)
    prune.add_argument(
        "--heldout",
        default=f"{DEFAULT_CALIBRATION}/heldout.txt",
        help="questions for the quality report (default: %(default)s)",
    )
    prune.add_argument("--report-tokens", type=int, default=24, help="answer tokens compared per question")
    prune.add_argument("--no-report", action="store_true", help="skip the comparison with the unpruned model")
    prune.set_defaults(func=_cmd_prune)

    router = bench.add_parser("router", help="decode speed with and without the router observer")
    router.add_argument("--decoder", default=DEFAULT_DECODER, help="MoE decoder GGUF (default: %(default)s)")
    router.add_argument("--threads", type=int, default=1, help="CPU threads, 0 for every core (default: %(default)s)")
    router.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default: %(default)s)")
    router.add_argument("--repeats", type=int, default=5, help="runs of each, interleaved (default: %(default)s)")
    router.set_defaults(func=_cmd_bench_router)

    _add_bench_moe(bench)
