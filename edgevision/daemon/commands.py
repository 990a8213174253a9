"""`edgevision run`, `status`, `press`, `release`, `edgevision bench e2e` and `edgevision bench soak`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

_CONFIG_HELP = "config file (default: $EDGEVISION_CONFIG, then /etc/edgevision/config.yaml)"


def add_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the appliance daemon in the foreground (as the systemd unit does)")
    run.add_argument("--config", help=_CONFIG_HELP)
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="ask the running daemon its state, models and last answer's timings")
    _socket_arguments(status)
    status.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    status.set_defaults(func=_cmd_status)
    for name, what in (("press", "press the push-to-talk button"), ("release", "release the push-to-talk button")):
        parser = sub.add_parser(name, help=f"{what} through the control socket (development, tests)")
        _socket_arguments(parser)
        parser.set_defaults(func=_cmd_button, command_line=name)

    e2e = bench.add_parser(
        "e2e",
        help="spoken questions through the daemon, overlapped vs sequential: per-stage medians, release → first audio",
    )
    e2e.add_argument("--config", help=_CONFIG_HELP)
    e2e.add_argument("-n", "--interactions", type=int, default=3, help="questions per mode (default: %(default)s)")
    e2e.add_argument(
        "--image",
        action="append",
        type=Path,
        help="photo to ask about (repeatable; default: the bundled photo and two generated scenes)",
    )
    e2e.add_argument("--json", type=Path, help="also write every interaction record to this JSON file")
    e2e.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="seconds the scripted user stays quiet after each question before letting go "
        "(default: %(default)s: the button is let go as the spoken clip ends)",
    )
    e2e.add_argument(
        "--audio",
        nargs="+",
        type=Path,
        metavar="WAV",
        help="recorded spoken questions instead of synthesised ones (a .txt beside one says what it asks)",
    )
    e2e.add_argument(
        "--peer",
        action="store_true",
        help="compare the daemon with the sequential pipeline a user would script (faster-whisper → "
        "llama-cpp-python Llama with a Llava15ChatHandler → Piper), in its own process",
    )
    e2e.add_argument(
        "--mmproj",
        type=Path,
        help="--peer: the vision tower as an mmproj GGUF; the daemon runs its ONNX export beside it "
        "(same name, .onnx) (default: mmproj-gemma3-270m.gguf beside the config's tower)",
    )
    e2e.add_argument(
        "--decoder",
        type=Path,
        help="the decoder GGUF both sides answer with instead of the config's (--peer: one as wide as the "
        "mmproj's rows, e.g. models/gemma-3-270m-q4_k_m.gguf)",
    )
    e2e.add_argument(
        "--cold",
        type=int,
        default=0,
        metavar="N",
        help="--peer: also N rounds of each side as a new process asked one question (default: 0)",
    )
    e2e.set_defaults(func=_cmd_bench_e2e)

    soak = bench.add_parser(
        "soak", help="many spoken questions through one daemon: RSS, open descriptors and threads, first vs last tenth"
    )
    soak.add_argument("--config", help=_CONFIG_HELP)
    soak.add_argument("-n", "--answers", type=int, default=500, help="questions to answer (default: %(default)s)")
    soak.add_argument("--tokens", type=int, default=8, help="longest answer, in tokens (default: %(default)s)")
    soak.add_argument("--json", type=Path, help="also write the summary and every sample to this JSON file")
    soak.set_defaults(func=_cmd_bench_soak)


def _socket_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help="control socket (default: devices.control_socket of the config)")
    parser.add_argument("--config", help=_CONFIG_HELP)


def _socket_path(args: argparse.Namespace) -> Path:
    from edgevision.config import Config, find_config, load_config
    from edgevision.errors import ConfigError

    if args.socket:
        return Path(args.socket)
    try:
        return Path(load_config(find_config(args.config)).devices.control_socket)
    except ConfigError:
        if args.config:
            raise
        return Path(Config().devices.control_socket)  # no config here: the service's default place


def _cmd_run(args: argparse.Namespace) -> int:
    from edgevision.config import find_config, load_config
    from edgevision.daemon.build import build_daemon
    from edgevision.daemon.notify import Notifier
    from edgevision.logs import configure_logging

    config = load_config(find_config(args.config))
    configure_logging(config.logging.level, args.debug)
    notifier = Notifier()
    daemon = build_daemon(config, notifier=notifier)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop, sig.name)
        await daemon.run()

    asyncio.run(serve())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from edgevision.devices.socket_button import send_button

    path = _socket_path(args)
    reply = _status_reply(path, send_button(path, "status"))
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(
        f"state:   {reply['state']} ({reply['mode']} mode{'' if reply['ready'] else ', warming up'}), "
        f"up {reply['uptime_s']:.0f} s, {reply['interactions']} presses"
    )
    for role, name in reply["models"].items():
        print(f"{role + ':':<11} {name}")
    if placement := reply.get("placement"):
        hit = placement["hit_rate"]
        print(
            f"placement: {placement['pinned_experts']} experts pinned ({placement['pinned_bytes'] / 2**20:.1f} MiB), "
            f"{placement['locked_bytes'] / 2**20:.1f} MiB locked, {len(placement['gpu_layers'])} GPU layers; "
            f"hit rate {'-' if hit is None else f'{100 * hit:.1f}%'} of {placement['expert_selections']} experts routed"
        )
        print(
            f"  since start: {placement['storage_bytes_read'] / 2**20:.1f} MiB read from storage, "
            f"{placement['major_faults']} major faults, {placement['replans']} re-plans"
            + (
                f", {placement['adaptation_errors']} failed ({placement['last_adaptation_error']})"
                if placement["adaptation_errors"]
                else ""
            )
        )
    last = reply.get("last")
    if not last:
        print("no question answered yet")
        return 0
    print(f"last:    {last['time']} ({last['kind']})")
    print(f"  question: {last['question']}")
    print(f"  answer:   {last['answer'] if last['answer'] is not None else '(none: ' + str(last.get('error')) + ')'}")
    for stage, seconds in last["durations_s"].items():
        unit = "tokens/s" if stage.endswith("_per_s") else "s"
        print(f"  {stage:<24} {seconds:9.3f} {unit}")
    return 0


_STATUS_KEYS = {
    "state": str,
    "mode": str,
    "ready": bool,
    "uptime_s": int | float,
    "interactions": int,
    "models": dict,
    "last": dict | None,
}
_LAST_KEYS = {"time": str, "kind": str, "question": str | None, "answer": str | None, "durations_s": dict}


def _status_reply(path: Path, line: str) -> dict:
    """The daemon's status reply, checked: anything else on the socket is one clear error, not a traceback."""
    from edgevision.errors import DeviceError

    def wrong(why: str) -> DeviceError:
        return DeviceError(
            f"{path} answered `status` with {why}, not edgevision's status — is it edgevision's "
            "control socket, and the same version as this command? (check --socket)"
        )

    try:
        reply = json.loads(line)
    except ValueError:
        raise wrong(f"{line[:40]!r}" if line else "nothing") from None
    if not isinstance(reply, dict):
        raise wrong(f"a JSON {type(reply).__name__}")
    for keys, where in ((_STATUS_KEYS, reply), (_LAST_KEYS, reply.get("last"))):
        for key, kind in keys.items() if where is not None else ():
            if not isinstance(where.get(key), kind):
                raise wrong(f"no {key!r}" if key not in where else f"a {key!r} that is {type(where[key]).__name__}")
    if reply["last"] and not all(isinstance(v, int | float) for v in reply["last"]["durations_s"].values()):
        raise wrong("durations that are not numbers")
    return reply


def _cmd_button(args: argparse.Namespace) -> int:
    from edgevision.devices.socket_button import send_button

    send_button(_socket_path(args), args.command_line)
    return 0


def _cmd_bench_e2e(args: argparse.Namespace) -> int:
    from edgevision.config import find_config, load_config
    from edgevision.daemon.bench import run_e2e
    from edgevision.daemon.versus import PeerModels
    from edgevision.errors import EdgevisionError
    from edgevision.logs import configure_logging

    path = find_config(args.config)
    config = load_config(path)
    configure_logging("warning", args.debug)
    if args.decoder is not None:
        if not args.decoder.is_file():
            raise EdgevisionError(f"bench e2e: decoder {args.decoder} not found")
        config = dataclasses.replace(
            config, decoder=dataclasses.replace(config.decoder, model=args.decoder.resolve(), chat_format="auto")
        )
    if args.pause < 0:
        raise EdgevisionError("bench e2e: --pause must be 0 or more seconds")
    if args.cold < 0 or (args.cold and not args.peer):
        raise EdgevisionError("bench e2e: --cold N needs --peer and N of 0 or more")
    for wav in args.audio or []:
        if not wav.is_file():
            raise EdgevisionError(f"bench e2e: recorded question {wav} not found")
    peer = None
    if args.peer:
        mmproj = args.mmproj or Path(config.vision.tower).parent / "mmproj-gemma3-270m.gguf"
        peer = PeerModels(mmproj=mmproj, tower=mmproj.with_suffix(".onnx"))
    report = run_e2e(
        config,
        n=args.interactions,
        images=args.image,
        pause=args.pause,
        audio=args.audio,
        peer=peer,
        cold=args.cold,
        config_path=path,
    )
    print(report.table())
    if args.json:
        records = {"warm": report.records, "cold": report.cold} if args.peer else report.records
        args.json.write_text(json.dumps(records, indent=1), encoding="utf-8")
        print(f"records: {args.json}")
    return 0


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from edgevision.config import find_config, load_config
    from edgevision.daemon.soak import run_soak
    from edgevision.errors import EdgevisionError
    from edgevision.logs import configure_logging

    config = load_config(find_config(args.config))
    configure_logging("warning", args.debug)
    if args.tokens < 1:
        raise EdgevisionError("bench soak: --tokens must be at least 1")
    report = run_soak(config, n=args.answers, tokens=args.tokens)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1), encoding="utf-8")
        print(f"samples: {args.json}")
    return 0
