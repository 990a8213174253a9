"""llama.cpp's own mapping of the model file, and what really takes an expert out of RAM.

Residency has to act on the pages llama.cpp reads. A page of a file is freed only when no process maps it
and it is dropped from the page cache, and the kernel's tools each stop short of that on their own:

- ``madvise(MADV_COLD)``/``MADV_PAGEOUT`` through a *second* mapping skip pages that another mapping (llama.cpp's)
  has touched: after unpinning, the expert stays 100% resident.
- ``posix_fadvise(POSIX_FADV_DONTNEED)`` drops clean pages from the page cache, but skips pages mapped
  anywhere, which every page llama.cpp has read is.
- ``madvise(MADV_DONTNEED)`` on llama.cpp's mapping removes the page from its page tables (the next access
  faults it back from the cache or the file: the data never changes), and then ``FADV_DONTNEED`` frees it.

So `ModelMapping` finds llama.cpp's mapping of the file in ``/proc/self/maps`` and `evict` does the last:
zap the range in that mapping (and in the pinner's, if it has one), then drop it from the page cache. The
pinner can lock through the same mapping (``ExpertPinner(..., address=mapping.base)``): one mapping, so an
evicted page really leaves.

``edgevision bench eviction`` (`measure_eviction`) measures each method on the real decoder.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import EdgevisionError
from edgevision.moe.layout import ExpertLayout
from edgevision.moe.libc import libc as _libc
from edgevision.moe.libc import mincore_holding_gil

logger = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MADV_RANDOM = 1
MADV_DONTNEED = 4
MADV_COLD = 20
MADV_PAGEOUT = 21

Range = tuple[int, int]  # absolute file offsets [start, end)


@dataclass(frozen=True)
class Vma:
    """One line of /proc/self/maps for a file: virtual [start, end) mapping file bytes from `offset`."""

    start: int
    end: int
    offset: int

    @property
    def base(self) -> int:
        """Where file offset 0 is (or would be) in this mapping."""
        return self.start - self.offset


def file_mappings(path: str | os.PathLike[str]) -> list[Vma]:
    """Every mapping of `path` in this process (by device and inode, so links and relative paths match)."""
    st = os.stat(path)
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        span, _perms, offset, dev, inode = fields[:5]
        if int(inode) != st.st_ino:
            continue
        major, minor = (int(part, 16) for part in dev.split(":"))
        if os.makedev(major, minor) != st.st_dev:
            continue
        lo, hi = (int(part, 16) for part in span.split("-"))
        found.append(Vma(lo, hi, int(offset, 16)))
    return found


class ModelMapping:
    """The address range where llama.cpp maps the model file (found when the decoder has loaded it).

    Args:
        layout: the file's expert layout.
        base: the virtual address of file offset 0 in llama.cpp's mapping (`LlamaDecoder.mapping_base`).
    """

    def __init__(self, layout: ExpertLayout, base: int) -> None:
        self.layout, self.base = layout, base
        vmas = [vma for vma in file_mappings(layout.path) if vma.base == base]
        if not vmas:
            raise EdgevisionError(f"{layout.path.name} is not mapped at {base:#x} in this process")
        self._vmas = vmas
        # expert -> (its first whole page's address, its ranges' page spans: (address, pages))
        self._spans: dict[tuple[int, int], tuple[int, list[tuple[int, int]]]] = {}
        self._local = threading.local()  # each thread's buffer for mincore's answer (`cold`)
        self._fd = os.open(layout.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def cold(self, experts: Iterable[tuple[int, int]], *, hold_gil: bool = True) -> list[tuple[int, int]]:
        """The experts of `experts` with a page not in the page cache (``mincore``, about 17 us for a 3 MiB
        expert in RAM).

        An expert out of RAM is nearly always out from its first whole page on (experts are read and evicted
        whole; `evict` leaves the page an expert shares with its neighbour), so that page is asked about first;
        every page only when it is in. Asking about the first and last
        pages alone was tried: the kernel's own reclaim leaves experts with holes, and the matmuls then took
        100 page faults per token (static-skew benchmark model). Any thread may call this: the decoding thread
        holding the GIL throughout (see `mincore_holding_gil`), a background thread with ``hold_gil=False``,
        so that the decoding thread's callbacks do not wait for its system calls."""
        out = []
        mincore = mincore_holding_gil() if hold_gil else _libc().mincore
        vec, address_of_vec = self._buffer()
        for expert in experts:
            known = self._spans.get(expert)
            if known is None:
                ranges = self.layout.expert_ranges(*expert)
                start, end = ranges[0]
                probe = -(-start // PAGE) if -(-start // PAGE) < end // PAGE else start // PAGE  # first whole page
                known = self._spans[expert] = (
                    self.base + probe * PAGE,
                    [(self.base + a // PAGE * PAGE, (b - 1) // PAGE - a // PAGE + 1) for a, b in ranges],
                )
            probe_address, spans = known
            if mincore(probe_address, PAGE, address_of_vec) != 0 or not vec[0] & 1:
                out.append(expert)
                continue
            for address, pages in spans:
                if pages > len(vec):
                    vec, address_of_vec = self._buffer(pages)
                if mincore(address, pages * PAGE, address_of_vec) != 0 or not vec[:pages].all():
                    out.append(expert)
                    break
        return out

    def in_ram(self, start: int, end: int) -> bool:
        """Whether every page of the file's bytes [start, end) is in the page cache (``mincore``, releasing the
        GIL: for the prefetch pool's workers, which skip the pieces of an expert the kernel's reclaim left)."""
        first, last = start // PAGE, (end - 1) // PAGE
        pages = last - first + 1
        vec, address_of_vec = self._buffer(pages)
        return _libc().mincore(self.base + first * PAGE, pages * PAGE, address_of_vec) == 0 and bool(vec[:pages].all())

    def _buffer(self, pages: int = 0) -> tuple[np.ndarray, int]:
        """This thread's buffer for mincore's answer (at least `pages` long) and its address."""
        held = getattr(self._local, "vec", None)
        if held is None or len(held[0]) < pages:
            vec = np.zeros(max(pages, 1024), dtype=np.uint8)
            held = self._local.vec = (vec, vec.ctypes.data)
        return held

    def covers(self, address: int) -> bool:
        """Whether `address` lies in this mapping (a weight llama.cpp reads from the file)."""
        return any(vma.start <= address < vma.end for vma in self._vmas)

    def _pages(self, start: int, end: int) -> tuple[int, int]:
        """The whole pages inside [start, end): a shared boundary page is left to its neighbour."""
        first = (start + PAGE - 1) // PAGE
        last = end // PAGE
        return first, max(first, last)

    def random_access(self) -> None:
        """Turn the kernel's read-around off in llama.cpp's mapping (``MADV_RANDOM``): a page fault then reads
        that page only, instead of dragging the (evicted, cold) experts around it back in. Expert misses are
        read whole and in parallel by `ExpertPrefetcher` instead, and the non-expert weights, read by every
        token, stay resident once read. Changes the mapping's flags (the memory-map lock, for writing): call
        it once, before decoding."""
        for vma in self._vmas:
            if _libc().madvise(vma.start, vma.end - vma.start, MADV_RANDOM) != 0:
                err = ctypes.get_errno()
                raise EdgevisionError(f"madvise(MADV_RANDOM) on {self.layout.path.name}: {os.strerror(err)}")

    def evict(self, ranges: Iterable[Range], *, also: Sequence[int] = ()) -> int:
        """Take the pages of `ranges` out of RAM: unmap them from llama.cpp's mapping (and from the mappings
        based at the addresses in `also`), then drop them from the page cache. Returns bytes asked.

        Only whole pages go: touching ranges are merged first, and a page a range shares with bytes outside
        every range (a neighbour expert's, or a small tensor's that all the layer's experts share, such as a
        per-expert scale) stays. Taking it too made every resident neighbour incomplete, so the policy read it
        again (measured: 4.2 incomplete chosen experts per token, most of them a shared scale page). A large
        folio that straddles the edge stays whole with it. Locked pages (a pinned expert's) stay."""
        spans: list[list[int]] = []  # [start, end) byte spans, touching ones merged
        for start, end in sorted(ranges):
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        pages = [[first, last] for first, last in ((-(-a // PAGE), b // PAGE) for a, b in spans) if first < last]
        for first, last in pages:  # unmapped everywhere first, so that no folio is held by a later range
            for base in (self.base, *also):
                if _libc().madvise(base + first * PAGE, (last - first) * PAGE, MADV_DONTNEED) != 0:
                    err = ctypes.get_errno()
                    if err != errno.EINVAL:  # EINVAL: a locked page in the range; the rest is unmapped
                        raise EdgevisionError(f"madvise(MADV_DONTNEED) on {self.layout.path.name}: {os.strerror(err)}")
        for first, last in pages:
            os.posix_fadvise(self._fd, first * PAGE, (last - first) * PAGE, os.POSIX_FADV_DONTNEED)
        return sum(last - first for first, last in pages) * PAGE

    def resident(self, ranges: Iterable[Range]) -> float:
        """Share of the pages of `ranges` in the page cache now (``mincore`` on the mapping)."""
        total = resident = 0
        for start, end in ranges:
            first, last = start // PAGE, (end - 1) // PAGE + 1
            vec = np.zeros(last - first, dtype=np.uint8)
            if _libc().mincore(self.base + first * PAGE, len(vec) * PAGE, vec.ctypes.data) != 0:
                raise EdgevisionError(f"mincore on {self.layout.path.name}: {os.strerror(ctypes.get_errno())}")
            total += len(vec)
            resident += int((vec & 1).sum())
        return resident / total if total else 1.0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ModelMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_managed(mapping: ModelMapping, placement: dict[str, tuple[str, int]]) -> None:
    """Raise unless every expert tensor of the layout is read by llama.cpp from its mapping of the file.

    `placement` is `RouterObserver.placement` after one decode: each expert weight's llama.cpp buffer and data
    address. A tensor repacked into llama.cpp's own buffers (CPU_REPACK, AMX: its "extra buffer types") or
    copied to a GPU is not in the mapping, so pinning, prefetching and evicting its pages would do nothing.

    Raises:
        EdgevisionError: a managed expert tensor is elsewhere, or none was seen.
    """
    names = {tensor.name for tensor in mapping.layout.tensors if tensor.name.endswith(".weight")}
    unseen = names - placement.keys()
    if unseen:
        raise EdgevisionError(
            f"the expert matmuls of {len(unseen)} expert tensor(s) (e.g. {min(unseen)}) were not observed: decode "
            "one token with the router observer before checking where the experts are"
        )
    offsets = {tensor.name: tensor.offset for tensor in mapping.layout.tensors}
    outside = sorted(  # llama.cpp reads the tensor at exactly its file offset in the mapping, or not from it
        (name, kind)
        for name, (kind, data) in placement.items()
        if name in names and data != mapping.base + offsets[name]
    )
    if outside:
        name, kind = outside[0]
        raise EdgevisionError(
            f"{len(outside)} expert tensor(s) of {mapping.layout.path.name} are not read from the model file "
            f"(e.g. {name} is in llama.cpp's {kind} buffer), so expert residency cannot manage them: load the "
            "decoder with extra buffer types off (decoder.extra_buffer_types: false)"
        )
