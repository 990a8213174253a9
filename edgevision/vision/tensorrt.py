"""Vision tower on TensorRT: the board's GPU path (JetPack 6.1/6.2's TensorRT 10.3; JetPack 6.0's 8.6 too).

`TensorRTEncoder` loads a plan built by `make engines`, after `engines.check_manifest` has compared the
plan's manifest with this machine's GPU and TensorRT and with the ONNX tower's current sha256. It owns
the CUDA context (the device's primary context, which TensorRT's runtime also uses), the engine, the
execution context, one stream and the buffers — pinned host buffers and device buffers, allocated once —
and frees them in `close()`. I/O is by tensor name (`get_tensor_name`, `get_tensor_mode`,
`set_tensor_address`) and inference is `execute_async_v3` on the one stream; both exist from TensorRT 8.5.
The encoder runs a few warm-up inferences before it reports ready.

`build_plan` is what `make engines` calls (tools/build_engines.py): ONNX → serialized plan, FP16 through
the builder flag (TensorRT 8.6 and 10), INT8 from a Q/DQ ONNX through a strongly typed network (TensorRT
10; on 8.6, the INT8 and FP16 flags with the same Q/DQ network). Progress is shown through a
`trt.IProgressMonitor` where TensorRT has one (10.0+), else per step.

`tensorrt` and `pycuda` are imported here and nowhere else.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import EdgevisionError, InputError, MissingDependencyError, ModelError
from edgevision.vision import engines
from edgevision.vision.engines import Platform, TensorInfo, check_manifest, read_manifest, resolve_plan

logger = logging.getLogger(__name__)
trt_logger = logging.getLogger(__name__ + ".trt")

WARMUP_RUNS = 3

HOW_TO_GET = (
    "on a Jetson, TensorRT's Python bindings come with JetPack (sudo apt install python3-libnvinfer; make the "
    "virtual environment with 'python3 -m venv --system-site-packages .venv' so it sees them) and pycuda with "
    "\"pip install -e '.[jetson]'\" (or pip install pycuda, with /usr/local/cuda/bin on PATH); elsewhere set "
    "vision.backend: onnxruntime"
)


def _require():
    """Import tensorrt and pycuda.driver, or say what is missing and how to get it."""
    missing = [name for name in ("tensorrt", "pycuda") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"the tensorrt vision back-end needs {' and '.join(missing)}: {HOW_TO_GET}")
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:  # installed, but its native library (libnvinfer, libcuda) is not loadable
        raise MissingDependencyError(
            f"the tensorrt vision back-end cannot load its libraries ({exc}): {HOW_TO_GET}"
        ) from exc
    return trt, cuda


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _make_logger(trt):
    """A trt.ILogger that sends TensorRT's messages into Python logging at the matching level."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG - 5,
    }

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            level = levels.get(severity, logging.WARNING)
            if level >= logging.ERROR:
                self.errors.append(str(msg))
            trt_logger.log(level, "%s", msg)

    return Logger()


def _init_cuda(cuda):
    """Initialise the CUDA driver and pick device 0, with a clear error where there is no GPU."""
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            raise MissingDependencyError("the tensorrt vision back-end needs a CUDA GPU; none was found")
        return cuda.Device(0)
    except cuda.Error as exc:
        raise MissingDependencyError(
            f"the tensorrt vision back-end cannot use CUDA ({exc}); check the GPU driver, or set "
            "vision.backend: onnxruntime"
        ) from exc


def running_platform() -> Platform:
    """This machine's TensorRT version and GPU, as a manifest records them."""
    trt, cuda = _require()
    device = _init_cuda(cuda)
    major, minor = device.compute_capability()
    return Platform(tensorrt_version=trt.__version__, gpu_name=device.name(), compute_capability=f"{major}.{minor}")


def _dims(dims) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


class TensorRTEncoder:
    """One TensorRT engine over one plan, with its execution context, CUDA stream and buffers.

    `tower_or_plan` is the plan (engines/NAME.plan) or the ONNX tower whose FP16 plan sits beside it.
    `threads` is accepted for the `VisionEncoder` interface; the GPU does the work.
    """

    def __init__(self, tower_or_plan: str | Path, *, threads: int = 0, warmup: int = WARMUP_RUNS) -> None:
        del threads
        trt, cuda = _require()
        self._cuda = cuda
        self.plan = resolve_plan(tower_or_plan)
        self.manifest = read_manifest(self.plan)
        self.spec = self.manifest.spec
        device = _init_cuda(cuda)
        major, minor = device.compute_capability()
        self.platform = Platform(trt.__version__, device.name(), f"{major}.{minor}")
        check_manifest(self.plan, self.manifest, self.platform)  # raises before anything is loaded

        self._lock = threading.Lock()
        self._ctx = None
        self._engine = None
        self._context = None
        self._runtime = None
        self._stream = None
        self._device_buffers: list = []
        self._host_buffers: list[np.ndarray] = []
        self.warmup_runs = 0
        self._ctx = device.retain_primary_context()
        self._ctx.push()
        try:
            self._load(trt, cuda)
            self._warm_up(warmup)
        except BaseException:
            self._release()
            cuda.Context.pop()
            self._ctx.detach()
            self._ctx = None
            raise
        cuda.Context.pop()
        logger.info(
            "TensorRT %s plan %s on %s ready (%s, %d warm-up runs)",
            self.manifest.precision,
            self.plan.name,
            self.platform.gpu_name,
            self.spec,
            self.warmup_runs,
        )

    # --- loading ------------------------------------------------------------------------------------------

    def _load(self, trt, cuda) -> None:
        self._trt_logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._trt_logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self._engine is None:
            detail = "; ".join(self._trt_logger.errors[-2:]) or "TensorRT gave no reason"
            raise ModelError(f"TensorRT cannot load plan {self.plan} ({detail}); run 'make engines' to rebuild it")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ModelError(f"TensorRT cannot create an execution context for {self.plan} (out of GPU memory?)")
        self._stream = cuda.Stream()

        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            mode = self._engine.get_tensor_mode(name)
            (inputs if mode == trt.TensorIOMode.INPUT else outputs).append(name)
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"{self.plan}: a vision tower has one input and one output, this plan has {inputs} → {outputs}"
            )
        self._input, self._output = inputs[0], outputs[0]

        # Fix the input shape (a dynamic batch is built with a profile of exactly 1) before reading the output's.
        size = self.spec.image_size
        input_shape = (1, 3, size, size)
        if -1 in _dims(self._engine.get_tensor_shape(self._input)):
            if not self._context.set_input_shape(self._input, input_shape):
                raise ModelError(f"{self.plan}: cannot set input {self._input} to shape {input_shape}")
        elif _dims(self._engine.get_tensor_shape(self._input)) != input_shape:
            raise ModelError(
                f"{self.plan}: input {self._input} is {_dims(self._engine.get_tensor_shape(self._input))}, "
                f"its manifest's preprocessing gives {input_shape}; run 'make engines' to rebuild it"
            )
        output_shape = _dims(self._context.get_tensor_shape(self._output))
        if int(np.prod(output_shape)) != self.spec.n_tokens * self.spec.n_embd:
            raise ModelError(
                f"{self.plan}: output {self._output} is {output_shape}, expected {self.spec.n_tokens} × "
                f"{self.spec.n_embd} rows; run 'make engines' to rebuild it"
            )

        for name, shape in ((self._input, input_shape), (self._output, output_shape)):
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            host = cuda.pagelocked_empty(shape, dtype)
            device_mem = cuda.mem_alloc(host.nbytes)
            self._host_buffers.append(host)
            self._device_buffers.append(device_mem)
            if not self._context.set_tensor_address(name, int(device_mem)):
                raise ModelError(f"{self.plan}: TensorRT refused the buffer address for tensor {name}")
        self._host_in, self._host_out = self._host_buffers
        self._dev_in, self._dev_out = self._device_buffers

    def _warm_up(self, runs: int) -> None:
        """The first inferences pick kernels and page in weights; run them before reporting ready."""
        rng = np.random.default_rng(0)
        pixels = rng.standard_normal(self._host_in.shape).astype(np.float32)
        for _ in range(runs):
            t = time.perf_counter()
            self._infer(pixels)
            logger.debug("warm-up inference %.1f ms", (time.perf_counter() - t) * 1e3)
            self.warmup_runs += 1

    # --- inference ----------------------------------------------------------------------------------------

    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        """One inference; the CUDA context must be current on this thread."""
        cuda = self._cuda
        np.copyto(self._host_in, pixels, casting="same_kind")
        cuda.memcpy_htod_async(self._dev_in, self._host_in, self._stream)
        if not self._context.execute_async_v3(self._stream.handle):
            raise ModelError(f"TensorRT inference failed on {self.plan}; see the log for TensorRT's reason")
        cuda.memcpy_dtoh_async(self._host_out, self._dev_out, self._stream)
        self._stream.synchronize()
        return np.array(self._host_out, dtype=np.float32).reshape(self.spec.n_tokens, self.spec.n_embd)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) float32 → (n_tokens, n_embd) float32; safe to call from any one thread at a time."""
        if self._context is None:
            raise ModelError("the TensorRT vision encoder is closed")
        if pixels.shape != self._host_in.shape:
            raise ModelError(f"{self.plan}: expected pixels of shape {self._host_in.shape}, got {pixels.shape}")
        with self._lock:
            self._ctx.push()
            try:
                return self._infer(pixels)
            finally:
                self._cuda.Context.pop()

    # --- closing ------------------------------------------------------------------------------------------

    def _release(self) -> None:
        """Free in reverse order of creation; the CUDA context must be current."""
        self._context = None
        self._engine = None
        self._runtime = None
        for buffer in self._device_buffers:
            buffer.free()
        for host in self._host_buffers:
            base = host.base
            if hasattr(base, "free"):
                base.free()
        self._device_buffers, self._host_buffers = [], []
        self._stream = None

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

    def __enter__(self) -> TensorRTEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- building plans (make engines) --------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltPlan:
    """What `build_plan` made, for the manifest."""

    platform: Platform
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    build_flags: tuple[str, ...]
    seconds: float


def _make_progress_monitor(trt, say: Callable[[str], None]):
    """A trt.IProgressMonitor printing each builder phase and its steps (None before TensorRT 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT may call from several threads
            self._steps: dict[str, int] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
                self._depth[phase_name] = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                if self._depth[phase_name] <= 1:
                    say(f"{'  ' * self._depth[phase_name]}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step) -> bool:
            with self._lock:
                total = self._steps.get(phase_name, 0)
                if self._depth.get(phase_name, 0) == 0 and total > 1:
                    say(f"  {phase_name}: step {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)
                self._depth.pop(phase_name, None)

    return Monitor()


def build_plan(
    onnx_path: str | Path,
    plan_out: str | Path,
    *,
    precision: str,
    image_size: int,
    workspace_mib: int = 1024,
    say: Callable[[str], None] = print,
) -> BuiltPlan:
    """Build a serialized TensorRT plan from an ONNX tower (for INT8, a Q/DQ ONNX) and write it atomically."""
    trt, cuda = _require()
    device = _init_cuda(cuda)
    major, minor = device.compute_capability()
    platform = Platform(trt.__version__, device.name(), f"{major}.{minor}")
    started = time.perf_counter()
    log = _make_logger(trt)
    ctx = device.retain_primary_context()
    ctx.push()
    try:
        builder = trt.Builder(log)
        flags = 0
        build_flags: list[str] = []
        if _major(trt) < 10:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        strongly_typed = precision == "int8" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            build_flags.append("STRONGLY_TYPED")
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, log)
        say(f"parsing {onnx_path}")
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors or 'no reason given'}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        if precision == "fp16":
            if not hasattr(trt.BuilderFlag, "FP16"):
                raise ModelError(f"TensorRT {trt.__version__} has no FP16 builder flag; export an FP16 ONNX tower")
            config.set_flag(trt.BuilderFlag.FP16)
            build_flags.append("FP16")
        elif not strongly_typed:  # TensorRT 8.6: explicit quantization from the Q/DQ network, FP16 elsewhere
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
            build_flags += ["INT8", "FP16"]

        # A dynamic batch gets a profile of exactly one image, which is all the encoder ever runs.
        profile = None
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = _dims(tensor.shape)
            if -1 in shape:
                fixed = tuple(d if d != -1 else (1 if axis == 0 else image_size) for axis, d in enumerate(shape))
                profile = profile or builder.create_optimization_profile()
                profile.set_shape(tensor.name, fixed, fixed, fixed)
        if profile is not None:
            config.add_optimization_profile(profile)

        monitor = _make_progress_monitor(trt, say)
        if monitor is not None:
            config.progress_monitor = monitor
        say(
            f"building {precision} plan for {platform.gpu_name} (sm {platform.compute_capability}), "
            f"TensorRT {platform.tensorrt_version}; this takes minutes on a Jetson"
        )
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            detail = "; ".join(log.errors[-3:]) or "see the log"
            raise ModelError(f"TensorRT could not build a plan from {onnx_path}: {detail}")

        def infos(count: int, get) -> tuple[TensorInfo, ...]:
            out = []
            for i in range(count):
                t = get(i)
                shape = tuple(
                    d if d != -1 else (1 if axis == 0 else image_size) for axis, d in enumerate(_dims(t.shape))
                )
                out.append(TensorInfo(t.name, shape, np.dtype(trt.nptype(t.dtype)).name))
            return tuple(out)

        inputs = infos(network.num_inputs, network.get_input)
        outputs = infos(network.num_outputs, network.get_output)
        plan_out = Path(plan_out)
        tmp = plan_out.with_name(plan_out.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(serialized)
        tmp.replace(plan_out)
    finally:
        cuda.Context.pop()
        ctx.detach()
    return BuiltPlan(platform, inputs, outputs, tuple(build_flags), time.perf_counter() - started)


def build_engine(
    onnx: str | Path,
    *,
    precision: str = "fp16",
    calibration: Sequence[Path] = (),
    workspace_mib: int = 1024,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """What `make engines` does for one ONNX tower: its plan and manifest beside it, unless both are current.

    For INT8 the tower is first quantized to a Q/DQ ONNX on the calibration images. Returns the plan's path.
    """
    onnx = Path(onnx)
    plan = engines.plan_path(onnx, precision)
    running = running_platform()
    if plan.is_file() and not force:
        try:
            check_manifest(plan, read_manifest(plan), running)
            say(f"{plan.name} is up to date")
            return plan
        except EdgevisionError as exc:
            say(f"rebuilding: {exc}")
    spec = engines.onnx_tower_spec(onnx)
    onnx_sha = engines.sha256_file(onnx)
    source, extra, qdq_sha = onnx, {}, ""
    if precision == "int8":
        if not calibration:
            raise InputError("INT8 needs calibration images: put JPEG/PNG photos in calibration/")
        source, fidelity = engines.quantize_with_report(onnx, calibration, say=say)
        extra["qdq_min_cosine_vs_fp32"] = round(fidelity, 6)
        qdq_sha = engines.sha256_file(source)
    built = build_plan(
        source, plan, precision=precision, image_size=spec.image_size, workspace_mib=workspace_mib, say=say
    )
    manifest = engines.Manifest(
        platform=built.platform,
        onnx=os.path.relpath(onnx, plan.parent),
        onnx_sha256=onnx_sha,
        precision=precision,
        inputs=built.inputs,
        outputs=built.outputs,
        build_flags=built.build_flags,
        spec=spec,
        built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(built.seconds, 1),
        quantized_onnx_sha256=qdq_sha,
        calibration_images=len(calibration) if precision == "int8" else 0,
        extra=extra,
    )
    engines.write_manifest(plan, manifest)
    say(
        f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB, {built.seconds:.0f} s) and {engines.manifest_path(plan).name}"
    )
    return plan
