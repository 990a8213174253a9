"""Pin chosen experts of a mapped GGUF file in RAM; leave the rest to page from storage.

llama.cpp maps the GGUF file (its default ``mmap`` load mode) and reads expert weights straight from that
mapping, so a page of an expert it has not touched lately may have left RAM and costs a major fault, a read
from storage, when the router picks that expert again. `ExpertPinner` maps the same file a second time,
read-only and shared: both mappings share the kernel's page cache, so locking a page through this mapping
(``mlock``) keeps it resident for llama.cpp too, and pre-faulting it (``madvise(MADV_WILLNEED)``, then the
lock, which faults in what is still missing) reads it in before the router needs it. Unpinned ranges are
unlocked and, where the kernel supports it, marked ``MADV_COLD`` so reclaim takes them before anything else.

Expert byte ranges do not start on page boundaries, so neighbouring experts share a page at each end; the
pinner counts how many pinned ranges use each boundary page and unlocks a page only when none does.

Locked pages count against ``RLIMIT_MEMLOCK`` (``ulimit -l``) unless the process has ``CAP_IPC_LOCK``
(root has); exceeding it fails with a message saying so. Locking is for the lifetime of the pinner:
`close` (or the end of a ``with`` block) unlocks everything and unmaps the file.

Caveat: this works only for tensors llama.cpp serves from its mapping. Weights it repacks into its own
buffers at load (the CPU back-end's "extra buffer types": Q4_0 on AVX2 or ARM dot-product CPUs, Q8_0 on ARM)
are copied to anonymous memory and no longer page; use Q8_0 on x86 or load with extra buffer types off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgevision.errors import EdgevisionError
from edgevision.moe.layout import ExpertLayout
from edgevision.moe.libc import PAGE
from edgevision.moe.libc import libc as _libc

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

MADV_WILLNEED = 3
MADV_COLD = 20  # Linux 5.4+
MADV_PAGEOUT = 21  # Linux 5.4+

Expert = tuple[int, int]  # (layer, expert)
RESIDENT: Expert = (-1, -1)  # stands for the non-expert weights in the pinned set


@dataclass(frozen=True)
class PinChange:
    """What one `ExpertPinner.pin` call did."""

    pinned: int  # experts newly pinned
    unpinned: int
    locked_bytes: int  # bytes locked after the call (page-rounded)


class ExpertPinner:
    """Keeps a set of experts of one GGUF file locked in RAM.

    Args:
        layout: the file's expert layout (`edgevision.moe.layout.read_layout`).
        release: what to do with an unpinned expert's pages: ``"cold"`` (``MADV_COLD``: reclaim them first),
            ``"pageout"`` (``MADV_PAGEOUT``: reclaim now, where no other mapping uses them) or ``None``.

    Raises:
        EdgevisionError: the file cannot be mapped, or locking fails (e.g. ``RLIMIT_MEMLOCK``).
    """

    def __init__(self, layout: ExpertLayout, *, release: str | None = "cold", address: int | None = None) -> None:
        if release not in (None, "cold", "pageout", "evict"):
            raise ValueError(f"release must be None, 'cold', 'pageout' or 'evict', not {release!r}")
        if release == "evict" and address is None:
            raise ValueError("release='evict' needs llama.cpp's mapping: pass address=decoder.mapping_base")
        self.layout = layout
        self._advice = {"cold": MADV_COLD, "pageout": MADV_PAGEOUT, None: None, "evict": None}[release]
        self._lock = threading.Lock()
        self._pinned: set[Expert] = set()
        self._edges: Counter[int] = Counter()  # boundary page -> pinned ranges touching it
        self._locked_pages = 0
        self._map: mmap.mmap | None = None
        self._evictor = None
        self._open = True
        if address is not None:  # lock through llama.cpp's own mapping: one mapping, so eviction frees
            from edgevision.moe.mapping import ModelMapping

            self._base = address
            if release == "evict":
                self._evictor = ModelMapping(layout, address)
            return
        fd = os.open(layout.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._map = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            raise EdgevisionError(f"cannot map {layout.path} to pin experts: {exc.strerror}") from exc
        finally:
            os.close(fd)  # the mapping keeps the file referenced
        self._view = np.frombuffer(self._map, dtype=np.uint8)  # read-only; gives the mapping's address
        self._base = self._view.ctypes.data

    # -- pinning ----------------------------------------------------------------------------------

    @property
    def pinned(self) -> frozenset[Expert]:
        """The pinned experts (not counting the non-expert weights)."""
        with self._lock:
            return frozenset(self._pinned - {RESIDENT})

    def lock_resident(self) -> None:
        """Lock and pre-fault the non-expert weights too (attention, dense MLP, routers, embeddings), which
        every token reads: under memory pressure the page cache would otherwise evict them like any page."""
        with self._lock:
            self._live()
            if RESIDENT not in self._pinned:
                self._pin_one(RESIDENT)

    @property
    def locked_bytes(self) -> int:
        return self._locked_pages * PAGE

    def pin(self, experts: Iterable[Expert]) -> PinChange:
        """Make exactly `experts` the pinned set: lock and pre-fault the new ones, release the dropped ones."""
        wanted = set(experts)
        with self._lock:
            self._live()
            drop = sorted(self._pinned - wanted - {RESIDENT})
            add = sorted(wanted - self._pinned)
            for expert in drop:
                self._unpin_one(expert)
            for expert in add:
                self._pin_one(expert)
            return PinChange(len(add), len(drop), self._locked_pages * PAGE)

    def _ranges(self, expert: Expert) -> tuple[tuple[int, int], ...]:
        if expert == RESIDENT:
            return self.layout.other_ranges
        layer, index = expert
        return self.layout.expert_ranges(layer, index)

    def _pin_one(self, expert: Expert) -> None:
        ranges = self._ranges(expert)  # raises IndexError before anything is locked
        for start, end in ranges:
            first, last = start // PAGE, (end - 1) // PAGE
            self._madvise(first, last + 1, MADV_WILLNEED)  # start the reads together, then lock (faults in)
        for start, end in ranges:
            first, last = start // PAGE, (end - 1) // PAGE
            lo = first + (self._edges[first] > 0)  # a boundary page already locked by a neighbour
            hi = last + 1 - (last != first and self._edges[last] > 0)
            if lo < hi:
                self._call("mlock", lo, hi)
                self._locked_pages += hi - lo
            self._edges[first] += 1
            if last != first:
                self._edges[last] += 1
        self._pinned.add(expert)

    def _unpin_one(self, expert: Expert) -> None:
        for start, end in self._ranges(expert):
            first, last = start // PAGE, (end - 1) // PAGE
            for page in {first, last}:
                self._edges[page] -= 1
                if not self._edges[page]:
                    del self._edges[page]
            lo = first + (first in self._edges)  # still used by a pinned neighbour
            hi = last + 1 - (last != first and last in self._edges)
            if lo < hi:
                self._call("munlock", lo, hi)
                self._locked_pages -= hi - lo
                if self._advice is not None:
                    self._madvise(lo, hi, self._advice)
                elif self._evictor is not None:
                    self._evictor.evict([(lo * PAGE, hi * PAGE)])
        self._pinned.discard(expert)

    def prefetch(self, experts: Iterable[Expert]) -> None:
        """Ask the kernel to start reading `experts` in (``MADV_WILLNEED``) without locking them. Does not
        wait for a `pin` in progress; call it only while the pinner is open."""
        self._live()
        for expert in experts:
            for start, end in self._ranges(expert):
                self._madvise(start // PAGE, (end - 1) // PAGE + 1, MADV_WILLNEED)

    def resident_fraction(self, experts: Iterable[Expert]) -> float:
        """Share of the pages holding `experts` that are in RAM now (``mincore``)."""
        total = resident = 0
        with self._lock:
            self._live()
            for expert in experts:
                for start, end in self._ranges(expert):
                    first, last = start // PAGE, (end - 1) // PAGE
                    vec = np.zeros(last + 1 - first, dtype=np.uint8)
                    self._check(_libc().mincore(self._addr(first), len(vec) * PAGE, vec.ctypes.data), "mincore")
                    total += len(vec)
                    resident += int((vec & 1).sum())
        return resident / total if total else 1.0

    # -- native calls -----------------------------------------------------------------------------

    def _addr(self, page: int) -> int:
        return self._base + page * PAGE

    def _call(self, name: str, lo: int, hi: int) -> None:
        self._check(getattr(_libc(), name)(self._addr(lo), (hi - lo) * PAGE), name)

    def _madvise(self, lo: int, hi: int, advice: int) -> None:
        rc = _libc().madvise(self._addr(lo), (hi - lo) * PAGE, advice)
        if rc != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL and advice in (MADV_COLD, MADV_PAGEOUT):
                logger.debug("kernel does not support madvise advice %d; unpinned pages are left as they are", advice)
                self._advice = None
                return
            self._check(rc, f"madvise({advice})")

    def _check(self, rc: int, what: str) -> None:
        if rc == 0:
            return
        err = ctypes.get_errno()
        if what == "mlock" and err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
            raise EdgevisionError(
                f"cannot lock expert pages of {self.layout.path.name} in RAM ({os.strerror(err)}, "
                f"{self.locked_bytes} bytes locked so far): raise the locked-memory limit (ulimit -l, "
                "LimitMEMLOCK= in the systemd unit) or run with CAP_IPC_LOCK, or lower the residency budget"
            )
        raise EdgevisionError(f"{what} on {self.layout.path.name} failed: {os.strerror(err)}")

    # -- lifetime ---------------------------------------------------------------------------------

    def _live(self) -> None:
        if not self._open:
            raise EdgevisionError(f"expert pinner for {self.layout.path.name} is closed")

    def close(self) -> None:
        """Unlock everything and unmap the file (idempotent)."""
        with self._lock:
            if not self._open:
                return
            self._advice, evictor, self._evictor = None, self._evictor, None  # closing releases, never evicts
            for expert in sorted(self._pinned):
                self._unpin_one(expert)
            self._open = False
            if evictor is not None:
                evictor.close()
            if self._map is not None:
                del self._view  # release the buffer export before closing the map
                self._map.close()
                self._map = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
