"""The OCR networks on TensorRT: the board's GPU path.

`make engines` (tools/build_engines.py --ocr) builds one FP16 plan per network into a folder
(engines/ppocrv5/: det.plan, cls.plan, rec.plan, each with its manifest, the ONNX it was built from and
dict.txt). The networks take images of varying size, so each plan has one optimization profile spanning
the shapes `edgevision.ocr.reader` sends (`PROFILES`); the recogniser's widest line is capped at the
profile's width (`max_rec_width`, which the reader honours).

`TensorRTOcr` checks each plan's manifest against this machine's GPU and TensorRT and the ONNX's sha256
(the vision tower's guard, `edgevision.vision.engines.check_manifest`) before anything is loaded, owns the
engines, contexts, one stream and device buffers sized for the largest shapes, and frees them in `close()`.

`tensorrt` and `pycuda` are imported only through `edgevision.vision.tensorrt`'s helpers, at construction.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgevision.errors import EdgevisionError, ModelError
from edgevision.ocr.models import DICT_FILE, STAGES, model_files
from edgevision.vision import engines
from edgevision.vision.preprocess import TowerSpec

logger = logging.getLogger(__name__)

# stage → (min, opt, max) input shapes, NCHW: what the reader sends (batches of up to 6 lines)
PROFILES = {
    "det": ((1, 3, 32, 32), (1, 3, 544, 960), (1, 3, 960, 960)),
    "cls": ((1, 3, 48, 192), (6, 3, 48, 192), (6, 3, 48, 192)),
    "rec": ((1, 3, 48, 320), (6, 3, 48, 640), (6, 3, 48, 1920)),
}


def _spec(stage: str) -> TowerSpec:
    """The manifest's preprocessing record for an OCR plan (the reader does its own preprocessing; this keeps
    one manifest format and guard for every plan)."""
    largest = PROFILES[stage][2]
    return TowerSpec(image_size=largest[-1], n_tokens=1, n_embd=1, resize="squash", source=f"ppocrv5:{stage}")


class TensorRTOcr:
    """The three OCR plans of one folder, on the GPU."""

    def __init__(self, directory: str | Path, *, threads: int = 0) -> None:
        del threads  # the GPU does the work
        from edgevision.vision.tensorrt import _init_cuda, _make_logger, _require

        trt, cuda = _require()
        self._cuda = cuda
        self.directory = Path(directory)
        device = _init_cuda(cuda)
        major, minor = device.compute_capability()
        running = engines.Platform(trt.__version__, device.name(), f"{major}.{minor}")
        plans = {}
        for stage in STAGES:
            plan = self.directory / f"{stage}.plan"
            if not plan.is_file():
                raise ModelError(f"no TensorRT plan {plan}; run 'make engines' on this board")
            engines.check_manifest(plan, engines.read_manifest(plan), running)  # raises before loading
            plans[stage] = plan
        if not (self.directory / DICT_FILE).is_file():
            raise ModelError(f"{self.directory} has no {DICT_FILE}; run 'make engines' again")
        self.max_rec_width = PROFILES["rec"][2][3]
        self._lock = threading.Lock()
        self._stages: dict[str, tuple] = {}
        self._buffers: list = []
        self._log = _make_logger(trt)
        self._ctx = device.retain_primary_context()
        self._ctx.push()
        try:
            self._runtime = trt.Runtime(self._log)
            self._stream = cuda.Stream()
            for stage, plan in plans.items():
                self._stages[stage] = self._load(trt, cuda, stage, plan)
        except BaseException:
            self._release()
            cuda.Context.pop()
            self._ctx.detach()
            self._ctx = None
            raise
        cuda.Context.pop()
        logger.info("TensorRT OCR plans in %s ready on %s", self.directory, running.gpu_name)

    def _load(self, trt, cuda, stage: str, plan: Path) -> tuple:
        engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            detail = "; ".join(self._log.errors[-2:]) or "TensorRT gave no reason"
            raise ModelError(f"TensorRT cannot load plan {plan} ({detail}); run 'make engines' to rebuild it")
        context = engine.create_execution_context()
        if context is None:
            raise ModelError(f"TensorRT cannot create an execution context for {plan} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{plan}: an OCR network has one input and one output, this plan has {names}")
        largest = PROFILES[stage][2]
        if not context.set_input_shape(inputs[0], largest):
            raise ModelError(f"{plan}: cannot set input {inputs[0]} to {largest}; run 'make engines' to rebuild it")
        out_largest = tuple(int(d) for d in context.get_tensor_shape(outputs[0]))
        buffers = []
        for name, shape in ((inputs[0], largest), (outputs[0], out_largest)):
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(int(np.prod(shape)), dtype)
            device_mem = cuda.mem_alloc(host.nbytes)
            self._buffers.append((host, device_mem))
            if not context.set_tensor_address(name, int(device_mem)):
                raise ModelError(f"{plan}: TensorRT refused the buffer address for tensor {name}")
            buffers.append((host, device_mem))
        return engine, context, inputs[0], outputs[0], buffers

    def run(self, stage: str, batch: np.ndarray) -> np.ndarray:
        if self._ctx is None:
            raise ModelError("the TensorRT OCR back-end is closed")
        engine, context, name_in, name_out, ((host_in, dev_in), (host_out, dev_out)) = self._stages[stage]
        del engine
        cuda = self._cuda
        with self._lock:
            self._ctx.push()
            try:
                if not context.set_input_shape(name_in, tuple(batch.shape)):
                    raise ModelError(f"TensorRT OCR {stage}: input shape {batch.shape} is outside the plan's profile")
                out_shape = tuple(int(d) for d in context.get_tensor_shape(name_out))
                n_in, n_out = batch.size, int(np.prod(out_shape))
                np.copyto(host_in[:n_in], batch.ravel(), casting="same_kind")
                cuda.memcpy_htod_async(dev_in, host_in[:n_in], self._stream)
                if not context.execute_async_v3(self._stream.handle):
                    raise ModelError(f"TensorRT OCR {stage} inference failed; see the log for TensorRT's reason")
                cuda.memcpy_dtoh_async(host_out[:n_out], dev_out, self._stream)
                self._stream.synchronize()
                return np.array(host_out[:n_out], dtype=np.float32).reshape(out_shape)
            finally:
                cuda.Context.pop()

    def _release(self) -> None:
        self._stages = {}
        for host, device_mem in self._buffers:
            device_mem.free()
            if hasattr(host.base, "free"):
                host.base.free()
        self._buffers = []
        self._stream = None
        self._runtime = None

    def close(self) -> None:
        if self._ctx is None:
            return
        with self._lock:
            self._ctx.push()
            try:
                if self._stream is not None:
                    self._stream.synchronize()
                self._release()
            finally:
                self._cuda.Context.pop()
                self._ctx.detach()
                self._ctx = None

    def __enter__(self) -> TensorRTOcr:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- building plans (make engines) --------------------------------------------------------------------------


def _build_plan(onnx: Path, plan: Path, stage: str, *, workspace_mib: int, say: Callable[[str], None]):
    """ONNX → FP16 plan with the stage's optimization profile, written atomically."""
    from edgevision.vision.tensorrt import (
        BuiltPlan,
        _init_cuda,
        _major,
        _make_logger,
        _make_progress_monitor,
        _require,
    )

    trt, cuda = _require()
    device = _init_cuda(cuda)
    major, minor = device.compute_capability()
    platform = engines.Platform(trt.__version__, device.name(), f"{major}.{minor}")
    started = time.perf_counter()
    log = _make_logger(trt)
    ctx = device.retain_primary_context()
    ctx.push()
    try:
        builder = trt.Builder(log)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if _major(trt) < 10 else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, log)
        say(f"parsing {onnx}")
        if not parser.parse_from_file(str(onnx)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse {onnx}: {errors or 'no reason given'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape(network.get_input(0).name, *PROFILES[stage])
        config.add_optimization_profile(profile)
        monitor = _make_progress_monitor(trt, say)
        if monitor is not None:
            config.progress_monitor = monitor
        say(f"building the fp16 {stage} plan for {platform.gpu_name} (sm {platform.compute_capability})")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError(
                f"TensorRT could not build a plan from {onnx}: {'; '.join(log.errors[-3:]) or 'see the log'}"
            )
        tensor_in, tensor_out = network.get_input(0), network.get_output(0)
        inputs = (engines.TensorInfo(tensor_in.name, PROFILES[stage][2], "float32"),)
        outputs = (engines.TensorInfo(tensor_out.name, tuple(int(d) for d in tensor_out.shape), "float32"),)
        tmp = plan.with_name(plan.name + ".tmp")
        tmp.write_bytes(serialized)
        tmp.replace(plan)
    finally:
        cuda.Context.pop()
        ctx.detach()
    return BuiltPlan(platform, inputs, outputs, ("FP16", f"profile:{PROFILES[stage]}"), time.perf_counter() - started)


def build_plans(
    models: str | Path,
    out: str | Path,
    *,
    workspace_mib: int = 1024,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """What `make engines` does for the OCR models: their ONNX and dictionary copied into `out`, and beside
    each ONNX its plan and manifest, unless both are current. Returns `out` (what `ocr.models` names)."""
    from edgevision.vision.tensorrt import running_platform

    files = model_files(models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files["dict"], out / DICT_FILE)
    running = running_platform()
    for stage in STAGES:
        onnx = out / f"{stage}.onnx"
        if not onnx.is_file() or engines.sha256_file(onnx) != engines.sha256_file(files[stage]):
            shutil.copyfile(files[stage], onnx)
        plan = out / f"{stage}.plan"
        if plan.is_file() and not force:
            try:
                engines.check_manifest(plan, engines.read_manifest(plan), running)
                say(f"{plan} is up to date")
                continue
            except EdgevisionError as exc:
                say(f"rebuilding: {exc}")
        built = _build_plan(onnx, plan, stage, workspace_mib=workspace_mib, say=say)
        engines.write_manifest(
            plan,
            engines.Manifest(
                platform=built.platform,
                onnx=os.path.relpath(onnx, plan.parent),
                onnx_sha256=engines.sha256_file(onnx),
                precision="fp16",
                inputs=built.inputs,
                outputs=built.outputs,
                build_flags=built.build_flags,
                spec=_spec(stage),
                built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                build_seconds=round(built.seconds, 1),
            ),
        )
        say(f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB, {built.seconds:.0f} s)")
    return out
