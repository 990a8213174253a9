"""Telemetry: power readers on recorded Orin NX data and fake sysfs trees, energy, memory, the interaction log."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgevision.errors import ConfigError, DeviceError
from edgevision.telemetry.log import InteractionLog, read
from edgevision.telemetry.memory import MemoryMeter
from edgevision.telemetry.power import (
    TOTAL,
    EnergyMeter,
    Ina3221Reader,
    NoPowerReader,
    PowerSample,
    RaplReader,
    TegrastatsReader,
    detect_power_reader,
    integrate,
    open_power_reader,
    parse_tegrastats,
)

ROOT = Path(__file__).resolve().parent.parent

DATA = Path(__file__).parent / "data"
TEGRASTATS = DATA / "tegrastats-orin-nx.txt"
INA3221 = DATA / "ina3221-orin-nx"


# --- power readers ------------------------------------------------------------------------------------------


def test_tegrastats_lines_give_each_rail_and_the_board_input_as_total():
    lines = TEGRASTATS.read_text().splitlines()
    first = parse_tegrastats(lines[0])
    assert first == {"VDD_IN": 4.827, "VDD_CPU_GPU_CV": 0.483, "VDD_SOC": 1.45, TOTAL: 4.827}
    peak = max(parse_tegrastats(line)[TOTAL] for line in lines)
    assert peak == 16.254  # the GPU-heavy moment, not the running average printed after the slash
    assert parse_tegrastats("RAM 2448/15655MB CPU [2%@729]") == {}


def test_tegrastats_legacy_format_is_read_too():
    line = "RAM 1500/3964MB CPU [5%@1479,off,off,2%@1479] POM_5V_IN 2578/2578 POM_5V_GPU 40/40 POM_5V_CPU 450/450"
    assert parse_tegrastats(line) == {"POM_5V_IN": 2.578, "POM_5V_GPU": 0.04, "POM_5V_CPU": 0.45, TOTAL: 2.578}


def test_ina3221_sysfs_tree_gives_the_three_orin_nx_rails():
    reader = Ina3221Reader(root=INA3221)
    assert [rail.name for rail in reader.rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # not "sum of shunt..."
    sample = reader.read()
    assert sample is not None
    assert sample.watts["VDD_IN"] == pytest.approx(5.032 * 1.536)
    assert sample.watts["VDD_CPU_GPU_CV"] == pytest.approx(5.024 * 0.328)
    assert sample.watts[TOTAL] == sample.watts["VDD_IN"]


def test_detect_prefers_ina3221_and_says_unavailable_where_there_is_nothing(tmp_path: Path):
    assert detect_power_reader(INA3221).name == "ina3221"
    none = detect_power_reader(tmp_path)
    assert none.name == "none" and none.read() is None
    assert isinstance(none, NoPowerReader) and none.reason.startswith("unavailable")
    with pytest.raises(DeviceError, match="no INA3221 rails"):
        open_power_reader("ina3221", root=tmp_path)


def _zone(root: Path, name: str, label: str, energy: int, wrap: int = 262143328850) -> Path:
    zone = root / "sys/class/powercap" / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "max_energy_range_uj").write_text(f"{wrap}\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    return zone / "energy_uj"


def test_rapl_turns_energy_counters_into_watts_across_a_wrap_around(tmp_path: Path):
    wrap = 1_000_000_000
    package = _zone(tmp_path, "intel-rapl:0", "package-0", wrap - 1_000_000, wrap)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 5_000_000, wrap)
    dram = _zone(tmp_path, "intel-rapl:0:1", "dram", 7_000_000, wrap)
    times = iter([10.0, 12.0])
    reader = RaplReader(tmp_path, clock=lambda: next(times))
    assert detect_power_reader(tmp_path).name == "rapl"
    assert reader.read() is None  # a rate needs two readings
    package.write_text(f"{19_000_000 - 1}\n")  # wrapped: 1 J before the wrap + 19 J after = 20 J in 2 s
    core.write_text("17000000\n")
    dram.write_text("9000000\n")
    sample = reader.read()
    assert sample is not None
    assert sample.watts["package-0"] == pytest.approx(10.0)
    assert sample.watts["package-0/core"] == pytest.approx(6.0)
    assert sample.watts[TOTAL] == pytest.approx(11.0)  # package + DRAM; the core is inside the package


def test_tegrastats_reader_runs_the_tool_and_an_energy_meter_integrates_it(tmp_path: Path):
    tool = tmp_path / "tegrastats"  # stands in for NVIDIA's binary: prints the recorded lines as it would
    tool.write_text(
        f"#!{sys.executable}\nimport sys, time\n"
        f"lines = open({str(TEGRASTATS)!r}).read().splitlines()\n"
        "while True:\n"
        "    for line in lines:\n"
        "        print(line, flush=True)\n"
        "        time.sleep(0.02)\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    reader = TegrastatsReader(tool, interval_ms=20)
    try:
        meter = EnergyMeter(reader, interval=0.01)
        deadline = time.monotonic() + 10
        while reader.read() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        meter.start()
        time.sleep(0.3)
        energy = meter.stop()
    finally:
        reader.close()
    assert energy.available and energy.source == "tegrastats"
    totals = [parse_tegrastats(line)[TOTAL] for line in TEGRASTATS.read_text().splitlines()]
    assert min(totals) <= energy.mean_watts <= max(totals)
    assert energy.joules == pytest.approx(energy.mean_watts * energy.seconds)
    assert set(energy.rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert json.loads(json.dumps(energy.to_record()))["available"] is True


def test_energy_holds_each_reading_until_the_next():
    samples = [PowerSample(1.0, {TOTAL: 5.0, "VDD_IN": 5.0}), PowerSample(2.0, {TOTAL: 10.0, "VDD_IN": 10.0})]
    energy = integrate(samples, 1.0, 3.0, NoPowerReader())
    assert energy.joules == pytest.approx(15.0)
    assert energy.mean_watts == pytest.approx(7.5)
    assert energy.peak_watts == 10.0


def test_energy_without_a_monitor_is_explicitly_unavailable():
    meter = EnergyMeter(NoPowerReader("unavailable (no monitor here)"), interval=0.01)
    meter.start()
    energy = meter.stop()
    assert not energy.available and energy.joules is None
    assert energy.to_record() == {"source": "none", "available": False, "reason": "unavailable (no monitor here)"}


# --- memory -------------------------------------------------------------------------------------------------


_PEAK_PROBE = """
import json, time
import numpy as np
from edgevision.telemetry.memory import MemoryMeter
earlier = np.ones(400 * 2**20 // 8)  # an earlier, higher peak of the process: it must not count for the span
del earlier
meter = MemoryMeter(interval=0.01)
meter.start()
block = np.ones(96 * 2**20 // 8)  # 96 MiB, touched
time.sleep(0.05)
del block
print(json.dumps(meter.stop().to_record()))
"""


def test_memory_peak_catches_an_allocation_freed_before_stop():
    # VmHWM is process-wide: measured in a fresh process, so what other tests allocated cannot decide it, and
    # after a higher earlier peak, so a high-water mark that was not reset for the span would show.
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    report = json.loads(result.stdout)
    assert 80 < report["peak_rss_mb"] - report["rss_mb"] < 250, report
    assert report["peak_rss_source"] in ("VmHWM", "sampled")
    assert report["system_total_mb"] > report["system_used_mb"] > 0
    assert report["gpu_source"] == "unavailable" and report["gpu_total_mb"] is None  # no Jetson here


def test_memory_counts_child_processes_like_the_piper_voice():
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; b = bytearray(64 << 20); print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        meter = MemoryMeter(interval=0.01)
        meter.start()
        report = meter.stop()
    finally:
        child.kill()
        child.wait()
    assert report.children_rss_mb > 60 and report.peak_children_rss_mb >= report.children_rss_mb


def test_memory_reads_jetson_nvmap_use(tmp_path: Path):
    (tmp_path / "proc/4242").mkdir(parents=True)
    (tmp_path / "proc/4242/status").write_text("Name:\tpython3\nVmHWM:\t 2097152 kB\nVmRSS:\t 1048576 kB\n")
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       15998852 kB\nMemFree:         9000000 kB\nMemAvailable:   11998852 kB\n"
        "NvMapMemFree:      12345 kB\nNvMapMemUsed:    3145728 kB\n"
    )
    meter = MemoryMeter(interval=0.01, root=tmp_path, pid=4242)
    meter.start()
    report = meter.stop()
    assert report.gpu_source == "NvMapMemUsed" and report.gpu_total_mb == 3072
    assert report.rss_mb == 1024 and report.peak_rss_source == "sampled"
    assert report.system_used_mb == pytest.approx(4000000 / 1024)

    clients = tmp_path / "sys/kernel/debug/nvmap/iovmm/clients"
    clients.parent.mkdir(parents=True)
    clients.write_text(
        "CLIENT                        PROCESS      PID        SIZE\n"
        "user                        gnome-shell     1201      40960K\n"
        "user                            python3     4242    2621440K\n"
        "user                            python3     4242      10240K\n"
        "total                                               2672640K\n"
    )
    meter.start()
    report = meter.stop()
    assert report.gpu_source == "nvmap-clients"
    assert report.gpu_process_mb == 2570 and report.gpu_total_mb == 2610


# --- the interaction log ------------------------------------------------------------------------------------


def test_log_rotates_and_keeps_every_record_complete(tmp_path: Path):
    path = tmp_path / "logs" / "interactions.jsonl"
    log = InteractionLog(path, max_bytes=2000, backups=50)

    def writer(n: int) -> None:
        for i in range(25):
            log.write({"writer": n, "i": i, "question": "what is in front of me?", "timings": {"total": 1.5}})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    files = sorted(path.parent.iterdir())
    assert len(files) > 2 and all(f.stat().st_size <= 2000 for f in files)
    records = read(path, rotated=True)
    assert sorted((r["writer"], r["i"]) for r in records) == [(n, i) for n in range(4) for i in range(25)]
    for n in range(4):  # each writer's records stay in order across the rotated files
        assert [r["i"] for r in records if r["writer"] == n] == list(range(25))


def test_log_keeps_only_the_configured_backups(tmp_path: Path):
    path = tmp_path / "interactions.jsonl"
    with InteractionLog(path, max_bytes=300, backups=2) as log:
        for i in range(40):
            log.write({"i": i, "energy": {"joules": float("nan")}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "interactions.jsonl",
        "interactions.jsonl.1",
        "interactions.jsonl.2",
    ]
    records = read(path, rotated=True)
    assert records[-1] == {"i": 39, "energy": {"joules": None}}  # NaN is not JSON: written as null
    assert [r["i"] for r in records] == list(range(records[0]["i"], 40))


def test_log_records_survive_sigterm(tmp_path: Path):
    path = tmp_path / "interactions.jsonl"
    script = (
        "import sys, itertools\n"
        "from edgevision.telemetry.log import InteractionLog\n"
        f"log = InteractionLog({str(path)!r}, max_bytes=10**6)\n"
        "for i in itertools.count():\n"
        "    log.write({'i': i, 'text': 'a long answer ' * 20})\n"
        "    if i == 20: print('ready', flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    lines = path.read_text().splitlines()
    assert len(lines) > 20
    assert [json.loads(line)["i"] for line in lines] == list(range(len(lines)))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to stand for a full disk")
def test_log_on_a_full_disk_drops_the_record_with_an_error(caplog):
    log = InteractionLog("/dev/full")
    with caplog.at_level("ERROR", logger="edgevision.telemetry.log"):
        assert log.write({"question": "what is this?"}) is False  # the assistant goes on answering
    assert "record dropped" in caplog.text
    log.close()


def test_log_in_an_unwritable_place_says_which_setting(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="telemetry.log_path"):
        InteractionLog(blocker / "interactions.jsonl")


# --- on the board -------------------------------------------------------------------------------------------

ON_JETSON = Path("/etc/nv_tegra_release").exists()


@pytest.mark.board
@pytest.mark.skipif(not ON_JETSON, reason="needs a Jetson (no /etc/nv_tegra_release): live INA3221 rails and NvMap")
def test_board_power_and_gpu_memory_are_measured():
    reader = detect_power_reader()
    try:
        assert reader.name in ("ina3221", "tegrastats")
        meter = EnergyMeter(reader, interval=0.05)
        meter.start()
        time.sleep(0.5)
        energy = meter.stop()
    finally:
        reader.close()
    assert energy.available and 0.5 < energy.mean_watts < 60  # an Orin NX draws roughly 4 to 25 W
    assert "VDD_IN" in energy.rails
    memory = MemoryMeter(interval=0.05)
    memory.start()
    assert memory.stop().gpu_source != "unavailable"


def test_bench_telemetry_prints_the_costs_side_by_side():
    result = subprocess.run(
        [sys.executable, "-m", "edgevision", "bench", "telemetry", "--seconds", "0.2", "--power", "none"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "log record (fsync'd)" in result.stdout and "on / off" in result.stdout


def test_interaction_log_never_follows_a_symbolic_link(tmp_path: Path):
    victim = tmp_path / "crontab"
    victim.write_text("untouched\n")
    link = tmp_path / "logs" / "interactions.jsonl"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        InteractionLog(link)
    assert victim.read_text() == "untouched\n"
