"""The daemon with its decoder placement against the daemon without one, under the same memory cap.

Each side runs ``edgevision bench e2e`` (scripted spoken questions through the real daemon, overlapped and
sequential) in a fresh child process moved into a memory-capped cgroup, after the decoder's GGUF has been dropped
from the page cache, so every page of it is read from storage once and charged to the cap. The two configs are
the given one with ``decoder.placement.ram_budget: none`` and with the placement asked for (default ``auto``:
the cgroup's limit less what the other stages use, the KV cache and the headroom). Printed side by side:
release → first audio, decode tokens/s, and per answer the major faults, bytes read from storage and the expert
hit rate (from the records' ``placement`` meter).

    sudo python tools/bench_placement.py --config bench.yaml --cap-mib 1200 -n 2   # absolute model paths

Needs root and a memory cgroup (v1 or v2). Storage settings matter: say what the disk and its readahead are
(``blockdev --getra``) when quoting the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _variant(config: Path, folder: Path, name: str, placement: dict) -> Path:
    data = yaml.safe_load(config.read_text()) or {}
    base = config.resolve().parent
    for section, key in (("vision", "tower"), ("decoder", "model")):
        value = data.get(section, {}).get(key)
        if value is not None and not Path(value).is_absolute():
            data[section][key] = str((base / value).resolve())
    data.setdefault("decoder", {})["placement"] = placement
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(config: Path, cap: int, n: int, out: Path, label: str) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from edgevision.config import load_config
    from edgevision.moe.cgroup import MemoryCgroup, drop_page_cache

    model = load_config(config).decoder.model
    still = drop_page_cache(model)
    with MemoryCgroup.create(f"ev-placement-{label}-{os.getpid()}", cap) as cgroup:
        cgroup.reset_peak()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgevision",
                "bench",
                "e2e",
                "--config",
                str(config),
                "-n",
                str(n),
                "--json",
                str(out),
            ],
            cwd=ROOT,
            preexec_fn=cgroup.enter,
            capture_output=True,
            text=True,
            check=False,
        )
        peak = cgroup.peak()
    if proc.returncode != 0:
        raise SystemExit(f"{label}: bench e2e failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(
        f"--- {label}: page cache before {100 * still:.0f}% of the model, cgroup peak "
        f"{(peak or 0) / 2**20:.0f} MiB\n{proc.stdout}",
        file=sys.stderr,
    )
    return json.loads(out.read_text())


def _median(records: list[dict], pick) -> float | None:
    values = [v for r in records if r.get("answer") is not None and (v := pick(r)) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_placement.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="config naming a MoE decoder")
    parser.add_argument("--cap-mib", type=int, required=True, help="memory cap of each run's cgroup, MiB")
    parser.add_argument("-n", "--interactions", type=int, default=2, help="questions per mode (default: 2)")
    parser.add_argument("--ram-budget", default="auto", help="the placement's ram_budget (default: auto)")
    parser.add_argument("--profile", help="router profile for the placement")
    parser.add_argument("--headroom", default="512MiB", help="the placement's headroom (default: 512MiB)")
    args = parser.parse_args(argv)
    cap = args.cap_mib * 2**20
    placement = {"ram_budget": args.ram_budget, "headroom": args.headroom, "replan_every": 16}
    if args.profile:
        placement["router_profile"] = str(Path(args.profile).resolve())
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ev-bench-placement-") as tmp:
        folder = Path(tmp)
        for label, section in (("no plan", {"ram_budget": "none"}), ("plan", placement)):
            config = _variant(args.config, folder, label.replace(" ", "-"), section)
            rows[label] = _run(config, cap, args.interactions, folder / f"{label.replace(' ', '-')}.json", label)
    measures = (
        ("release → first audio (s)", lambda r: r["durations_s"].get("release_to_first_audio")),
        ("decode (tok/s)", lambda r: r["durations_s"].get("decode_tokens_per_s")),
        ("major faults per answer", lambda r: r.get("placement", {}).get("major_faults")),
        ("MiB read from storage per answer", lambda r: (r.get("placement", {}).get("storage_bytes_read") or 0) / 2**20),
        ("expert hit rate", lambda r: r.get("placement", {}).get("hit_rate")),
        ("pinned experts", lambda r: r.get("placement", {}).get("pinned_experts")),
        ("MiB pinned (with non-expert weights)", lambda r: (r.get("placement", {}).get("locked_bytes") or 0) / 2**20),
    )
    print(
        f"daemon with vs without its decoder placement, cgroup cap {args.cap_mib} MiB, {args.interactions} "
        "questions per mode, medians over both modes"
    )
    print(f"{'':<34} {'no plan':>10} {'plan':>10}")
    for name, pick in measures:
        cells = [_median(rows[label], pick) for label in ("no plan", "plan")]
        print(f"{name:<34} " + " ".join(f"{c:>10.3f}" if c is not None else f"{'—':>10}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
