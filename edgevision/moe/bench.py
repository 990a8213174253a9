"""``edgevision bench moe``: decoding a MoE model that does not fit, side by side.

Each configuration runs in a fresh child process that is moved into a memory-capped cgroup (about 60% of the
model file) before it starts, after the model file has been dropped from the page cache, so every page it
reads is charged to the cap and paged from storage once evicted:

- unconstrained: llama.cpp's default mmap, no cap; it also records the reference (greedy) continuations;
- plain mmap under the cap: the kernel's page cache decides what stays;
- router-aware residency under the cap: the planner's pins from the calibration profile (the prior), moved
  by live router statistics in the background (`edgevision.moe.online`), non-expert weights locked;
- pruned-to-fit under the cap: the model pruned (``edgevision prune``) to fit the cap, with top-1
  agreement against the unconstrained model on the held-out prompts.

Every run decodes the same held-out prompts teacher-forced along the reference continuation (each step feeds
the reference token and records the model's own top-1), so every configuration does the same work and the
top-1 agreement is measured position by position. Tokens/s and major page faults (``getrusage`` in the child)
cover the single-token decode steps only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgevision.errors import EdgevisionError, ModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "models/bench/gemma4-moe-synthetic-l8-e32k2-skew0.8-up0.1-q8_0.gguf"
MIB = 2**20


@dataclass(frozen=True)
class RunSpec:
    """One configuration, as handed to the child process (JSON on stdin)."""

    label: str
    model: str
    prompts: list[str]
    tokens: int
    reference: list[list[int]] | None = None  # per prompt, the tokens to feed; None: generate greedily
    cap: int | None = None  # the cgroup's limit (for the residency budget)
    profile: str | None = None  # router profile: enables router-aware residency
    headroom: int = 48 * MIB  # left to the page cache and allocations beside the pins
    prefetch: bool = True  # router-triggered read-ahead of unpinned experts (with a profile)
    n_threads: int = 0
    n_ctx: int = 512


@dataclass
class RunResult:
    label: str
    tokens_per_s: float = 0.0  # decode steps per second of wall time minus time spent waiting for a CPU
    wall_tokens_per_s: float = 0.0
    faults_per_token: float = 0.0
    decoded: int = 0
    top1: list[list[int]] = field(default_factory=list)
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


def run_config(spec: RunSpec) -> RunResult:
    """Decode `spec.prompts` in this process (the child) and measure."""
    from contextlib import ExitStack

    import numpy as np

    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.decoder.prompt import GEMMA4, build_turn, run_prompt
    from edgevision.moe.calibrate import SYSTEM_PROMPT

    result = RunResult(spec.label)
    with ExitStack() as stack:
        observer = online = None
        if spec.profile:
            from edgevision.moe.router import RouterObserver

            observer = RouterObserver.for_model(spec.model)
        decoder = stack.enter_context(
            LlamaDecoder(spec.model, n_ctx=spec.n_ctx, n_threads=spec.n_threads, cb_eval=observer)
        )
        if spec.profile:
            online = _start_residency(spec, stack, observer, result)
        elapsed = waited = 0.0
        faults = 0
        for i, question in enumerate(spec.prompts):
            decoder.reset()
            run_prompt(decoder, build_turn(question, system=SYSTEM_PROMPT, fmt=GEMMA4).segments)
            feed = spec.reference[i] if spec.reference else None
            top1: list[int] = []
            for step in range(spec.tokens):
                best = int(np.argmax(decoder.logits()))
                top1.append(best)
                if step == spec.tokens - 1:
                    break
                token = feed[step] if feed else best
                f0, w0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, _cpu_wait(), time.perf_counter()
                decoder.prefill_tokens([token])
                elapsed += time.perf_counter() - t0
                waited += _cpu_wait() - w0
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0
                result.decoded += 1
            result.top1.append(top1)
        if online is not None:
            stats = online.stats
            result.notes += f", {stats.replans} re-plans moved {stats.pins_moved} pins"
            if spec.prefetch:
                result.notes += f", {online.prefetches} expert reads ahead"
    result.rss_anon = _rss_anon()
    result.wall_tokens_per_s = result.decoded / elapsed if elapsed else 0.0
    result.tokens_per_s = result.decoded / (elapsed - waited) if elapsed > waited else result.wall_tokens_per_s
    result.faults_per_token = faults / max(1, result.decoded)
    return result


def _start_residency(spec: RunSpec, stack: Any, observer: Any, result: RunResult) -> Any:
    from edgevision.moe.layout import read_layout
    from edgevision.moe.online import OnlineResidency
    from edgevision.moe.pinning import ExpertPinner
    from edgevision.moe.profile import RouterProfile

    layout = read_layout(spec.model)
    prior = RouterProfile.load(spec.profile)
    prior.check_model(layout.n_layer, layout.n_expert, Path(spec.model).name)
    cap = spec.cap or layout.file_size
    budget = cap - _rss_anon() - spec.headroom
    pinner = stack.enter_context(ExpertPinner(layout))
    pinner.lock_resident()
    online = OnlineResidency(
        layout, pinner, prior.share(), ram_budget=budget, replan_every=16, prefetch=spec.prefetch
    )
    stack.callback(online.close)
    observer.listeners.append(online.observe)
    online.start()
    plan = online.stats.plan
    result.notes = (
        f"{len(plan.pinned)}/{layout.n_expert * len(layout.moe_layers)} experts pinned "
        f"({plan.pinned_bytes / MIB:.0f} MiB, {100 * plan.covered_mass:.0f}% of prior mass)"
    )
    return online


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


def _run_child(spec: RunSpec, cgroup: Any = None, timeout: float = 900) -> RunResult:
    from edgevision.moe.cgroup import drop_page_cache

    still = drop_page_cache(spec.model)
    if cgroup is not None:
        cgroup.reset_peak()
    proc = subprocess.run(
        [sys.executable, "-m", "edgevision.moe.bench"],
        input=json.dumps(asdict(spec)),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=cgroup.enter if cgroup is not None else None,
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
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edgevision.moe.calibrate import load_calibration, run_calibration\n"
        "from edgevision.moe.router import RouterObserver\n"
        "model, folder, tokens, threads, out = sys.argv[1:]\n"
        "observer = RouterObserver.for_model(model)\n"
        "run_calibration(model, load_calibration(folder), observer, max_tokens=int(tokens), n_threads=int(threads))\n"
        "observer.profile(Path(model).name).save(out)\n"
    )
    args = [str(model), str(calibration), str(tokens), str(n_threads), str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900, check=False)
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


def _agreement(reference: list[list[int]], other: list[list[int]]) -> float | None:
    pairs = [(a, b) for ref, got in zip(reference, other, strict=False) for a, b in zip(ref, got, strict=False)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


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
) -> str:
    """Run every configuration and return the table."""
    from edgevision.moe.calibrate import read_questions
    from edgevision.moe.cgroup import CgroupUnavailable, MemoryCgroup
    from edgevision.moe.layout import read_layout
    from edgevision.moe.profile import RouterProfile

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
    with tempfile.TemporaryDirectory(prefix="edgevision-bench-moe-") as tmp:
        work = Path(tmp)
        # a private copy: pages of a file another process maps cannot be dropped, nor charged to the cap
        model = Path(shutil.copyfile(model, work / model.name))
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
        free = _run_child(RunSpec("unconstrained (mmap)", **base))
        if free.error:
            raise EdgevisionError(f"the unconstrained run failed: {free.error}")
        reference = free.top1
        specs: list[tuple[RunSpec, bool]] = []  # (spec, capped)
        try:
            cgroup = MemoryCgroup.create(f"edgevision-bench-{os.getpid()}", cap)
        except CgroupUnavailable as exc:
            lines.append(f"memory-capped runs skipped: {exc}")
            cgroup = None
        results: dict[str, list[RunResult]] = {free.label: [free]}
        notes: dict[str, str] = {}
        with cgroup if cgroup is not None else contextlib.nullcontext():
            if cgroup is not None:
                share = f"{100 * cap / layout.file_size:.0f}% of the file"
                lines.append(f"cap: {cap / MIB:.0f} MiB ({share}), cgroup v{cgroup.version} {cgroup.path}")
                forced = dict(base, reference=reference, cap=cap)
                specs.append((RunSpec("plain mmap", **forced), True))
                aware = RunSpec("router-aware residency", **forced, profile=str(profile), headroom=headroom_mib * MIB)
                specs.append((aware, True))
                # the pruned file must fit beside what the process itself needs
                budget = cap - free.rss_anon - headroom_mib * MIB
                pruned, kept = _prune_to_fit(model, Path(calibration), budget, n_threads, work)
                if pruned is None:
                    results["pruned-to-fit"] = [RunResult("pruned-to-fit", error=kept)]
                else:
                    specs.append((RunSpec("pruned-to-fit", **dict(forced, model=str(pruned))), True))
                    notes["pruned-to-fit"] = f"{pruned.stat().st_size / MIB:.0f} MiB file, {kept}" + _kept_mass(
                        pruned, prior
                    )
            # the machine's load drifts: interleave the configurations, repeat them, keep each one's best run
            specs.append((RunSpec("unconstrained (mmap)", **base), False))
            for round_ in range(repeats):
                for spec, capped in specs if round_ else specs[:-1]:
                    results.setdefault(spec.label, []).append(_run_child(spec, cgroup if capped else None))
        rows = []
        for label, runs in results.items():
            ok = [r for r in runs if not r.error]
            best = max(ok, key=lambda r: r.tokens_per_s) if ok else runs[0]
            parts = [notes.get(label, ""), best.notes.lstrip(", ")]
            if len(ok) > 1:
                parts.append(f"best of {len(ok)}: {', '.join(f'{r.tokens_per_s:.2f}' for r in ok)} tokens/s")
            best.notes = "; ".join(part for part in parts if part)
            rows.append((best, "no cap" if label.startswith("unconstrained") else f"cap {cap / MIB:.0f} MiB"))
        results = rows
    lines += _table(results, reference)
    return "\n".join(lines)


def _table(results: list[tuple[RunResult, str]], reference: list[list[int]]) -> list[str]:
    free = results[0][0].tokens_per_s
    header = (
        f"{'configuration':<24} {'memory':<14} {'tokens/s*':>9} {'x unconstr.':>11} {'wall tok/s':>10} "
        f"{'major faults/tok':>16} {'top-1 agree':>11}  notes"
    )
    out = ["", header]
    by_label = {}
    for result, where in results:
        by_label[result.label] = result
        if result.error:
            out.append(f"{result.label:<24} {where:<14} {'-':>9} {'-':>11} {'-':>10} {'-':>16} {'-':>11}  {result.error}")
            continue
        agree = _agreement(reference, result.top1)
        agree_text = "(reference)" if result is results[0][0] else f"{100 * agree:.1f}%" if agree is not None else "-"
        notes = result.notes.lstrip(", ")
        if result.peak:
            notes = f"peak {result.peak / MIB:.0f} MiB" + (f"; {notes}" if notes else "")
        out.append(
            f"{result.label:<24} {where:<14} {result.tokens_per_s:>9.2f} {result.tokens_per_s / free:>11.2f} "
            f"{result.wall_tokens_per_s:>10.2f} {result.faults_per_token:>16.1f} {agree_text:>11}  {notes}"
        )
    plain, aware, pruned = (by_label.get(k) for k in ("plain mmap", "router-aware residency", "pruned-to-fit"))
    out.append(
        "* decode steps per second, not counting the time the decoding thread waited for a CPU (schedstat "
        "run-queue delay: the cores are shared); page-fault I/O counts. Ratios use this column."
    )
    out.append("")
    if plain and aware and not plain.error and not aware.error and plain.tokens_per_s:
        out.append(
            f"router-aware / plain mmap under the cap: {aware.tokens_per_s / plain.tokens_per_s:.2f}x (target >= 2x)"
        )
    if pruned and not pruned.error:
        agree = _agreement(reference, pruned.top1) or 0.0
        out.append(
            f"pruned-to-fit / unconstrained: {pruned.tokens_per_s / free:.2f}x (target >= 0.9x), top-1 agreement "
            f"{100 * agree:.1f}% on the held-out prompts (target >= 99%)"
        )
    elif pruned:
        out.append(f"pruned-to-fit: not measured ({pruned.error})")
    return out


if __name__ == "__main__":
    sys.exit(_child_main())
