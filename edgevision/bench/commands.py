"""``edgevision bench board HOST``, ``edgevision bench suites`` and ``edgevision report RESULTS``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_SUITES_HELP = "suites to run, comma-separated: {names} or all (default: all)"


def _suite_arguments(parser: argparse.ArgumentParser) -> None:
    from edgevision.bench.suites import SUITES
    from edgevision.telemetry.power import POWER_READERS

    parser.add_argument("--suites", default="all", help=_SUITES_HELP.format(names=", ".join(SUITES)))
    parser.add_argument("--quick", action="store_true", help="few rounds and short runs (tests, a first look)")
    parser.add_argument("--rounds", type=int, help="repeats of every measurement (default: 5, or 2 with --quick)")
    parser.add_argument(
        "--config",
        default="config/edgevision.yaml",
        help="config whose models the suites use, on the machine that runs them (default: %(default)s)",
    )
    parser.add_argument(
        "--power", default="auto", choices=("auto", *POWER_READERS), help="power reader (default: %(default)s)"
    )
    parser.add_argument(
        "--power-root",
        help="read the INA3221/RAPL sysfs files under this folder instead of / "
        "(tests: the recorded-format fixture in tests/data)",
    )
    parser.add_argument("--interval-ms", type=int, default=100, help="power and memory sampling (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the decoders; 0: all cores")


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The suite options, as `bench suites` on the board takes them."""
    argv = [
        "--suites",
        args.suites,
        "--config",
        args.config,
        "--power",
        args.power,
        "--interval-ms",
        str(args.interval_ms),
        "--threads",
        str(args.threads),
    ]
    if args.quick:
        argv.append("--quick")
    if args.rounds is not None:
        argv += ["--rounds", str(args.rounds)]
    if args.power_root:
        argv += ["--power-root", args.power_root]
    return argv


def add_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    board = bench.add_parser(
        "board", help="run the benchmark suites on a board over SSH and bring back one results folder with its report"
    )
    board.add_argument("host", help="the board: [user@]host, as ssh takes it")
    board.add_argument("-p", "--port", type=int, help="SSH port (default: ssh's)")
    board.add_argument("-i", "--identity", type=Path, help="private key (default: ssh-agent and ssh's defaults)")
    board.add_argument(
        "-o",
        "--ssh-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ssh option, repeatable (e.g. UserKnownHostsFile=FILE)",
    )
    board.add_argument(
        "--remote-dir",
        default="edgevision",
        help="where the tree is copied on the board, relative to its home (default: %(default)s)",
    )
    board.add_argument(
        "--python",
        default=".venv/bin/python",
        help="the board's Python environment to use (default: %(default)s in --remote-dir, made "
        "with 'make venv' if missing)",
    )
    board.add_argument(
        "--models",
        help="the board's models folder, linked as --remote-dir/models where that has "
        "none (default: make models there)",
    )
    board.add_argument(
        "--no-setup",
        action="store_true",
        help="never run make venv / make models on the board: a missing environment is an error",
    )
    board.add_argument(
        "--copy",
        choices=["auto", "rsync", "tar"],
        default="auto",
        help="how the tree and results travel: rsync over ssh, tar over ssh, or auto (rsync where both sides have it)",
    )
    board.add_argument("--out", type=Path, help="local results folder (default: out/bench/HOST-UTCTIME)")
    board.add_argument("--compare", type=Path, help="an older results folder for the report to compare with")
    board.add_argument("--force", action="store_true", help="compare even across hardware, power modes or models")
    _suite_arguments(board)
    board.set_defaults(func=_cmd_board)

    suites = bench.add_parser(
        "suites",
        help="run the benchmark suites on this machine into a results folder (what 'bench board' runs on the board)",
    )
    _suite_arguments(suites)
    suites.add_argument("--models", type=Path, default=Path("models"), help="models folder (default: %(default)s)")
    suites.add_argument("--out", type=Path, help="results folder to make (default: out/bench/HOST-UTCTIME)")
    suites.add_argument("--git-commit", help=argparse.SUPPRESS)  # given by 'bench board': the board has no .git
    suites.add_argument("--git-dirty", action="store_true", help=argparse.SUPPRESS)
    suites.set_defaults(func=_cmd_suites)

    report = sub.add_parser(
        "report",
        help="an HTML and Markdown report (plots inlined) from a benchmark results "
        "folder, optionally against an older one",
    )
    report.add_argument("results", type=Path, help="results folder (from 'edgevision bench board' or 'bench suites')")
    report.add_argument("--compare", type=Path, metavar="OLDER", help="older results folder: mark what changed")
    report.add_argument("--force", action="store_true", help="compare even across hardware, power modes or models")
    report.add_argument(
        "--threshold",
        type=float,
        default=0.05,
        help="smallest relative change that counts as a regression or improvement (default: 0.05)",
    )
    report.add_argument("--out", type=Path, help="folder for report.html/report.md (default: the results folder)")
    report.set_defaults(func=_cmd_report)


def _rounds(args: argparse.Namespace) -> int:
    return args.rounds if args.rounds is not None else (2 if args.quick else 5)


def _cmd_suites(args: argparse.Namespace) -> int:
    import platform
    import time

    from edgevision.bench.runner import parse_suites, run_suites

    suites = parse_suites(args.suites)
    out = args.out or Path("out/bench") / f"{platform.node()}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    commit = {"git_commit": args.git_commit, "git_dirty": args.git_dirty} if args.git_commit else None
    folder = run_suites(
        out,
        suites=suites,
        config_path=Path(args.config),
        models_dir=args.models,
        rounds=_rounds(args),
        quick=args.quick,
        power=args.power,
        power_root=Path(args.power_root) if args.power_root else None,
        interval=args.interval_ms / 1000,
        threads=args.threads,
        commit=commit,
    )
    print(f"results: {folder}")
    return 0


def _cmd_board(args: argparse.Namespace) -> int:
    from edgevision.bench.remote import Ssh, bench_board
    from edgevision.bench.report import build_report, write_report
    from edgevision.bench.results import ResultsError, load_results
    from edgevision.bench.runner import parse_suites
    from edgevision.errors import EdgevisionError

    parse_suites(args.suites)  # a typo fails here, not after the copy
    if args.compare:
        load_results(args.compare)  # an unreadable older run fails before the board is busy
    ssh = Ssh(args.host, port=args.port, identity=args.identity, options=tuple(args.ssh_option))
    refused: list[str] = []

    def finish(folder: Path) -> None:
        try:
            files = build_report(folder, older=args.compare, force=args.force)
        except ResultsError as error:  # not comparable: the run is kept, its report made without the comparison
            refused.append(str(error))
            files = build_report(folder)
        write_report(folder, files)

    folder = bench_board(
        ssh,
        suites_argv=_forwarded(args),
        out=args.out,
        remote_dir=args.remote_dir,
        python=args.python,
        models=args.models,
        setup=not args.no_setup,
        copy=args.copy,
        finish=finish,
    )
    print(f"results: {folder}\nreport:  {folder / 'report.html'}")
    if refused:
        raise EdgevisionError(f"{refused[0]}; the results and a report without the comparison are in {folder}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from edgevision.bench.report import build_report, write_report

    files = build_report(args.results, older=args.compare, force=args.force, threshold=args.threshold)
    page = write_report(args.results, files, args.out)
    print(f"report: {page}\n        {page.with_name('report.md')}", file=sys.stdout)
    return 0
