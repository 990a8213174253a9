"""The per-interaction log: JSON lines, one record per answer, size-rotated, each record fsync'd.

A record is written with one `write()` of a whole line and flushed to disk before `write()` returns, so
a SIGTERM or a power cut after an answer never loses or half-writes its record. A record is whole or
absent: when a write fails part-way (a full disk), the file is cut back to where the record began, so the
next record never lands glued to a fragment; a torn last line found when the log is opened (a crash or a
power cut mid-write) is cut off the same way, and the cut bytes are logged. When the file would pass
`max_bytes` it is rotated like logrotate: interactions.jsonl → .1 → .2 ... up to `backups`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgevision.errors import ConfigError

logger = logging.getLogger(__name__)


def _default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "to_record"):
        return value.to_record()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clean(value: Any) -> Any:
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class InteractionLog:
    """Appends one JSON object per line to `path`; thread-safe; rotates at `max_bytes` keeping `backups`."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = _open_append(self.path)
        except OSError as error:
            reason = (
                "it is a symbolic link, which the log never follows" if error.errno == errno.ELOOP else error.strerror
            )
            raise ConfigError(
                f"cannot write the interaction log {self.path}: {reason} — set "
                "telemetry.log_path to a writable file (systemd: LogsDirectory=edgevision)"
            ) from error

    def write(self, record: dict[str, Any]) -> bool:
        """Append `record` as one line and flush it to disk before returning.

        A full or failing disk is logged as an error and the record dropped (False): the assistant goes on
        answering. A record that is not JSON-serialisable is a bug and raises TypeError.
        """
        line = (json.dumps(_clean(record), default=_default, ensure_ascii=False, allow_nan=False) + "\n").encode()
        with self._lock:
            if self._closed:
                raise ValueError(f"interaction log {self.path} is closed")
            try:
                if self._file.closed:  # a rotation failed half-way before: append to whatever is there now
                    self._file = _open_append(self.path)
                size = self._file.seek(0, os.SEEK_END)
                if size > 0 and size + len(line) > self.max_bytes:
                    self._rotate()
                    size = 0
            except OSError as error:
                logger.error("interaction log %s: record dropped: %s", self.path, error)
                return False
            view = memoryview(line)
            try:
                while view:  # unbuffered: one write() call normally takes the whole line
                    view = view[self._file.write(view) :]
                os.fsync(self._file.fileno())
            except OSError as error:
                if len(view) < len(line) or error.errno != errno.ENOSPC:  # some of it may be on disk
                    self._cut(size)
                logger.error("interaction log %s: record dropped: %s", self.path, error)
                return False
        return True

    def _cut(self, size: int) -> None:
        """Remove a partly written record: the file back to `size` bytes (truncating frees space, so it works
        on a full disk)."""
        try:
            os.ftruncate(self._file.fileno(), size)
        except OSError as error:  # the record's fragment stays; the next open cuts it off (repair_tail)
            logger.error("interaction log %s: cannot remove a partly written record: %s", self.path, error)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = _open_append(self.path)
        logger.debug("interaction log rotated: %s", self.path)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._file.close()

    def __enter__(self) -> InteractionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_append(path: Path):
    """Open the log for appending, unbuffered, never through a symbolic link (O_NOFOLLOW: a link planted in
    the log's folder cannot make us append to another file), with a torn last record cut off (`repair_tail`)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o640)
    file = os.fdopen(fd, "ab+", buffering=0)
    repair_tail(file)
    return file


def repair_tail(file: Any) -> int:
    """Cut a torn last line (bytes after the last newline) off a log opened for appending; returns how many
    bytes were cut. Every complete record before it stays."""
    size = file.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    fd = file.fileno()
    end = size
    while end > 0:  # find the last newline, reading back in blocks
        start = max(0, end - 65536)
        block = os.pread(fd, end - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    else:
        keep = 0
    if keep < size:
        logger.warning(
            "%s: cut off a torn last record (%d bytes: %r...); the records before it are intact",
            getattr(file, "name", "interaction log"),
            size - keep,
            os.pread(fd, min(80, size - keep), keep),
        )
        os.ftruncate(fd, keep)
    return size - keep


def read(path: str | os.PathLike[str], *, rotated: bool = False) -> list[dict[str, Any]]:
    """The records in `path` (with `rotated`, also its backups, oldest first); a torn last line is skipped."""
    return list(iter_records(path, rotated=rotated))


def iter_records(path: str | os.PathLike[str], *, rotated: bool = False) -> Iterator[dict[str, Any]]:
    path = Path(path)
    files = [path]
    if rotated:
        backups = [p for p in path.parent.glob(path.name + ".*") if p.suffix.lstrip(".").isdigit()]
        files = sorted(backups, key=lambda p: -int(p.suffix[1:])) + files
    for file in files:
        if not file.exists():
            continue
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d: not a complete JSON record; skipped", file, number)
