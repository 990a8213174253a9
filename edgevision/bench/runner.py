"""Run the chosen suites on this machine into one results folder (``edgevision bench suites``).

This is what ``edgevision bench board`` runs on the board over SSH; it also runs directly on any machine. The
folder is written whole or not at all: the suites run into ``NAME.partial/``, renamed to ``NAME/`` once every
suite has finished, so a failed run leaves nothing that looks like results.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from edgevision import __version__
from edgevision.bench.machine import load_snapshot, machine_facts
from edgevision.bench.results import RESULTS_FILE, SCHEMA, SCHEMA_VERSION, quantity, write_json_atomic
from edgevision.bench.sampler import Sampler
from edgevision.bench.suites import SUITES, SuiteContext, suite_function
from edgevision.errors import ConfigError, EdgevisionError, ModelError
from edgevision.registry import REGISTRY_FILE, Registry

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def parse_suites(text: str) -> list[str]:
    """ "e2e,vision" → ["vision", "e2e"] in the registry's order; "all" → every suite."""
    names = list(SUITES) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise ConfigError(f"--suites: {', '.join(unknown) or 'none given'}: choose from {', '.join(SUITES)} or all")
    return [n for n in SUITES if n in names]


def source_commit() -> dict[str, Any]:
    """The checkout's git commit and whether it had changes, or "unknown" outside a git checkout."""

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": bool(status) if commit else None}


def check_models(models_dir: Path) -> list[dict[str, Any]]:
    """The registered models (name, kind, path, sha256, size); ModelError where this machine has none."""
    if not (models_dir / REGISTRY_FILE).is_file():
        where = f"{models_dir} (→ {models_dir.resolve()})" if models_dir.is_symlink() else str(models_dir)
        raise ModelError(f"no models in {where} (no {REGISTRY_FILE}); run 'make models' on this machine")
    records = Registry(models_dir).records()
    if not records:
        raise ModelError(f"{models_dir / REGISTRY_FILE} lists no models; run 'make models' on this machine")
    missing = [r.name for r in records if not Path(r.path).exists()]
    if missing:
        raise ModelError(f"registered models missing from {models_dir}: {', '.join(missing)}; run 'make models' again")
    return [
        {
            "name": r.name,
            "kind": r.kind,
            "path": r.path,
            "sha256": r.sha256,
            "size": quantity(r.size, "B"),
            "source": r.source,
        }
        for r in records
    ]


def used_models(paths: list[Path], registered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The models the suites measured: their registry records (hashed here where a file is not registered)."""
    from edgevision.registry import sha256_of

    by_path = {str(Path(r["path"]).resolve()): r for r in registered}
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        key = str(Path(path).resolve())
        if key in out:
            continue
        record = by_path.get(key)
        if record is None:
            sha, size = sha256_of(Path(key))
            record = {
                "name": Path(key).stem,
                "kind": "unregistered",
                "path": key,
                "sha256": sha,
                "size": quantity(size, "B"),
                "source": "not in the registry",
            }
        out[key] = record
    return sorted(out.values(), key=lambda r: (r["kind"], r["name"]))


def run_suites(
    out: Path,
    *,
    suites: list[str],
    config_path: Path,
    models_dir: Path,
    rounds: int,
    quick: bool,
    power: str = "auto",
    power_root: Path | None = None,
    interval: float = 0.1,
    threads: int = 0,
    commit: dict[str, Any] | None = None,
    progress: Any = None,
) -> Path:
    """Run `suites` and write `out`/results.json; return `out`. Nothing is left at `out` if a suite fails."""
    from edgevision.config import load_config
    from edgevision.telemetry.power import open_power_reader

    if rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    if out.exists():
        raise EdgevisionError(f"{out} already exists; choose another --out")
    models = check_models(models_dir)
    config = load_config(config_path)
    say = progress or (lambda text: print(text, flush=True))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        results: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "run": {
                "id": out.name,
                "started_utc": _utc(),
                "suites": suites,
                "rounds": rounds,
                "quick": quick,
                "threads": threads,
                "config": str(config_path),
                "sample_interval": quantity(interval, "s"),
            },
            "source": {**(commit or source_commit()), "edgevision_version": __version__},
            "machine": machine_facts(),
            "models": [],  # the models the suites used, filled in as they run
            "load_before": load_snapshot(),
            "suites": {},
        }
        reader = open_power_reader(power, root=power_root or "/")
        results["run"]["power"] = {
            "reader": reader.name,
            "sysfs_root": str(power_root or "/"),
            "note": (
                f"read from {power_root}, a folder of sysfs files, not from this machine's monitors"
                if power_root
                else getattr(reader, "reason", "")
            ),
        }
        context = SuiteContext(config, models_dir, rounds, quick, threads)
        used: list[Path] = []
        try:
            for name in suites:
                say(f"bench: {name}: {SUITES[name][1]} ({rounds} round{'s' * (rounds > 1)})")
                results["suites"][name], paths = _run_one(name, context, reader, interval)
                used.extend(paths)
                say(f"bench: {name}: done in {results['suites'][name]['seconds']['value']:.1f} s")
        finally:
            reader.close()
        results["models"] = used_models(used, models)
        results["load_after"] = load_snapshot()
        results["run"]["finished_utc"] = _utc()
        write_json_atomic(partial / RESULTS_FILE, results)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _run_one(name: str, context: SuiteContext, reader: Any, interval: float) -> tuple[dict[str, Any], list[Path]]:
    run = suite_function(name)
    load = load_snapshot(window=0.3)
    sampler = Sampler(reader, interval=interval)
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    sampler.start()
    try:
        result = run(context)
    except EdgevisionError as error:
        raise EdgevisionError(f"suite {name}: {error}") from error
    finally:
        series = sampler.stop()
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    figures = result.figures + (result.after(series) if result.after else [])
    rss = [v for v in series["rss_mib"] if v is not None]
    available = [v for v in series["mem_available_mib"] if v is not None]
    gpu = [v for v in series["gpu_mib"] if v is not None]
    memory = {
        "peak_rss": quantity(max(rss, default=None), "MiB"),
        "min_mem_available": quantity(min(available, default=None), "MiB"),
        "peak_gpu": quantity(max(gpu, default=None), "MiB"),
    }
    return {
        "status": "ok",
        "description": SUITES[name][1],
        "seconds": quantity(seconds, "s"),
        # CPU time of this process and its finished children (Piper): what the suite costs, whatever else ran
        "cpu_seconds": quantity(cpu, "s"),
        "figures": figures,
        "notes": result.notes,
        "answer": result.answer,
        "memory": memory,
        "load_before": load,
        "samples": series,
        "models": sorted({Path(p).name for p in result.models}),
    }, [Path(p) for p in result.models]


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
