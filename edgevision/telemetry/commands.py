"""`edgevision bench telemetry`: what measuring costs — per sample, per logged record, and on a busy CPU.

The meters run on background threads during every answer, so they must cost next to nothing: this prints
the time of one power and one memory sample, of one fsync'd log record, and the throughput of a CPU-bound
workload with the meters off and on, side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def add_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    parser = bench.add_parser("telemetry", help="the cost of the power and memory meters and of the interaction log")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each workload run (default: %(default)s)")
    parser.add_argument("--interval-ms", type=int, default=100, help="sampling interval (default: %(default)s)")
    parser.add_argument("--power", default="auto", help="power reader: auto, ina3221, tegrastats, rapl, none")
    parser.add_argument("--log-dir", type=Path, help="where to write the test log (default: a temporary folder)")
    parser.set_defaults(func=_cmd_bench)


def _per_call_us(call: Any, n: int = 200) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _workload(seconds: float) -> float:
    """Pure-Python work for `seconds` (holds the GIL, as tokenising and the pipeline's glue do): loops/s."""
    end, loops = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        sum(i * i for i in range(1000))
        loops += 1
    return loops / seconds


def run(seconds: float, interval: float, power: str, log_dir: Path) -> list[tuple[str, str]]:
    from edgevision.telemetry.log import InteractionLog
    from edgevision.telemetry.memory import MemoryMeter
    from edgevision.telemetry.power import EnergyMeter, open_power_reader

    rows: list[tuple[str, str]] = []
    reader = open_power_reader(power)
    try:
        power_us = _per_call_us(reader.read)
        memory = MemoryMeter(interval=interval)
        memory_us = _per_call_us(memory._sample)
        rows.append((f"power sample ({reader.name})", f"{power_us:8.1f} µs"))
        rows.append(("memory sample", f"{memory_us:8.1f} µs"))
        share = (power_us + memory_us) / (interval * 1e6) * 100
        rows.append((f"sampling share of one core at {interval * 1000:g} ms", f"{share:8.3f} %"))

        log = InteractionLog(log_dir / "bench.jsonl", max_bytes=1 << 20, backups=1)
        record = {"question": "what is in front of me?", "durations_s": {f"stage{i}": 0.123 for i in range(16)}}
        log_us = _per_call_us(lambda: log.write(record), n=50)
        log.close()
        rows.append(("log record (fsync'd)", f"{log_us:8.1f} µs"))

        _workload(0.2)  # warm up
        off = _workload(seconds)
        energy = EnergyMeter(reader, interval=interval)
        energy.start()
        memory.start()
        on = _workload(seconds)
        memory.stop()
        measured = energy.stop()
        rows.append(("workload, meters off", f"{off:8.1f} loops/s"))
        rows.append(("workload, meters on", f"{on:8.1f} loops/s"))
        rows.append(("on / off", f"{on / off:8.3f}"))
        energy_text = (
            f"{measured.joules:.2f} J, mean {measured.mean_watts:.2f} W" if measured.available else measured.reason
        )
        rows.append(("energy of the 'on' run", energy_text))
    finally:
        reader.close()
    return rows


def _cmd_bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        rows = run(args.seconds, args.interval_ms / 1000, args.power, args.log_dir or Path(scratch))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
