"""Build TensorRT plans from the ONNX vision towers in engines/ (what `make engines` runs).

For each `engines/NAME.onnx` this writes `engines/NAME.plan` (FP16, the default) or, with
`--precision int8`, first a Q/DQ copy `engines/NAME.int8.qdq.onnx` calibrated on the images in
calibration/ (ONNX Runtime, on the CPU) and then `engines/NAME.int8.plan` from it (explicit quantization).
Beside each plan goes its manifest, `NAME[.int8].manifest.json`: TensorRT version, GPU, compute capability,
the ONNX's sha256, precision, I/O tensors, builder flags, the tower's preprocessing and the build time.
A plan whose manifest still matches this machine and its ONNX is left alone (use --force to rebuild).

`--tower PATH` links an ONNX tower into engines/ first (make engines passes the synthetic towers that
`make models` makes). `--ocr DIR` also builds FP16 plans for the OCR models in DIR (det, cls, rec; each with
an optimization profile over the shapes the reader sends) into engines/ppocrv5/, under the same manifest
guard: set `ocr.backend: tensorrt` and `ocr.models: ../engines/ppocrv5` to use them. Where TensorRT is not
installed, nothing is touched and the exit status is 1.

    python tools/build_engines.py                                   # every engines/*.onnx, FP16
    python tools/build_engines.py --precision int8 --calibration calibration
    python tools/build_engines.py --qdq-only --precision int8       # only the Q/DQ ONNX (no TensorRT needed)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgevision.errors import EdgevisionError, InputError, ModelError
from edgevision.vision import engines

ROOT = Path(__file__).resolve().parent.parent


def say(message: str) -> None:
    print(f"make engines: {message}", flush=True)


def tensorrt_missing() -> str | None:
    """Why plans cannot be built here, or None."""
    missing = [name for name in ("tensorrt", "pycuda") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed, so no TensorRT plan can be built on this machine "
        "(plans are built on the board they run on: a Jetson with JetPack 6, in a venv made with "
        "--system-site-packages, plus pip install pycuda). Nothing in engines/ was changed. "
        "Elsewhere use vision.backend: onnxruntime."
    )


def link_towers(towers: list[Path], folder: Path) -> None:
    """Put each given ONNX tower into engines/ as a relative symlink (kept if already there)."""
    for tower in towers:
        if not tower.is_file():
            say(f"skipping {tower}: not there (run 'make models' to make the synthetic towers)")
            continue
        link = folder / tower.name
        target = Path(os.path.relpath(tower.resolve(), folder.resolve()))
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() and not link.is_symlink():
            say(f"keeping {link} (a file of that name is already in {folder})")
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target)
        say(f"linked {link} → {target}")


def onnx_towers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if not p.name.endswith(".qdq.onnx"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, default=ROOT / "engines", help="folder of ONNX towers and plans")
    parser.add_argument("--tower", type=Path, action="append", default=[], help="ONNX tower to link into it first")
    parser.add_argument("--precision", choices=engines.PRECISIONS, default="fp16")
    parser.add_argument("--calibration", type=Path, default=ROOT / "calibration", help="images for INT8 calibration")
    parser.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT builder workspace")
    parser.add_argument("--force", action="store_true", help="rebuild plans that are up to date")
    parser.add_argument("--qdq-only", action="store_true", help="with --precision int8: only write the Q/DQ ONNX")
    parser.add_argument("--ocr", type=Path, help="OCR model folder (det/cls/rec.onnx, dict.txt) to build plans for")
    args = parser.parse_args(argv)

    if args.qdq_only and args.precision != "int8":
        parser.error("--qdq-only goes with --precision int8")
    if not args.qdq_only:
        why = tensorrt_missing()
        if why:
            print(f"make engines: error: {why}", file=sys.stderr)
            return 1
    try:
        args.engines.mkdir(parents=True, exist_ok=True)
        link_towers(args.tower, args.engines)
        towers = onnx_towers(args.engines)
        if not towers:
            raise ModelError(f"no ONNX towers in {args.engines}: put NAME.onnx there (or pass --tower)")
        images = engines.calibration_images(args.calibration) if args.precision == "int8" else []
        if args.precision == "int8" and not images:
            raise InputError(f"INT8 needs calibration images: put JPEG/PNG photos in {args.calibration}")
        if args.qdq_only:
            for onnx in towers:
                engines.quantize_with_report(onnx, images, say=say)
            return 0
        from edgevision.vision.tensorrt import build_engine, running_platform

        running = running_platform()
        say(f"TensorRT {running.tensorrt_version} on {running.gpu_name} (sm {running.compute_capability})")
        for onnx in towers:
            build_engine(
                onnx,
                precision=args.precision,
                calibration=images,
                workspace_mib=args.workspace_mib,
                force=args.force,
                say=say,
            )
        if args.ocr:
            from edgevision.ocr.tensorrt import build_plans

            build_plans(args.ocr, args.engines / "ppocrv5", workspace_mib=args.workspace_mib, force=args.force, say=say)
    except EdgevisionError as exc:
        print(f"make engines: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
