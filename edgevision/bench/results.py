"""The results folder's JSON: schema, figures with their units, median and spread, and whether two runs compare.

A results folder holds ``results.json`` (this schema) and, once reported, ``report.html`` and ``report.md``.
Every figure names its unit and whether lower or higher is better; repeated measurements keep their values
with their median and range, so a later run can say whether a change is beyond the noise.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevision.errors import EdgevisionError

SCHEMA = "edgevision.bench.results"
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
MIN_ROUNDS = 3  # repeats a figure needs on both sides before a change in it is called a regression or improvement

# Units whose figures are better when lower; the others (tok/s, images/s) when higher.
LOWER_IS_BETTER = {"s", "ms", "J", "W", "MiB"}


class ResultsError(EdgevisionError):
    """A results folder that cannot be read, or two that should not be compared."""


def figure(
    name: str, unit: str, values: Iterable[float | None], *, config: str = "", better: str | None = None
) -> dict:
    """One measured quantity: its repeats, median and range, in `unit`. None values (not measured) are dropped."""
    kept = [float(v) for v in values if v is not None]
    if better is None:
        better = "lower" if unit in LOWER_IS_BETTER else "higher"
    out: dict[str, Any] = {"name": name, "config": config, "unit": unit, "better": better, "n": len(kept)}
    if kept:
        out.update(
            median=_round(statistics.median(kept)),
            min=_round(min(kept)),
            max=_round(max(kept)),
            values=[_round(v) for v in kept],
        )
    else:
        out.update(median=None, min=None, max=None, values=[])
    return out


def quantity(value: float | None, unit: str) -> dict:
    """A single value with its unit (sizes, durations of the run)."""
    return {"value": _round(value) if isinstance(value, float) else value, "unit": unit}


def _round(value: float) -> float:
    return float(f"{value:.6g}")


# --- reading and writing --------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON whole or not at all (a temporary file renamed over the target)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_results(folder: str | os.PathLike[str]) -> dict:
    """The results of a results folder (or of its results.json); ResultsError with the fix if unreadable."""
    path = Path(folder)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ResultsError(
            f"{path}: no such results file; give a folder made by 'edgevision bench board' or 'edgevision bench suites'"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ResultsError(f"{path}: not readable JSON ({error})") from error
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"{path}: not an edgevision results file (schema is not {SCHEMA!r})")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ResultsError(f"{path}: no schema_version")
    if version > SCHEMA_VERSION:
        raise ResultsError(
            f"{path}: schema version {version} is newer than this edgevision reads ({SCHEMA_VERSION}); "
            "update edgevision on this machine to read it"
        )
    missing = [key for key in ("run", "source", "machine", "models", "suites") if key not in data]
    if missing:
        raise ResultsError(f"{path}: incomplete results (no {', '.join(missing)}); the run did not finish")
    return data


# --- comparing two runs ----------------------------------------------------------------------------------------


def comparability(new: dict, old: dict) -> list[str]:
    """Why two runs should not be compared (empty if they may): different hardware, power mode or models."""
    reasons = []
    for label, pick in (("hardware", hardware_key), ("power mode", power_mode_key)):
        a, b = pick(new), pick(old)
        if a != b:
            reasons.append(f"different {label} ({_describe(a)} vs {_describe(b)})")
    new_models, old_models = models_key(new), models_key(old)
    if new_models != old_models:
        changed = sorted({n for n, _ in new_models ^ old_models})
        reasons.append(f"different models ({', '.join(changed)})")
    return reasons


def hardware_key(results: dict) -> tuple:
    m = results["machine"]
    return (m.get("board") or "", m.get("cpu_model") or "", m.get("cpu_count"), m.get("arch") or "")


def power_mode_key(results: dict) -> str:
    return (results["machine"].get("power_mode") or {}).get("mode") or "not reported"


def models_key(results: dict) -> set[tuple[str, str]]:
    return {(m["name"], m["sha256"]) for m in results["models"]}


def _describe(key: Any) -> str:
    if isinstance(key, tuple):
        return " / ".join(str(k) for k in key if k not in ("", None))
    return str(key)


@dataclass(frozen=True)
class Change:
    """One figure measured in both runs."""

    suite: str
    name: str
    config: str
    unit: str
    old: float
    new: float
    verdict: str  # "regression", "improvement", "within noise", "too few rounds" or "changed" (no better side)

    @property
    def ratio(self) -> float:
        return self.new / self.old if self.old else float("inf")

    @property
    def label(self) -> str:
        return f"{self.suite}: {self.name}" + (f" ({self.config})" if self.config else "")


def compare(new: dict, old: dict, *, threshold: float = 0.05) -> list[Change]:
    """Each figure the two runs share, and whether it got worse (a regression), better, or stayed within noise.

    A change counts when the medians differ by more than `threshold` (relative) and the two runs' ranges
    (min to max over the repeats) do not overlap; otherwise it is within noise. With fewer than
    `MIN_ROUNDS` repeats on either side a range says little, so such a change is "too few rounds", not a verdict.
    """
    olds = {_figure_id(s, f): f for s, f in figures(old)}
    changes = []
    for suite, fig in figures(new):
        before = olds.get(_figure_id(suite, fig))
        if before is None or fig["median"] is None or before["median"] is None:
            continue
        changes.append(
            Change(
                suite,
                fig["name"],
                fig["config"],
                fig["unit"],
                before["median"],
                fig["median"],
                _verdict(fig, before, threshold),
            )
        )
    return changes


def _verdict(new: dict, old: dict, threshold: float) -> str:
    a, b = old["median"], new["median"]
    if a == 0 or abs(b - a) / abs(a) <= threshold:
        return "within noise"
    if new["min"] <= old["max"] and old["min"] <= new["max"]:  # the ranges overlap
        return "within noise"
    if min(new["n"], old["n"]) < MIN_ROUNDS:
        return "too few rounds"
    if new["better"] not in ("lower", "higher"):  # a count such as answer tokens: neither way is better
        return "changed"
    worse = b > a if new["better"] == "lower" else b < a
    return "regression" if worse else "improvement"


def _figure_id(suite: str, fig: dict) -> tuple[str, str, str, str]:
    return suite, fig["name"], fig["config"], fig["unit"]


def figures(results: dict) -> list[tuple[str, dict]]:
    """(suite, figure) for every figure of every suite that ran."""
    return [(name, fig) for name, suite in results["suites"].items() for fig in suite.get("figures", [])]


def suites_run(results: dict) -> list[str]:
    return [name for name, suite in results["suites"].items() if suite.get("status") == "ok"]


def median_of(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
