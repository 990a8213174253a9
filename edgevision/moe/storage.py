"""Storage like the board's for ``edgevision bench moe``: the model on a throttled loop device.

On the Jetson the model file sits on an NVMe drive whose block device reads ahead 128 KiB; this VM's disk
reads ahead 8 MiB, which decides how much a page fault drags in and so who wins. `BoardStorage` copies the
model into an ext4 file system on a loop device with direct I/O (``losetup --direct-io=on``: the loop
device's reads bypass the host's page cache and its readahead), sets the loop device's ``read_ahead_kb``
(128 by default) and throttles reads from it to an NVMe's bandwidth with the cgroup v1 ``blkio`` controller
(``blkio.throttle.read_bps_device``; cgroup v2 ``io.max`` where that is mounted instead). The benchmark's
children join that cgroup, which also counts the bytes they read from the device (`read_bytes`).

Where the loop device's backing file lives: ``ram`` (default: /dev/shm, so the other tenants of this
machine's disk cannot make the figures drift, and every read costs the throttle, not the VM's disk) or
``disk`` (a temporary file on the VM's disk, slower per request than an NVMe). Per-request latency is not
added (the sandbox has no device mapper for dm-delay): `measure_latency` says what one 128 KiB read costs.

Needs root; `StorageUnavailable` says why not.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgevision.errors import EdgevisionError

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

MIB = 2**20
# An Orin-class NVMe: the Orin NX developer kit carrier's M.2 Key M slot is PCIe Gen3 x4 (about 3.9 GB/s of
# link); spec sheets of the Gen3 x4 drives fitted there give 2,000-3,500 MB/s sequential reads. We take the low
# end, 2,000 MB/s, for random reads of whole experts. A spec-sheet figure, not measured on a board.
NVME_READ_MBPS = 2000
READ_AHEAD_KB = 128


class StorageUnavailable(EdgevisionError):
    """A loop device, a file system on it or the blkio throttle cannot be set up here."""


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    except FileNotFoundError as exc:
        raise StorageUnavailable(f"{cmd[0]} is not installed (util-linux, e2fsprogs)") from exc
    except subprocess.CalledProcessError as exc:
        raise StorageUnavailable(f"{' '.join(cmd)} failed: {exc.stderr.strip()}") from exc


@dataclass(frozen=True)
class StorageSettings:
    read_ahead_kb: int
    max_sectors_kb: int
    read_mbps: int | None
    backing: str
    direct_io: bool
    device: str

    def describe(self) -> str:
        throttle = f"reads throttled to {self.read_mbps} MB/s (blkio)" if self.read_mbps else "reads not throttled"
        return (
            f"storage: {self.device} (loop, direct I/O {'on' if self.direct_io else 'OFF'}, backing file in "
            f"{self.backing}), ext4, read_ahead_kb {self.read_ahead_kb}, max_sectors_kb {self.max_sectors_kb}, "
            f"{throttle}"
        )


class BoardStorage:
    """The model copied onto a throttled loop device; `path` is the copy. Close to detach everything."""

    def __init__(self, model: Path, *, read_ahead_kb: int, read_mbps: int | None, backing: str = "ram") -> None:
        if os.geteuid() != 0:
            raise StorageUnavailable("board-like storage needs root (losetup, mount, blkio cgroup)")
        if backing not in ("ram", "disk"):
            raise ValueError("backing must be 'ram' or 'disk'")
        self._work = Path(tempfile.mkdtemp(prefix="edgevision-storage-", dir="/dev/shm" if backing == "ram" else None))
        self._device: str | None = None
        self._mounted = False
        self.cgroup: Path | None = None
        try:
            image = self._work / "disk.img"
            size = model.stat().st_size + 64 * MIB
            with open(image, "wb") as f:
                f.truncate(size)
            _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
            self._device = _run("losetup", "--direct-io=on", "--find", "--show", str(image))
            mount = self._work / "mnt"
            mount.mkdir()
            _run("mount", "-o", "noatime", self._device, str(mount))
            self._mounted = True
            self.path = Path(shutil.copyfile(model, mount / model.name))
            with open(self.path, "rb+") as f:
                os.fsync(f.fileno())
            name = Path(self._device).name
            queue = Path("/sys/block") / name / "queue"
            (queue / "read_ahead_kb").write_text(str(read_ahead_kb))
            direct = (Path("/sys/block") / name / "loop" / "dio").read_text().strip() == "1"
            self.major_minor = (Path("/sys/block") / name / "dev").read_text().strip()
            self.cgroup = self._throttle(read_mbps)
            self.settings = StorageSettings(
                read_ahead_kb=int((queue / "read_ahead_kb").read_text()),
                max_sectors_kb=int((queue / "max_sectors_kb").read_text()),
                read_mbps=read_mbps,
                backing="RAM (/dev/shm)" if backing == "ram" else "the VM's disk",
                direct_io=direct,
                device=self._device,
            )
        except BaseException:
            self.close()
            raise

    def _throttle(self, read_mbps: int | None) -> Path:
        root = Path("/sys/fs/cgroup/blkio")
        if not (root / "blkio.throttle.read_bps_device").exists():
            raise StorageUnavailable("no cgroup v1 blkio hierarchy with throttling at /sys/fs/cgroup/blkio")
        group = root / f"edgevision-storage-{os.getpid()}"
        group.mkdir(exist_ok=True)
        if read_mbps:
            (group / "blkio.throttle.read_bps_device").write_text(f"{self.major_minor} {read_mbps * 10**6}")
        return group

    def enter(self) -> None:
        """Move the calling process into the throttled cgroup (a ``preexec_fn``)."""
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def read_bytes(self) -> int:
        """Bytes the cgroup's processes have read from the loop device so far."""
        if self.cgroup is None:
            return 0
        for line in (self.cgroup / "blkio.throttle.io_service_bytes").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == self.major_minor and parts[1] == "Read":
                return int(parts[2])
        return 0

    def measure_latency(self, size: int = 128 * 1024, count: int = 64) -> float:
        """Median seconds of one `size`-byte O_DIRECT read of the model file at queue depth 1, from this
        process (not throttled), without the time this thread then waited for a CPU (schedstat)."""
        import mmap
        import random

        def waited() -> float:
            try:
                return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                return 0.0

        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, size)
            blocks = os.fstat(fd).st_size // size
            times = []
            for _ in range(count):
                w0, t0 = waited(), time.perf_counter()
                os.preadv(fd, [buf], random.randrange(blocks) * size)
                times.append(time.perf_counter() - t0 - (waited() - w0))
            return sorted(times)[len(times) // 2]
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.cgroup is not None:
            try:
                self.cgroup.rmdir()
            except OSError as exc:
                logger.warning("could not remove %s (%s)", self.cgroup, exc.strerror)
            self.cgroup = None
        if self._mounted:
            subprocess.run(["umount", str(self._work / "mnt")], check=False, capture_output=True)
            self._mounted = False
        if self._device:
            subprocess.run(["losetup", "-d", self._device], check=False, capture_output=True)
            self._device = None
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
