"""The router-aware policy, live: which experts stay in RAM, read ahead, and what leaves.

`ExpertManager` follows a `PredictingObserver`: attached (`attach`), the decoding thread only copies each MoE
layer's router logits and input into a queue, and the manager's own thread makes the decisions (it can also
be used as the observer's listeners, on the decoding thread). For every MoE layer of every decode:

1. the router's choice goes into the `ScoredCache` (prior + decayed selection counts). A selected expert
   that is not resident is handed to the `ExpertPrefetcher` at once: the observer sees the choice before the
   expert matmuls run, so the pool's parallel reads race llama.cpp's page faults, which then find the pages
   (or wait for the read already in flight) instead of reading 4 KiB at a time;
2. the next MoE layers' predicted choice (`RoutePredictor` on this layer's router input) goes to the cache as
   hints: the ones it admits are read ahead while this and the following layers compute;
3. what the cache evicts is handed to a background thread that takes it out of RAM for real
   (`ModelMapping.evict`: unmap from llama.cpp's mapping, drop from the page cache). Keeping the experts'
   resident bytes within the budget this way means the kernel's own reclaim, which does not know what the
   router will pick, has nothing to choose.

The budget follows memory pressure: a callable (default: this process's cgroup room, `memory_room`, minus
`headroom`) is polled by the same background thread, and the cache shrinks (evicting its lowest-scored
experts) or grows with it.

Nothing here runs ``mlock``/``munlock`` (they take the process's memory-map lock for writing and would stall
the decoding thread's page faults), and nothing here changes a weight: the generated tokens are the same with
and without the manager (tested).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgevision.moe.cache import PREFILL_WEIGHT, PRIOR_TOKENS, Expert, ScoredCache
from edgevision.moe.layout import ExpertLayout
from edgevision.moe.mapping import ModelMapping
from edgevision.moe.prefetch import AHEAD, NOW, ExpertPrefetcher

if TYPE_CHECKING:
    from typing_extensions import Self

    from edgevision.moe.predict import PredictingObserver, RoutePredictor

logger = logging.getLogger(__name__)

MIB = 2**20
READ_AHEAD_PRECISION = 0.8  # predicted experts are read ahead while at least this share of them is then chosen
PRECISION_DECAY = 0.02  # weight of each MoE layer's outcome in that share (about the last 50 layers)


@dataclass(frozen=True)
class ManagerStats:
    steps: int  # decodes observed
    selected: int  # expert selections (unique per layer and decode)
    misses: int  # of those, not resident by the policy's account
    hinted: int  # experts read ahead on a prediction
    read_now: int  # experts read on the router's own choice
    evicted: int  # experts taken out of RAM
    capacity: int  # bytes of experts the cache may hold now
    resident: int  # bytes of experts it holds

    @property
    def hit_rate(self) -> float:
        return 1 - self.misses / self.selected if self.selected else 1.0


def cgroup_budget(other_bytes: int, headroom: int = 48 * MIB) -> Callable[[int], int]:
    """A budget following memory pressure: the experts may hold what they hold now plus the room left under
    this process's memory cap (or the machine's available memory), minus `headroom`."""
    from edgevision.moe.cgroup import memory_room

    def budget(resident: int) -> int:
        limit, usage = memory_room()
        return max(0, resident + limit - usage - headroom)

    return budget


class ExpertManager:
    """Keeps the experts the router is likeliest to pick in RAM (see the module docstring).

    Args:
        layout: the model's expert layout.
        mapping: llama.cpp's mapping of the file (`ModelMapping(layout, decoder.mapping_base)`).
        prior: (n_layer, n_expert) calibrated selection shares (`RouterProfile` counts, normalised).
        budget: bytes of experts to keep, or ``budget(resident_bytes) -> bytes`` polled every `poll` seconds.
        predictor: the routers of the layers ahead; None: no predicted routing.
        depth: how many MoE layers ahead to predict.
        prefetch: read missed and predicted experts with the pool (False: leave them to page faults).
        evict: take evicted experts out of RAM (False: leave them to the kernel's reclaim).
        warm: read the prior's likeliest experts into the budget at start.
        random_access: no kernel read-around on llama.cpp's expert pages (`ModelMapping.random_access`).
        reroute: cache-aware routing: on a decoded token, a chosen expert not in RAM is replaced by the
            likeliest expert in RAM whose router logit is within this margin of its own (so its gate is at
            least ``exp(-reroute)`` of the replaced one's), as `reroute` describes. 0: never; the model's
            routing, and so its tokens, are then exactly as without the manager. It changes the model's output:
            ``edgevision bench moe`` reports top-1 agreement and KL beside the speed.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        mapping: ModelMapping,
        prior: np.ndarray,
        *,
        budget: int | Callable[[int], int],
        predictor: RoutePredictor | None = None,
        depth: int = 1,
        prefetch: bool = True,
        evict: bool = True,
        warm: bool = True,
        random_access: bool = True,
        workers: int = 4,
        half_life: float = 2.0,
        prior_tokens: float = PRIOR_TOKENS,
        poll: float = 0.25,
        reroute: float = 0.0,
    ) -> None:
        if reroute < 0:
            raise ValueError(f"the rerouting margin must be 0 or more, not {reroute}")
        self.layout, self.mapping, self.predictor, self.depth = layout, mapping, predictor, depth
        self.margin = float(reroute)
        self.rerouted = 0  # chosen experts replaced by one in RAM (`reroute`)
        self._router_choice: dict[int, set[int]] = {}  # layer -> the router's own choice, before `reroute`
        self._budget = budget if callable(budget) else None
        capacity = budget if isinstance(budget, int) else budget(0)
        expert_bytes = [
            layout.expert_bytes(layer) if layer in layout.moe_layers else 0 for layer in range(layout.n_layer)
        ]
        self.cache = ScoredCache(capacity, expert_bytes, prior, half_life=half_life, prior_tokens=prior_tokens)
        self._lock = threading.Lock()  # the cache, between the decoding thread and the background one
        self._evicting: set[Expert] = set()  # being taken out of RAM now (`_take_out`)
        self._out = threading.Condition(self._lock)  # notified when they are out
        # the pool's workers ask what is in RAM without holding the GIL, which the decoding thread needs
        needed = functools.partial(mapping.cold, hold_gil=False)
        self.prefetcher = (
            ExpertPrefetcher(layout, workers=workers, needed=needed, in_ram=mapping.in_ram) if prefetch else None
        )
        self._evict = evict
        self._random = random_access
        self._warm = warm
        self._poll = poll
        self._first = layout.moe_layers[0]
        self._step = 0
        self._selected = self._misses = self._hinted = self._read_now = self._evicted = 0
        # evicted experts for the background thread; an Event: set it when reached; None: stop
        self._dropped: queue.SimpleQueue[tuple[int, list[Expert]] | threading.Event | None] = queue.SimpleQueue()
        # (layer call count when dropped, experts); an expert selected again since is not taken out
        self._calls = 0  # MoE layers observed
        self._marks = 0  # MoE layers the decoding thread has reached (`_enqueue`): counts as `_calls` does
        self._selected_at = np.full((layout.n_layer, layout.n_expert), -1, dtype=np.int64)
        self._after_use: list[Expert] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # this token's layers (layer, logits, router input, predictions), not yet queued
        self._batch: list[tuple[int, np.ndarray, np.ndarray | None, dict[int, np.ndarray]]] = []
        self._last = layout.moe_layers[-1]
        self._policy_thread: threading.Thread | None = None
        self._observer: PredictingObserver | None = None
        self.n_used = layout.n_expert_used
        self._waited = 0  # experts read on the decoding thread's behalf before its matmuls
        self._read_ahead = 0  # experts read on the decoding thread's prediction for a layer ahead
        # on single-token decode steps: seconds the decoding thread spent in the policy (`_enqueue`), of which
        # waiting for the lock against eviction and waiting for the reads of the experts it chose; MoE layers
        self.decoder_time = self.lock_time = self.read_wait = 0.0
        self.decode_layers = 0
        self.decode_misses = 0  # chosen experts not in RAM on single-token decode steps
        self.decode_holes = 0  # of those, experts the cache holds: pages the kernel's reclaim took
        # share of predicted experts then chosen (decayed); reads ahead stop below the bar. It starts at the bar:
        # predictions earn their reads (static-skew model, 72% right: from 1.0 it took about 60 layers to fall
        # below, and the reads ahead on the way cost about 1 MB per token over the benchmark run)
        self.precision = READ_AHEAD_PRECISION
        self._guessed: dict[int, set[int]] = {}  # layer -> the experts predicted for it
        self.evict_time = 0.0
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- observation --------------------------------------------------------------------------------

    def attach(self, observer: PredictingObserver) -> None:
        """Take the router's choices from `observer` on this manager's own thread: the decoding thread only
        copies each MoE layer's router logits and input and queues them (`PredictingObserver.deferred`)."""
        self.n_used = observer.n_expert_used
        self._observer = observer
        observer.deferred = self._enqueue
        if self.margin > 0:
            observer.reroute = self.reroute
        self._inbox = queue.SimpleQueue()
        self._policy_thread = threading.Thread(target=self._follow, name="moe-policy", daemon=True)
        self._policy_thread.start()

    def reroute(self, layer: int, logits: np.ndarray) -> bool:
        """Cache-aware routing, on the decoding thread before llama.cpp's top-k reads the router's `logits`
        (``(1, n_expert)``, changed in place): each chosen expert not wholly in RAM (``mincore``) is replaced by
        the likeliest unchosen expert that is, if its logit is at least the chosen one's minus the margin; every
        other expert scoring above the new choice's lowest is pushed below all of them, so that top-k picks
        exactly the new choice. Gemma 4 renormalises the gates over the chosen experts, so each keeps its own
        gate (its softmax over the chosen logits), the substitute included. Returns whether anything changed.
        A chosen expert with no substitute in reach stays chosen, and is read as usual."""
        start = time.perf_counter()
        row = logits[0]
        k = self.n_used
        order = np.argsort(row)[::-1]
        chosen = order[:k].tolist()
        self._router_choice[layer] = set(chosen)
        cold = self.mapping.cold([(layer, e) for e in chosen])
        if not cold:
            self.decoder_time += time.perf_counter() - start
            return False
        missing = {e for _, e in cold}
        if self.prefetcher is not None and missing:  # read ahead on a prediction: on its way, kept
            missing -= {e for x, e in self.prefetcher.pending() if x == layer}
        candidates = iter(int(e) for e in order[k:])
        candidate = next(candidates, None)
        swapped = 0
        for position, expert in enumerate(chosen):
            if expert not in missing:
                continue
            floor = row[expert] - self.margin
            while candidate is not None and row[candidate] >= floor:
                warm = not self.mapping.cold([(layer, candidate)])
                taken, candidate = candidate, next(candidates, None)
                if warm:
                    chosen[position] = taken
                    swapped += 1
                    break
        if swapped:
            lowest = min(row[e] for e in chosen)
            pushed = [e for e in order if row[e] >= lowest and e not in chosen]
            row[pushed] = row.min() - 64.0  # out of the top-k, and a gate that rounds to nothing
            self.rerouted += swapped
        self.decoder_time += time.perf_counter() - start
        return swapped > 0

    def _enqueue(self, layer: int, logits: np.ndarray, router_input: np.ndarray | None) -> None:
        """On the decoding thread, before the layer's expert matmuls: the chosen experts not wholly in the page
        cache are read now, by the pool at its queue depth, and waited for (the matmuls would otherwise fault
        them in a read-ahead window at a time); the rest of the work is queued for the policy's thread."""
        if self._error is not None:  # the policy has stopped (reported by `stats`); the kernel decides
            return
        start = time.perf_counter()
        try:
            self._enqueue_layer(layer, logits, router_input)
        finally:
            if logits.shape[0] == 1:
                self.decoder_time += time.perf_counter() - start
                self.decode_layers += 1

    def _enqueue_layer(self, layer: int, logits: np.ndarray, router_input: np.ndarray | None) -> None:
        predicted: dict[int, np.ndarray] = {}  # target layer -> predicted experts, handed on to `hidden`
        if self.prefetcher is not None:
            if logits.shape[0] == 1:  # the ids only (no gates): what the matmuls will read
                chosen = np.argpartition(logits[0], -self.n_used)[-self.n_used :]
            else:  # a prefill: every expert any row chose
                chosen = np.unique(np.argpartition(-logits, self.n_used - 1, axis=1)[:, : self.n_used])
            if self.predictor is not None and router_input is not None and logits.shape[0] == 1:
                guessed = self._guessed.pop(layer, None)
                choice = self._router_choice.pop(layer, None) or set(chosen.tolist())
                if guessed is not None:  # how often a predicted expert is then chosen (decayed) by the router
                    right = len(guessed & choice) / len(guessed)
                    self.precision += PRECISION_DECAY * (right - self.precision)
                for target in self.predictor.ahead(layer, self.depth):
                    predicted[target] = self.predictor.predict_ids(layer, router_input, target)
                    self._guessed[target] = set(predicted[target].tolist())
            locking = time.perf_counter()
            with self._out:  # in use from now: an eviction decided earlier leaves them (see `_take_out`)
                self._marks += 1
                self._selected_at[layer, chosen] = self._marks
                for target, guess in predicted.items():
                    self._selected_at[target, guess] = self._marks
                # one being taken out right now: wait until it is out, then read it back (rare)
                while self._evicting and self._evicting.intersection((layer, int(e)) for e in chosen):
                    self._out.wait(0.1)
            if logits.shape[0] == 1:
                self.lock_time += time.perf_counter() - locking
            # what the page cache holds now (mincore), not the policy thread's view, which may lag a layer
            cold = self.mapping.cold([(layer, int(e)) for e in chosen])
            if cold:
                self.prefetcher.submit(cold, NOW)
                self._waited += len(cold)
                if logits.shape[0] == 1:
                    self.decode_misses += len(cold)
                    self.decode_holes += int(self.cache.held(layer, np.array([e for _, e in cold])).sum())
            # the next layers' predicted experts, read while this layer and the ones before them compute. Here
            # rather than on the policy's thread, which may be a token behind: there the read would start too
            # late. The policy's thread decides later whether they stay (`hidden`).
            # Only while predictions are mostly right: a wrong one costs a whole expert's read, and the bandwidth
            # it takes delays the reads the decoder waits for (static-skew model: 64% right, 0.7 MB a token more).
            if self.precision >= READ_AHEAD_PRECISION:
                for target, guess in predicted.items():
                    # not those the policy holds (most of them): waking the pool's workers for them would cost
                    # the decoding thread GIL hand-offs; the pool's worker skips the others that are in RAM
                    wanted = [(target, int(e)) for e in guess[~self.cache.held(target, guess)]]
                    if wanted:
                        self._read_ahead += self.prefetcher.submit(wanted, AHEAD)
            if cold:
                waiting = time.perf_counter()
                if not self.prefetcher.wait_for(cold, timeout=2.0):
                    logger.debug("reading experts %s took more than 2 s; llama.cpp faults in the rest", cold)
                if logits.shape[0] == 1:
                    self.read_wait += time.perf_counter() - waiting
        # the policy's thread wakes once per decoded token, not once per layer: each wake-up takes the GIL
        # and a CPU from the decoding thread; its decisions only need to keep up token by token
        self._batch.append((layer, logits, router_input, predicted))
        if logits.shape[0] > 1 or layer == self._last:
            self._inbox.put(self._batch)
            self._batch = []

    def _follow(self) -> None:
        from edgevision.moe.predict import topk_gates

        while (item := self._inbox.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            for layer, logits, router_input, predicted in item:
                try:
                    ids, weights = topk_gates(logits, self.n_used)
                    self.observe(layer, ids, weights)
                    if router_input is not None:
                        self.hidden(layer, router_input, predicted)
                except Exception as exc:  # reported by stats; decoding goes on with the kernel deciding
                    logger.exception("the expert policy failed on layer %d; the kernel's page cache decides", layer)
                    self._error = exc
                    return

    # -- decisions (the policy thread, or the decoding thread when used as listeners) ----------------

    def observe(self, layer: int, expert_ids: np.ndarray, _weights: np.ndarray) -> None:
        """`RouterObserver` listener: the router's choice for `layer`."""
        if layer == self._first:
            self._step += 1
            if self._step == 2 and self._observer is not None:  # the first graph has been seen whole
                from edgevision.moe.mapping import check_managed

                check_managed(self.mapping, self._observer.placement)  # raises if llama.cpp repacked them
            if self._after_use:  # the experts read for one decode only: that decode is over
                self._dropped.put((self._calls, self._after_use))
                self._after_use = []
        elif expert_ids.shape[0] > 1 and self._after_use:
            # a prefill reads nearly every expert of every layer: what the layers before read for this use only
            # leaves now, not at the end, or the prefill would fill the cap and the kernel's reclaim would make
            # holes in the experts the cache holds
            self._dropped.put((self._calls, self._after_use))
            self._after_use = []
        self._calls += 1
        chosen = np.unique(expert_ids).tolist()
        weight = PREFILL_WEIGHT if expert_ids.shape[0] > 1 else 1.0
        with self._lock:  # the decoding thread may have marked them for a later use already (`_enqueue`)
            self._selected_at[layer, chosen] = np.maximum(self._selected_at[layer, chosen], self._calls)
            missed, evicted = self.cache.access(layer, chosen, self._step, weight)
        self._selected += len(chosen)
        self._misses += len(missed)
        if missed and self.prefetcher is not None and self._policy_thread is None:
            self._read_now += self.prefetcher.submit([(layer, e) for e in missed], NOW)
        if evicted:
            mine = [x for x in evicted if x[0] == layer]  # not admitted: this layer is about to use them
            if mine:
                self._after_use += mine
            if len(mine) < len(evicted):
                self._dropped.put((self._calls, [x for x in evicted if x[0] != layer]))

    def hidden(self, layer: int, router_input: np.ndarray, predicted: dict[int, np.ndarray] | None = None) -> None:
        """`PredictingObserver` hidden listener: predict the layers ahead and read their experts early.
        `predicted`: the predictions the decoding thread made already (`_enqueue`), not made again."""
        if self.predictor is None or router_input.shape[0] != 1:
            return  # a prefill reads nearly every expert anyway: its predictions would only flood the cache
        if self.precision < READ_AHEAD_PRECISION:
            return  # predictions mostly wrong lately: admitting them would read and hold the wrong experts
        for target in self.predictor.ahead(layer, self.depth):
            made = predicted.get(target) if predicted else None
            if made is None:
                made = self.predictor.predict(layer, router_input, target)
            guess = np.unique(made).tolist()
            with self._lock:
                ahead, evicted, transient = self.cache.hint(target, guess, self._step)
            if self.prefetcher is not None:
                # the decoding thread has read the predicted experts ahead already (`_enqueue`); the admitted
                # ones stay, the others were read for this use only and are taken out after it
                if transient:
                    self._after_use += [(target, e) for e in transient]
                if ahead:  # the pool's worker skips those in RAM
                    self._hinted += self.prefetcher.submit([(target, e) for e in ahead], AHEAD)
            if evicted:
                self._dropped.put((self._calls, evicted))

    # -- background -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Take every expert the cache does not hold out of RAM, warm the cache from the prior (read in the
        background) and start the eviction/budget thread: from here the page cache holds what the policy says."""
        if self._random:
            self.mapping.random_access()
            if self.prefetcher is not None:  # the non-expert weights, in large reads rather than page by page
                self.prefetcher.submit_ranges(self.layout.other_ranges)
        warm = []
        if self._warm:
            with self._lock:
                warm = self.cache.warm()
        if self._evict:
            # every expert out first, the warm ones too: the page cache may hold them in large folios that
            # straddle two experts (a file written or read ahead in big pieces), and a folio leaves only
            # whole; re-read by the pool, they come back in pieces that can leave one expert at a time
            every = [(layer, e) for layer in self.layout.moe_layers for e in range(self.layout.n_expert)]
            self.mapping.evict([r for x in every for r in self.layout.expert_ranges(*x)])
        if warm and self.prefetcher is not None:
            self.prefetcher.submit(warm, AHEAD)
        self._worker = threading.Thread(target=self._run, name="moe-evict", daemon=True)
        self._worker.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                batch = self._dropped.get(timeout=self._poll)
            except queue.Empty:
                batch = (self._calls, [])
            if batch is None:
                return
            if isinstance(batch, threading.Event):
                batch.set()
                continue
            when, experts = batch
            try:
                if self._budget is not None:
                    with self._lock:
                        resident = self.cache.resident_bytes
                    capacity = self._budget(resident)
                    with self._lock:
                        if capacity < self.cache.resident_bytes:
                            shrunk = self.cache.shrink(capacity, self._step)
                        else:
                            self.cache.capacity, shrunk = capacity, []
                    if shrunk and self._evict:
                        self._take_out(self._calls, shrunk)
                if experts and self._evict:
                    self._take_out(when, experts)
            except Exception as exc:  # reported by stats; decoding goes on with the kernel deciding
                logger.exception("evicting experts failed; the kernel's reclaim decides from now on")
                self._error = exc
                return

    def _take_out(self, when: int, experts: list[Expert]) -> None:
        # An expert re-admitted since it was dropped stays, and so does one selected again since: it is in use
        # now, and will be dropped again after use if the cache does not keep it. The decoding thread marks what
        # it is about to use under the lock (`_enqueue`), and waits for an expert it finds in `_evicting`: so
        # either it marked first and the expert stays, or it waits until the expert is out and reads it back.
        # Reads of them in flight are cancelled and waited for first: a read landing after the eviction would
        # bring the expert back, and nothing submits one again without marking it first.
        with self._lock:
            gone = [x for x in set(experts) if x not in self.cache and self._selected_at[x] <= when]
        if self.prefetcher is not None and gone:
            self.prefetcher.cancel(gone)
            for _ in range(200):
                if not self.prefetcher.reading() & set(gone):
                    break
                time.sleep(0.0005)
        with self._lock:
            gone = [x for x in gone if x not in self.cache and self._selected_at[x] <= when]
            self._evicting.update(gone)
        try:  # without the lock: the system calls take a while, and the decoding thread waits only for these
            t0 = time.perf_counter()
            self.mapping.evict([r for layer, e in gone for r in self.layout.expert_ranges(layer, e)])
            self.evict_time += time.perf_counter() - t0
        finally:
            with self._out:
                self._evicting.difference_update(gone)
                self._out.notify_all()
        self._evicted += len(gone)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until queued decisions, reads and evictions are done (tests, measurements)."""
        if self._policy_thread is not None:
            if self._batch:  # a decode that ended before the last MoE layer was observed
                self._inbox.put(self._batch)
                self._batch = []
            done = threading.Event()
            self._inbox.put(done)
            deadline = time.monotonic() + timeout
            while not done.wait(0.05):
                if self._error is not None:
                    raise self._error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the expert policy took more than {timeout} s to catch up")
        if self.prefetcher is not None:
            self.prefetcher.wait(timeout)
        done = threading.Event()
        self._dropped.put(done)
        if not done.wait(timeout):
            raise TimeoutError(f"evicting experts took more than {timeout} s")

    @property
    def stats(self) -> ManagerStats:
        if self._error is not None:
            raise self._error
        return ManagerStats(
            self._step,
            self._selected,
            self._misses,
            self._hinted + self._read_ahead,
            self._read_now + self._waited,
            self._evicted,
            self.cache.capacity,
            self.cache.resident_bytes,
        )

    def close(self) -> None:
        """Stop the threads (the experts stay where they are)."""
        if self._policy_thread is not None:
            self._inbox.put(None)
            self._policy_thread.join()
            self._policy_thread = None
        if self._worker is not None:
            self._dropped.put(None)
            self._worker.join()
            self._worker = None
        if self.prefetcher is not None:
            self.prefetcher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
