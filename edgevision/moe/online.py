"""Online residency: the pinned set follows live routing, re-planned in the background.

A calibration profile is only a prior: what a user actually asks about routes differently. `OnlineResidency`
is a `RouterObserver` listener (``observer.listeners.append(online.observe)``). On the decoding thread it
only adds each node's gate weights into a pending ``(n_layer, n_expert)`` array and, every `replan_every`
tokens, drops a wake-up into a one-slot queue (never blocking: if the worker is still busy the request is
merged into the next). A worker thread then folds the pending counts into exponentially decayed live
statistics (half-life `half_life` tokens), blends them with the prior (worth `prior_tokens` tokens), plans
with `edgevision.moe.residency.plan_residency` and moves the pins (`ExpertPinner.pin`: lock and pre-fault the
newly hot, release the newly cold). ctypes releases the GIL around ``mlock``/``madvise``, so the page reads
happen beside decoding instead of in front of it.

With ``prefetch=True`` it also reads ahead, on a second thread, the unpinned experts the router has just
selected (``MADV_WILLNEED`` over each expert's whole byte range): the observer sees a layer's choice before
the expert matrices are multiplied, so the read is one large request already in flight when llama.cpp
touches the pages, instead of a chain of small synchronous faults.

Pinning only decides which pages stay in RAM, never what the weights are, so the generated tokens are the
same whatever the plan (tests check it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgevision.moe.layout import ExpertLayout
from edgevision.moe.pinning import ExpertPinner
from edgevision.moe.residency import ResidencyPlan, normalized_shares, plan_residency

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineStats:
    tokens: int  # tokens observed (rows through the first MoE layer)
    replans: int
    pins_moved: int  # experts pinned or unpinned by re-plans after the first plan
    plan: ResidencyPlan | None
    errors: int = 0  # re-plans that failed (each retried after a back-off; the last plan stays meanwhile)
    last_error: str | None = None


class OnlineResidency:
    """Keeps `pinner`'s pinned set planned from the prior plus live router statistics.

    Args:
        layout: the model's expert layout.
        pinner: the pinner to drive (owned by the caller).
        prior: ``(n_layer, n_expert)`` routing shares from calibration (`RouterProfile.share()`).
        ram_budget: bytes the plan may keep resident (see `plan_residency`).
        gpu_budget: bytes of GPU memory for expert tensors: layers the plan puts on the GPU are never pinned
            again in RAM (the GPU layers are fixed at load, so pass the budget the model was loaded with).
        replan_every: tokens between re-plans.
        half_life: tokens after which a live observation counts half.
        prior_tokens: how many tokens' worth of evidence the prior is.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        pinner: ExpertPinner,
        prior: np.ndarray,
        *,
        ram_budget: int,
        replan_every: int = 64,
        half_life: float = 512.0,
        prior_tokens: float = 256.0,
        prefetch: bool = False,
        gpu_budget: int = 0,
        backoff: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        if replan_every < 1 or half_life <= 0 or prior_tokens < 0:
            raise ValueError("replan_every and half_life must be positive, prior_tokens 0 or more")
        self.layout, self.pinner = layout, pinner
        self.ram_budget = ram_budget
        self.gpu_budget = gpu_budget
        self.backoff = backoff  # seconds to wait after a failed re-plan: first, and the most (doubling between)
        self.on_plan: Callable[[ResidencyPlan], None] | None = None  # told of each plan once its pins are in place
        self.replan_every, self.half_life, self.prior_tokens = replan_every, half_life, prior_tokens
        shape = (layout.n_layer, layout.n_expert)
        self._prior = normalized_shares(prior, *shape)
        self._first_layer = layout.moe_layers[0]
        self._lock = threading.Lock()  # guards the pending arrays and counters
        self._pending = np.zeros(shape)
        self._pending_tokens = 0
        self._tokens = 0
        self._since_request = 0
        self._live = np.zeros(shape)  # worker-only
        # True: re-plan; an Event: re-plan, then set it; False: stop
        self._wake: queue.Queue[bool | threading.Event] = queue.Queue(maxsize=1)
        self._replans = 0
        self._moved = 0
        self._plan: ResidencyPlan | None = None
        self._errors = 0
        self._last_error: str | None = None
        self._retry_at = 0.0  # monotonic time before which re-plan requests wait (after a failure)
        self._worker: threading.Thread | None = None
        # router-triggered prefetch: experts just selected but not pinned, read ahead by another thread
        self._prefetch: queue.Queue[tuple[int, np.ndarray] | None] | None = queue.Queue(64) if prefetch else None
        self._prefetcher: threading.Thread | None = None
        self._pinned_mask = np.zeros(shape, dtype=bool)  # replaced whole by the worker, read by `observe`
        self.prefetches = 0

    # -- decoding thread --------------------------------------------------------------------------

    def observe(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        """The `RouterObserver` listener: a counter update and, now and then, a non-blocking wake-up."""
        if self._prefetch is not None:
            chosen = np.unique(expert_ids)
            cold = chosen[~self._pinned_mask[layer, chosen]]
            if cold.size:
                try:
                    self._prefetch.put_nowait((layer, cold))
                except queue.Full:
                    pass  # the prefetcher is behind; the kernel will fault these in itself
        mass = np.bincount(expert_ids.ravel(), weights=weights.ravel(), minlength=self.layout.n_expert)
        with self._lock:
            self._pending[layer] += mass
            if layer == self._first_layer:
                self._pending_tokens += expert_ids.shape[0]
                self._tokens += expert_ids.shape[0]
                self._since_request += expert_ids.shape[0]
                if self._since_request < self.replan_every:
                    return
                self._since_request = 0
            else:
                return
        try:
            self._wake.put_nowait(True)
        except queue.Full:
            pass  # a re-plan is already due; it will include these tokens

    # -- worker -----------------------------------------------------------------------------------

    def start(self) -> Self:
        """Pin the prior's plan now, then follow live statistics in a background thread."""
        self._apply(self._prior)
        self._worker = threading.Thread(target=self._run, name="moe-residency", daemon=True)
        self._worker.start()
        if self._prefetch is not None:
            self._prefetcher = threading.Thread(target=self._run_prefetch, name="moe-prefetch", daemon=True)
            self._prefetcher.start()
        return self

    def _run_prefetch(self) -> None:
        assert self._prefetch is not None
        while (item := self._prefetch.get()) is not None:
            layer, experts = item
            try:
                self.pinner.prefetch((layer, int(e)) for e in experts)
                self.prefetches += len(experts)
            except Exception:  # a failed read-ahead only costs the faults it would have saved
                logger.exception("prefetching experts %s of layer %d failed", experts.tolist(), layer)

    def _run(self) -> None:
        failures = 0
        while (request := self._wake.get()) is not False:
            if not isinstance(request, threading.Event) and time.monotonic() < self._retry_at:
                continue  # backing off after a failure; the pending counts wait for the next request
            try:
                self._replan()
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))
                self._retry_at = time.monotonic() + delay
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "re-planning expert residency failed (%s); the last plan stays in place, retrying in %.0f s",
                    self._last_error,
                    delay,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
            if isinstance(request, threading.Event):
                request.set()

    def _replan(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, np.zeros_like(self._pending)
            n, self._pending_tokens = self._pending_tokens, 0
        self._live = self._live * 0.5 ** (n / self.half_life) + pending
        live_tokens = self._live.sum(axis=1, keepdims=True)
        live_share = np.divide(self._live, live_tokens, out=np.zeros_like(self._live), where=live_tokens > 0)
        blended = self.prior_tokens * self._prior + live_tokens * live_share
        self._apply(blended)

    def _apply(self, share: np.ndarray) -> None:
        plan = plan_residency(self.layout, share, ram_budget=self.ram_budget, gpu_budget=self.gpu_budget)
        change = self.pinner.pin(plan.pinned)
        mask = np.zeros_like(self._pinned_mask)
        for layer, expert in plan.pinned:
            mask[layer, expert] = True
        self._pinned_mask = mask
        if self._plan is not None:
            self._moved += change.pinned + change.unpinned
            self._replans += 1
        self._plan = plan
        if self.on_plan is not None:
            self.on_plan(plan)
        logger.debug(
            "residency plan: %d experts pinned (%+d/-%d), %.1f%% of routing mass covered",
            len(plan.pinned),
            change.pinned,
            change.unpinned,
            100 * plan.covered_mass,
        )

    def drain(self, timeout: float = 60.0) -> None:
        """Re-plan with everything observed so far and wait until the new pins are in place."""
        if self._worker is None:
            raise RuntimeError("OnlineResidency is not started")
        done = threading.Event()
        self._wake.put(done, timeout=timeout)
        if not done.wait(timeout):
            raise TimeoutError(f"re-planning expert residency took more than {timeout} s")

    @property
    def stats(self) -> OnlineStats:
        return OnlineStats(self._tokens, self._replans, self._moved, self._plan, self._errors, self._last_error)

    def close(self) -> None:
        """Stop the worker (the pins stay until the pinner is closed)."""
        if self._worker is not None:
            while True:
                try:
                    self._wake.put(False, timeout=0.1)
                    break
                except queue.Full:
                    if not self._worker.is_alive():
                        break
            self._worker.join()
            self._worker = None
        if self._prefetcher is not None and self._prefetch is not None:
            self._prefetch.put(None)
            self._prefetcher.join()
            self._prefetcher = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
