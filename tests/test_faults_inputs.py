"""The fault corpus, bad inputs: 60 distinct bad inputs run against the real CLI (`python -m edgevision ...` as
a subprocess, with a timeout), plus SIGTERM in the middle of `ask` and an output on a full disk.

For every case: the exit status is 2, stderr is exactly one line, `edgevision: error: ...`, that names the
problem and what to do (a per-case pattern), there is no traceback, no partial output file (nor its temporary
file) is left, and ONNX Runtime wrote nothing under $HOME. Most cases fail before any model is loaded; the few
that need a model to fail (a mislabelled or broken tower, a truncated GGUF) load only what comes before it.

Cases by area: audio 12, image 9, question 4, --out and --snapshot 7, config 17, models and registry 11.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("EDGEVISION_MODELS", ROOT / "models"))
PHOTO = ROOT / "assets" / "photo.jpg"
QUESTION_WAV = ROOT / "assets" / "question.wav"
TIMEOUT_S = 90


# --- making bad files ---------------------------------------------------------------------------------------


def wav_bytes(
    *, rate: int = 16_000, channels: int = 1, width: int = 2, frames: int = 1600, claimed_frames: int | None = None
) -> bytes:
    """A PCM WAV file with any header values (the standard library refuses to write some of these)."""
    data = b"\0" * (frames * channels * width)
    data_size = len(data) if claimed_frames is None else claimed_frames * channels * width
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * width, channels * width, width * 8)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size) + data
    return b"RIFF" + struct.pack("<I", min(len(riff), 2**32 - 1)) + riff


def png_header(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels (what a decompression bomb looks like)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def relabelled_tower(tmp: Path, **changes) -> Path:
    """The bundled tower with its preprocessing metadata changed (a lying label)."""
    import onnx

    model = onnx.load(str(MODELS / "synthetic" / "tower-gemma3-270m.onnx"))
    for prop in model.metadata_props:
        if prop.key == "edgevision.preprocess":
            prop.value = json.dumps({**json.loads(prop.value), **changes})
    out = tmp / "relabelled.onnx"
    onnx.save(model, str(out))
    return out


# --- the cases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: `make(tmp)` writes what it needs under tmp and returns the command's arguments (after
    `python -m edgevision`); `says` must match the error line (the problem and what to do)."""

    name: str
    make: Callable[[Path], list[str | bytes]]
    says: str
    env: Callable[[Path], dict[str, str]] | None = None


def config_text(tmp: Path, **overrides: dict) -> str:
    """A valid config naming the provisioned models (absolute paths), with sections overridden."""
    sections = {
        "speech": {
            "recognizer": {"kind": "whisper", "model": str(MODELS / "whisper-tiny.en")},
            "synthesizer": {"kind": "piper", "voice": str(MODELS / "piper" / "en_US-joe-medium.onnx")},
        },
        "vision": {"tower": str(MODELS / "synthetic" / "tower-gemma3-270m.onnx"), "threads": 1},
        "ocr": {"models": str(MODELS / "ppocrv5")},
        "decoder": {"model": str(MODELS / "gemma-3-270m-q4_k_m.gguf"), "n_threads": 1, "max_answer_tokens": 8},
        "logging": {"level": "warning"},
        "telemetry": {"log_path": str(tmp / "log" / "interactions.jsonl")},
    }
    for section, values in overrides.items():
        sections[section] = {**sections[section], **values}
    return json.dumps(sections, indent=1)  # JSON is YAML


def write(tmp: Path, name: str, data: bytes | str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def config(tmp: Path, **overrides: dict) -> Path:
    return write(tmp, "config.yaml", config_text(tmp, **overrides))


def ask(
    tmp: Path,
    *,
    image: Path | str = PHOTO,
    audio: Path | str | None = None,
    question: str | bytes | None = None,
    out: Path | str | None = None,
    cfg: Path | None = None,
) -> list[str | bytes]:
    """`edgevision ask` with a good config, photo and question unless given; --out answer.wav in tmp."""
    args: list[str | bytes] = ["ask", "--config", str(cfg or config(tmp)), "--image", str(image)]
    if audio is not None:
        args += ["--audio", str(audio)]
    else:
        args += ["--question", "What is in front of me?" if question is None else question]
    return [*args, "--out", str(out if out is not None else tmp / "answer.wav")]


def with_audio(data: bytes) -> Callable[[Path], list[str | bytes]]:
    return lambda tmp: ask(tmp, audio=write(tmp, "question.wav", data))


def with_image(data: bytes) -> Callable[[Path], list[str | bytes]]:
    return lambda tmp: ask(tmp, image=write(tmp, "photo.png", data))


def check_config(text: str | bytes) -> Callable[[Path], list[str | bytes]]:
    return lambda tmp: ["check-config", str(write(tmp, "config.yaml", text))]


def check_overridden(**overrides: dict) -> Callable[[Path], list[str | bytes]]:
    return lambda tmp: ["check-config", str(config(tmp, **overrides))]


def fifo(tmp: Path) -> Path:
    path = tmp / "fifo"
    os.mkfifo(path)
    return path


def loop(tmp: Path) -> Path:
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    return tmp / "a"


def registry(tmp: Path, content: str | None) -> Path:
    models = tmp / "models"
    models.mkdir()
    if content is None:
        (models / "registry.json").mkdir()
    else:
        (models / "registry.json").write_text(content)
    return models


def replaced_decoder(tmp: Path) -> list[str | bytes]:
    """A decoder registered with one sha256 whose file now has other bytes (same size)."""
    models = tmp / "models"
    models.mkdir()
    gguf = models / "decoder.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 1024)
    record = {
        "name": "decoder",
        "kind": "decoder",
        "path": str(gguf.resolve()),
        "sha256": "0" * 64,
        "size": gguf.stat().st_size,
        "source": "test",
    }
    (models / "registry.json").write_text(json.dumps({"decoder": record}))
    return ask(tmp, cfg=config(tmp, decoder={"model": str(gguf)}))


def truncated_gguf(tmp: Path) -> list[str | bytes]:
    with open(MODELS / "gemma-3-270m-q4_k_m.gguf", "rb") as f:
        head = f.read(1 << 20)
    return ask(tmp, cfg=config(tmp, decoder={"model": str(write(tmp, "cut.gguf", head))}))


def gguf_data_cut(tmp: Path) -> list[str | bytes]:
    """The small synthetic MoE decoder with its header whole and its tensor data cut short."""
    data = (MODELS / "synthetic" / "gemma4-moe-synthetic-l4-e8k2-q4_0.gguf").read_bytes()
    cut = write(tmp, "cut.gguf", data[: len(data) * 9 // 10])
    return ask(tmp, cfg=config(tmp, decoder={"model": str(cut)}))


def deep_yaml(depth: int) -> str:
    return "speech: " + "[" * depth + "]" * depth + "\n"


CASES = [
    # audio
    Case("wav-1-hz", with_audio(wav_bytes(rate=1, frames=16_000)), r"sample rate of 1 Hz.*ffmpeg"),
    Case("wav-0-hz", with_audio(wav_bytes(rate=0)), r"sample rate of 0 Hz.*ffmpeg"),
    Case("wav-1-mhz", with_audio(wav_bytes(rate=1_000_000)), r"sample rate of 1000000 Hz.*ffmpeg"),
    Case("wav-header-claims-hours", with_audio(wav_bytes(claimed_frames=2**31 // 2)), r"s long.*at most 120 s.*cut"),
    Case("wav-200-seconds", with_audio(wav_bytes(frames=16_000 * 200)), r"200 s long.*at most 120 s"),
    Case("wav-16-channels", with_audio(wav_bytes(channels=16)), r"16 channels.*ffmpeg"),
    Case("wav-no-samples", with_audio(wav_bytes(frames=0)), r"holds no audio.*record again"),
    Case("wav-is-text", with_audio(b"this is not audio\n" * 10), r"not a PCM WAV file.*ffmpeg"),
    Case("wav-truncated-header", with_audio(wav_bytes()[:20]), r"not a PCM WAV file \(it ends inside.*ffmpeg"),
    Case(
        "wav-float-samples",
        with_audio(wav_bytes()[:20] + struct.pack("<H", 3) + wav_bytes()[22:]),
        r"not a PCM WAV file.*ffmpeg",
    ),
    Case("wav-is-a-directory", lambda tmp: ask(tmp, audio=tmp), r"is not a file; give the path of a WAV"),
    Case("wav-missing", lambda tmp: ask(tmp, audio=tmp / "nothing.wav"), r"not found.*Check the path"),
    # image
    Case("png-20000x20000-bomb", with_image(png_header(20_000, 20_000)), r"megapixels: scale it down"),
    Case("png-144-megapixels", with_image(png_header(12_000, 12_000)), r"144 megapixels.*scale it down"),
    Case("png-100000x1", with_image(png_header(100_000_000, 1)), r"megapixels: scale it down"),
    Case("image-is-text", with_image(b"hello\n"), r"cannot read .* as an image.*JPEG or PNG"),
    Case("image-empty-file", with_image(b""), r"cannot read .* as an image.*JPEG or PNG"),
    Case("jpeg-truncated", with_image(PHOTO.read_bytes()[:300]), r"cannot read .* as an image.*JPEG or PNG"),
    Case(
        "png-bad-crc",
        with_image(png_header(64, 64)[:29] + b"\0\0\0\0" + png_header(64, 64)[33:]),
        r"cannot read .* as an image.*JPEG or PNG",
    ),
    Case("image-is-a-directory", lambda tmp: ask(tmp, image=tmp), r"is not a file.*JPEG or PNG"),
    Case("image-missing", lambda tmp: ask(tmp, image=tmp / "nothing.jpg"), r"not found.*JPEG or PNG"),
    # question
    Case("question-not-utf8", lambda tmp: ask(tmp, question=b"what is \xff\xfe this?"), r"not UTF-8 text.*type it"),
    Case("question-empty", lambda tmp: ask(tmp, question=""), r"I didn't catch a question.*ask it in words"),
    Case("question-blank", lambda tmp: ask(tmp, question=" \n\t "), r"I didn't catch a question.*ask it in words"),
    Case("question-too-long", lambda tmp: ask(tmp, question="why " * 1000), r"4000 characters.*at most 2000"),
    # --out
    Case("out-is-a-directory", lambda tmp: ask(tmp, out=tmp), r"is a directory; give a file name"),
    Case("out-folder-missing", lambda tmp: ask(tmp, out=tmp / "no" / "such" / "a.wav"), r"does not exist; create it"),
    Case("out-in-proc", lambda tmp: ask(tmp, out="/proc/edgevision-answer.wav"), r"cannot be written.*writable folder"),
    Case("out-is-a-fifo", lambda tmp: ask(tmp, out=fifo(tmp)), r"not a regular file; choose another name"),
    Case("out-is-a-symlink", lambda tmp: ask(tmp, out=loop(tmp)), r"symbolic link; give the path of a regular file"),
    Case(
        "snapshot-folder-missing",
        lambda tmp: ["devices", "--snapshot", str(tmp / "no" / "frame.jpg")],
        r"--snapshot .* does not exist; create it",
    ),
    Case(
        "snapshot-unknown-format",
        lambda tmp: ["devices", "--snapshot", str(tmp / "frame.txt")],
        r"name the file \.jpg or \.png",
    ),
    # config
    Case("config-2-mib", check_config("# padding\n" * 220_000), r"MiB; a config file may be at most 1024 KiB"),
    Case("config-dev-zero", lambda tmp: ["check-config", "/dev/zero"], r"not a regular file.*YAML config file"),
    Case("config-fifo", lambda tmp: ["check-config", str(fifo(tmp))], r"not a regular file.*YAML config file"),
    Case("config-directory", lambda tmp: ["check-config", str(tmp)], r"is a directory.*YAML config file"),
    Case("config-nested-1000", check_config(deep_yaml(1000)), r"nested more than 16 levels.*check the brackets"),
    Case(
        "config-nested-mappings",
        check_config("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 40))),
        r"nested more than 16 levels",
    ),
    Case(
        "config-not-utf8", check_config(b"speech:\n  language: \xff\xfe\n"), r"not UTF-8 text.*save the file as UTF-8"
    ),
    Case("config-syntax", check_config("speech: [unclosed\n"), r"YAML syntax error.*fix the indentation"),
    Case("config-top-level-list", check_config("- speech\n- vision\n"), r"top level is a list.*write the sections"),
    Case("config-unknown-key", check_overridden(decoder={"n_ctxx": 512}), r"unknown setting.*did you mean 'n_ctx'"),
    Case("config-out-of-range", check_overridden(decoder={"n_ctx": 10}), r"below the minimum 256.*set a value"),
    Case(
        "log-path-traversal",
        check_overridden(telemetry={"log_path": "../../../../etc/cron.d/edgevision"}),
        r"climbs out of its folder with '\.\.'.*full path",
    ),
    Case(
        "log-path-in-etc",
        check_overridden(telemetry={"log_path": "/etc/cron.d/edgevision"}),
        r"system folder /etc.*full path",
    ),
    Case(
        "capture-dir-traversal",
        check_overridden(telemetry={"capture_dir": "captures/../../../usr"}),
        r"climbs out of its folder.*full path",
    ),
    Case(
        "decoder-is-a-directory",
        lambda tmp: ["check-config", str(config(tmp, decoder={"model": str(tmp)}))],
        r"is a directory, not a file.*model file itself",
    ),
    Case(
        "decoder-symlink-loop",
        lambda tmp: ["check-config", str(config(tmp, decoder={"model": str(loop(tmp))}))],
        r"broken, or a loop.*fix the link",
    ),
    Case(
        "config-env-is-a-directory",
        lambda tmp: ask(tmp)[:1] + ask(tmp)[3:],
        r"is a directory, not a file.*check the path",
        env=lambda tmp: {"EDGEVISION_CONFIG": str(tmp)},
    ),
    # models and the registry
    Case(
        "registry-is-a-list",
        lambda tmp: ["models", "--dir", str(registry(tmp, "[1, 2]")), "list"],
        r"holds list, not an object.*delete it",
    ),
    Case(
        "registry-is-a-directory",
        lambda tmp: ["models", "--dir", str(registry(tmp, None)), "list"],
        r"not a regular file.*delete it",
    ),
    Case(
        "registry-entry-malformed",
        lambda tmp: ["models", "--dir", str(registry(tmp, '{"x": {"name": 1}}')), "list"],
        r"entry 'x' is malformed.*delete it",
    ),
    Case(
        "register-a-directory",
        lambda tmp: ["models", "--dir", str(tmp / "m"), "register", str(tmp), "--kind", "decoder"],
        r"not a file; a decoder must be a llama.cpp GGUF",
    ),
    Case(
        "register-symlink-loop",
        lambda tmp: ["models", "--dir", str(tmp / "m"), "register", str(loop(tmp)), "--kind", "decoder"],
        r"cannot be resolved.*fix the symbolic link",
    ),
    Case("registered-decoder-replaced", replaced_decoder, r"changed since it was registered.*register it again"),
    Case(
        "tower-image-size-100000",
        lambda tmp: ask(tmp, cfg=config(tmp, vision={"tower": str(relabelled_tower(tmp, image_size=100_000))})),
        r"relabelled.onnx: .*image_size 100000.*re-export",
    ),
    Case(
        "tower-width-mislabelled",
        lambda tmp: ask(tmp, cfg=config(tmp, vision={"tower": str(relabelled_tower(tmp, n_embd=128))})),
        r"rows of width 128.*outputs.*re-export",
    ),
    Case("gguf-truncated", truncated_gguf, r"could not load decoder model.*truncated or corrupt"),
    Case("gguf-data-cut-short", gguf_data_cut, r"could not load decoder model.*truncated or corrupt"),
    Case(
        "gguf-version-99",
        lambda tmp: ask(
            tmp,
            cfg=config(
                tmp, decoder={"model": str(write(tmp, "v99.gguf", b"GGUF" + struct.pack("<I", 99) + b"\0" * 64))}
            ),
        ),
        r"GGUF version 99.*re-convert",
    ),
]


def run_cli(args: list[str | bytes], tmp: Path, env: dict[str, str] | None = None, **kwargs):
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "EDGEVISION_CACHE_DIR": str(CACHE),
    }
    for inherited in ("ORT_DISABLE_TELEMETRY", "EDGEVISION_CONFIG", "XDG_CACHE_HOME"):
        environment.pop(inherited, None)  # edgevision itself must turn telemetry off; no config from outside
    environment.update(env or {})
    command = [sys.executable, "-m", "edgevision", *args]
    return subprocess.run(
        command, env=environment, cwd=tmp, capture_output=True, timeout=TIMEOUT_S, check=False, **kwargs
    )


CACHE = Path(os.environ.get("EDGEVISION_TEST_CACHE", "/tmp/edgevision-test-digests"))


def test_the_corpus_has_at_least_40_distinct_cases():
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names) >= 40
    assert len(CASES) == int(__doc__.split(" distinct bad inputs")[0].split()[-1])  # the docstring's count


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_gets_one_clear_line(case: Case, tmp_path: Path):
    args = case.make(tmp_path)
    result = run_cli(args, tmp_path, env=case.env(tmp_path) if case.env else None)
    stderr = result.stderr.decode("utf-8", errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert result.returncode == 2, (result.returncode, stderr)
    assert len(lines) == 1 and lines[0].startswith("edgevision: error: "), stderr
    assert re.search(case.says, lines[0]), lines[0]
    leftovers = sorted(p.name for p in tmp_path.glob("*answer.wav*")) + sorted(
        p.name for p in tmp_path.glob("edgevision-piper-*")
    )
    assert leftovers == [], leftovers
    assert not (tmp_path / "home" / ".cache" / "Microsoft").exists(), "ONNX Runtime wrote telemetry"


def test_sigterm_during_ask_leaves_no_temporary_files_and_no_output(tmp_path: Path):
    """SIGTERM once Piper runs (its temporary folder exists): the command unwinds, stops Piper, removes the folder,
    writes no answer, and says so in one line."""
    home = tmp_path / "home"
    home.mkdir()
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "TMPDIR": str(tmp_path),
        "EDGEVISION_CACHE_DIR": str(CACHE),
    }
    out = tmp_path / "answer.wav"
    process = subprocess.Popen(
        [sys.executable, "-m", "edgevision", *ask(tmp_path, out=out)],
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not list(tmp_path.glob("edgevision-piper-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "ask ended before Piper started"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT_S)
    stderr = err.decode("utf-8", errors="replace")
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["edgevision: stopped by SIGTERM"], stderr
    assert list(tmp_path.glob("edgevision-piper-*")) == [] and not out.exists()
    assert list(tmp_path.glob(".answer.wav.*")) == []


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 64 KiB tmpfs: a full disk (needs root and mount; skipped where mounting is not allowed)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to make a small disk")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_out_on_a_full_disk_is_refused_before_the_work(tmp_path: Path, tiny_disk: Path):
    result = run_cli(ask(tmp_path, out=tiny_disk / "answer.wav"), tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.count("\n") == 1, stderr
    assert "MiB free on its disk" in stderr and "free some space" in stderr
    assert list(tiny_disk.iterdir()) == []


def test_atomic_write_on_a_disk_that_fills_up_leaves_nothing(tiny_disk: Path):
    import numpy as np

    from edgevision.errors import InputError
    from edgevision.speech.audio import Audio, write_wav

    target = tiny_disk / "answer.wav"
    with pytest.raises(InputError, match="No space left.*nothing was written.*free some space"):
        write_wav(target, Audio(np.zeros(16_000 * 10, dtype=np.float32), 16_000))  # 320 KB into 64 KiB
    assert list(tiny_disk.iterdir()) == []
