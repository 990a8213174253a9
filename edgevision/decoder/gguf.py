"""A GGUF file's first bytes checked before llama.cpp's parser sees it."""

from __future__ import annotations

from pathlib import Path

from edgevision.errors import ModelError

GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)


def check_gguf(path: Path) -> None:
    """Raise ModelError unless `path` is a readable file that starts like a GGUF file.

    llama.cpp rejects most bad files cleanly, but checking the magic first keeps arbitrary bytes (a text
    file, an ONNX model) away from the native parser.
    """
    if not path.exists():
        raise ModelError(f"decoder model {path} does not exist; check the path or download the GGUF file")
    if not path.is_file():
        raise ModelError(f"decoder model {path} is not a file; point the decoder at a .gguf file")
    try:
        with path.open("rb") as f:
            header = f.read(8)
    except OSError as exc:
        raise ModelError(f"decoder model {path} cannot be read ({exc.strerror}); check its permissions") from exc
    if len(header) < 8 or header[:4] != GGUF_MAGIC:
        raise ModelError(
            f"decoder model {path} is not a GGUF file (starts with {header[:4]!r}, not {GGUF_MAGIC!r}); "
            "convert the model with llama.cpp's convert_hf_to_gguf.py or download the .gguf release"
        )
    version = int.from_bytes(header[4:8], "little")
    if version not in _GGUF_VERSIONS:
        raise ModelError(
            f"decoder model {path} is GGUF version {version}, this llama.cpp reads versions "
            f"{', '.join(map(str, _GGUF_VERSIONS))}; re-convert it with a current llama.cpp"
        )
