"""The decoder's placement in the product: the residency plan applied when the appliance loads its decoder.

`DecoderPlacement.open` turns the ``decoder.placement`` settings into a plan before the model is loaded: the RAM
budget (a size, or ``auto``: the cgroup limit or MemAvailable, less what the stages loaded so far use, the KV
cache and a headroom), whole MoE layers for the GPU within its budget, and the experts to pin from the router
profile (`edgevision.moe.residency`). It then locks the non-expert weights and pins those experts
(`ExpertPinner`), checking first that ``RLIMIT_MEMLOCK`` allows it: a shortfall is one line naming the limit and
the fix, and nothing is left locked after any failure.

The decoder is loaded with `decoder_options`: the tensor overrides that keep the CPU-side layers' expert tensors
in the plain CPU buffer type (served from the file mapping that the pins hold, never repacked into anonymous
memory), the GPU layers, and a `RouterObserver` as its eval callback. While loading, llama.cpp's own log says
where each overridden tensor went; `start` checks it against the plan (`placed`), then starts online adaptation
(`OnlineResidency`: re-plans in the background, a failure is logged and retried after a back-off) and counts, from
the observed routing, how many expert selections the resident set served (the hit rate).

`status` is what ``edgevision status`` shows; `meter` measures one answer (major faults, bytes read from storage,
hit rate) for the per-answer log. Both read process-wide counters (``getrusage``, ``/proc/self/io``): the other
stages' faults and reads are in them too, which on a running appliance are few.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevision.errors import ConfigError, EdgevisionError, ModelError
from edgevision.moe.layout import ExpertLayout
from edgevision.moe.residency import ResidencyPlan, plan_residency
from edgevision.schema import parse_size

if TYPE_CHECKING:
    from edgevision.config import PlacementSettings

logger = logging.getLogger(__name__)

MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
CAP_IPC_LOCK = 14
NEVER = 2**62  # replan_every when online adaptation is off (prefetch only)
_OVERRIDDEN = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


class MemlockError(EdgevisionError):
    """Locking the resident weights failed, or would: RLIMIT_MEMLOCK is too small."""


# -- the process's memory, as the kernel reports it ----------------------------------------------------------


def memlock_limit() -> int | None:
    """The soft ``RLIMIT_MEMLOCK`` in bytes; None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def can_lock_unlimited() -> bool:
    """Whether this process has CAP_IPC_LOCK in its effective set (then RLIMIT_MEMLOCK does not apply)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def locked_bytes_now() -> int:
    """Bytes this process has locked (VmLck)."""
    return _status_kib("VmLck") * 1024


def storage_bytes_read() -> int:
    """Bytes this process caused to be read from storage (``/proc/self/io`` read_bytes; page faults included)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def _cgroup_limit() -> tuple[int, int] | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``) and the anonymous memory charged there now (every process in it: a speech
    synthesizer's child too); None when there is no limit."""
    found: list[tuple[int, int]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            base, name, stat, keys = Path("/sys/fs/cgroup"), "memory.max", "memory.stat", ("anon",)
        elif "memory" in controllers.split(","):
            base, name, stat, keys = (
                Path("/sys/fs/cgroup/memory"),
                "memory.limit_in_bytes",
                "memory.stat",
                ("total_rss",),
            )
        else:
            continue
        parts = [part for part in path.split("/") if part]
        # inside a cgroup namespace the mount's root may be a descendant of the path's start: try its tails
        here = next((base.joinpath(*parts[i:]) for i in range(len(parts)) if base.joinpath(*parts[i:]).is_dir()), base)
        while True:
            with contextlib.suppress(OSError, ValueError):
                text = (here / name).read_text().strip()
                if text != "max" and int(text) < 2**60:
                    values = dict(row.split() for row in (here / stat).read_text().splitlines() if " " in row)
                    found.append((int(text), sum(int(values.get(key, 0)) for key in keys)))
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(found) if found else None


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise EdgevisionError(f"/proc/meminfo has no {field}; set decoder.placement.ram_budget to a size")


def auto_budget(kv_bytes: int, headroom: int, working_set: int = 0) -> tuple[int, str]:
    """The RAM the decoder's weights may keep resident, measured now (after the other stages are loaded), and
    how it was found. `working_set` is left to the page cache for the experts one token may read from storage
    (pinned pages cannot be reclaimed: without that room the paged experts would thrash, or the cgroup kill us)."""
    terms = (
        f"KV cache {kv_bytes // MIB} MiB - one token's paged experts {working_set // MIB} MiB - headroom "
        f"{headroom // MIB} MiB"
    )
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limit, anon = cgroup
        return limit - anon - kv_bytes - working_set - headroom, (
            f"cgroup limit {limit // MIB} MiB - {anon // MIB} MiB anonymous memory of the loaded stages - {terms}"
        )
    available = _meminfo("MemAvailable")
    return available - kv_bytes - working_set - headroom, (
        f"MemAvailable {available // MIB} MiB (other stages already loaded) - {terms}"
    )


# -- locking ------------------------------------------------------------------------------------------------


def lock_need(layout: ExpertLayout, plan: ResidencyPlan, *, lock_resident: bool) -> int:
    """Bytes the plan locks, page-rounded per range (an upper bound)."""
    ranges = list(layout.other_ranges) if lock_resident else []
    for layer, expert in plan.pinned:
        ranges.extend(layout.expert_ranges(layer, expert))
    return sum(((end - 1) // PAGE - start // PAGE + 1) * PAGE for start, end in ranges)


def _memlock_message(need: int, what: str) -> str:
    limit = memlock_limit()
    shown = "unlimited" if limit is None else f"{limit} bytes"
    return (
        f"cannot lock the decoder's resident weights in RAM ({what}): RLIMIT_MEMLOCK is {shown} and the plan "
        f"locks {need} bytes; set LimitMEMLOCK={need} in the service unit (ulimit -l {-(-need // 1024)} in a "
        "shell) or grant CAP_IPC_LOCK, or lower decoder.placement.ram_budget or set lock_resident: false"
    )


def check_memlock(need: int) -> None:
    """Raise MemlockError before anything is locked if RLIMIT_MEMLOCK cannot hold `need` more bytes."""
    limit = memlock_limit()
    if limit is None or can_lock_unlimited():
        return
    if locked_bytes_now() + need > limit:
        raise MemlockError(_memlock_message(need, "the limit is too small"))


def lock_plan(pinner: Any, plan: ResidencyPlan, *, lock_resident: bool, need: int) -> None:
    """Lock the non-expert weights (if asked) and pin the plan's experts; on any failure close the pinner (which
    unlocks and unmaps everything it locked, a half-locked expert included) and raise MemlockError."""
    try:
        if lock_resident:
            pinner.lock_resident()
        pinner.pin(plan.pinned)
    except EdgevisionError as exc:
        pinner.close()
        raise MemlockError(_memlock_message(need, str(exc).split(" (", 1)[-1].split(",", 1)[0])) from exc
    except BaseException:
        pinner.close()
        raise


# -- the placement ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    """Where llama.cpp's loader says it put the weights."""

    overridden: dict[str, str]  # tensor name -> buffer type, for every tensor an override matched
    buffers: dict[str, float]  # buffer type -> MiB of model weights in it


class DecoderPlacement:
    """The plan, the pins, the router observer and online adaptation for one loaded decoder.

    Use `open`; then load the decoder with `decoder_options()` inside `loading()`, `start(decoder)`, and `close()`
    when done (after the decoder is freed or before: the pins only keep pages in RAM).
    """

    def __init__(
        self,
        model: Path,
        settings: PlacementSettings,
        layout: ExpertLayout,
        plan: ResidencyPlan,
        prior: np.ndarray,
        *,
        budget_source: str,
        gpu: bool,
    ) -> None:
        self.model, self.settings, self.layout, self.plan = model, settings, layout, plan
        self.budget_source = budget_source
        self.gpu = gpu
        self._prior = prior
        self._pinner: Any = None
        self._online: Any = None
        self.observer: Any = None
        self.placed: Placed | None = None
        self._lock = threading.Lock()
        self._resident = self._resident_mask(plan)
        self._hits = 0
        self._selections = 0
        self._step = 0
        self._sampled = True
        self._first_layer = layout.moe_layers[0]
        self._start_reads = storage_bytes_read()
        self._start_faults = major_faults()

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def open(cls, model: str | os.PathLike[str], settings: PlacementSettings, *, n_ctx: int) -> DecoderPlacement | None:
        """Plan and pin for `model` (None when ``ram_budget`` is ``none``: no placement)."""
        if settings.ram_budget.strip().lower() == "none":
            return None
        from edgevision.moe.buft import has_gpu
        from edgevision.moe.pinning import ExpertPinner
        from edgevision.moe.plan import read_header

        model = Path(model)
        try:
            header = read_header(model)
        except ModelError as exc:
            raise ModelError(
                f"{exc} (decoder.placement is for mixture-of-experts decoders: set ram_budget: none)"
            ) from exc
        layout = header.layout
        gpu_budget = parse_size(settings.gpu_expert_budget)
        gpu = has_gpu() and settings.gpu_layers != 0
        if gpu_budget and not gpu:
            raise ConfigError(
                f"decoder.placement.gpu_expert_budget is {settings.gpu_expert_budget} but "
                + ("gpu_layers is 0" if has_gpu() else "this llama.cpp build has no GPU back-end")
                + "; set gpu_expert_budget to 0, or use a CUDA build of llama-cpp-python with gpu_layers -1"
            )
        if settings.ram_budget.strip().lower() == "auto":
            one_token = layout.n_expert_used * sum(layout.expert_bytes(layer) for layer in layout.moe_layers)
            budget, source = auto_budget(header.kv_cache_bytes(n_ctx), parse_size(settings.headroom), one_token)
        else:
            budget, source = parse_size(settings.ram_budget), "decoder.placement.ram_budget"
        prior = _prior(layout, settings.router_profile)
        try:
            plan = plan_residency(layout, prior, ram_budget=max(0, budget), gpu_budget=gpu_budget)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (decoder.placement budget: {source})") from None
        placement = cls(model, settings, layout, plan, prior, budget_source=source, gpu=gpu)
        # on a GPU the non-expert weights of offloaded layers live in GPU buffers: locking their file pages would
        # hold the same bytes twice
        lock_resident = settings.lock_resident and not gpu
        need = lock_need(layout, plan, lock_resident=lock_resident)
        check_memlock(need)
        placement._pinner = ExpertPinner(layout)
        lock_plan(placement._pinner, plan, lock_resident=lock_resident, need=need)
        return placement

    def decoder_options(self) -> dict[str, Any]:
        """Keyword arguments for `LlamaDecoder`: GPU layers, tensor overrides and the router observer."""
        from edgevision.moe.router import RouterObserver

        self.observer = RouterObserver.for_model(self.model)
        self.observer.listeners.append(self._listen)
        return {
            "n_gpu_layers": None if self.settings.gpu_layers < 0 else self.settings.gpu_layers,
            "tensor_overrides": self.plan.tensor_overrides(self.layout),
            "cb_eval": self.observer,
        }

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Around the decoder's load: read llama.cpp's own report of where each weight was placed."""
        from edgevision.decoder.native import native_log_capture, weight_buffers

        with native_log_capture(logging.DEBUG) as lines:
            yield
        overridden = {match.group(1): match.group(2) for line in lines if (match := _OVERRIDDEN.search(line))}
        self.placed = Placed(overridden, weight_buffers(lines))

    def start(self, decoder: Any) -> None:
        """Check llama.cpp placed the weights as planned, start adaptation, and log the plan."""
        self._verify()
        settings = self.settings
        if settings.online or settings.prefetch:
            from edgevision.moe.online import OnlineResidency

            self._online = OnlineResidency(
                self.layout,
                self._pinner,
                self._prior,
                ram_budget=self.plan.ram_budget,
                gpu_budget=self.plan.gpu_budget,
                replan_every=settings.replan_every if settings.online else NEVER,
                prefetch=settings.prefetch,
            )
            self._online.on_plan = self._new_plan
            self._online.start()
        logger.info("%s", self.describe())

    def _verify(self) -> None:
        expected = {t.name: ("GPU" if t.layer in self.plan.gpu_layers else "CPU") for t in self.layout.tensors}
        placed = self.placed.overridden if self.placed else {}
        wrong = [
            f"{name} in {placed.get(name, 'its default buffer')}"
            for name, where in expected.items()
            if where == "CPU" and placed.get(name) != "CPU"
        ]
        if wrong:
            raise EdgevisionError(
                f"llama.cpp did not place the expert tensors of {self.model.name} as planned ({len(wrong)} not in "
                f"the CPU buffer type, e.g. {wrong[0]}); this llama-cpp-python may ignore tensor overrides: "
                "use 0.3.36, or set decoder.placement.ram_budget: none"
            )
        repacked = [name for name in (self.placed.buffers if self.placed else {}) if "REPACK" in name.upper()]
        if repacked:
            logger.warning(
                "llama.cpp repacked some weights into %s (anonymous memory, not the file mapping): they do not "
                "page, and pins do not hold them; turn off decoder.extra_buffer_types",
                ", ".join(repacked),
            )

    # -- observation ------------------------------------------------------------------------------

    def _new_plan(self, plan: ResidencyPlan) -> None:
        mask = self._resident_mask(plan)
        with self._lock:
            self.plan = plan
            self._resident = mask

    def _resident_mask(self, plan: ResidencyPlan) -> np.ndarray:
        mask = np.zeros((self.layout.n_layer, self.layout.n_expert), dtype=bool)
        for layer in plan.gpu_layers:
            mask[layer] = True
        for layer, expert in plan.pinned:
            mask[layer, expert] = True
        return mask

    def _listen(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        if layer == self._first_layer:
            self._step += 1
            self._sampled = self._step % self.settings.observe_every == 0
        if not self._sampled:
            return
        hits = int(self._resident[layer, ids].sum())
        with self._lock:
            self._hits += hits
            self._selections += ids.size
        if self._online is not None:
            self._online.observe(layer, ids, weights)

    def counters(self) -> tuple[int, int]:
        """(hits, selections) of experts counted so far."""
        with self._lock:
            return self._hits, self._selections

    # -- reporting ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``edgevision status`` shows: the plan now, and what it has served since start."""
        hits, selections = self.counters()
        plan = self.plan
        stats = self._online.stats if self._online is not None else None
        return {
            "model": self.model.name,
            "ram_budget": plan.ram_budget,
            "budget_from": self.budget_source,
            "gpu_layers": list(plan.gpu_layers),
            "gpu_expert_bytes": plan.gpu_bytes,
            "resident_bytes": plan.resident_bytes,
            "pinned_experts": len(plan.pinned),
            "pinned_bytes": plan.pinned_bytes,
            "locked_bytes": self.locked_bytes,
            "covered_mass": round(plan.covered_mass, 4),
            "hit_rate": round(hits / selections, 4) if selections else None,
            "expert_selections": selections,
            "storage_bytes_read": storage_bytes_read() - self._start_reads,
            "major_faults": major_faults() - self._start_faults,
            "replans": stats.replans if stats else 0,
            "pins_moved": stats.pins_moved if stats else 0,
            "adaptation_errors": stats.errors if stats else 0,
            "last_adaptation_error": stats.last_error if stats else None,
            "prefetched_experts": self._online.prefetches if self._online is not None else 0,
            "llama_buffers_mib": {k: round(v, 1) for k, v in (self.placed.buffers if self.placed else {}).items()},
            "overridden_to_cpu": sum(1 for v in (self.placed.overridden if self.placed else {}).values() if v == "CPU"),
        }

    def describe(self) -> str:
        """The plan as one readable block, for the start-up log."""
        plan, lay = self.plan, self.layout
        n_experts = len(lay.moe_layers) * lay.n_expert
        gpu_experts = len(plan.gpu_layers) * lay.n_expert
        paged = n_experts - gpu_experts - len(plan.pinned)
        placed = self.placed
        buffers = ", ".join(f"{k} {v:.1f} MiB" for k, v in placed.buffers.items()) if placed else "unknown"
        return "\n".join(
            [
                f"decoder placement for {self.model.name}:",
                f"  RAM budget      {plan.ram_budget / MIB:.1f} MiB ({self.budget_source})",
                f"  resident        {plan.resident_bytes / MIB:.1f} MiB non-expert weights"
                + (" (locked)" if self.settings.lock_resident and not self.gpu else ""),
                f"  GPU             {len(plan.gpu_layers)} MoE layers, {plan.gpu_bytes / MIB:.1f} MiB of experts",
                (
                    f"  pinned          {len(plan.pinned)} of {n_experts} experts, {plan.pinned_bytes / MIB:.1f} MiB "
                    f"({100 * plan.covered_mass:.1f}% of the prior's routing mass)"
                ),
                f"  paged           {paged} experts, from storage when routed",
                (
                    f"  llama.cpp       {len(placed.overridden) if placed else 0} expert tensors overridden to the CPU "
                    f"buffer type; buffers: {buffers}"
                ),
                (
                    f"  adaptation      online {'on' if self.settings.online else 'off'} (every "
                    f"{self.settings.replan_every} tokens), prefetch {'on' if self.settings.prefetch else 'off'}, "
                    f"routing counted on 1 step in {self.settings.observe_every}"
                ),
            ]
        )

    @property
    def locked_bytes(self) -> int:
        return self._pinner.locked_bytes if self._pinner is not None else 0

    def meter(self) -> PlacementMeter:
        return PlacementMeter(self)

    def close(self) -> None:
        """Stop adaptation and release every pin (idempotent)."""
        if self._online is not None:
            self._online.close()
            self._online = None
        if self._pinner is not None:
            self._pinner.close()
            self._pinner = None


def _prior(layout: ExpertLayout, profile: Path | None) -> np.ndarray:
    if profile is None:
        return np.ones((layout.n_layer, layout.n_expert))
    from edgevision.moe.profile import RouterProfile

    loaded = RouterProfile.load(profile)
    loaded.check_model(layout.n_layer, layout.n_expert, layout.path.name)
    return loaded.share()


class PlacementMeter:
    """One answer's storage reads, major faults and expert hit rate (a per-interaction meter for the daemon);
    without a placement, only the reads and faults."""

    def __init__(self, placement: DecoderPlacement | None = None) -> None:
        self.placement = placement
        self._start: tuple[int, int, int, int] = (0, 0, 0, 0)

    def start(self) -> None:
        hits, selections = self.placement.counters() if self.placement else (0, 0)
        self._start = (major_faults(), storage_bytes_read(), hits, selections)

    def stop(self) -> dict[str, Any]:
        faults, reads, hits, selections = self._start
        record: dict[str, Any] = {
            "major_faults": major_faults() - faults,
            "storage_bytes_read": storage_bytes_read() - reads,
        }
        if self.placement is not None:
            now_hits, now_selections = self.placement.counters()
            served, asked = now_hits - hits, now_selections - selections
            record.update(
                expert_selections=asked,
                hit_rate=round(served / asked, 4) if asked else None,
                pinned_experts=len(self.placement.plan.pinned),
                locked_bytes=self.placement.locked_bytes,
            )
        return record
