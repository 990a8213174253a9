"""An emulated NVMe drive for ``edgevision bench moe``: the model served by a small FUSE server that adds latency.

A block device in this sandbox cannot be given a per-request latency (no device mapper for ``dm-delay``, no
nbd/ublk), and blk-throttle has only bandwidth and IOPS limits. So `EmulatedNvme` mounts a read-only FUSE
file system with one file, the model, and answers the kernel's READ requests itself, speaking the FUSE
protocol over ``/dev/fuse`` directly (no libfuse; the layouts are those of the kernel's
``include/uapi/linux/fuse.h``, protocol 7.31). The file is opened with ``FOPEN_KEEP_CACHE`` and without
``FOPEN_DIRECT_IO``, so the kernel's page cache, readahead, ``mmap``, ``mincore``, ``madvise`` and
``posix_fadvise`` behave as for a file on a block device; only the misses reach the server, as READ requests
of at most 128 KiB (the FUSE default ``max_pages``, like an NVMe's usual transfer size).

The device model: a READ of `size` bytes that arrives at `t` is answered at
``max(t + latency, channel_free) + size / bandwidth`` and ``channel_free`` moves to that time. The command
latency of requests in flight overlaps; their transfers share the bandwidth one after another. At queue depth
1 every request costs latency + transfer; deep queues get the bandwidth. Sixteen server threads each take a
request from /dev/fuse, compute its due time, sleep until then (with a 1 ns timer slack, so the sleeps are
accurate) and write the reply straight from a populated mapping of the model's copy in /dev/shm. The threads
are C (`edgevision.moe.nvme_server`: no GIL, a few microseconds of CPU per READ); where no C compiler is at
hand, Python threads in this module answer instead, slower and costlier (logged). This module mounts the file
system and answers the kernel's INIT in either case.
The latency is what an application sees end to end at queue depth 1: what a 128 KiB read takes beyond the
model when the server starts (its own round trip, its timer's wake-up) is taken off each reply's due time.

The bytes served are counted in an 8-byte file in /dev/shm (`counter`) that the benchmark's children read
before and after each decode step (``/proc/self/io`` counts block-layer reads only, none of FUSE's).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import json
import logging
import mmap
import os
import random
import select
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgevision.moe.libc import libc
from edgevision.moe.nvme_server import NativeServer
from edgevision.moe.storage import StorageUnavailable

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

KIB, MIB = 1024, 2**20
# An Orin-class NVMe at queue depth 1. NVMe drives answer a 4 KiB random read at queue depth 1 in about 50-100
# us as an application sees it (device-level 20-70 us: simplyblock's NVMe latency glossary; about 50 us for a
# Samsung 9100 Pro from its ~80 MB/s QD1 4K random reads; AnandTech's QD1 random-read tests of TLC drives land
# in the same range). The Orin NX / Orin Nano developer kit carrier (P3768) takes DRAM-less PCIe Gen3 x4 client
# drives and the Orin's Cortex-A78AE cores add stack time, so we take 80 us: a figure from public reviews and
# spec sheets, NOT measured on a board. The bandwidth is `storage.NVME_READ_MBPS` (2,000 MB/s, Gen3 x4).
NVME_LATENCY_US = 80.0

# -- the FUSE protocol (include/uapi/linux/fuse.h) ------------------------------------------------------------

FUSE_MAJOR, FUSE_MINOR = 7, 31


class Op(enum.IntEnum):
    """The opcodes this server answers (any other gets ENOSYS)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    OPEN = 14
    READ = 15
    STATFS = 17
    RELEASE = 18
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    ACCESS = 34
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42


NO_REPLY = (Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT)
ASYNC_READ, MAX_PAGES = 1 << 0, 1 << 22  # fuse_init_out.flags
FOPEN_KEEP_CACHE = 1 << 1
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write, time_gran, max_pages,
# map_alignment, flags2, max_stack_depth, request_timeout, unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize,
# flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, *_nsec; then fuse_attr
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then fuse_attr
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, pad
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type
ROOT, FILE = 1, 2  # node ids
VALID = 24 * 3600  # seconds the kernel may keep names and attributes: nothing here ever changes
assert (IN_HEADER.size, INIT_OUT.size, READ_IN.size, ATTR.size, STATFS_OUT.size) == (40, 64, 40, 88, 80)

MS_RDONLY, MS_NOSUID, MS_NODEV, MNT_DETACH = 1, 2, 4, 2
PR_SET_TIMERSLACK = 29
# server threads, each taking one request at a time: the most READs in flight (an NVMe's queue is deeper); the
# connection's max_background, the most readahead READs the kernel sends at once, is set to the same
READERS = 16


def _low_timer_slack() -> None:
    """Sleeps of the calling thread wake within ~1 ns of their deadline (instead of the default 50 us)."""
    libc().prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(1), 0, 0, 0)


@dataclass(frozen=True)
class NvmeSettings:
    latency_us: float
    read_mbps: int | None
    read_ahead_kb: int
    max_request_kb: int
    kernel_protocol: str
    bdi: str
    lead_us: float  # how early each reply is written: the server's own round trip, as measured
    server: str  # "C" or "Python"

    def describe(self) -> str:
        bandwidth = f"{self.read_mbps} MB/s" if self.read_mbps else "unthrottled"
        return (
            f"storage: emulated NVMe ({self.server} FUSE server over /dev/fuse, protocol {self.kernel_protocol}, "
            f"backing file in RAM (/dev/shm)): latency {self.latency_us:.0f} us at queue depth 1 (replies written "
            f"{self.lead_us:.0f} us before their due time: the server's own round trip), transfers {bandwidth}, "
            f"READ requests of at most "
            f"{self.max_request_kb} KiB, read_ahead_kb {self.read_ahead_kb} (bdi {self.bdi})"
        )


class _Channel:
    """When each READ is answered: ``max(arrival + latency, free) + size / bandwidth``."""

    def __init__(self, latency: float, bandwidth: float | None) -> None:
        self.latency, self.bandwidth = latency, bandwidth
        self.free = 0.0

    def due(self, arrival: float, size: int) -> float:
        start = max(arrival + self.latency, self.free)
        self.free = start + (size / self.bandwidth if self.bandwidth else 0.0)
        return self.free


class EmulatedNvme:
    """The model on an emulated NVMe; `path` is the file on the mount. Close to unmount and stop the server.

    The server's threads run in this process. The C server's need nothing of it; the Python server's (`native`
    false, or no C compiler) need its GIL to answer: then read the file from other processes only (as the
    benchmark's children do), since a read here that holds the GIL while it waits for the server (a page fault
    on a mapping of `path`, e.g. slicing an ``mmap``) would never be answered.
    """

    def __init__(
        self,
        model: Path,
        *,
        latency_us: float,
        read_mbps: int | None,
        read_ahead_kb: int,
        name: str | None = None,
        native: bool = True,
    ) -> None:
        if os.geteuid() != 0:
            raise StorageUnavailable("the emulated NVMe needs root (mount(2) of a FUSE file system)")
        if not os.path.exists("/dev/fuse"):
            raise StorageUnavailable("/dev/fuse is missing (the kernel's FUSE module, or the device in a container)")
        self._work = Path(tempfile.mkdtemp(prefix="edgevision-nvme-", dir="/dev/shm"))
        self._fd = -1
        self._mounted = False
        self._threads: list[threading.Thread] = []
        self._native: NativeServer | None = None
        self._lock = threading.Lock()
        self._kernel = "?"
        self._read_ahead = read_ahead_kb * KIB
        self.bdi = ""
        self._served = 0  # the Python server's bytes answered to READ requests, and READs
        self._requests = 0
        try:
            self._backing = os.open(shutil.copyfile(model, self._work / "backing"), os.O_RDONLY)
            self._size = os.fstat(self._backing).st_size
            # populated: a reply then never waits for the server's own minor faults on the tmpfs pages
            self._map = mmap.mmap(self._backing, self._size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ)
            self._view = memoryview(self._map)  # replies are written from it: no copy in this process
            self._name = (name or model.name).encode()
            self.counter = self._work / "served"
            self.counter.write_bytes(bytes(8))
            self._counter_fd = os.open(self.counter, os.O_RDWR)
            self._counter = mmap.mmap(self._counter_fd, 8)
            self._channel = _Channel(latency_us * 1e-6, read_mbps * 1e6 if read_mbps else None)
            self._lead = 0.0
            self._mount()
            self._start(native)
            self.bdi = f"0:{os.minor(os.stat(self._mount_point).st_dev)}"  # a GETATTR: the server answers it
            self.path = self._mount_point / self._name.decode()
            ra = Path("/sys/class/bdi") / self.bdi / "read_ahead_kb"
            ra.write_text(str(read_ahead_kb))
            # what a queue-depth-1 read takes beyond the model (the server's round trip and its timer's wake-up)
            # is taken off each reply's due time
            target = self._channel.due(0.0, 128 * KIB)
            self._channel.free = 0.0
            if self._native:
                self._native.set_model(self._channel.latency, self._channel.bandwidth, 0.0)
            measured = min(self.measure(count=32, bandwidth=False)[0] for _ in range(3))
            self._lead = min(max(0.0, measured - target), target)
            if self._native:
                self._native.set_model(self._channel.latency, self._channel.bandwidth, self._lead)
            self.settings = NvmeSettings(
                latency_us=latency_us,
                read_mbps=read_mbps,
                read_ahead_kb=int(ra.read_text()),
                max_request_kb=self._max_request // KIB,
                kernel_protocol=self._kernel,
                bdi=self.bdi,
                lead_us=self._lead * 1e6,
                server="C" if self._native else "Python",
            )
        except BaseException:
            self.close()
            raise

    # -- mount and serve --------------------------------------------------------------------------

    def _mount(self) -> None:
        self._mount_point = self._work / "mnt"
        self._mount_point.mkdir()
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={128 * KIB}"
        lib = libc()
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV
        if lib.mount(b"edgevision-nvme", bytes(self._mount_point), b"fuse", flags, options.encode()) != 0:
            err = ctypes.get_errno()
            raise StorageUnavailable(f"mount -t fuse on {self._mount_point}: {os.strerror(err)}")
        self._mounted = True
        self._init()

    def _init(self) -> None:
        """Answer the kernel's first request, INIT: the protocol version and the connection's settings."""
        poll = select.poll()
        poll.register(self._fd, select.POLLIN)
        if not poll.poll(10_000):
            raise StorageUnavailable("the kernel sent no FUSE INIT within 10 s of the mount")
        request = os.read(self._fd, 4 * KIB + 128 * KIB)
        _, opcode, unique, *_ = IN_HEADER.unpack_from(request)
        if opcode != Op.INIT:
            raise StorageUnavailable(f"the kernel's first FUSE request was opcode {opcode}, not INIT")
        major, minor, _, flags = INIT_IN.unpack_from(request, IN_HEADER.size)
        self._kernel = f"{major}.{minor}"
        self._max_request = 32 * mmap.PAGESIZE  # FUSE_DEFAULT_MAX_PAGES_PER_REQ, without MAX_PAGES
        # max_background (the most readahead READs the kernel sends at once) is the number of server threads
        settings = (self._read_ahead, flags & ASYNC_READ, READERS, READERS * 3 // 4, 4 * KIB, 1, 0, 0, 0, 0, 0)
        self._write(unique, 0, [INIT_OUT.pack(FUSE_MAJOR, min(minor, FUSE_MINOR), *settings)])

    def _start(self, native: bool) -> None:
        """`READERS` server threads: C where the library builds, else Python."""
        if native:
            self._native = NativeServer.create(self._fd, self._map, self._name, self._counter, READERS)
            if self._native:
                return
        self._threads = [threading.Thread(target=self._serve, name=f"nvme-{i}", daemon=True) for i in range(READERS)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        """One of `READERS` threads: take a request from /dev/fuse, answer it (a READ at its due time), until the
        connection goes (unmount)."""
        _low_timer_slack()
        buffer = 4 * KIB + 128 * KIB
        while True:
            try:
                request = os.read(self._fd, buffer)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                if exc.errno != errno.ENODEV:  # ENODEV: unmounted
                    logger.warning("emulated NVMe: reading /dev/fuse failed: %s", exc.strerror)
                break
            arrival = time.perf_counter()
            _, opcode, unique, node, *_ = IN_HEADER.unpack_from(request)
            try:
                self._handle(opcode, unique, node, memoryview(request)[IN_HEADER.size :], arrival)
            except Exception:  # a bug here must not leave the kernel (and a benchmark child) waiting forever
                logger.exception("emulated NVMe: request %d (opcode %d) failed", unique, opcode)
                self._write(unique, -errno.EIO, [])
            if opcode == Op.DESTROY:
                break

    def _handle(self, opcode: int, unique: int, node: int, body: memoryview, arrival: float) -> None:
        if opcode == Op.READ:
            _, offset, size, *_ = READ_IN.unpack_from(body)
            with self._view[offset : offset + size] if node == FILE else memoryview(b"") as data:
                with self._lock:
                    due = self._channel.due(arrival, len(data))
                wait = due - self._lead - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                self._write(unique, 0, [data])
                with self._lock:
                    self._requests += 1
                    self._served += len(data)
                    struct.pack_into("<Q", self._counter, 0, self._served)
        elif opcode not in NO_REPLY:
            error, payload = self._answer(opcode, node, body)
            self._write(unique, error, payload)

    def _answer(self, opcode: int, node: int, body: memoryview) -> tuple[int, list[bytes]]:
        """(negative errno or 0, reply payload) for everything but READ and INIT."""
        match opcode:
            case Op.LOOKUP:
                if node == ROOT and bytes(body).rstrip(b"\0") == self._name:
                    return 0, [ENTRY_OUT.pack(FILE, 0, VALID, VALID, 0, 0), self._attr(FILE)]
                return -errno.ENOENT, []
            case Op.GETATTR:
                return 0, [ATTR_OUT.pack(VALID, 0, 0), self._attr(node)]
            case Op.OPEN:
                (flags,) = struct.unpack_from("<I", body)
                if flags & os.O_ACCMODE != os.O_RDONLY:
                    return -errno.EROFS, []
                return 0, [OPEN_OUT.pack(0, FOPEN_KEEP_CACHE, 0)]
            case Op.OPENDIR:
                return 0, [OPEN_OUT.pack(0, 0, 0)]
            case Op.READDIR:
                offset, size = struct.unpack_from("<QI", body, 8)
                return 0, [self._entries(offset, size)]
            case Op.STATFS:
                blocks = -(-self._size // 4096)
                return 0, [STATFS_OUT.pack(blocks, 0, 0, 2, 0, 4096, 255, 4096)]
            case Op.RELEASE | Op.RELEASEDIR | Op.FLUSH | Op.ACCESS | Op.DESTROY:
                return 0, []
        return -errno.ENOSYS, []

    def _attr(self, node: int) -> bytes:
        if node == FILE:
            mode, size, nlink = stat.S_IFREG | 0o444, self._size, 1
        else:
            mode, size, nlink = stat.S_IFDIR | 0o555, 0, 2
        now = int(time.time())
        return ATTR.pack(node, size, -(-size // 512), now, now, now, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)

    def _entries(self, offset: int, size: int) -> bytes:
        out = b""
        entries = [(ROOT, b".", stat.S_IFDIR), (ROOT, b"..", stat.S_IFDIR), (FILE, self._name, stat.S_IFREG)]
        for i, (ino, name, kind) in enumerate(entries[offset:], start=offset + 1):
            entry = DIRENT.pack(ino, i, len(name), kind >> 12) + name
            entry += bytes(-len(entry) % 8)
            if len(out) + len(entry) > size:
                break
            out += entry
        return out

    def _write(self, unique: int, error: int, payload: list[bytes] | list[memoryview]) -> None:
        length = OUT_HEADER.size + sum(len(p) for p in payload)
        try:
            os.writev(self._fd, [OUT_HEADER.pack(length, error, unique), *payload])
        except OSError as exc:  # ENOENT: the request was interrupted or aborted meanwhile
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                logger.warning("emulated NVMe: replying on /dev/fuse failed: %s", exc.strerror)

    # -- measurements ----------------------------------------------------------------------------

    def measure(self, count: int = 64, *, bandwidth: bool = True) -> tuple[float, float]:
        """(median seconds of one 128 KiB read at queue depth 1, bytes/s of 8 readers) through the mount, from a
        separate process like the benchmark's children (so its threads never wait for this one's GIL)."""
        cmd = [sys.executable, "-m", "edgevision.moe.nvme", str(self.path), str(count), str(int(bandwidth))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise StorageUnavailable(f"measuring the emulated NVMe failed: {proc.stderr.strip()[-300:]}")
        latency, bandwidth = json.loads(proc.stdout)
        return float(latency), float(bandwidth)

    def self_check(self) -> str:
        """The achieved latency at queue depth 1 and bandwidth at queue depth 8, as a header line's tail."""
        latency, bandwidth = self.measure()
        target = self.settings.latency_us + (128 * KIB / self.settings.read_mbps if self.settings.read_mbps else 0)
        return (
            f"measured through the mount from another process, less CPU wait: one 128 KiB read at queue depth 1 "
            f"{1e6 * latency:.0f} us (target {target:.0f} us), 8 readers of 128 KiB {bandwidth / 1e6:.0f} MB/s"
        )

    # -- the benchmark's storage interface --------------------------------------------------------

    def enter(self) -> None:
        """Nothing to join: the server counts what it serves (a ``preexec_fn``)."""

    @property
    def served(self) -> int:
        """Bytes answered to READ requests so far."""
        counter = self.__dict__.get("_counter")
        return struct.unpack_from("<Q", counter)[0] if counter is not None else self._served

    @property
    def requests(self) -> int:
        """READ requests answered so far."""
        return self._native.requests if self._native else self._requests

    def read_bytes(self) -> int:
        return self.served

    def close(self) -> None:
        if self._mounted:
            if libc().umount2(bytes(self._mount_point), MNT_DETACH) != 0:
                logger.warning("umount %s: %s", self._mount_point, os.strerror(ctypes.get_errno()))
            self._mounted = False
            self._abort()
        if self._native and not self._native.stop():
            # its threads may still use the descriptor and the mappings (which it holds open): the process ends them
            self._fd = -1
        for thread in self._threads:
            thread.join(timeout=5)
            if thread.is_alive():
                logger.warning("emulated NVMe: thread %s did not stop", thread.name)
        self._threads = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._served = self.served
        for name in ("_view", "_map", "_counter", "_counter_fd", "_backing"):
            value = self.__dict__.pop(name, None)
            try:
                if isinstance(value, memoryview):
                    value.release()
                elif isinstance(value, mmap.mmap):
                    value.close()
                elif isinstance(value, int):
                    os.close(value)
            except BufferError:  # a reply still queued in a thread that did not stop: the process ends it
                logger.warning("emulated NVMe: %s still in use", name)
        shutil.rmtree(self._work, ignore_errors=True)

    def _abort(self) -> None:
        """End the FUSE connection even if a process still holds the (detached) file open: its reads fail."""
        if not self.bdi:  # the mount never got as far as INIT
            return
        abort = Path("/sys/fs/fuse/connections") / self.bdi.split(":")[1] / "abort"
        try:
            abort.write_text("1")
        except OSError:  # gone with the mount (nobody held it), or fusectl not mounted
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cpu_waited() -> float:
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def measure_latency(path: Path, size: int = 128 * KIB, count: int = 64) -> float:
    """Median seconds of one `size`-byte read of `path` at a random offset, queue depth 1, through the page
    cache (read-ahead off for the descriptor, the pages dropped before and after), less the time this thread
    waited for a CPU (schedstat)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        buf = mmap.mmap(-1, size)
        blocks = os.fstat(fd).st_size // size
        times = []
        for _ in range(count):
            offset = random.randrange(blocks) * size
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
            w0, t0 = _cpu_waited(), time.perf_counter()
            os.preadv(fd, [buf], offset)
            times.append(time.perf_counter() - t0 - (_cpu_waited() - w0))
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
        return sorted(times)[len(times) // 2]
    finally:
        os.close(fd)


def measure_bandwidth(path: Path, depth: int = 8, total: int = 64 * MIB, size: int = 128 * KIB) -> float:
    """Bytes per second that `depth` threads reading distinct `size`-byte pieces of the first `total` bytes of
    `path` (in a random order, read-ahead off, from a dropped page cache) get together."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = min(total, os.fstat(fd).st_size // size * size)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
        pieces = list(range(0, total, size))
        random.shuffle(pieces)

        def read(share: list[int]) -> None:
            buf = mmap.mmap(-1, size)
            for offset in share:
                os.preadv(fd, [buf], offset)

        threads = [threading.Thread(target=read, args=(pieces[i::depth],)) for i in range(depth)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
        return total / elapsed
    finally:
        os.close(fd)


if __name__ == "__main__":  # python -m edgevision.moe.nvme PATH [COUNT]: what EmulatedNvme.measure runs
    target = Path(sys.argv[1])
    latency = measure_latency(target, count=int(sys.argv[2]))
    print(json.dumps([latency, measure_bandwidth(target) if sys.argv[3] == "1" else 0.0]))
