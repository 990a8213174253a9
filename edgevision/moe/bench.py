"""``edgevision bench moe``: decoding a MoE model that does not fit, side by side.

The model file is first put on storage like the board's, so the VM's disk and its 8 MiB readahead never
decide a result: by default an emulated NVMe (`edgevision.moe.nvme`: a FUSE server that answers each read
request after an NVMe's latency and at its bandwidth, ``read_ahead_kb`` 128), or (``--storage loop``) a loop
device with direct I/O, ext4, ``read_ahead_kb`` 128 and reads throttled to an NVMe's bandwidth but no added
latency (`edgevision.moe.storage`). Each configuration then runs in a fresh child process moved into a
memory-capped cgroup (about 60% of the model file) (and, on the loop device, the storage's blkio cgroup)
before it starts, after the model file has been dropped from the page cache, so every page it reads is charged
to the cap, read from the emulated drive and counted:

- unconstrained: llama.cpp's default mmap, no cap;
- plain mmap under the cap: the kernel's page cache decides what stays;
- expert LRU, router-aware, Belady under the cap: residency policies (`edgevision.moe.policy`) driven by the
  router observer through one harness; Belady's optimal replacement reads the run's routing recorded
  beforehand, so it is the ceiling for any policy's hit rate;
- optionally pruned-to-fit (``--pruned``): the model pruned to fit the cap.

A reference run (unconstrained, not timed) first samples each held-out prompt's continuation (seeded, as a
user's answers are sampled: the synthetic models' greedy text falls into one-token loops), records the
model's top-1 at every step and the routing trace. Every run then decodes the same prompts teacher-forced
along that continuation, so every configuration does the same work and routes the same way, and top-1
agreement is measured position by position. Over the single-token decode steps only, each child measures:
tokens/s (without the time it waited for a CPU: schedstat), major faults (``getrusage``), bytes read from
storage (the emulated NVMe's count of bytes served, or on a loop device ``/proc/self/io`` read_bytes: every
thread's reads, faults and read-ahead included) and the
hit rate: the share of the experts each router chose whose pages were all in RAM at that moment (``mincore``
on the experts' byte ranges), and the share of their pages in RAM. The probe costs decode time, so the hit
rates come from one extra probed run of each capped configuration and everything else from runs without it
(plain mmap runs without the router observer too; the policies need it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgevision.errors import EdgevisionError, ModelError
from edgevision.moe.bench_table import KL_TOKENS, table

logger = logging.getLogger(__name__)

# 'make bench-model': the realistic-routing model (the default) and the static-skew one
DEFAULT_MODEL = "models/bench/gemma4-moe-synthetic-l8-e32k2-up0.1-t16s3p4i0.3c0.3-q8_0.gguf"
STATIC_MODEL = "models/bench/gemma4-moe-synthetic-l8-e32k2-skew0.8-up0.1-q8_0.gguf"
MIB = 2**20


@dataclass(frozen=True)
class RunSpec:
    """One configuration, as handed to the child process (JSON on stdin)."""

    label: str
    model: str
    prompts: list[str]
    tokens: int
    reference: list[list[int]] | None = None  # per prompt, the tokens to feed; None: generate greedily
    # per prompt and step, the reference run's likeliest tokens (their log-probabilities are recorded, for KL);
    # None: record this run's own likeliest KL_TOKENS
    kl_ids: list[list[list[int]]] | None = None
    cap: int | None = None  # the cgroup's limit (for the residency budget)
    profile: str | None = None  # router profile: enables router-aware residency
    headroom: int = 48 * MIB  # left to the page cache and allocations beside the pins
    policy: str | None = None  # a residency policy from edgevision.moe.policy.POLICIES
    probe: bool = False  # measure the hit rate (router observer and mincore on every chosen expert)
    trace: str | None = None  # the recorded routing (for Belady)
    record_trace: str | None = None  # record this run's routing here
    seed: int = 0  # sampling seed of the reference continuations
    read_counter: str | None = None  # the emulated NVMe's served-bytes counter; None: /proc/self/io read_bytes
    n_threads: int = 0
    n_ctx: int = 512


@dataclass
class RunResult:
    label: str
    tokens_per_s: float = 0.0  # decode steps per second of wall time minus time spent waiting for a CPU
    median_tokens_per_s: float = 0.0  # over the repeats (the table's rows are each configuration's best run)
    wall_tokens_per_s: float = 0.0
    faults_per_token: float = 0.0
    decoded: int = 0
    top1: list[list[int]] = field(default_factory=list)
    fed: list[list[int]] = field(default_factory=list)  # the tokens decoded after each top-1 (reference run)
    kl_ids: list[list[list[int]]] = field(default_factory=list)  # the likeliest tokens at each step (reference run)
    logprobs: list[list[list[float]]] = field(default_factory=list)  # their log-probabilities at each step
    hits: int = 0
    accesses: int = 0
    pages_in: int = 0
    pages: int = 0
    read_bytes_per_token: float = 0.0
    notes: str = ""
    error: str = ""
    peak: int | None = None
    rss_anon: int = 0  # the child's anonymous memory at the end (interpreter, llama.cpp buffers, KV cache)


# -- the child ------------------------------------------------------------------------------------


def _cpu_wait() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (schedstat run-queue delay), 0 if the
    kernel does not say."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _bytes_reader(counter: str | None) -> Any:
    """What counts the bytes read from storage: /proc/self/io's read_bytes (block devices; FUSE reads never
    show there), or the emulated NVMe's counter of bytes served (8 bytes in a file it keeps updated)."""
    if counter is None:
        return _read_bytes
    import mmap
    import struct

    with open(counter, "rb") as f:
        view = mmap.mmap(f.fileno(), 8, prot=mmap.PROT_READ)
    return lambda: struct.unpack_from("<Q", view)[0]


def run_config(spec: RunSpec) -> RunResult:
    """Decode `spec.prompts` in this process (the child) and measure."""
    from contextlib import ExitStack

    import numpy as np

    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.decoder.prompt import GEMMA4, build_turn, run_prompt
    from edgevision.moe.calibrate import SYSTEM_PROMPT
    from edgevision.moe.layout import read_layout

    result = RunResult(spec.label)
    layout = read_layout(spec.model)
    with ExitStack() as stack:
        observer = probe = recorder = policy = None
        if spec.policy:
            from edgevision.moe.policy import load_policy

            policy = load_policy(spec.policy)
        if spec.policy or spec.probe or spec.record_trace:
            from edgevision.moe.predict import PredictingObserver
            from edgevision.moe.router import RouterObserver

            kind = PredictingObserver if getattr(policy, "predicts", False) else RouterObserver
            observer = kind.for_model(spec.model)
        decoder = stack.enter_context(
            LlamaDecoder(spec.model, n_ctx=spec.n_ctx, n_threads=spec.n_threads, cb_eval=observer)
        )
        if spec.probe:
            from edgevision.moe.probe import ResidencyProbe

            probe = ResidencyProbe(layout)
            stack.callback(probe.close)
            observer.listeners.append(probe)  # first: before a policy reads the chosen experts in
        if spec.record_trace:
            from edgevision.moe.policy import TraceRecorder

            recorder = TraceRecorder()
            observer.listeners.append(recorder)
        if policy is not None:
            _start_policy(policy, spec, stack, observer, layout, decoder.mapping_base)
        elapsed = waited = 0.0
        faults = read = 0
        read_bytes = _bytes_reader(spec.read_counter)
        for i, question in enumerate(spec.prompts):
            decoder.reset()
            run_prompt(decoder, build_turn(question, system=SYSTEM_PROMPT, fmt=GEMMA4).segments)
            feed = spec.reference[i] if spec.reference else None
            rng = np.random.default_rng([spec.seed, i])
            top1: list[int] = []
            fed: list[int] = []
            kl_ids: list[list[int]] = []
            logprobs: list[list[float]] = []
            for step in range(spec.tokens):
                logits = decoder.logits()
                top1.append(int(np.argmax(logits)))
                z = logits.astype(np.float64) - logits.max()
                z -= np.log(np.exp(z).sum())
                if spec.kl_ids:
                    ids = np.asarray(spec.kl_ids[i][step], dtype=np.int64)
                else:
                    ids = np.argpartition(-z, KL_TOKENS)[:KL_TOKENS]
                    kl_ids.append(ids.tolist())
                logprobs.append(z[ids].tolist())
                if step == spec.tokens - 1:
                    break
                if feed:
                    token = feed[step]
                else:  # the reference continuation: sampled at temperature 1
                    z = logits.astype(np.float64)
                    p = np.exp(z - z.max())
                    token = int(rng.choice(p.size, p=p / p.sum()))
                fed.append(token)
                if probe is not None:
                    probe.active = True
                f0, r0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, read_bytes()
                w0, t0 = _cpu_wait(), time.perf_counter()
                decoder.prefill_tokens([token])
                elapsed += time.perf_counter() - t0
                waited += _cpu_wait() - w0
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0
                read += read_bytes() - r0
                if probe is not None:
                    probe.active = False
                result.decoded += 1
            result.top1.append(top1)
            result.fed.append(fed)
            result.kl_ids.append(kl_ids)
            result.logprobs.append(logprobs)
        if policy is not None:
            result.notes = policy.notes()
        if recorder is not None:
            recorder.trace().save(spec.record_trace)
        if probe is not None:
            result.hits, result.accesses = probe.hits, probe.accesses
            result.pages_in, result.pages = probe.pages_in, probe.pages
    result.rss_anon = _rss_anon()
    result.wall_tokens_per_s = result.decoded / elapsed if elapsed else 0.0
    result.tokens_per_s = result.decoded / (elapsed - waited) if elapsed > waited else result.wall_tokens_per_s
    result.faults_per_token = faults / max(1, result.decoded)
    result.read_bytes_per_token = read / max(1, result.decoded)
    return result


def _start_policy(policy: Any, spec: RunSpec, stack: Any, observer: Any, layout: Any, mapping_base: int | None) -> None:
    from edgevision.moe.pinning import ExpertPinner
    from edgevision.moe.policy import PolicyContext, RoutingTrace
    from edgevision.moe.profile import RouterProfile

    prior = None
    if spec.profile:
        profile = RouterProfile.load(spec.profile)
        profile.check_model(layout.n_layer, layout.n_expert, Path(spec.model).name)
        prior = profile.share()
    cap = spec.cap or layout.file_size
    budget = cap - _rss_anon() - spec.headroom - layout.other_bytes
    pinner = stack.enter_context(ExpertPinner(layout))
    pinner.lock_resident()
    trace = RoutingTrace.load(spec.trace) if spec.trace else None
    context = PolicyContext(layout, pinner, max(0, budget), prior, trace, mapping_base, observer)
    stack.callback(policy.close)
    policy.start(context)
    observer.listeners.append(policy.observe)


def _child_main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    spec = RunSpec(**json.loads(sys.stdin.read()))
    try:
        result = run_config(spec)
    except EdgevisionError as exc:
        result = RunResult(spec.label, error=str(exc))
    print(json.dumps(asdict(result)))
    return 0


# -- the parent -----------------------------------------------------------------------------------


def _run_child(spec: RunSpec, cgroup: Any = None, storage: Any = None, timeout: float = 900) -> RunResult:
    from edgevision.moe.cgroup import drop_page_cache

    still = drop_page_cache(spec.model)
    if cgroup is not None:
        cgroup.reset_peak()

    def enter() -> None:  # in the child, before exec
        if storage is not None:
            storage.enter()
        if cgroup is not None:
            cgroup.enter()

    proc = subprocess.run(
        [sys.executable, "-m", "edgevision.moe.bench"],
        input=json.dumps(asdict(spec)),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=enter,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory under the cap?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return RunResult(spec.label, error=f"{why}: {tail}"[:300])
    result = RunResult(**json.loads(lines[-1]))
    if still > 0.02:  # another process maps the file: those pages are not charged to the cap
        result.notes += f", {100 * still:.0f}% of the file was still cached at the start (mapped elsewhere)"
    if cgroup is not None:
        result.peak = cgroup.peak()
    return result


def _calibrate(model: Path, calibration: Path, tokens: int, n_threads: int, out: Path) -> None:
    """The prior: the calibration questions (text only) through the model, in a child, uncapped."""
    cmd = [sys.executable, "-m", "edgevision", "calibrate", "--decoder", str(model), "--calibration", str(calibration)]
    cmd += ["--no-images", "--max-tokens", str(tokens), "--threads", str(n_threads), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise EdgevisionError(f"calibrating {model.name} failed: {proc.stderr.strip().splitlines()[-1:]}")


def _prune_to_fit(model: Path, calibration: Path, budget: int, n_threads: int, work: Path) -> tuple[Path | None, str]:
    """`model` pruned by ``edgevision prune`` (its default ranking, REAP saliency summed over the calibration
    prompts' tokens) to a file of at most `budget` bytes, or (None, why not)."""
    if importlib.util.find_spec("edgevision.moe.prune") is None:
        return None, "edgevision prune is not available in this checkout"
    from edgevision.moe.prune import DEFAULT_CRITERION

    out = work / (model.stem + "-pruned.gguf")
    cmd = [sys.executable, "-m", "edgevision", "prune", "--decoder", str(model), "--budget", str(budget)]
    cmd += ["--criterion", DEFAULT_CRITERION]
    cmd += ["--out", str(out), "--calibration", str(calibration), "--no-images", "--no-report", "--max-tokens", "8"]
    cmd += ["--threads", str(n_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 or not out.is_file():
        return None, "edgevision prune failed: " + " | ".join(proc.stderr.strip().splitlines()[-2:])
    kept = next((line for line in proc.stdout.splitlines() if line.startswith("pruned model:")), "")
    kept = kept.split(": ", 2)[-1].split(",")[0] if kept else ""
    return out, f"{kept}, ranked by {DEFAULT_CRITERION}"


def _kept_mass(pruned: Path, prior: Any) -> str:
    """', kept experts carry X% of the prior's gate mass', from the pruned file's kept-expert ids."""
    import gguf
    import numpy as np

    field = gguf.GGUFReader(pruned).get_field("edgevision.prune.kept_experts")
    if field is None:
        return ""
    kept = np.asarray(field.contents(), dtype=np.int64).reshape(prior.n_layer, -1)
    share = prior.share()
    mass = np.take_along_axis(share, kept, axis=1).sum(axis=1)
    by_mass = np.sort(share, axis=1)[:, ::-1][:, : kept.shape[1]].sum(axis=1)
    return (
        f", kept experts carry {100 * mass.min():.1f}-{100 * mass.max():.1f}% of each layer's prior gate mass "
        f"(the {kept.shape[1]} with the most mass: {100 * by_mass.min():.1f}-{100 * by_mass.max():.1f}%)"
    )


POLICY_ROWS = (("expert LRU", "expert-lru"), ("router-aware", "router-aware"), ("Belady (ceiling)", "belady"))


def bench_moe(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    cap_fraction: float = 0.6,
    cap_mib: int | None = None,
    tokens: int = 16,
    calibration: str | os.PathLike[str] = "calibration",
    heldout: str = "heldout.txt",
    profile: str | os.PathLike[str] | None = None,
    n_threads: int = 0,
    headroom_mib: int = 48,
    repeats: int = 2,
    storage: str = "nvme",
    read_ahead_kb: int | None = None,
    read_mbps: int | None = None,
    latency_us: float | None = None,
    backing: str = "ram",
    pruned: bool = False,
    policies: Sequence[str] | None = None,
) -> str:
    """Run every configuration and return the table. `policies`: the policy rows, as `load_policy` names
    (default: expert LRU, router-aware, Belady)."""
    from edgevision.moe.calibrate import read_questions
    from edgevision.moe.cgroup import CgroupUnavailable, MemoryCgroup
    from edgevision.moe.layout import read_layout
    from edgevision.moe.nvme import NVME_LATENCY_US, EmulatedNvme
    from edgevision.moe.profile import RouterProfile
    from edgevision.moe.storage import NVME_READ_MBPS, READ_AHEAD_KB, BoardStorage

    model = Path(model)
    if not model.is_file():
        raise ModelError(f"benchmark model {model} does not exist; make it with 'make bench-model'")
    layout = read_layout(model)
    cap = cap_mib * MIB if cap_mib else int(cap_fraction * layout.file_size)
    prompts = list(read_questions(Path(calibration) / heldout))
    lines = [
        (
            f"edgevision bench moe: {model.name}: {layout.file_size / MIB:.0f} MiB file, experts "
            f"{layout.expert_total / MIB:.0f} MiB ({len(layout.moe_layers)} layers x {layout.n_expert}, top "
            f"{layout.n_expert_used}, {layout.expert_bytes(layout.moe_layers[0]) / MIB:.1f} MiB each), "
            f"other weights {layout.other_bytes / MIB:.0f} MiB"
        )
    ]
    with tempfile.TemporaryDirectory(prefix="edgevision-bench-moe-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        disk: Any = None
        counter = None
        if storage == "nvme":
            disk = stack.enter_context(
                EmulatedNvme(
                    model,
                    latency_us=NVME_LATENCY_US if latency_us is None else latency_us,
                    read_mbps=NVME_READ_MBPS if read_mbps is None else read_mbps,
                    read_ahead_kb=read_ahead_kb or READ_AHEAD_KB,
                )
            )
            model, counter = disk.path, str(disk.counter)
            lines.append(f"{disk.settings.describe()}; {disk.self_check()}; threads {n_threads or 'all cores'}")
        elif storage == "loop":
            disk = stack.enter_context(
                BoardStorage(
                    model,
                    read_ahead_kb=read_ahead_kb or READ_AHEAD_KB,
                    read_mbps=NVME_READ_MBPS if read_mbps is None else read_mbps,
                    backing=backing,
                )
            )
            model = disk.path
            lines.append(
                disk.settings.describe() + f"; one 128 KiB O_DIRECT read, unthrottled, less CPU wait: "
                f"{1e6 * disk.measure_latency():.0f} us (median, queue depth 1); threads {n_threads or 'all cores'}"
            )
        else:
            # a private copy: pages of a file another process maps cannot be dropped, nor charged to the cap
            model = Path(shutil.copyfile(model, work / model.name))
            ra = _read_ahead_of(model)
            lines.append(f"storage: the host's disk as it is (read_ahead_kb {ra}): NOT like the board's")
        if profile is None:
            profile = work / "prior.router.json"
            _calibrate(model, Path(calibration), 8, n_threads, profile)
            source = f"calibrated now on {calibration}/prompts.txt (text only, 8 generated tokens each)"
        else:
            source = str(profile)
        prior = RouterProfile.load(profile)
        top25 = prior.top_share(0.25)
        lines.append(
            f"routing skew (prior, {source}): hottest 25% of experts carry {top25.min():.2f}-{top25.max():.2f} "
            f"of each layer's gate mass (mean {top25.mean():.2f})"
        )
        base = {"model": str(model), "prompts": prompts, "tokens": tokens, "n_threads": n_threads}
        base |= {"read_counter": counter}
        trace = work / "routing.trace.npz"
        ref = _run_child(RunSpec("reference", **base, record_trace=str(trace)), storage=disk)
        if ref.error:
            raise EdgevisionError(f"the reference run failed: {ref.error}")
        reference, fed = ref.top1, ref.fed
        base |= {"kl_ids": ref.kl_ids}
        specs: list[tuple[RunSpec, bool]] = []  # (spec, capped)
        try:
            cgroup = MemoryCgroup.create(f"edgevision-bench-{os.getpid()}", cap)
        except CgroupUnavailable as exc:
            lines.append(f"memory-capped runs skipped: {exc}")
            cgroup = None
        results: dict[str, list[RunResult]] = {}
        notes: dict[str, str] = {}
        free_spec = RunSpec("unconstrained (mmap)", **dict(base, reference=fed))
        probed: dict[str, RunResult] = {}
        with cgroup if cgroup is not None else contextlib.nullcontext():
            if cgroup is not None:
                share = f"{100 * cap / layout.file_size:.0f}% of the file"
                lines.append(f"cap: {cap / MIB:.0f} MiB ({share}), cgroup v{cgroup.version} {cgroup.path}")
                forced = dict(base, reference=fed, cap=cap, headroom=headroom_mib * MIB)
                specs.append((RunSpec("plain mmap", **forced), True))
                rows_ = POLICY_ROWS if policies is None else [(_policy_label(name), name) for name in policies]
                for label, name in rows_:
                    extra = {"profile": str(profile)} if name.startswith(("router-aware", "pinned-prior")) else {}
                    extra |= {"trace": str(trace)} if name == "belady" else {}
                    specs.append((RunSpec(label, **forced, policy=name, **extra), True))
                if pruned:
                    budget = cap - ref.rss_anon - headroom_mib * MIB
                    pruned_path, kept = _prune_to_fit(model, Path(calibration), budget, n_threads, work)
                    if pruned_path is None:
                        results["pruned-to-fit"] = [RunResult("pruned-to-fit", error=kept)]
                    else:
                        specs.append((RunSpec("pruned-to-fit", **dict(forced, model=str(pruned_path))), True))
                        notes["pruned-to-fit"] = (
                            f"{pruned_path.stat().st_size / MIB:.0f} MiB file, {kept}" + _kept_mass(pruned_path, prior)
                        )
                # hit rates from one probed run of each capped configuration; speed and bytes from runs without
                # the probe (its mincore calls cost decode time)
                for spec, _ in specs:
                    probed[spec.label] = _run_child(dataclasses.replace(spec, probe=True), cgroup, disk)
            specs.insert(0, (free_spec, False))
            # the machine's load drifts: interleave the configurations, repeat them, keep each one's best run
            for _ in range(repeats):
                for spec, capped in specs:
                    results.setdefault(spec.label, []).append(_run_child(spec, cgroup if capped else None, disk))
        rows = []
        for label, runs in results.items():
            ok = [r for r in runs if not r.error]
            best = max(ok, key=lambda r: r.tokens_per_s) if ok else runs[0]
            if ok:
                best.median_tokens_per_s = statistics.median(r.tokens_per_s for r in ok)
            hit = probed.get(label)
            if hit is not None and not hit.error and not best.error:
                best.hits, best.accesses = hit.hits, hit.accesses
                best.pages_in, best.pages = hit.pages_in, hit.pages
            parts = [notes.get(label, ""), best.notes.lstrip(", ")]
            if len(ok) > 1:
                parts.append(f"best of {len(ok)}: {', '.join(f'{r.tokens_per_s:.2f}' for r in ok)} tokens/s")
            best.notes = "; ".join(part for part in parts if part)
            rows.append((best, "no cap" if label.startswith("unconstrained") else f"cap {cap / MIB:.0f} MiB"))
    bandwidth = disk.settings.read_mbps * 1e6 if disk is not None and disk.settings.read_mbps else None
    source = "bytes the emulated NVMe served" if counter else "/proc/self/io read_bytes"
    lines += table(rows, reference, bandwidth, source, ref.logprobs)
    return "\n".join(lines)


def _policy_label(name: str) -> str:
    labels = {n: label for label, n in POLICY_ROWS}
    base, _, options = name.partition(":")
    shown = [
        key + " off" if value in ("0", "false", "off", "no") else option
        for option in options.split(",")
        if option
        for key, _, value in [option.partition("=")]
    ]
    return labels.get(base, base) + (f" ({', '.join(shown)})" if shown else "")


def _read_ahead_of(path: Path) -> str:
    dev = os.stat(path).st_dev
    name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    for candidate in (name, name.parent):
        ra = candidate / "queue" / "read_ahead_kb"
        if ra.exists():
            return ra.read_text().strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(_child_main())
