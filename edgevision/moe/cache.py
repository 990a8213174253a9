"""Which experts to keep in RAM: expert-granular replacement policies, and a simulator to compare them.

Every selected expert costs its full bytes whatever its gate weight, so the policies here count selections,
not gate mass. Capacity is in bytes; an expert's size is its layer's (`ExpertLayout.expert_bytes`).

- `LruCache`: least recently selected out (the expert-granular form of what the page cache does).
- `ScoredCache`, the router-aware policy: each expert's score estimates how soon it is selected again, as a
  decayed selection count (LRFU: every selection adds 1, halving every `half_life` tokens, so a short
  half-life is LRU-like and a long one LFU-like) plus `prior_tokens` x the calibrated share of its layer's
  selections as a pseudo-count that never decays. Eviction takes the lowest score. Admission: a missed expert
  whose score is below every resident's is read for this token and dropped right after (it would push out
  something likelier to be needed), unless there is free room. `hint` records predicted selections (from the
  layers ahead) at a fraction of a selection's weight, so a right prediction is still there when the router
  confirms it and a wrong one leaves first.
- `BeladyCache`: the offline optimum (evict what is needed furthest in the future, bypass when the new expert
  is), computed from the whole trace: the ceiling any policy is measured against.

`simulate` replays a routing trace (per token, per MoE layer, the selected ids, as `RouterObserver` listeners
see them) through a policy and counts hits, misses and bytes read. Pure logic: no files, no native calls.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Expert = tuple[int, int]  # (layer, expert)
PRIOR_TOKENS = 16.0  # what the calibrated prior is worth, in tokens' selections (swept: `bench policy`)
# what a prompt prefill's selection adds to a score, against a generated token's 1: a prefill selects nearly
# every expert once, which says little about what the answer will select
PREFILL_WEIGHT = 0.1
Trace = Sequence[Sequence[Sequence[int]]]  # [token][position in the layer order] -> selected expert ids


class Cache(Protocol):
    """What `simulate` and `edgevision.moe.manager.ExpertManager` drive."""

    resident_bytes: int

    def access(self, layer: int, experts: Iterable[int], now: int) -> tuple[list[int], list[Expert]]:
        """The router selected `experts` of `layer` at token `now`: returns (missed experts, experts to evict
        now; a missed expert that is not admitted is among the evicted)."""
        ...

    def resident(self) -> set[Expert]: ...


@dataclass
class SimResult:
    name: str
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    tokens: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0


class _Sized:
    def __init__(self, capacity: int, expert_bytes: Sequence[int]) -> None:
        if capacity < 0:
            raise ValueError("capacity must be 0 or more bytes")
        self.capacity = capacity
        self.expert_bytes = list(expert_bytes)  # per layer
        self.resident_bytes = 0

    def size(self, layer: int) -> int:
        return self.expert_bytes[layer]


class LruCache(_Sized):
    """Expert-granular least-recently-used replacement."""

    def __init__(self, capacity: int, expert_bytes: Sequence[int]) -> None:
        super().__init__(capacity, expert_bytes)
        self._order: OrderedDict[Expert, None] = OrderedDict()

    def access(self, layer: int, experts: Iterable[int], now: int) -> tuple[list[int], list[Expert]]:
        missed, evicted = [], []
        for e in experts:
            key = (layer, int(e))
            if key in self._order:
                self._order.move_to_end(key)
                continue
            missed.append(key[1])
            self._order[key] = None
            self.resident_bytes += self.size(layer)
        while self.resident_bytes > self.capacity and self._order:
            victim, _ = self._order.popitem(last=False)
            self.resident_bytes -= self.size(victim[0])
            evicted.append(victim)
        return missed, evicted

    def resident(self) -> set[Expert]:
        return set(self._order)


class ScoredCache(_Sized):
    """The router-aware policy (see the module docstring).

    Args:
        capacity: bytes of experts to keep.
        expert_bytes: per layer, bytes of one expert.
        prior: (n_layer, n_expert) calibrated selection shares (rows summing to 1, or 0 for dense layers).
        half_life: tokens after which a selection counts half.
        prior_tokens: how many tokens' worth of selections the prior is worth.
        hint_weight: what a predicted selection adds to the score (a real one adds 1).
    """

    def __init__(
        self,
        capacity: int,
        expert_bytes: Sequence[int],
        prior: np.ndarray,
        *,
        half_life: float = 2.0,
        prior_tokens: float = PRIOR_TOKENS,
        hint_weight: float = 0.5,
    ) -> None:
        super().__init__(capacity, expert_bytes)
        if half_life <= 0 or prior_tokens < 0 or hint_weight < 0:
            raise ValueError("half_life must be positive, prior_tokens and hint_weight 0 or more")
        self._rate = math.log(2) / half_life
        self._base = prior_tokens * np.asarray(prior, dtype=np.float64)
        # a decayed count is stored as count * 2 ** (t / half_life): an update touches one entry and all
        # scores are compared at one time by dividing by the same factor (the clock restarts when it grows)
        self._boost = np.zeros_like(self._base)
        self._origin = 0.0
        self.hint_weight = hint_weight
        self._mask = np.zeros(self._base.shape, dtype=bool)  # resident
        self._sizes = np.broadcast_to(np.asarray(self.expert_bytes, dtype=np.int64)[:, None], self._base.shape)
        self._unit = min((b for b in self.expert_bytes if b > 0), default=0)  # the smallest expert

    def _scale(self, now: float) -> float:
        factor = math.exp(self._rate * (now - self._origin))
        if factor > 1e100:
            self._boost /= factor
            self._origin, factor = now, 1.0
        return factor

    def scores(self, now: float) -> np.ndarray:
        """(n_layer, n_expert): every expert's decayed selections at token `now` plus its prior pseudo-count."""
        return self._boost / self._scale(now) + self._base

    def _add(self, layer: int, experts: Sequence[int], weight: float, now: float) -> None:
        amount = weight * self._scale(now)
        row = self._boost[layer]
        for expert in experts:  # a handful: scalar updates beat fancy indexing here
            row[expert] += amount

    def _make_room(
        self, layer: int, expert: int, now: float, protect: Sequence[int], strict: bool
    ) -> list[Expert] | None:
        """Free room for (layer, expert) by evicting lower-scored residents (not `protect`, of the same layer):
        the evicted, or None if the expert does not beat them (`strict`: must score higher)."""
        need = self.size(layer) - (self.capacity - self.resident_bytes)
        if need <= 0:
            return []
        scores = self.scores(now)
        mine = scores[layer, expert]
        candidates = self._mask.copy()
        candidates[layer, protect] = False
        if need <= self._unit:  # one victim is enough (experts of one size): the lowest score
            masked = np.where(candidates, scores, np.inf)
            victim = int(np.argmin(masked))
            worst = masked.flat[victim]
            if not np.isfinite(worst) or worst > mine or (strict and worst == mine):
                return None
            self._mask.flat[victim] = False
            self.resident_bytes -= int(self._sizes.flat[victim])
            return [divmod(victim, self._base.shape[1])]
        flat = np.flatnonzero(candidates)
        order = flat[np.argsort(scores.ravel()[flat], kind="stable")]
        sizes = self._sizes.ravel()[order]
        enough = np.searchsorted(np.cumsum(sizes), need)
        if enough >= len(order):
            return None
        chosen = order[: enough + 1]
        worst = scores.ravel()[chosen[-1]]
        if worst > mine or (strict and worst == mine):
            return None
        self._mask.ravel()[chosen] = False
        self.resident_bytes -= int(sizes[: enough + 1].sum())
        return [divmod(int(i), self._base.shape[1]) for i in chosen]

    def _admit(self, layer: int, expert: int) -> None:
        self._mask[layer, expert] = True
        self.resident_bytes += self.size(layer)

    def access(
        self, layer: int, experts: Iterable[int], now: int, weight: float = 1.0
    ) -> tuple[list[int], list[Expert]]:
        """See `Cache.access`; `weight` is what each selection adds to the score (a prompt prefill, which
        selects most experts once, may count for less than a generated token)."""
        chosen = [int(e) for e in experts]
        self._add(layer, chosen, weight, now)
        missed = [e for e in chosen if not self._mask[layer, e]]
        evicted: list[Expert] = []
        for e in missed:
            victims = self._make_room(layer, e, now, chosen, strict=False)
            if victims is None:
                evicted.append((layer, e))  # not admitted: read for this token, dropped after
                continue
            evicted += victims
            self._admit(layer, e)
        return missed, evicted

    def hint(self, layer: int, experts: Iterable[int], now: int) -> tuple[list[int], list[Expert], list[int]]:
        """Predicted selections for `layer`: returns (experts admitted, to read ahead; experts to evict for
        them; experts not resident and not admitted). The last ones are worth reading ahead too, for this use
        only (a prediction is nearly always right): the caller takes them out again after use."""
        chosen = [int(e) for e in experts]
        self._add(layer, chosen, self.hint_weight, now)
        ahead: list[int] = []
        evicted: list[Expert] = []
        transient: list[int] = []
        for e in chosen:
            if self._mask[layer, e]:
                continue
            victims = self._make_room(layer, e, now, chosen, strict=True)
            if victims is None:
                transient.append(e)
                continue
            evicted += victims
            self._admit(layer, e)
            ahead.append(e)
        return ahead, evicted, transient

    def shrink(self, capacity: int, now: int) -> list[Expert]:
        """A new capacity (memory pressure): returns the experts to evict to fit it."""
        self.capacity = max(0, capacity)
        if self.resident_bytes <= self.capacity:
            return []
        scores = self.scores(now)
        flat = np.flatnonzero(self._mask)
        order = flat[np.argsort(scores.ravel()[flat], kind="stable")]
        sizes = self._sizes.ravel()[order]
        count = int(np.searchsorted(np.cumsum(sizes), self.resident_bytes - self.capacity)) + 1
        chosen = order[:count]
        self._mask.ravel()[chosen] = False
        self.resident_bytes -= int(sizes[:count].sum())
        return [divmod(int(i), self._base.shape[1]) for i in chosen]

    def warm(self) -> list[Expert]:
        """Fill free room with the prior's likeliest experts (at start); returns them, to be read in."""
        density = self._base / self._sizes
        added = []
        for index in np.argsort(-density.ravel(), kind="stable"):
            layer, expert = divmod(int(index), self._base.shape[1])
            if density[layer, expert] <= 0:
                break
            if self._mask[layer, expert] or self.resident_bytes + self.size(layer) > self.capacity:
                continue
            self._admit(layer, expert)
            added.append((layer, expert))
        return added

    def resident(self) -> set[Expert]:
        return {(int(a), int(b)) for a, b in zip(*np.nonzero(self._mask), strict=True)}

    def __contains__(self, expert: Expert) -> bool:
        return bool(self._mask[expert])

    def held(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Which of `experts` (ids of `layer`) the cache holds, as a boolean array."""
        return self._mask[layer, experts]


class BeladyCache(_Sized):
    """Belady's optimal replacement with bypass, from the whole trace (the ceiling)."""

    def __init__(self, capacity: int, expert_bytes: Sequence[int], trace: Trace, layers: Sequence[int]) -> None:
        super().__init__(capacity, expert_bytes)
        # next use of each access, in access order
        self._uses: dict[Expert, list[int]] = {}
        step = 0
        for token in trace:
            for position, ids in enumerate(token):
                for e in ids:
                    self._uses.setdefault((layers[position], int(e)), []).append(step)
                step += 1
        self._cursor: dict[Expert, int] = {key: 0 for key in self._uses}
        self._step = 0
        self._resident: set[Expert] = set()

    def _next_use(self, key: Expert) -> float:
        uses, i = self._uses.get(key, []), self._cursor.get(key, 0)
        return uses[i] if i < len(uses) else math.inf

    def access(self, layer: int, experts: Iterable[int], now: int) -> tuple[list[int], list[Expert]]:
        chosen = [int(e) for e in experts]
        for e in chosen:
            self._cursor[(layer, e)] += 1  # this use is consumed
        missed = [e for e in chosen if (layer, e) not in self._resident]
        evicted: list[Expert] = []
        protect = {(layer, e) for e in chosen}
        for e in missed:
            key = (layer, e)
            size = self.size(layer)
            while self.resident_bytes + size > self.capacity:
                pool = [k for k in self._resident if k not in protect]
                if not pool:
                    break
                victim = max(pool, key=self._next_use)
                if self._next_use(victim) <= self._next_use(key):
                    break
                self._resident.discard(victim)
                self.resident_bytes -= self.size(victim[0])
                evicted.append(victim)
            if self.resident_bytes + size <= self.capacity:
                self._resident.add(key)
                self.resident_bytes += size
            else:
                evicted.append(key)
        self._step += 1
        return missed, evicted

    def resident(self) -> set[Expert]:
        return set(self._resident)


def simulate(
    name: str,
    cache: Cache,
    trace: Trace,
    layers: Sequence[int],
    expert_bytes: Sequence[int],
    *,
    predictions: Sequence[Sequence[Sequence[int]]] | None = None,
    warm: bool = False,
    counted: Sequence[bool] | None = None,
    prefill_weight: float = PREFILL_WEIGHT,
) -> SimResult:
    """Replay `trace` (``trace[t][i]``: ids selected at token t by MoE layer ``layers[i]``) through `cache`.

    With `predictions` (same shape: the ids predicted for layer i before it ran) a `ScoredCache` gets them as
    hints; an expert read ahead on a hint and then selected counts as a hit (it was read while earlier layers
    computed), and its bytes count as read. With `counted`, only the steps marked True are counted (e.g. the
    single-token decode steps), though every step goes through the cache. Returns hits, misses and bytes read
    per counted step.
    """
    result = SimResult(name)
    if warm and isinstance(cache, ScoredCache):
        result.bytes_read += sum(expert_bytes[layer] for layer, _ in cache.warm())
    for t, token in enumerate(trace):
        for i, ids in enumerate(token):
            layer = layers[i]
            transient: list[int] = []
            if predictions is not None and isinstance(cache, ScoredCache) and predictions[t][i]:
                ahead, _, transient = cache.hint(layer, predictions[t][i], t)
                if counted is None or counted[t]:
                    result.bytes_read += (len(ahead) + len(transient)) * expert_bytes[layer]
            unique = list(dict.fromkeys(int(e) for e in ids))
            if isinstance(cache, ScoredCache) and counted is not None and not counted[t]:
                missed, _ = cache.access(layer, unique, t, prefill_weight)
            else:
                missed, _ = cache.access(layer, unique, t)
            missed = [e for e in missed if e not in transient]  # read ahead for this use: a hit, bytes counted
            if counted is None or counted[t]:
                result.misses += len(missed)
                result.hits += len(unique) - len(missed)
                result.bytes_read += len(missed) * expert_bytes[layer]
        if counted is None or counted[t]:
            result.tokens += 1
    return result
