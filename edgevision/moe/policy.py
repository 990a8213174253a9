"""Expert residency policies: which experts stay in RAM under a byte budget, and the plug point for them.

``edgevision bench moe`` runs every policy through the same harness, so they differ only in their decisions:
the harness loads the model (llama.cpp's mmap), opens an `ExpertPinner` on the same file with the
non-expert weights locked, installs a `RouterObserver`, hands the policy a `PolicyContext` and adds
`ExpertPolicy.observe` to the observer's listeners. The listener runs on the decoding thread after a MoE
layer's router has chosen and before its expert matrices are read, so a policy may read the chosen experts
in right there (synchronously), hand them to its own threads, or only take note.

A policy is a class with the `ExpertPolicy` methods, named in `POLICIES` (``name -> "module:Class"``,
imported when chosen, so a policy's heavy imports cost nothing to the others). This module holds the
baselines the benchmark measures a router-aware policy against:

- `ExpertLru`: an expert-granular LRU. Every chosen expert is locked (read in now if it is not resident);
  when the locked experts exceed the budget, the least recently chosen one is unlocked and left to the page
  cache's reclaim.
- `Belady`: the same mechanism, but on overflow it unlocks the expert whose next use lies furthest in the
  future, read from the run's own routing recorded beforehand (`RoutingTrace`): the optimal replacement
  (Belady's MIN), the ceiling no online policy can pass.
- `OnlineResidencyPolicy` (``pinned-prior``): the earlier router-aware residency (`edgevision.moe.online`:
  the prior's plan pinned, moved by live statistics) behind this interface.

The router-aware policy itself is `edgevision.moe.router_aware.RouterAwarePolicy` (the mechanism:
`edgevision.moe.manager.ExpertManager`).

The same replacement logic runs offline over a recorded trace (`simulate`), for the routing statistics of
``edgevision bench routing`` and the tests. An access is one (layer, expert) that a router chose in one
evaluation (a prefill batch counts each chosen expert once, since its weights are read once); it is a hit when
the expert was resident before that evaluation.
"""

from __future__ import annotations

import bisect
import importlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from edgevision.moe.layout import ExpertLayout
    from edgevision.moe.pinning import ExpertPinner

Expert = tuple[int, int]  # (layer, expert)


# -- the recorded routing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingTrace:
    """The experts each MoE layer chose, evaluation by evaluation, in the order the router observer saw them.

    ``events[i] = (layer, experts)``: the distinct expert ids layer `layer` chose in the i-th observed
    evaluation (one decoded token, or one prefill batch).
    """

    events: tuple[tuple[int, tuple[int, ...]], ...]

    def accesses(self) -> list[tuple[Expert, ...]]:
        return [tuple((layer, e) for e in experts) for layer, experts in self.events]

    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.events}))

    def save(self, path: str | Path) -> None:
        layers = np.array([layer for layer, _ in self.events], dtype=np.int32)
        counts = np.array([len(ids) for _, ids in self.events], dtype=np.int32)
        ids = np.array([e for _, experts in self.events for e in experts], dtype=np.int32)
        with open(path, "wb") as f:
            np.savez(f, layers=layers, counts=counts, ids=ids)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        data = np.load(path)
        bounds = np.concatenate([[0], np.cumsum(data["counts"])])
        ids = data["ids"].tolist()
        return cls(
            tuple(
                (int(layer), tuple(ids[bounds[i] : bounds[i + 1]])) for i, layer in enumerate(data["layers"].tolist())
            )
        )


class TraceRecorder:
    """A `RouterObserver` listener that records a `RoutingTrace`."""

    def __init__(self) -> None:
        self._events: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        self._events.append((layer, tuple(int(e) for e in np.unique(expert_ids))))

    def trace(self) -> RoutingTrace:
        return RoutingTrace(tuple(self._events))


# -- replacement, pure logic ------------------------------------------------------------------------


class LruCache:
    """Least-recently-used replacement over `capacity` experts."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an expert cache needs room for at least one expert")
        self.capacity = capacity
        self._order: OrderedDict[Expert, None] = OrderedDict()

    @property
    def resident(self) -> frozenset[Expert]:
        return frozenset(self._order)

    def access(self, experts: Sequence[Expert]) -> tuple[int, list[Expert]]:
        """Use `experts` (one evaluation); returns (hits, evicted)."""
        hits = sum(e in self._order for e in experts)
        for expert in experts:
            self._order[expert] = None
            self._order.move_to_end(expert)
        evicted = []
        while len(self._order) > max(self.capacity, len(experts)):
            expert, _ = self._order.popitem(last=False)
            evicted.append(expert)
        return hits, evicted


class BeladyCache:
    """Belady's optimal replacement (MIN): on overflow, drop the resident expert used again furthest ahead.

    `accesses` is the whole future, one tuple of experts per evaluation; `access` must be called with them in
    order (`position` says where it is). An evaluation that differs from the recorded one is still served
    (LRU-like: its experts are treated as used now) and counted in `diverged`.
    """

    def __init__(self, capacity: int, accesses: Sequence[Sequence[Expert]]) -> None:
        if capacity < 1:
            raise ValueError("an expert cache needs room for at least one expert")
        self.capacity = capacity
        self._future = [tuple(a) for a in accesses]
        self._uses: dict[Expert, list[int]] = {}
        for position, experts in enumerate(self._future):
            for expert in experts:
                self._uses.setdefault(expert, []).append(position)
        self._resident: set[Expert] = set()
        self.position = 0
        self.diverged = 0

    @property
    def resident(self) -> frozenset[Expert]:
        return frozenset(self._resident)

    def _next_use(self, expert: Expert, after: int) -> float:
        uses = self._uses.get(expert, ())
        i = bisect.bisect_right(uses, after)
        return uses[i] if i < len(uses) else float("inf")

    def access(self, experts: Sequence[Expert]) -> tuple[int, list[Expert]]:
        now = self.position
        if now >= len(self._future) or set(self._future[now]) != set(experts):
            self.diverged += 1
        self.position += 1
        hits = sum(e in self._resident for e in experts)
        self._resident.update(experts)
        evicted = []
        keep = set(experts)
        while len(self._resident) > max(self.capacity, len(experts)):
            victim = max((e for e in self._resident if e not in keep), key=lambda e: (self._next_use(e, now), e))
            self._resident.discard(victim)
            evicted.append(victim)
        return hits, evicted


@dataclass(frozen=True)
class HitRate:
    hits: int
    accesses: int

    @property
    def rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")


def simulate(trace: RoutingTrace, capacity: int, kind: str = "lru", *, layer: int | None = None) -> HitRate:
    """Hit rate of `kind` (``"lru"`` or ``"belady"``) replacement with room for `capacity` experts, over the
    whole trace (one cache shared by all layers) or over one layer's evaluations only (`layer`)."""
    if kind not in ("lru", "belady"):
        raise ValueError(f"unknown replacement {kind!r}: lru or belady")
    accesses = [a for (lay, _), a in zip(trace.events, trace.accesses(), strict=True) if layer in (None, lay)]
    cache: LruCache | BeladyCache = LruCache(capacity) if kind == "lru" else BeladyCache(capacity, accesses)
    hits = total = 0
    for experts in accesses:
        got, _ = cache.access(experts)
        hits += got
        total += len(experts)
    return HitRate(hits, total)


# -- the plug point ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyContext:
    """What the harness hands a policy when it starts."""

    layout: ExpertLayout
    pinner: ExpertPinner  # open on the model file, non-expert weights already locked; owned by the harness
    budget: int  # bytes of experts the policy may keep locked (the cap less the process and the other weights)
    prior: np.ndarray | None = None  # (n_layer, n_expert) routing shares from calibration, when there is one
    trace: RoutingTrace | None = None  # this run's routing recorded beforehand: for the oracle (Belady) only
    mapping_base: int | None = None  # where llama.cpp mapped the model file (`LlamaDecoder.mapping_base`)
    observer: Any = None  # the router observer (a `PredictingObserver` for a policy with ``predicts = True``)


class ExpertPolicy(Protocol):
    """A residency policy. `observe` runs on the decoding thread: keep it short or hand work to a thread.
    A policy whose class sets ``predicts = True`` gets a `PredictingObserver` (router inputs too)."""

    def start(self, context: PolicyContext) -> None:
        """Take the context; set up threads and the first resident set."""

    def observe(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        """A `RouterObserver` listener: `layer`'s router chose ``expert_ids`` (T, k) with gate ``weights``."""

    def notes(self) -> str:
        """A short line for the benchmark table (what it pinned, read ahead, moved)."""

    def close(self) -> None:
        """Stop threads; the harness closes the pinner afterwards."""


POLICIES: dict[str, str] = {
    "expert-lru": "edgevision.moe.policy:ExpertLru",
    "belady": "edgevision.moe.policy:Belady",
    "router-aware": "edgevision.moe.router_aware:RouterAwarePolicy",
    "pinned-prior": "edgevision.moe.policy:OnlineResidencyPolicy",
}


def load_policy(name: str) -> ExpertPolicy:
    """A new instance of the policy registered as `name`; ``name:key=0,key=1`` passes boolean options
    (``router-aware:predict=0`` is the router-aware policy without predicted routing), ``key=N`` (N > 1) a
    number (``router-aware:depth=2``), ``key=X.Y`` a fraction (``router-aware:reroute=1.0``)."""
    name, _, options = name.partition(":")
    try:
        target = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown residency policy {name!r}; known: {', '.join(POLICIES)}") from None
    kwargs: dict[str, bool | int | float] = {}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if value.replace(".", "", 1).isdigit() and "." in value:
            kwargs[key] = float(value)
        else:
            kwargs[key] = int(value) if value.isdigit() and int(value) > 1 else value not in ("0", "false", "off", "no")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


class _Replacement:
    """A policy that locks every chosen expert and unlocks what its cache evicts (shared by LRU and Belady)."""

    label = ""

    def start(self, context: PolicyContext) -> None:
        self.pinner = context.pinner
        per_expert = max(context.layout.expert_bytes(layer) for layer in context.layout.moe_layers)
        self.capacity = max(context.layout.n_expert_used, context.budget // per_expert)
        self.cache = self._cache(context)
        self.locked: set[Expert] = set()
        self.reads = 0

    def _cache(self, context: PolicyContext) -> LruCache | BeladyCache:
        raise NotImplementedError

    def observe(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        experts = tuple((layer, int(e)) for e in np.unique(expert_ids))
        _, evicted = self.cache.access(experts)
        self.locked.difference_update(evicted)
        new = [e for e in experts if e not in self.locked]
        self.locked.update(new)
        if new or evicted:
            self.reads += len(new)
            self.pinner.pin(self.locked)  # unlocks the evicted, locks (and reads in) the new

    def notes(self) -> str:
        return f"room for {self.capacity} experts, {self.reads} experts locked in as chosen"

    def close(self) -> None:
        pass


class ExpertLru(_Replacement):
    def _cache(self, context: PolicyContext) -> LruCache:
        return LruCache(self.capacity)


class Belady(_Replacement):
    def _cache(self, context: PolicyContext) -> BeladyCache:
        if context.trace is None:
            raise ValueError("Belady's replacement needs the run's routing trace, recorded beforehand")
        return BeladyCache(self.capacity, context.trace.accesses())

    def notes(self) -> str:
        cache = self.cache
        diverged = f", {cache.diverged} evaluations differed from the trace" if isinstance(cache, BeladyCache) else ""
        return super().notes() + diverged


class OnlineResidencyPolicy:
    """`edgevision.moe.online.OnlineResidency` (prior plan, live re-plans, router-triggered read-ahead)."""

    def __init__(self, *, prefetch: bool = True) -> None:
        self.prefetch = prefetch
        self._online: Any = None

    def start(self, context: PolicyContext) -> None:
        from edgevision.moe.online import OnlineResidency

        if context.prior is None:
            raise ValueError("router-aware residency needs a calibration profile (the prior)")
        self._online = OnlineResidency(
            context.layout,
            context.pinner,
            context.prior,
            ram_budget=context.budget + context.layout.other_bytes,
            replan_every=16,
            prefetch=self.prefetch,
        )
        self._online.start()

    def observe(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        self._online.observe(layer, expert_ids, weights)

    def notes(self) -> str:
        stats = self._online.stats
        plan = stats.plan
        text = f"{len(plan.pinned)} experts pinned ({100 * plan.covered_mass:.0f}% of prior mass)" if plan else ""
        text += f", {stats.replans} re-plans moved {stats.pins_moved} pins"
        if self.prefetch:
            text += f", {self._online.prefetches} expert reads ahead"
        return text

    def close(self) -> None:
        if self._online is not None:
            self._online.close()
