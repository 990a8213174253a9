"""Read experts into the page cache ahead of the decoder, at a queue depth the disk can use.

``madvise(MADV_WILLNEED)`` looks like the tool for this but the kernel caps one call's read-ahead at
``max(read_ahead_kb, max_sectors_kb)``: at the 128 KiB usual on an NVMe drive it reads about 4% of a 3.2 MiB
expert and the rest still comes in as synchronous page faults, one at a time, in the decoding thread.

`ExpertPrefetcher` instead splits each requested expert's byte ranges (one per fused tensor, from
`edgevision.moe.layout`) into chunks and lets a small pool of threads read them with positional reads
(``os.preadv`` into a per-thread scratch buffer that is thrown away) on a descriptor with read-ahead off
(``POSIX_FADV_RANDOM``: exactly the expert's pages, not the cold neighbours after it). A read of a missing page fills the
page cache, which llama.cpp's mapping of the same file shares, so the expert's pages are there when the
matrix multiplication touches them; with `workers` threads up to `workers` requests are at the disk at once.
Python releases the GIL around the system call, so the pool runs beside decoding.

Requests carry a priority: an expert the router has just selected (needed within this layer) goes before
one predicted for a layer ahead. An expert already queued is not queued twice. A request that has waited
longer than `max_age` new requests is dropped when reached: the layer it was for has long passed.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edgevision.moe.layout import ExpertLayout

logger = logging.getLogger(__name__)

__all__ = ["AHEAD", "NOW", "ExpertPrefetcher", "PrefetchStats", "ReadRecord"]

Expert = tuple[int, int]  # (layer, expert)
NOW, AHEAD = 0, 1  # priorities: selected by the current layer's router; predicted for a layer ahead
KIB = 1024


@dataclass(frozen=True)
class ReadRecord:
    """One positional read, as traced with ``trace=True``."""

    offset: int
    length: int
    thread: int
    start: float  # time.perf_counter() before and after the read
    end: float


@dataclass(frozen=True)
class PrefetchStats:
    experts: int  # experts read (each fully)
    reads: int
    bytes: int
    dropped: int  # requests skipped as stale
    max_in_flight: int  # the most reads at the disk at one time


class ExpertPrefetcher:
    """A pool of reader threads filling the page cache with whole experts of one GGUF file.

    Args:
        layout: the file's expert layout.
        workers: reader threads, i.e. the most reads in flight at once (the queue depth at the disk).
        chunk: bytes per read; an expert of several MiB is split so that the workers share it.
        max_age: a queued request is dropped if this many newer ones were queued after it.
        trace: record every read (`reads`), for tests and measurements.
        needed: of the experts given, those not in RAM (e.g. `ModelMapping.cold`); a worker asks it before
            reading an expert queued to be read ahead, and skips one in RAM already.
        in_ram: ``in_ram(start, end)``, whether those bytes of the file are in RAM (`ModelMapping.in_ram`); a
            worker asks it before each read and skips a piece in RAM already, so an expert the kernel's
            reclaim left with holes costs its holes, not its whole bytes.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        *,
        workers: int = 4,
        chunk: int = 512 * KIB,
        max_age: int = 256,
        trace: bool = False,
        needed: Callable[[list[Expert]], list[Expert]] | None = None,
        in_ram: Callable[[int, int], bool] | None = None,
    ) -> None:
        if workers < 1 or chunk < 4096:
            raise ValueError("workers must be at least 1 and chunk at least 4096 bytes")
        self.layout, self.workers, self.chunk, self.max_age = layout, workers, chunk, max_age
        self._needed = needed
        self._in_ram = in_ram
        self.pieces_in_ram = 0  # reads skipped: the piece was in RAM already (`in_ram`)
        self._skipped = 0  # reads ahead skipped: the expert was in RAM when its turn came
        self._fd = os.open(layout.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        # no read-ahead on this descriptor: read what was asked, not the next (cold) experts as well. The
        # state is per open file, so llama.cpp's own accesses keep theirs.
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Expert]] = []  # (priority, sequence, expert)
        self._queued: set[Expert] = set()
        self._priority: dict[Expert, int] = {}  # queued expert -> the priority it was last queued with
        # (offset, length, expert, priority) being split, taken by workers from the end
        self._chunks: list[tuple[int, int, Expert, int]] = []
        self._pending_chunks = 0  # chunks taken from the queue and not yet read
        self._sequence = 0
        self._in_flight = 0
        self._at_disk: Counter[Expert] = Counter()  # expert -> its chunks being read now
        self._closed = False
        self._experts = self._reads = self._bytes = self._dropped = self._max_in_flight = 0
        self.trace: list[ReadRecord] | None = [] if trace else None
        self._threads = [
            threading.Thread(target=self._work, name=f"moe-prefetch-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # -- requests (any thread) --------------------------------------------------------------------

    def submit(self, experts: Iterable[Expert], priority: int = NOW) -> int:
        """Queue `experts` for reading; returns how many were new. Never blocks on I/O."""
        added = 0
        with self._cond:
            if self._closed:
                return 0
            for expert in experts:
                expert = (int(expert[0]), int(expert[1]))
                if expert in self._queued and (priority != NOW or self._priority.get(expert) == NOW):
                    continue
                self._priority[expert] = priority
                self._sequence += 1
                heapq.heappush(self._heap, (priority, self._sequence, expert))
                self._queued.add(expert)
                added += 1
            if added:
                self._cond.notify_all()
        return added

    def submit_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Queue plain file ranges (the non-expert weights) ahead of everything else."""
        with self._cond:
            for start, end in ranges:
                for offset in range(start, end, self.chunk):
                    self._chunks.append((offset, min(self.chunk, end - offset), (-1, -1), NOW))
                    self._pending_chunks += 1
            self._cond.notify_all()

    def cancel(self, experts: Iterable[Expert]) -> None:
        """Forget queued reads of `experts` (about to be evicted: a late read would bring them back). A chunk
        already at the disk finishes; `the evictor waits for it (`reading`)."""
        with self._cond:
            drop = {(int(layer), int(e)) for layer, e in experts} & (self._queued | {c[2] for c in self._chunks})
            if not drop:
                return
            self._heap = [item for item in self._heap if item[2] not in drop]
            heapq.heapify(self._heap)
            self._queued -= drop
            for expert in drop:
                self._priority.pop(expert, None)
            kept = [c for c in self._chunks if c[2] not in drop]
            self._pending_chunks -= len(self._chunks) - len(kept)
            self._chunks = kept
            self._dropped += len(drop)
            self._cond.notify_all()

    def wait_for(self, experts: Iterable[Expert], timeout: float = 5.0) -> bool:
        """Block until none of `experts` is queued or being read; False on timeout (the decoder's page faults
        then read what is left)."""
        wanted = {(int(layer), int(e)) for layer, e in experts}
        deadline = time.monotonic() + timeout
        with self._cond:
            while wanted & (self._queued | self._at_disk.keys() | {c[2] for c in self._chunks}):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def pending(self) -> set[Expert]:
        """Experts queued to be read or being read."""
        with self._cond:
            return self._queued | self._at_disk.keys() | {c[2] for c in self._chunks}

    def reading(self) -> set[Expert]:
        """Experts with a read at the disk now."""
        with self._cond:
            return set(self._at_disk)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until every queued expert has been read (tests, measurements)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._chunks or self._pending_chunks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"prefetching did not finish within {timeout} s")
                self._cond.wait(left)

    @property
    def skipped(self) -> int:
        """Experts queued to be read ahead that were in RAM when their turn came (`needed`)."""
        with self._cond:
            return self._skipped

    @property
    def stats(self) -> PrefetchStats:
        with self._cond:
            return PrefetchStats(self._experts, self._reads, self._bytes, self._dropped, self._max_in_flight)

    # -- workers ----------------------------------------------------------------------------------

    def _next_chunk(self) -> tuple[int, int, Expert, int] | None:
        """Under the lock: the next (offset, length, expert, priority) to read, None when closed."""
        while True:
            if self._closed:
                return None
            # an expert chosen now goes before the rest of one read ahead for a layer to come
            if self._chunks and not (self._heap and self._heap[0][0] < self._chunks[-1][3]):
                return self._chunks.pop()
            if self._heap:
                priority, sequence, expert = heapq.heappop(self._heap)
                if expert not in self._queued or self._priority.get(expert) != priority:
                    continue  # read already, or queued again more urgently
                self._queued.discard(expert)
                del self._priority[expert]
                if self._sequence - sequence > self.max_age:
                    self._dropped += 1
                    continue
                if priority != NOW and self._needed is not None and not self._needed([expert]):
                    self._skipped += 1  # a read ahead of an expert in RAM already: checked here, not by the caller
                    continue
                split = self._split(expert, priority)
                self._chunks += split  # taken first
                self._pending_chunks += len(split)
                self._experts += 1
                continue
            self._cond.wait()

    def _split(self, expert: Expert, priority: int) -> list[tuple[int, int, Expert, int]]:
        chunks = []
        for start, end in self.layout.expert_ranges(*expert):
            for offset in range(start, end, self.chunk):
                chunks.append((offset, min(self.chunk, end - offset), expert, priority))
        chunks.reverse()  # popped from the end: the expert is read front to back
        return chunks

    def _work(self) -> None:
        buffer = bytearray(self.chunk)
        view = memoryview(buffer)
        ident = threading.get_ident()
        while True:
            with self._cond:
                item = self._next_chunk()
                if item is None:
                    return
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
                offset, length, expert, _ = item
                self._at_disk[expert] += 1
            start = time.perf_counter()
            done = 0
            there = self._in_ram is not None and self._in_ram(offset, offset + length)
            if not there:
                try:
                    done = os.preadv(self._fd, [view[:length]], offset)
                except OSError as exc:  # a failed read-ahead only costs the faults it would have saved
                    logger.warning("prefetch read of %d bytes at %d failed: %s", length, offset, exc.strerror)
            end = time.perf_counter()
            with self._cond:
                self._in_flight -= 1
                self._pending_chunks -= 1
                self._at_disk[expert] -= 1
                if not self._at_disk[expert]:
                    del self._at_disk[expert]
                if there:
                    self.pieces_in_ram += 1
                else:
                    self._reads += 1
                    self._bytes += done
                    if self.trace is not None:
                        self.trace.append(ReadRecord(offset, length, ident, start, end))
                self._cond.notify_all()

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers (reads in flight finish) and close the file (idempotent)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._heap.clear()
            self._chunks.clear()
            self._queued.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        os.close(self._fd)

    def __enter__(self) -> ExpertPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
