"""Files edgevision reads and writes for the user: read within bounds, checked before the work starts, written
atomically.

`check_output` refuses an output path that cannot be written (a directory, a missing folder, a read-only
place, a nearly full disk) before any model is loaded, so a bad `--out` fails in a second instead of after
the whole answer. `atomic_write` writes into a temporary file beside the target and renames it into place
only once everything was written and flushed, so a crash, a full disk or a signal never leaves a partial
file under the target's name.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from edgevision.errors import ConfigError, InputError

# A config file is a page of settings: anything much larger is not one of ours.
MAX_CONFIG_BYTES = 1 << 20

# Refuse to start when the output's disk has less free space than this (a spoken answer is ~100 KiB a second).
MIN_FREE_BYTES = 16 * 2**20


def check_output(path: str | os.PathLike[str], *, what: str = "output file", min_free: int = MIN_FREE_BYTES) -> Path:
    """`path` as a Path if a file can be written there; otherwise InputError saying what to do."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file name inside it, e.g. {path / 'answer.wav'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{what} {path}: its folder {parent} does not exist; create it first (mkdir -p {parent})")
    if path.is_symlink():
        raise InputError(f"{what} {path} is a symbolic link; give the path of a regular file")
    if path.exists() and not path.is_file():
        raise InputError(f"{what} {path} exists and is not a regular file; choose another name")
    try:  # os.access does not see a read-only mount for root: try creating a file there
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe")  # noqa: SIM115
        probe.close()
        stats = os.statvfs(parent)
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be written ({exc.strerror}); choose a writable folder") from exc
    free = stats.f_bavail * stats.f_frsize
    if free < min_free:
        raise InputError(
            f"{what} {path}: only {free // 2**20} MiB free on its disk (at least {min_free // 2**20} MiB needed); "
            "free some space or choose another disk"
        )
    return path


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file in the same folder, renamed over it when the block ends.

    On any exception (a full disk, KeyboardInterrupt, SystemExit from a signal handler) the temporary file is
    removed and `path` is left as it was. An OSError while writing becomes an InputError that names the file.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        hint = "free some space on that disk" if exc.errno == errno.ENOSPC else "choose a writable place"
        raise InputError(f"cannot write {path} ({exc.strerror}); nothing was written — {hint}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def read_text_file(path: Path, *, limit: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; a FIFO, a device or a huge file is refused
    before it is read (a FIFO would block, /dev/zero never ends)."""
    try:
        info = path.stat()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror} — check the path and its permissions") from e
    if not stat.S_ISREG(info.st_mode):
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, a device or a socket)"
        raise ConfigError(f"{path}: is {what} — give the path of a YAML config file")
    if info.st_size > limit:
        raise ConfigError(
            f"{path}: is {info.st_size / 2**20:.1f} MiB; a config file may be at most {limit // 1024} KiB — "
            "check that this is the config file (config/edgevision.yaml is about 8 KiB)"
        )
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror} — check the path and its permissions") from e
    if len(data) > limit:  # it grew after the check
        raise ConfigError(f"{path}: more than {limit // 1024} KiB — check that this is the config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}) — save the file as UTF-8") from e
