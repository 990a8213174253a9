"""The residency planner: what stays in fast memory for a given budget.

Given a memory budget and the router's routing shares (a `RouterProfile` from calibration as the prior, or live
statistics; see `edgevision.moe.online`), `plan_residency` decides

a. on CUDA builds, which MoE layers keep their expert tensors in GPU buffers (whole fused tensors: llama.cpp
   places tensors, not rows); every other layer's expert tensors are overridden to the CPU buffer type
   (`ResidencyPlan.tensor_overrides`, applied through `edgevision.moe.buft`);
b. in RAM, which individual experts of the CPU-side layers are pinned (locked and pre-faulted from the mapped
   GGUF by `edgevision.moe.pinning`); the rest page from storage as the router asks for them.

Non-expert weights (attention, dense MLP, routers, embeddings) are always resident and are charged to the RAM
budget first. Every token passes every MoE layer once, so a layer's shares (which sum to 1) are directly
comparable across layers: the planner pins the experts with the most routing mass per byte first, and stops
at the budget. Experts the profile never saw routed are not pinned (their RAM is worth more to the page cache).
Ties break by (layer, expert), so the same inputs give the same plan.

Pure logic: no files, no native calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from edgevision.errors import ConfigError
from edgevision.moe.layout import ExpertLayout


@dataclass(frozen=True)
class ResidencyPlan:
    """What to keep resident, and what it costs and covers."""

    ram_budget: int
    gpu_budget: int
    resident_bytes: int  # non-expert weights, always resident in RAM
    gpu_layers: tuple[int, ...]  # MoE layers whose expert tensors live in GPU buffers
    gpu_bytes: int
    pinned: tuple[tuple[int, int], ...]  # (layer, expert), sorted
    pinned_bytes: int
    covered_mass: float  # share of all routing mass (over all MoE layers) served from GPU or pinned RAM

    def pinned_in(self, layer: int) -> tuple[int, ...]:
        return tuple(e for lay, e in self.pinned if lay == layer)

    def tensor_overrides(self, layout: ExpertLayout, cpu: str = "CPU") -> list[tuple[str, str]]:
        """``(regex, buffer type)`` pairs keeping the expert tensors of non-GPU layers on the CPU: with
        ``n_gpu_layers=-1`` everything else goes to the GPU. Empty when no layer is CPU-side."""
        cpu_layers = [layer for layer in layout.moe_layers if layer not in self.gpu_layers]
        if not cpu_layers:
            return []
        alternation = "|".join(str(layer) for layer in cpu_layers)
        return [(rf"^blk\.({alternation})\.\w+_exps\.", cpu)]


def normalized_shares(share: np.ndarray, n_layer: int, n_expert: int) -> np.ndarray:
    """`share` as float64 (n_layer, n_expert), each row summing to 1 (or all 0 when nothing was routed)."""
    array = np.asarray(share, dtype=np.float64)
    if array.shape != (n_layer, n_expert):
        raise ConfigError(
            f"router profile has shape {array.shape} but the model has {n_layer} layers of {n_expert} experts; "
            "calibrate this model (edgevision calibrate) and plan with its profile"
        )
    if not np.isfinite(array).all() or (array < 0).any():
        raise ConfigError("router profile has negative or non-finite shares; recalibrate")
    total = array.sum(axis=1, keepdims=True)
    return np.divide(array, total, out=np.zeros_like(array), where=total > 0)


def plan_residency(
    layout: ExpertLayout,
    share: np.ndarray,
    *,
    ram_budget: int,
    gpu_budget: int = 0,
) -> ResidencyPlan:
    """Plan residency for `layout` from routing shares of shape (n_layer, n_expert) (layers indexed as in the
    model; rows of non-MoE layers are ignored).

    Args:
        ram_budget: bytes of RAM the weights may keep resident: non-expert weights plus pinned experts.
        gpu_budget: bytes of GPU memory for expert tensors (0 on CPU-only builds).

    Raises:
        ConfigError: the budget does not even hold the non-expert weights, or the profile does not match.
    """
    if ram_budget < 0 or gpu_budget < 0:
        raise ConfigError("memory budgets must be 0 or more bytes")
    shares = normalized_shares(share, layout.n_layer, layout.n_expert)
    if layout.other_bytes > ram_budget:
        raise ConfigError(
            f"the memory budget ({_mib(ram_budget)}) is smaller than the model's non-expert weights "
            f"({_mib(layout.other_bytes)}), which must stay resident; raise the budget or prune the model"
        )
    layers = layout.moe_layers
    gpu_layers, gpu_bytes = _gpu_layers(layout, shares, gpu_budget)

    free = ram_budget - layout.other_bytes
    candidates: list[tuple[float, int, int, int]] = []  # (-mass per byte, layer, expert, bytes)
    for layer in layers:
        if layer in gpu_layers:
            continue
        size = layout.expert_bytes(layer)
        for expert in range(layout.n_expert):
            mass = float(shares[layer, expert])
            if mass > 0:
                candidates.append((-mass / size, layer, expert, size))
    candidates.sort()
    pinned: list[tuple[int, int]] = []
    used = 0
    for _density, layer, expert, size in candidates:
        if used + size <= free:
            pinned.append((layer, expert))
            used += size
    covered = sum(float(shares[layer].sum()) for layer in gpu_layers)
    covered += sum(float(shares[layer, expert]) for layer, expert in pinned)
    return ResidencyPlan(
        ram_budget=ram_budget,
        gpu_budget=gpu_budget,
        resident_bytes=layout.other_bytes,
        gpu_layers=gpu_layers,
        gpu_bytes=gpu_bytes,
        pinned=tuple(sorted(pinned)),
        pinned_bytes=used,
        covered_mass=covered / max(1, len(layers)),
    )


def _gpu_layers(layout: ExpertLayout, shares: np.ndarray, gpu_budget: int) -> tuple[tuple[int, ...], int]:
    """Whole layers for the GPU, most evenly routed first (highest entropy): a concentrated layer is served
    almost as well by pinning its few hot experts in RAM, a spread-out one is not."""
    if gpu_budget <= 0:
        return (), 0
    order = sorted(layout.moe_layers, key=lambda layer: (-_entropy(shares[layer]), layer))
    chosen: list[int] = []
    used = 0
    for layer in order:
        size = layout.layer_bytes(layer)
        if used + size <= gpu_budget:
            chosen.append(layer)
            used += size
    return tuple(sorted(chosen)), used


def _entropy(row: np.ndarray) -> float:
    p = row[row > 0]
    return float(-(p * np.log(p)).sum())


def plan_diff(
    old: Iterable[tuple[int, int]], new: Iterable[tuple[int, int]]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(to_unpin, to_pin)`` turning pin set `old` into `new`, each sorted."""
    before, after = set(old), set(new)
    return sorted(before - after), sorted(after - before)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
