"""`edgevision bench board` against a real OpenSSH server on 127.0.0.1, and `edgevision report`.

The server is started by the test (sshd as root with its own config, a non-standard port, a throw-away host
key and client key in a temporary folder). The run is the path a user takes on a board: real ssh, a real
copy of the tree (rsync), a real quick benchmark of the small models, the results folder brought back and a
real report. Power comes from the INA3221 fixture in tests/data (written from the documented sysfs format,
not captured on a board), read through the same reader the board uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgevision.bench.results import SCHEMA, SCHEMA_VERSION, figure, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
INA3221 = ROOT / "tests" / "data" / "ina3221-orin-nx"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
UNITS = {"s", "ms", "J", "W", "MiB", "tok/s", "frames/s", "tokens"}

needs_sshd = pytest.mark.skipif(
    not (Path(SSHD).is_file() and shutil.which("ssh") and shutil.which("rsync") and os.geteuid() == 0),
    reason="needs root, OpenSSH's sshd and ssh, and rsync (apt-get install openssh-server openssh-client rsync)",
)


def edgevision(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEVISION_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "edgevision", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("edgevision: error: ")
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


class Server:
    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.key = _keygen(folder / "client")
        self.other_key = _keygen(folder / "not-authorized")
        host_key = _keygen(folder / "host")
        (folder / "authorized_keys").write_text((folder / "client.pub").read_text())
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {(folder / 'host.pub').read_text()}")
        config = folder / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n"
            "StrictModes no\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self.log = folder / "sshd.log"
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=self.log.open("w"))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"sshd did not start: {self.log.read_text()}") from None
                time.sleep(0.1)

    def args(self, key: Path | None = None) -> list[str]:
        return [
            "root@127.0.0.1",
            "-p",
            str(self.port),
            "-i",
            str(key or self.key),
            "-o",
            f"UserKnownHostsFile={self.folder / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=yes",
        ]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    server = Server(tmp_path_factory.mktemp("sshd"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def board_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The board's config: the provisioned models, short answers (a quick run)."""
    models = ROOT / "models"
    if not (models / "registry.json").is_file():
        pytest.skip("the models are not provisioned: run 'make models'")
    path = tmp_path_factory.mktemp("board-config") / "edgevision.yaml"
    path.write_text(
        f"speech:\n  recognizer: {{kind: whisper, model: {models / 'whisper-tiny.en'}}}\n"
        f"  synthesizer: {{kind: piper, voice: {models / 'piper/en_US-joe-medium.onnx'}}}\n"
        f"vision:\n  tower: {models / 'synthetic/tower-gemma3-270m.onnx'}\n"
        f"decoder:\n  model: {models / 'gemma-3-270m-q4_k_m.gguf'}\n  n_ctx: 1024\n  max_answer_tokens: 6\n"
        f"ocr:\n  models: {models / 'ppocrv5'}\n"
        "telemetry:\n  power_reader: none\n",
        encoding="utf-8",
    )
    return path


def _board(
    sshd: Server,
    tmp: Path,
    config: Path,
    *extra: str,
    key: Path | None = None,
    models: Path | None = None,
    suites: str = "idle,vision,e2e,router,moe",
) -> subprocess.CompletedProcess[str]:
    return edgevision(
        "bench",
        "board",
        *sshd.args(key),
        "--remote-dir",
        tmp / "board",
        "--python",
        sys.executable,
        "--models",
        models or ROOT / "models",
        "--no-setup",
        "--quick",
        "--rounds",
        "2",
        "--suites",
        suites,
        "--config",
        config,
        "--power",
        "ina3221",
        "--power-root",
        INA3221,
        "--out",
        tmp / "results",
        *extra,
    )


@needs_sshd
def test_bench_board_over_loopback_ssh_brings_back_results_and_a_report(
    sshd: Server, board_config: Path, tmp_path: Path
) -> None:
    done = _board(sshd, tmp_path, board_config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    results_dir = tmp_path / "results"
    data = json.loads((results_dir / "results.json").read_text())

    assert data["schema"] == SCHEMA and data["schema_version"] == SCHEMA_VERSION
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert data["source"]["git_commit"] == head  # the board has no .git: the commit came with the run
    assert set(data["suites"]) == {"idle", "vision", "e2e", "router", "moe"}
    registry = json.loads((ROOT / "models" / "registry.json").read_text())
    used = {
        "whisper-tiny.en",
        "en_US-joe-medium",
        "tower-gemma3-270m",
        "gemma-3-270m-q4_k_m",
        *(f"gemma4-moe-synthetic-l4-e8k2-{v}" for v in ("f32", "q8_0", "q4_0")),
    }  # what the suites measured
    assert {(m["name"], m["sha256"]) for m in data["models"]} == {(n, registry[n]["sha256"]) for n in used}
    assert all(m["size"]["unit"] == "B" for m in data["models"])
    assert data["machine"]["cpu_count"] == os.cpu_count() and data["machine"]["memory_total"]["unit"] == "MiB"
    assert data["run"]["power"]["reader"] == "ina3221" and "not from this machine" in data["run"]["power"]["note"]
    assert "loadavg_1m" in data["load_before"] and "top_processes" in data["load_after"]

    for name, suite in data["suites"].items():
        assert suite["status"] == "ok" and suite["seconds"]["unit"] == "s" and suite["cpu_seconds"]["unit"] == "s"
        assert suite["figures"], name
        for fig in suite["figures"]:
            assert fig["unit"] in UNITS, fig
            assert fig["n"] == 2 and fig["min"] <= fig["median"] <= fig["max"], fig  # two rounds, median and range
        samples = suite["samples"]
        assert samples["units"]["power_w"] == "W" and samples["units"]["rss_mib"] == "MiB"
        assert len(samples["t_s"]) >= 2 and max(samples["rss_mib"]) > 0
    # the fixture's rails: VDD_IN 5.0 V x 1.0 A or so, the same reading every sample
    idle = next(f for f in data["suites"]["idle"]["figures"] if f["name"] == "idle power")
    assert 1.0 < idle["median"] < 30.0
    e2e = {(f["name"], f["config"]): f for f in data["suites"]["e2e"]["figures"]}
    for mode in ("overlapped", "sequential"):
        assert e2e[("release → first audio", mode)]["median"] > 0
        joules = e2e[("energy per answer", mode)]["median"]
        seconds = e2e[("press → last audio", mode)]["median"]
        assert joules == pytest.approx(idle["median"] * seconds, rel=0.2)  # constant power x the answer's time
        events = data["suites"]["e2e"]["answer"][mode]["events_s"]
        order = ["press", "release", "first token", "first audio", "last audio"]
        assert [events[k] for k in order] == sorted(events[k] for k in order)
    decode = {f["config"] for f in data["suites"]["moe"]["figures"] if f["unit"] == "tok/s"}
    assert {"moe f32", "moe q8_0", "moe q4_0"} <= decode

    page = (results_dir / "report.html").read_text()
    for suite in data["suites"]:
        assert f"<h3>{suite}</h3>" in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 4  # waterfall, power, memory, tokens/s
    assert not re.search(r"""(src|href)=(?!['"]?data:)""", page)  # self-contained: nothing fetched from elsewhere
    assert (results_dir / "report.md").is_file() and (results_dir / "report-waterfall.png").is_file()
    # the tree went over the wire, without git or models
    board = tmp_path / "board"
    assert (board / "edgevision" / "bench" / "remote.py").read_bytes() == (
        ROOT / "edgevision/bench/remote.py"
    ).read_bytes()
    assert not (board / ".git").exists() and (board / "models").is_symlink()
    assert not list(tmp_path.glob("*.partial"))


@needs_sshd
def test_without_rsync_the_tree_and_results_travel_by_tar(sshd: Server, board_config: Path, tmp_path: Path) -> None:
    stale = tmp_path / "board" / "edgevision" / "gone.py"  # a file deleted here since the last copy
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('a stale file ran')\n")
    done = _board(sshd, tmp_path, board_config, "--copy", "tar", suites="idle")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "(tar over ssh" in done.stdout
    data = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(data["suites"]) == ["idle"] and data["suites"]["idle"]["figures"][0]["n"] == 2
    assert (tmp_path / "results" / "report.html").is_file()
    assert not stale.exists()
    assert (tmp_path / "board" / "Makefile").read_bytes() == (ROOT / "Makefile").read_bytes()
    assert (tmp_path / "board" / "models").is_symlink() and not (tmp_path / "board" / ".git").exists()


@needs_sshd
def test_an_unreachable_board_is_one_line(tmp_path: Path, board_config: Path) -> None:
    port = _free_port()  # nothing listens there
    done = edgevision(
        "bench",
        "board",
        "root@127.0.0.1",
        "-p",
        port,
        "-o",
        "ConnectTimeout=5",
        "--remote-dir",
        tmp_path / "board",
        "--out",
        tmp_path / "results",
        "--suites",
        "idle",
        "--quick",
    )
    assert "cannot reach root@127.0.0.1" in one_line_error(done) and "Connection refused" in done.stderr
    assert not list(tmp_path.iterdir())


@needs_sshd
def test_a_key_the_board_refuses_is_one_line(sshd: Server, tmp_path: Path, board_config: Path) -> None:
    done = _board(sshd, tmp_path, board_config, key=sshd.other_key, suites="idle")
    line = one_line_error(done)
    assert "refused the key" in line and "Permission denied" in line
    assert not list(tmp_path.iterdir())


@needs_sshd
def test_a_board_without_models_is_one_line_and_leaves_nothing(
    sshd: Server, tmp_path: Path, board_config: Path
) -> None:
    empty = tmp_path / "no-models"
    empty.mkdir()
    done = _board(sshd, tmp_path, board_config, models=empty, suites="idle")
    line = one_line_error(done)
    assert "127.0.0.1: no models in models" in line and "make models" in line
    assert not (tmp_path / "results").exists() and not list(tmp_path.glob("results*"))
    assert (
        not list((tmp_path / "board" / "out").glob("bench-runs/*")) if (tmp_path / "board" / "out").exists() else True
    )


# --- reports from stored results folders ----------------------------------------------------------------------


def stored_results(
    folder: Path,
    *,
    first_audio: list[float],
    decode: list[float],
    idle_w: list[float],
    board: str = "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
    mode: str = "15W",
    version: int = SCHEMA_VERSION,
) -> Path:
    """A results folder as a board run leaves it (without the samples a plot needs: no power over an answer)."""
    folder.mkdir(parents=True)
    series = {
        "start_unix_s": 1.0e9,
        "interval_s": 0.1,
        "power_source": "ina3221",
        "t_s": [0.0, 0.1, 0.2],
        "power_w": [5.0, 9.0, 6.0],
        "rails_w": {},
        "rss_mib": [400.0, 900.0, 950.0],
        "mem_available_mib": [14000.0, 13500.0, 13400.0],
        "gpu_mib": [100.0, 800.0, 820.0],
        "units": {"t_s": "s", "power_w": "W", "rss_mib": "MiB"},
    }
    suite = {
        "status": "ok",
        "seconds": {"value": 10.0, "unit": "s"},
        "notes": [],
        "answer": None,
        "samples": series,
        "memory": {"peak_rss": {"value": 950.0, "unit": "MiB"}},
    }
    write_json_atomic(
        folder / "results.json",
        {
            "schema": SCHEMA,
            "schema_version": version,
            "run": {
                "id": folder.name,
                "started_utc": "2026-11-20T10:00:00Z",
                "finished_utc": "2026-11-20T10:05:00Z",
                "suites": ["idle", "e2e", "moe"],
                "rounds": 3,
                "quick": False,
                "power": {"reader": "ina3221"},
            },
            "source": {"git_commit": "0123456789abcdef", "git_dirty": False},
            "machine": {
                "board": board,
                "cpu_model": "ARMv8 Processor rev 1 (v8l)",
                "cpu_count": 8,
                "arch": "aarch64",
                "memory_total": {"value": 15656.0, "unit": "MiB"},
                "power_mode": {"mode": mode, "id": 0},
            },
            "models": [
                {
                    "name": "gemma-3-270m-q4_k_m",
                    "kind": "decoder",
                    "sha256": "ab" * 32,
                    "size": {"value": 253_000_000, "unit": "B"},
                }
            ],
            "suites": {
                "idle": {**suite, "description": "at rest", "figures": [figure("idle power", "W", idle_w)]},
                "e2e": {
                    **suite,
                    "description": "spoken questions",
                    "figures": [figure("release → first audio", "s", first_audio, config="overlapped")],
                },
                "moe": {
                    **suite,
                    "description": "MoE decode",
                    "figures": [figure("decode", "tok/s", decode, config="moe q8_0")],
                },
            },
        },
    )
    return folder


def _row(markdown: str, label: str) -> str:
    (row,) = [line for line in markdown.splitlines() if line.startswith(f"| {label} |")]
    return row


def test_report_marks_a_slower_stage_a_regression_and_a_faster_one_an_improvement(tmp_path: Path) -> None:
    older = stored_results(
        tmp_path / "older", first_audio=[1.00, 1.05, 1.10], decode=[20.0, 21.0, 22.0], idle_w=[4.0, 4.1, 4.2]
    )
    newer = stored_results(
        tmp_path / "newer", first_audio=[1.50, 1.55, 1.60], decode=[30.0, 31.0, 29.0], idle_w=[4.05, 4.15, 4.1]
    )
    done = edgevision("report", newer, "--compare", older)
    assert done.returncode == 0, done.stderr
    markdown = (newer / "report.md").read_text()
    assert "▲ regression" in _row(markdown, "e2e: release → first audio (overlapped)")  # slower: worse
    assert "+47.6%" in _row(markdown, "e2e: release → first audio (overlapped)")
    assert "▼ improvement" in _row(markdown, "moe: decode (moe q8_0)")  # more tokens/s: better
    assert "within noise" in _row(markdown, "idle: idle power")  # 0.2 W apart, overlapping ranges
    assert "1 regression(s), 1 improvement(s), 1 within noise" in markdown
    page = (newer / "report.html").read_text()
    assert "<td class=regression>▲ regression</td>" in page and "<td class=improvement>▼ improvement</td>" in page
    assert "report-changes.png" in markdown and (newer / "report-changes.png").stat().st_size > 1000


def test_two_quick_runs_are_too_few_rounds_to_call_and_a_busy_machine_is_named(tmp_path: Path) -> None:
    older = stored_results(tmp_path / "older", first_audio=[1.0, 1.1], decode=[20.0, 21.0], idle_w=[4.0, 4.1])
    newer = stored_results(tmp_path / "newer", first_audio=[2.0, 2.1], decode=[20.5, 21.5], idle_w=[4.0, 4.1])
    data = json.loads((newer / "results.json").read_text())
    data["load_before"] = {"loadavg_1m": 6.5, "cpu_count": 8, "top_processes": []}
    write_json_atomic(newer / "results.json", data)
    assert edgevision("report", newer, "--compare", older).returncode == 0
    markdown = (newer / "report.md").read_text()
    assert "too few rounds to tell" in _row(markdown, "e2e: release → first audio (overlapped)")  # 2 rounds each
    assert "0 regression(s)" in markdown
    assert "Other work was running: newer started at load 6.5 on 8 cores" in markdown


def test_report_refuses_runs_from_other_hardware_or_power_modes_unless_forced(tmp_path: Path) -> None:
    older = stored_results(tmp_path / "older", first_audio=[1.0], decode=[20.0], idle_w=[4.0], mode="25W")
    newer = stored_results(tmp_path / "newer", first_audio=[1.2], decode=[21.0], idle_w=[4.0])
    line = one_line_error(edgevision("report", newer, "--compare", older))
    assert "different power mode (15W vs 25W)" in line and "--force" in line
    assert not (newer / "report.html").exists()
    done = edgevision("report", newer, "--compare", older, "--force")
    assert (
        done.returncode == 0
        and "Compared with --force although: different power mode" in (newer / "report.md").read_text()
    )
    other = stored_results(tmp_path / "x86", first_audio=[1.0], decode=[20.0], idle_w=[4.0], board="")
    assert "different hardware" in one_line_error(edgevision("report", newer, "--compare", other))


def test_a_results_folder_from_a_newer_schema_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    newer = stored_results(
        tmp_path / "future", first_audio=[1.0], decode=[20.0], idle_w=[4.0], version=SCHEMA_VERSION + 1
    )
    line = one_line_error(edgevision("report", newer))
    assert f"schema version {SCHEMA_VERSION + 1} is newer than this edgevision reads ({SCHEMA_VERSION})" in line
    assert sorted(p.name for p in newer.iterdir()) == ["results.json"]


JETSON = Path("/proc/device-tree/model").is_file() and "Jetson" in Path("/proc/device-tree/model").read_text(
    errors="replace"
)


@pytest.mark.board
@pytest.mark.skipif(not JETSON, reason="needs a Jetson: its power mode (nvpmodel), L4T release and INA3221 rails")
def test_on_a_jetson_a_run_records_the_power_mode_the_release_and_real_rails(tmp_path: Path) -> None:
    done = edgevision("bench", "suites", "--suites", "idle", "--quick", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["machine"]["board"] and data["machine"]["l4t_release"]
    assert data["machine"]["power_mode"]["mode"]  # nvpmodel -q
    assert data["run"]["power"]["reader"] in ("ina3221", "tegrastats")
    idle = data["suites"]["idle"]["figures"][0]
    assert idle["unit"] == "W" and 1.0 < idle["median"] < 40.0  # an Orin NX idles at a few watts


# --- pure logic ---------------------------------------------------------------------------------------------------


def test_energy_between_holds_each_reading_until_the_next() -> None:
    from edgevision.bench.sampler import energy_between

    series = {"start_unix_s": 100.0, "t_s": [0.0, 1.0, 2.0, 3.0], "power_w": [5.0, 10.0, None, 4.0]}
    # 100.5-101: 5 W; 101-103: 10 W (the missing reading does not end it); 103-103.5: 4 W
    assert energy_between(series, 100.5, 103.5) == pytest.approx(0.5 * 5 + 2 * 10 + 0.5 * 4)
    assert energy_between({**series, "power_w": [None] * 4}, 100.0, 103.0) is None


@pytest.mark.parametrize(
    ("stderr", "code", "says"),
    [
        ("ssh: connect to host jetson port 22: Connection refused\n", 255, "cannot reach me@jetson: ssh: connect"),
        ("ssh: Could not resolve hostname jetson: Name or service not known\n", 255, "cannot reach me@jetson"),
        ("me@jetson: Permission denied (publickey,password).\n", 255, "me@jetson refused the key"),
        ("Host key verification failed.\n", 255, "host key not known or changed"),
        (
            "bench: idle\nedgevision: error: no models in models (no registry.json); run 'make models'\n",
            2,
            "jetson: no models in models",
        ),
        ("Traceback ...\nKeyError: 'x'\n", 1, "jetson: the command failed (exit 1): KeyError: 'x'"),
    ],
)
def test_ssh_failures_become_one_line_that_says_what_to_do(stderr: str, code: int, says: str) -> None:
    from edgevision.bench.remote import Ssh

    assert says in str(Ssh("me@jetson").error(code, stderr))
