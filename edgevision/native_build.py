"""The package's small C libraries (``*.c`` beside the module that loads them), compiled where first used.

A library is built by the system's C compiler (``$CC``, else ``cc``) the first time it is needed — ``make venv``
does it ahead of time — next to its source, or in ``$XDG_CACHE_HOME/edgevision`` (else ``~/.cache/edgevision``)
where the package is read-only. Its name carries a digest of the source (``_nodefilter-0123456789ab.so``), so an
edited source is rebuilt; it is compiled beside its final name and renamed, so a concurrent build or load never
sees half a library. A caller falls back to Python (and says so) where it cannot be built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def library_name(source: Path) -> str:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    return f"_{source.stem}-{digest}.so"


def _places(source: Path) -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgevision"
    return [source.parent, cache]


def build(source: Path, folder: Path | None = None, flags: Sequence[str] = ()) -> Path:
    """Compile `source` into a shared library in `folder` (default: next to it, else the user's cache); its path.

    Raises OSError or subprocess.CalledProcessError when there is no compiler or the folder is not writable.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise FileNotFoundError("no C compiler (cc, gcc or $CC)")
    last: OSError | None = None
    for place in [folder] if folder else _places(source):
        try:
            place.mkdir(parents=True, exist_ok=True)
            target = place / library_name(source)
            with tempfile.NamedTemporaryFile(dir=place, prefix=f".{source.stem}-", suffix=".so", delete=False) as tmp:
                partial = Path(tmp.name)
            try:
                subprocess.run(
                    [compiler, "-O2", "-shared", "-fPIC", *flags, "-o", str(partial), str(source)],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
            return target
        except OSError as exc:
            last = exc
    raise last or OSError(f"nowhere to build {source.name}")


def find_or_build(source: Path, flags: Sequence[str] = ()) -> Path:
    """The library built from `source`: an existing one with the source's digest, else a new build (which raises
    as `build` does)."""
    name = library_name(source)
    for place in _places(source):
        if (place / name).is_file():
            return place / name
    return build(source, flags=flags)
