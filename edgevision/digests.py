"""sha256 of model files, cached by what `stat` says about them, so checking a model at start-up costs a `stat`.

A digest is reused while every file keeps its size, modification time, change time and inode. Change time
(ctime) cannot be set back by a user: replacing a file, or copying one over it with its old mtime
(`cp -p`, `touch -r`), changes it, so a replaced model is hashed again. A file changed in the last two seconds
is never cached (its times may not have ticked yet). The cache is one JSON file:
$EDGEVISION_CACHE_DIR, else systemd's $CACHE_DIRECTORY, else $XDG_CACHE_HOME/edgevision, else
~/.cache/edgevision. Where it cannot be written the digests are kept for this process only.

Both the model registry's load-time check and the TensorRT plan guard read digests from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_FILE = "sha256.json"
_BLOCK = 1 << 22
_SETTLE_NS = 2_000_000_000  # a file changed less than this long ago is hashed again next time


def files_of(path: Path) -> list[Path]:
    """The files a model consists of: the file (with a Piper voice's .json beside it) or a directory's files."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if Path(f"{path}.json").is_file():  # a Piper voice's config belongs to it
        files.append(Path(f"{path}.json"))
    return files


def stat_key(files: list[Path]) -> list[list[int]]:
    """What must not change for a cached digest to stand: size, mtime, ctime, inode and device of each file."""
    key = []
    for file in files:
        s = file.stat()
        key.append([s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev])
    return key


def hash_files(files: list[Path], progress: Callable[[int, int], None] | None = None) -> tuple[str, int]:
    """sha256 of the files' bytes in order, and their total size."""
    total = sum(f.stat().st_size for f in files)
    digest, done = hashlib.sha256(), 0
    for file in files:
        with file.open("rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
    return digest.hexdigest(), total


def default_cache_dir() -> Path:
    for variable in ("EDGEVISION_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(variable):
            return Path(os.environ[variable].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgevision"


class DigestCache:
    """Resolved path → (stat key, sha256), in memory and in `directory`/sha256.json."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.file = Path(directory if directory is not None else default_cache_dir()) / CACHE_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = self._read()

    def sha256(self, path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None) -> str:
        """The sha256 of a model file or directory: cached while its files' stat is unchanged, else hashed."""
        return self.digest(path, progress)[0]

    def digest(
        self, path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None
    ) -> tuple[str, int]:
        """(sha256, total size) of a model file or directory."""
        resolved = Path(path).resolve()
        files = files_of(resolved)
        key = stat_key(files)
        name = str(resolved)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.get("stat") == key:
                return entry["sha256"], sum(k[0] for k in key)
        sha, size = hash_files(files, progress)
        if stat_key(files) != key:  # it changed while being read: do not remember a digest of a moving target
            return sha, size
        # File times tick with the kernel's coarse clock (milliseconds): a file changed again within the same
        # tick keeps its times. As git does with "racily clean" files, remember only digests of files whose
        # last change is safely in the past.
        newest = max((max(k[1], k[2]) for k in key), default=0)
        if time.time_ns() - newest < _SETTLE_NS:
            return sha, size
        with self._lock:
            self._entries[name] = {"stat": key, "sha256": sha}
            self._write()
        return sha, size

    def _read(self) -> dict[str, dict]:
        try:
            raw = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.debug("digest cache %s unreadable (%s); starting afresh", self.file, exc)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {k: v for k, v in raw.items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)}

    def _write(self) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=f".{CACHE_FILE}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self._entries, f, indent=1, sort_keys=True)
                os.replace(tmp, self.file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            logger.debug("digest cache %s not written (%s); digests kept for this process", self.file, exc)


_default: DigestCache | None = None
_default_lock = threading.Lock()


def default_cache() -> DigestCache:
    """The process's digest cache, in `default_cache_dir()`."""
    global _default
    with _default_lock:
        if _default is None or _default.file.parent != default_cache_dir():
            _default = DigestCache()
        return _default


def sha256_of(path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None) -> str:
    """The sha256 of a model file or directory, through the process's digest cache."""
    return default_cache().sha256(path, progress)
