"""The table `edgevision bench moe` prints: one row per configuration, side by side, and the lines that hold
the router-aware policy against issue 10's targets (`table`), with top-1 agreement and KL against the
reference run for rows that change the model (`top1_agreement`, `mean_kl`) and a storage-only model of the speed
(`storage_bound`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgevision.moe.bench import RunResult

MIB = 2**20
KL_TOKENS = 32  # KL is taken over the reference's likeliest tokens, the rest of the vocabulary as one outcome


def mean_kl(reference: list[list[list[float]]], other: list[list[list[float]]]) -> float | None:
    """Mean KL(reference || other) per position, in nats, over the reference's `KL_TOKENS` likeliest tokens and
    the rest of the vocabulary as one outcome: a lower bound of the whole distributions' KL (merging outcomes
    never raises it)."""
    values = []
    for ref_prompt, got_prompt in zip(reference, other, strict=False):
        for p_log, q_log in zip(ref_prompt, got_prompt, strict=False):
            p_lp, q_lp = np.asarray(p_log), np.asarray(q_log)
            p_rest = max(1e-12, 1 - np.exp(p_lp).sum())
            q_rest = max(1e-12, 1 - np.exp(q_lp).sum())
            values.append(float(np.sum(np.exp(p_lp) * (p_lp - q_lp)) + p_rest * np.log(p_rest / q_rest)))
    return sum(values) / len(values) if values else None


def top1_agreement(reference: list[list[int]], other: list[list[int]]) -> float | None:
    pairs = [(a, b) for ref, got in zip(reference, other, strict=False) for a, b in zip(ref, got, strict=False)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def storage_bound(result: RunResult, free: RunResult, bandwidth: float | None) -> float | None:
    """Tokens/s if decoding computed as fast as unconstrained and read its bytes at the throttle's bandwidth
    one after the other (no overlap): what the storage alone would allow, whatever the machine's load."""
    if not bandwidth or not free.tokens_per_s:
        return None
    return 1 / (1 / free.tokens_per_s + result.read_bytes_per_token / bandwidth)


def table(
    results: list[tuple[RunResult, str]],
    reference: list[list[int]],
    bandwidth: float | None = None,
    read_source: str = "/proc/self/io read_bytes",
    reference_logprobs: list[list[list[float]]] | None = None,
) -> list[str]:
    free = results[0][0].tokens_per_s
    header = (
        f"{'configuration':<22} {'memory':<12} {'hit rate':>8} {'pages in':>8} {'MB read/tok':>11} {'faults/tok':>10} "
        f"{'tokens/s*':>9} {'x unconstr.':>11} {'wall tok/s':>10} {'model tok/s+':>12} {'top-1 agree':>11} "
        f"{'KL nats':>8}  notes"
    )
    out = ["", header]
    by_label = {}
    for result, where in results:
        by_label[result.label] = result
        if result.error:
            out.append(
                f"{result.label:<22} {where:<12} {'-':>8} {'-':>8} {'-':>11} {'-':>10} {'-':>9} {'-':>11} {'-':>10} "
                f"{'-':>12} {'-':>11} {'-':>8}  {result.error}"
            )
            continue
        agree = top1_agreement(reference, result.top1)
        agree_text = f"{100 * agree:.1f}%" if agree is not None else "-"
        kl = mean_kl(reference_logprobs, result.logprobs) if reference_logprobs and result.logprobs else None
        kl_text = f"{kl:.4f}" if kl is not None else "-"
        hit = f"{100 * result.hits / result.accesses:.1f}%" if result.accesses else "-"
        pages_in = f"{100 * result.pages_in / result.pages:.1f}%" if result.pages else "-"
        modelled = storage_bound(result, results[0][0], bandwidth)
        modelled_text = f"{modelled:.1f}" if modelled else "-"
        notes = result.notes.lstrip(", ")
        if result.rss_anon:
            notes = f"anon {result.rss_anon / MIB:.0f} MiB" + (f"; {notes}" if notes else "")
        if result.peak:
            notes = f"peak {result.peak / MIB:.0f} MiB" + (f"; {notes}" if notes else "")
        out.append(
            f"{result.label:<22} {where:<12} {hit:>8} {pages_in:>8} {result.read_bytes_per_token / 1e6:>11.2f} "
            f"{result.faults_per_token:>10.1f} {result.tokens_per_s:>9.2f} {result.tokens_per_s / free:>11.2f} "
            f"{result.wall_tokens_per_s:>10.2f} {modelled_text:>12} {agree_text:>11} {kl_text:>8}  {notes}"
        )
    out.append(
        "* decode steps per second, not counting the time the decoding thread waited for a CPU (schedstat "
        "run-queue delay: the cores are shared); page-fault I/O counts. Ratios use this column. Hit rate: share "
        "of chosen experts fully in RAM when chosen, pages in: share of their pages in RAM (both from one extra "
        "probed run of each configuration; the other columns from runs without the probe). MB read/tok: "
        f"{read_source} over the decode steps. Top-1 agreement against the reference run's top-1; KL nats: mean "
        f"KL(reference || run) per position over the reference's {KL_TOKENS} likeliest tokens and the rest as one "
        "(a lower bound; 0 where the model's output is unchanged)."
    )
    if bandwidth:
        out.append(
            f"+ a model, not a measurement: 1 / (1 / unconstrained tokens/s* + MB read per token / "
            f"{bandwidth / 1e6:.0f} MB/s), reads not overlapped with compute; it does not depend on this machine's "
            "load, the measured columns do (on shared cores the storage's reads also wait for CPU)."
        )
    out.append("")
    plain, lru, aware, belady = (
        by_label.get(k) for k in ("plain mmap", "expert LRU", "router-aware", "Belady (ceiling)")
    )
    ok = [r for r in (plain, lru, aware) if r is not None and not r.error and r.tokens_per_s]

    def medians(a: RunResult, b: RunResult) -> str:
        if not (a.median_tokens_per_s and b.median_tokens_per_s):
            return ""
        return f"; of the medians of the repeats {a.median_tokens_per_s / b.median_tokens_per_s:.2f}x"

    if aware in ok and plain in ok:
        out.append(
            f"router-aware / plain mmap under the cap: {aware.tokens_per_s / plain.tokens_per_s:.2f}x (target >= 1.5x)"
            + medians(aware, plain)
        )
    if aware in ok and lru in ok:
        out.append(
            f"router-aware / expert LRU under the cap: {aware.tokens_per_s / lru.tokens_per_s:.2f}x (target >= 1.2x)"
            + medians(aware, lru)
        )
    if aware in ok and plain in ok:
        bound_aware, bound_plain = (storage_bound(r, results[0][0], bandwidth) for r in (aware, plain))
        if bound_aware and bound_plain:
            out.append(f"modelled (+): router-aware / plain mmap {bound_aware / bound_plain:.2f}x")
    for label, rerouting in by_label.items():  # cache-aware routing: faster, at a cost in fidelity shown beside
        if not label.startswith("router-aware (reroute") or rerouting.error or plain not in ok:
            continue
        agree = top1_agreement(reference, rerouting.top1)
        kl = mean_kl(reference_logprobs, rerouting.logprobs) if reference_logprobs and rerouting.logprobs else None
        out.append(
            f"{label} / plain mmap under the cap: {rerouting.tokens_per_s / plain.tokens_per_s:.2f}x"
            + medians(rerouting, plain)
            + (f", / expert LRU {rerouting.tokens_per_s / lru.tokens_per_s:.2f}x" if lru in ok else "")
            + (f"; it changes the model's output: top-1 agreement {100 * agree:.1f}%" if agree is not None else "")
            + (f", KL {kl:.4f} nats" if kl is not None else "")
        )
    if aware in ok and belady is not None and not belady.error and aware.pages and belady.pages:
        gap = 100 * (belady.pages_in / belady.pages - aware.pages_in / aware.pages)
        gap_all = 100 * (belady.hits / belady.accesses - aware.hits / aware.accesses)
        out.append(
            f"router-aware pages in RAM when chosen: {gap:.1f} points below Belady's (target <= 10); "
            f"experts with all pages in RAM: {gap_all:.1f} points"
        )
    pruned = by_label.get("pruned-to-fit")
    if pruned and not pruned.error:
        agree = top1_agreement(reference, pruned.top1) or 0.0
        out.append(
            f"pruned-to-fit / unconstrained: {pruned.tokens_per_s / free:.2f}x, top-1 agreement "
            f"{100 * agree:.1f}% on the held-out prompts"
        )
    elif pruned:
        out.append(f"pruned-to-fit: not measured ({pruned.error})")
    return out
