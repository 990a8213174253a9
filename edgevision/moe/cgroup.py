"""A memory-limited cgroup to run a benchmark child in, as on a device with less RAM than the model.

Supports cgroup v2 (``memory.max`` on a ``cgroup2`` mount whose root offers the memory controller) and v1
(``memory.limit_in_bytes`` in the ``memory`` hierarchy). The cgroup is created beside this process's own
(v1: inside it), a child is moved in before it runs anything (`MemoryCgroup.enter`, used as Popen's
``preexec_fn``), so everything it maps (the model's page cache included) is charged to it, and the cgroup is
removed on `close`. Page-cache pages are charged to the cgroup that first reads them, so callers drop the
model file from the page cache before each run (`drop_page_cache`).

Creating cgroups needs root (or a delegated subtree); `MemoryCgroup.create` raises `CgroupUnavailable`
saying which and why, instead of failing on a write deep inside.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgevision.errors import EdgevisionError

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)


class CgroupUnavailable(EdgevisionError):
    """No memory cgroup can be made here (not root, no memory controller)."""


def _mounts() -> list[tuple[str, str, str]]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((parts[1], parts[2], parts[3]))  # mount point, type, options
    return out


def _own_path(controller: str | None) -> str:
    """This process's cgroup path in the v1 hierarchy of `controller`, or in v2 (None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if controller is None and _id == "0" and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return "/"


class MemoryCgroup:
    """A cgroup with a memory cap; `enter` moves the calling process into it."""

    def __init__(self, path: Path, version: int, limit: int) -> None:
        self.path, self.version, self.limit = path, version, limit
        self._procs = str(path / "cgroup.procs")

    @classmethod
    def create(cls, name: str, limit: int) -> MemoryCgroup:
        """Make cgroup `name` capped at `limit` bytes (no swap beyond it where the kernel can say so).

        Raises:
            CgroupUnavailable: not root, or neither a v2 nor a v1 memory controller is mounted.
        """
        if os.geteuid() != 0:
            raise CgroupUnavailable(
                "memory-capped runs need a cgroup, and creating one needs root (this process is uid "
                f"{os.geteuid()}); run the benchmark as root, or under systemd-run --scope -p MemoryMax=..."
            )
        errors = []
        for mount, kind, options in _mounts():
            try:
                if kind == "cgroup2" and "memory" in (Path(mount) / "cgroup.controllers").read_text().split():
                    return cls._create_v2(Path(mount), name, limit)
                if kind == "cgroup" and "memory" in options.split(","):
                    return cls._create_v1(Path(mount), name, limit)
            except OSError as exc:
                errors.append(f"{mount}: {exc.strerror or exc}")
        detail = "; ".join(errors) or "neither a cgroup2 mount with the memory controller nor a v1 memory hierarchy"
        raise CgroupUnavailable(f"no memory cgroup can be made here ({detail})")

    @classmethod
    def _create_v2(cls, mount: Path, name: str, limit: int) -> MemoryCgroup:
        control = mount / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory")
        path = mount / name
        path.mkdir(exist_ok=True)
        (path / "memory.max").write_text(str(limit))
        swap = path / "memory.swap.max"
        if swap.exists():
            swap.write_text("0")
        logger.debug("cgroup v2 %s: memory.max %d", path, limit)
        return cls(path, 2, limit)

    @classmethod
    def _create_v1(cls, mount: Path, name: str, limit: int) -> MemoryCgroup:
        parent = mount / _own_path("memory").lstrip("/")
        path = (parent if parent.is_dir() else mount) / name
        path.mkdir(exist_ok=True)
        (path / "memory.limit_in_bytes").write_text(str(limit))
        memsw = path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            try:
                memsw.write_text(str(limit))
            except OSError:
                logger.debug("cannot set %s; swap may extend the cap", memsw)
        logger.debug("cgroup v1 %s: memory.limit_in_bytes %d", path, limit)
        return cls(path, 1, limit)

    def enter(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``: runs in the child before exec)."""
        with open(self._procs, "w") as f:
            f.write(str(os.getpid()))

    def peak(self) -> int | None:
        """Highest memory charge seen (v1 ``max_usage_in_bytes``, v2 ``memory.peak``), None if unknown."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def reset_peak(self) -> None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            (self.path / name).write_text("0")
        except OSError:
            pass  # older v2 kernels cannot reset memory.peak

    def close(self) -> None:
        """Remove the cgroup (its processes must have exited)."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove cgroup %s (%s); remove it with rmdir", self.path, exc.strerror)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def drop_page_cache(path: str | os.PathLike[str]) -> float:
    """Evict a file's clean, unmapped pages from the page cache (``posix_fadvise(DONTNEED)``); returns the
    share of its pages still cached afterwards (pages another process maps cannot be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages would stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return cached_fraction(fd)
    finally:
        os.close(fd)


def cached_fraction(fd: int) -> float:
    """Share of an open file's pages in the page cache (``mincore`` on a fresh read-only mapping)."""
    import mmap

    import numpy as np

    from edgevision.moe.libc import PAGE
    from edgevision.moe.libc import libc as _libc

    size = os.fstat(fd).st_size
    if size == 0:
        return 0.0
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    try:
        view = np.frombuffer(mapping, dtype=np.uint8)
        vec = np.zeros((size + PAGE - 1) // PAGE, dtype=np.uint8)
        rc = _libc().mincore(view.ctypes.data, size, vec.ctypes.data)
        del view
        if rc != 0:
            return float("nan")
        return float((vec & 1).mean())
    finally:
        mapping.close()


def memory_room() -> tuple[int, int]:
    """(limit, usage) in bytes of the memory this process may use: its own cgroup's cap and charge (v2
    ``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``) when it is
    capped, less the inactive file pages in it (reclaimed first, at no cost: a full cap is not pressure by
    itself), else the machine's (``MemTotal`` and ``MemTotal - MemAvailable``)."""
    for mount, kind, options in _mounts():
        if kind == "cgroup2":
            folder = Path(mount) / _own_path(None).lstrip("/")
            names, inactive = ("memory.max", "memory.current"), "inactive_file"
        elif kind == "cgroup" and "memory" in options.split(","):
            folder = Path(mount) / _own_path("memory").lstrip("/")
            names, inactive = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file"
        else:
            continue
        try:
            limit_text, usage_text = ((folder / name).read_text().strip() for name in names)
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit_text != "max" and int(limit_text) < 2**60:
            return int(limit_text), int(usage_text) - int(stat.get(inactive, 0))
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"], info["MemTotal"] - info["MemAvailable"]
