"""Which of the experts a router chooses are in RAM at that moment: the hit rate of ``edgevision bench moe``.

`ResidencyProbe` is a `RouterObserver` listener. Installed first among the listeners, it runs after a MoE
layer's router has chosen and before any policy reads the chosen experts in, and asks the kernel
(``mincore`` through a private read-only mapping of the model file, which shares the page cache with
llama.cpp's) how many of each chosen expert's pages are resident.
"""

from __future__ import annotations

import os
from typing import Any


class ResidencyProbe:
    """A router listener that counts, during decode steps (`active`), how many chosen experts had all their
    pages in RAM (``mincore`` through a private read-only mapping of the model file)."""

    def __init__(self, layout: Any) -> None:
        import mmap

        import numpy as np

        from edgevision.moe.libc import PAGE

        fd = os.open(layout.path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = np.frombuffer(self._map, dtype=np.uint8)
        base = self._view.ctypes.data
        self._ranges = {
            (layer, e): [
                (base + s // PAGE * PAGE, (e_ - 1) // PAGE - s // PAGE + 1) for s, e_ in layout.expert_ranges(layer, e)
            ]
            for layer in layout.moe_layers
            for e in range(layout.n_expert)
        }
        most = max(n for ranges in self._ranges.values() for _, n in ranges)
        self._vec = np.zeros(most, dtype=np.uint8)
        self._page = PAGE
        self.active = False
        self.hits = self.accesses = 0
        self.pages_in = self.pages = 0  # the chosen experts' pages, and how many of them were in RAM

    def __call__(self, layer: int, expert_ids: Any, weights: Any) -> None:
        if not self.active:
            return
        import numpy as np

        from edgevision.moe.libc import libc as _libc

        mincore = _libc().mincore
        for expert in np.unique(expert_ids):
            resident = True
            for address, pages in self._ranges[(layer, int(expert))]:
                vec = self._vec[:pages]
                inside = int((vec & 1).sum()) if mincore(address, pages * self._page, vec.ctypes.data) == 0 else 0
                resident &= inside == pages
                self.pages_in += inside
                self.pages += pages
            self.hits += resident
            self.accesses += 1

    def close(self) -> None:
        del self._view
        self._map.close()
