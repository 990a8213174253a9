"""The router-aware policy's pieces: parallel prefetch reads, eviction that frees, routing prediction, the expert
cache's replacement, and the whole policy driving llama.cpp without changing a generated token.

Tier 1: the cache policies on hand-made traces. Tier 3: a synthetic Gemma-4 MoE in the real llama.cpp and the
real page cache of this machine (``mincore`` says what is resident).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevision.moe.layout import read_layout

TOOLS = Path(__file__).resolve().parent.parent / "tools"
ROOT = TOOLS.parent
PROMPT = "The camera sees a person standing next to a table."


@pytest.fixture(scope="module")
def make_synthetic():
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module("make_synthetic")
    finally:
        sys.path.remove(str(TOOLS))


@pytest.fixture(scope="module")
def moe_q8(make_synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "moe-q8_0.gguf"
    return make_synthetic.write_moe_decoder(path, ftype="q8_0", router_skew=1.5, n_ff_exp=256)


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # a freshly written file's dirty pages would stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cached(path: Path, start: int, end: int) -> float:
    """Share of the pages of [start, end) of `path` in the page cache (mincore through a fresh mapping)."""
    import mmap

    from edgevision.moe.pinning import PAGE, _libc

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        first, last = start // PAGE, (end - 1) // PAGE + 1
        vec = np.zeros(last - first, dtype=np.uint8)
        assert _libc().mincore(view.ctypes.data + first * PAGE, len(vec) * PAGE, vec.ctypes.data) == 0
        share = float((vec & 1).mean())
        del view
    return share


# -- tier 3: prefetch -----------------------------------------------------------------------------------


def test_prefetch_pool_reads_exactly_the_experts_ranges_in_parallel(moe_q8: Path, tmp_path: Path):
    from edgevision.moe.prefetch import AHEAD, NOW, ExpertPrefetcher

    layout = read_layout(moe_q8)
    wanted = [(0, 1), (2, 5), (3, 0)]
    _drop(moe_q8)
    with ExpertPrefetcher(layout, workers=4, chunk=16 * 1024, trace=True) as pool:
        assert pool.submit(wanted[:2]) == 2
        assert pool.submit([wanted[0], wanted[2]], priority=AHEAD) == 1  # (0, 1) is already queued
        pool.wait()
        stats = pool.stats
        trace = list(pool.trace or [])
    # every byte of the wanted experts was read, and nothing else
    read = sorted((r.offset, r.offset + r.length) for r in trace)
    expected = sorted(r for expert in wanted for r in layout.expert_ranges(*expert))
    merged: list[list[int]] = []
    for start, end in read:
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    assert [tuple(r) for r in merged] == _merge_touching(expected)
    assert stats.experts == 3 and stats.bytes == sum(end - start for start, end in expected)
    # the reads went to the disk side by side: several threads, overlapping in time
    assert len({r.thread for r in trace}) > 1
    assert stats.max_in_flight > 1
    # and the pages are now in the page cache, while an expert nobody asked for is not
    for expert in wanted:
        for start, end in layout.expert_ranges(*expert):
            if end - start > 4096:
                assert _cached(moe_q8, start, end) == 1.0
    start, end = layout.expert_ranges(1, 3)[0]
    assert _cached(moe_q8, start + 4096, end - 4096) == 0.0
    assert NOW < AHEAD


def _merge_touching(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
