"""`edgevision devices`: what cameras, sound devices, buttons and monitors this machine has, as edgevision sees them.

For setting up a board: which camera index, which sound device name, whether OpenCV can open a CSI camera,
whether power and GPU memory can be measured. `--snapshot PATH` saves a frame from the configured camera,
to aim it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

_CONFIG_HELP = "config file (default: $EDGEVISION_CONFIG, then /etc/edgevision/config.yaml)"


def add_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    devices = sub.add_parser("devices", help="list the cameras, sound devices, buttons and power monitors found here")
    devices.add_argument("--json", action="store_true", help="print the findings as JSON")
    devices.add_argument("--snapshot", type=Path, help="save a frame from the configured camera to this image file")
    devices.add_argument("--config", help=_CONFIG_HELP + "; used by --snapshot")
    devices.set_defaults(func=_cmd_devices)


def survey(root: str | os.PathLike[str] = "/") -> dict[str, Any]:
    """Everything found, as plain data (each part says why it is missing where it is)."""
    base = Path(root)
    return {
        "cameras": sorted(str(p) for p in (base / "dev").glob("video*")),
        "opencv": _opencv(),
        "sound": _sound(),
        "buttons": _buttons(base),
        "power": _power(base),
        "gpu_memory": _gpu_memory(base),
    }


def _opencv() -> dict[str, Any]:
    if importlib.util.find_spec("cv2") is None:
        return {"available": False, "reason": "cv2 not installed (pip install opencv-python-headless)"}
    from edgevision.devices.opencv_camera import has_gstreamer, import_cv2

    cv2 = import_cv2()
    return {"available": True, "version": cv2.__version__, "gstreamer": has_gstreamer(cv2)}


def _sound() -> dict[str, Any]:
    from edgevision.devices.portaudio import import_sounddevice
    from edgevision.errors import MissingDependencyError

    try:
        sd = import_sounddevice()
    except MissingDependencyError as error:
        return {"available": False, "reason": str(error)}
    default_in, default_out = sd.default.device
    devices = []
    for index, info in enumerate(sd.query_devices()):
        devices.append(
            {
                "index": index,
                "name": info["name"],
                "inputs": info["max_input_channels"],
                "outputs": info["max_output_channels"],
                "rate": int(info["default_samplerate"]),
                "default_input": index == default_in,
                "default_output": index == default_out,
            }
        )
    return {"available": True, "devices": devices}


def _buttons(base: Path) -> dict[str, Any]:
    found: dict[str, Any] = {"socket": True}
    if importlib.util.find_spec("evdev") is None:
        found["evdev"] = "python-evdev not installed (pip install edgevision[evdev])"
    else:
        import evdev

        keys = []
        for path in evdev.list_devices():
            try:
                with evdev.InputDevice(path) as device:
                    if evdev.ecodes.EV_KEY in device.capabilities():
                        keys.append(f"{path} ({device.name})")
            except OSError:
                continue
        found["evdev"] = keys or "no input device with keys (or no access: add the user to 'input')"
    chips = sorted(str(p) for p in (base / "dev").glob("gpiochip*"))
    jetson = importlib.util.find_spec("Jetson") is not None
    found["gpio"] = {"chips": chips, "jetson_gpio": jetson}
    return found


def _power(base: Path) -> dict[str, Any]:
    from edgevision.telemetry.power import detect_power_reader

    reader = detect_power_reader(base)
    try:
        sample = reader.read()
        if sample is None and reader.name == "rapl":  # a rate: read twice
            import time

            time.sleep(0.2)
            sample = reader.read()
    finally:
        reader.close()
    if sample is None:
        return {"reader": reader.name, "reason": getattr(reader, "reason", "no reading yet")}
    return {"reader": reader.name, "watts": {k: round(v, 3) for k, v in sample.watts.items()}}


def _gpu_memory(base: Path) -> dict[str, Any]:
    from edgevision.telemetry.memory import meminfo, nvmap_clients

    clients = nvmap_clients(base)
    if clients is not None:
        return {"source": "nvmap-clients", "total_mb": round(clients.get("total", 0) / 1024, 1)}
    info = meminfo(base)
    if "NvMapMemUsed" in info:
        return {"source": "NvMapMemUsed", "total_mb": round(info["NvMapMemUsed"] / 1024, 1)}
    return {"source": "unavailable", "reason": "no NvMap here (not a Jetson)"}


def _cmd_devices(args: argparse.Namespace) -> int:
    image_format = _snapshot_format(args.snapshot) if args.snapshot else None  # a bad path fails before the survey
    found = survey()
    if args.snapshot:
        found["snapshot"] = _snapshot(args, image_format)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(render(found))
    return 0


def _snapshot_format(path: Path) -> str:
    """The image format for the snapshot's file name, once the path is known to be writable."""
    from PIL import Image

    from edgevision.errors import InputError
    from edgevision.files import check_output

    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise InputError(f"--snapshot {path}: name the file .jpg or .png, so its format is known")
    check_output(path, what="--snapshot")
    return image_format


def _snapshot(args: argparse.Namespace, image_format: str) -> str:
    from edgevision.config import find_config, load_config
    from edgevision.devices.backends import open_configured_camera
    from edgevision.devices.camera import take_frame
    from edgevision.files import atomic_write

    devices = load_config(find_config(args.config)).devices
    camera = open_configured_camera(devices)
    try:
        frame = take_frame(camera)
    finally:
        camera.close()
    with atomic_write(args.snapshot) as file:
        frame.image.save(file, format=image_format)
    source = getattr(devices.camera.options, "source", "")
    return f"{args.snapshot} ({frame.image.width}x{frame.image.height}, {devices.camera.kind} {source})"


def render(found: dict[str, Any]) -> str:
    """The survey as a few aligned lines."""
    lines = []
    cameras = found["cameras"]
    lines.append(("cameras", ", ".join(cameras) if cameras else "none (/dev/video* is empty)"))
    cv = found["opencv"]
    if cv["available"]:
        gst = "yes" if cv["gstreamer"] else "no — CSI cameras need JetPack's OpenCV"
        lines.append(("opencv", f"{cv['version']}, GStreamer: {gst}"))
    else:
        lines.append(("opencv", cv["reason"]))
    sound = found["sound"]
    if not sound["available"]:
        lines.append(("sound", sound["reason"]))
    else:
        for kind, key, default in (
            ("microphones", "inputs", "default_input"),
            ("speakers", "outputs", "default_output"),
        ):
            names = [
                f"[{d['index']}] {d['name']} ({d['rate']} Hz){' *default' if d[default] else ''}"
                for d in sound["devices"]
                if d[key] > 0
            ]
            lines.append((kind, "; ".join(names) or "none"))
    buttons = found["buttons"]
    evdev = buttons["evdev"]
    lines.append(("evdev keys", evdev if isinstance(evdev, str) else "; ".join(evdev)))
    gpio = buttons["gpio"]
    chips = ", ".join(gpio["chips"]) or "no /dev/gpiochip*"
    lines.append(("gpio", f"{chips}; Jetson.GPIO {'installed' if gpio['jetson_gpio'] else 'not installed'}"))
    power = found["power"]
    if "watts" in power:
        lines.append(("power", f"{power['reader']}: " + ", ".join(f"{k} {v:.2f} W" for k, v in power["watts"].items())))
    else:
        lines.append(("power", f"{power['reader']}: {power['reason']}"))
    gpu = found["gpu_memory"]
    lines.append(("gpu memory", f"{gpu['source']}: {gpu['total_mb']} MiB" if "total_mb" in gpu else gpu["reason"]))
    if "snapshot" in found:
        lines.append(("snapshot", found["snapshot"]))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name + ':':<{width + 1}} {text}" for name, text in lines)
