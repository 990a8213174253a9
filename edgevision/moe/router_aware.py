"""The router-aware policy behind the benchmark's plug point (``router-aware`` in `edgevision.moe.policy`):
`RouterAwarePolicy` builds an `ExpertManager` from the harness's `PolicyContext` and reports what it did."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgevision.moe.cache import PRIOR_TOKENS
from edgevision.moe.manager import MIB, ExpertManager, cgroup_budget
from edgevision.moe.mapping import ModelMapping


class RouterAwarePolicy:
    """`ExpertManager` behind the benchmark's `edgevision.moe.policy.ExpertPolicy` interface (``router-aware``).

    Its pieces can be switched off one by one (`edgevision bench moe --policy-options`, to measure what each
    buys): ``predict`` (read the next layer's predicted experts ahead), ``prefetch`` (read misses with the
    pool; off: page faults read them), ``evict`` (take evicted experts out of RAM; off: the kernel's reclaim
    chooses), ``prior`` (calibrated pseudo-counts; off: recency and counts only), ``follow`` (the budget
    follows the cgroup's room), ``random`` (no kernel read-around on llama.cpp's mapping). ``reroute=M``
    turns on cache-aware routing with margin M (`ExpertManager.reroute`; it changes the model's output).
    """

    predicts = True

    def __init__(
        self,
        *,
        predict: bool = True,
        prefetch: bool = True,
        evict: bool = True,
        prior: bool = True,
        follow: bool = True,
        random: bool = True,
        depth: int = 1,
        reroute: float = 0.0,
        headroom: int = 32 * MIB,
    ) -> None:
        self.options = {
            "predict": predict,
            "prefetch": prefetch,
            "evict": evict,
            "prior": prior,
            "follow": follow,
            "random": random,
        }
        self.headroom = headroom
        self.depth = int(depth)  # MoE layers ahead whose experts are predicted and read
        self.reroute = float(reroute)  # cache-aware routing's margin (0: off)
        self.manager: ExpertManager | None = None

    def start(self, context: object) -> None:
        from edgevision.moe.predict import RoutePredictor

        ctx: Any = context
        if ctx.mapping_base is None:
            raise ValueError("the router-aware policy needs llama.cpp's mapping of the model (use_mmap)")
        layout = ctx.layout
        mapping = ModelMapping(layout, ctx.mapping_base)
        shape = (layout.n_layer, layout.n_expert)
        prior = ctx.prior if ctx.prior is not None and self.options["prior"] else np.zeros(shape)
        budget: int | Callable[[int], int] = ctx.budget
        if self.options["follow"] and self.options["evict"]:  # without evicting, the cap's usage says nothing
            room = cgroup_budget(layout.other_bytes, self.headroom)
            ceiling = ctx.budget

            def budget(resident: int) -> int:
                return min(ceiling, room(resident)) if resident else ceiling

        predictor = RoutePredictor.from_gguf(layout.path) if self.options["predict"] else None
        self.manager = ExpertManager(
            layout,
            mapping,
            prior,
            budget=budget,
            predictor=predictor,
            depth=self.depth,
            prefetch=self.options["prefetch"],
            evict=self.options["evict"],
            prior_tokens=PRIOR_TOKENS if self.options["prior"] else 0.0,
            random_access=self.options["random"],
            reroute=self.reroute,
        )
        self.manager.attach(ctx.observer)
        self.manager.start()

    def observe(self, layer: int, expert_ids: np.ndarray, weights: np.ndarray) -> None:
        """Nothing: the manager takes the router's choices on its own thread (`ExpertManager.attach`)."""

    def notes(self) -> str:
        if self.manager is None:
            return ""
        self.manager.drain()
        s = self.manager.stats
        off = [name for name, on in self.options.items() if not on]
        m = self.manager
        per = 1e3 * len(m.layout.moe_layers) / max(1, m.decode_layers)  # ms per decoded token
        skipped = m.prefetcher.skipped if m.prefetcher is not None else 0
        pieces = m.prefetcher.pieces_in_ram if m.prefetcher is not None else 0
        return (
            f"policy hit rate {100 * s.hit_rate:.1f}%, {s.read_now} experts read on a miss, {s.hinted} queued to "
            f"read ahead on a prediction ({skipped} of them in RAM already; {pieces} pieces of experts read found "
            f"in RAM), {s.evicted} evicted, room "
            f"{s.capacity / MIB:.0f} MiB; chosen experts not in RAM per decoded token "
            f"{len(m.layout.moe_layers) * m.decode_misses / max(1, m.decode_layers):.2f} (held by the policy, with "
            f"pages reclaimed by the kernel: {len(m.layout.moe_layers) * m.decode_holes / max(1, m.decode_layers):.2f})"
            + (
                f", rerouted to one in RAM {len(m.layout.moe_layers) * m.rerouted / max(1, m.decode_layers):.2f}"
                if m.margin
                else ""
            )
            + f", predictions right "
            f"{100 * m.precision:.0f}% at the end; decoding thread in the policy "
            f"per decoded token {per * m.decoder_time:.2f} ms (lock {per * m.lock_time:.2f}, waiting for reads "
            f"{per * m.read_wait:.2f}); evict {m.evict_time:.2f} s" + (f"; off: {', '.join(off)}" if off else "")
        )

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager.mapping.close()
