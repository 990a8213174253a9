"""``edgevision report RESULTS [--compare OLDER]``: a self-contained HTML page and a Markdown page.

The HTML has its plots inlined (base64 PNG) so it can be mailed or attached as one file; the Markdown links
PNG files written beside it. With ``--compare`` every figure both runs measured gets its change, a regression
(worse beyond the noise) or an improvement marked; runs from different hardware, power modes or models are
refused unless forced.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from edgevision.bench.plots import plots
from edgevision.bench.results import Change, ResultsError, comparability, compare, figures, load_results, suites_run

CAPTIONS = {
    "waterfall": "Each bar is one answer (the middle one of its mode by release → first audio; the lower middle one "
    "when the count is even) from the press of the button: "
    "grey while the question is spoken, orange from the release to the first token and on to the "
    "first spoken audio (the wait the user feels), blue while the answer is spoken.",
    "power": "Board input power sampled through that answer; the shaded area under the curve from press to last "
    "audio is the answer's energy in joules. Dashed lines mark the stages.",
    "memory": "Every suite one after another: the benchmark process's resident memory (with its children, Piper), "
    "system RAM in use, and on a Jetson the GPU's NvMap memory (CPU and GPU share the RAM).",
    "tokens": "Median decode and prefill speed of each configuration; whiskers span the repeats.",
    "changes": "Per cent change of each figure's median against the older run. Red: a regression (worse by more "
    "than the threshold, the two runs' ranges apart, at least 3 rounds each); green: an improvement; "
    "grey: within the noise; light grey: too few rounds to tell, or a count with no better side.",
}
MARKS = {
    "regression": "▲ regression",
    "improvement": "▼ improvement",
    "within noise": "within noise",
    "too few rounds": "too few rounds to tell",
    "changed": "changed",
}


def _value(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def _spread(fig: dict) -> str:
    if fig["median"] is None:
        return "—"
    return f"{_value(fig['min'])} – {_value(fig['max'])}" if fig["n"] > 1 else "(one run)"


def _facts(results: dict) -> list[tuple[str, str]]:
    m, run, src = results["machine"], results["run"], results["source"]
    mode = (m.get("power_mode") or {}).get("mode")
    power = run.get("power", {})
    load = results.get("load_before", {})
    busy = "; ".join(f"{p['command']} ({p['cpu_percent']:.0f}%)" for p in load.get("top_processes", [])) or "nothing"
    memory = m.get("memory_total", {}).get("value")
    return [
        (
            "run",
            (
                f"{run['id']}: {run['started_utc']} → {run.get('finished_utc', '?')}, {run['rounds']} rounds"
                f"{' (quick)' if run['quick'] else ''}, suites {', '.join(run['suites'])}"
            ),
        ),
        (
            "commit",
            (
                f"{src['git_commit']}{' (with uncommitted changes)' if src.get('git_dirty') else ''}, "
                f"edgevision {src.get('edgevision_version', '?')}"
            ),
        ),
        ("board", m.get("board") or f"not a Jetson ({m.get('product') or 'unknown product'})"),
        (
            "CPU",
            f"{m['cpu_model']}, {m['cpu_count']} cores, {m['arch']}"
            + (f", {memory / 1024:.1f} GiB RAM" if memory else ""),
        ),
        ("system", f"{m.get('os') or '?'}, kernel {m.get('kernel')}"),
        ("JetPack / L4T / TensorRT", " / ".join(str(m.get(k) or "—") for k in ("jetpack", "l4t_release", "tensorrt"))),
        ("power mode", mode or "not reported (no nvpmodel)"),
        ("clocks", "jetson_clocks --show recorded" if m.get("clocks") else "not reported (no jetson_clocks)"),
        ("power readings", f"{power.get('reader', '?')}" + (f" — {power['note']}" if power.get("note") else "")),
        (
            "load before the run",
            (f"load average {load.get('loadavg_1m', 0):.2f} on {load.get('cpu_count')} cores; busiest: {busy}"),
        ),
    ]


def _headlines(results: dict) -> list[str]:
    out = []
    for suite, fig in figures(results):
        wanted = {
            ("e2e", "release → first audio"),
            ("e2e", "energy per answer"),
            ("idle", "idle power"),
            ("moe", "decode"),
        }
        if (suite, fig["name"]) in wanted and fig["median"] is not None:
            out.append(f"{fig['name']} ({fig['config']}): {_value(fig['median'])} {fig['unit']}")
    for name, suite in results["suites"].items():
        peak = suite.get("memory", {}).get("peak_rss", {}).get("value")
        if peak and name == "e2e":
            out.append(f"peak RSS during e2e: {peak:.0f} MiB")
    return out


def _busy(results: dict) -> str | None:
    """A note where something else kept the machine busy when the run started (load above half the cores)."""
    load = results.get("load_before") or {}
    cores = load.get("cpu_count") or results["machine"].get("cpu_count") or 1
    if load.get("loadavg_1m", 0) <= cores / 2:
        return None
    return f"{results['run']['id']} started at load {load['loadavg_1m']:.1f} on {cores} cores"


def _load_warning(new: dict, old: dict) -> str | None:
    busy = [b for b in (_busy(new), _busy(old)) if b]
    if not busy:
        return None
    return (
        f"Other work was running: {'; '.join(busy)}. Figures move with the machine's load; compare runs made "
        "on an otherwise idle board."
    )


def _counts(changed: list[Change]) -> str:
    counts = {v: sum(c.verdict == v for c in changed) for v in MARKS}
    text = (
        f"{counts['regression']} regression(s), {counts['improvement']} improvement(s), "
        f"{counts['within noise']} within noise"
    )
    if counts["too few rounds"]:
        text += f", {counts['too few rounds']} beyond the threshold but with too few rounds to tell"
    if counts["changed"]:
        text += f", {counts['changed']} changed count(s)"
    return text


def _check(new: dict, old: dict, force: bool) -> list[str]:
    reasons = comparability(new, old)
    if reasons and not force:
        raise ResultsError(
            f"will not compare {new['run']['id']} with {old['run']['id']}: {'; '.join(reasons)}; "
            "pass --force to compare anyway"
        )
    return reasons


def build_report(
    folder: Path, *, older: Path | None = None, force: bool = False, threshold: float = 0.05
) -> dict[str, bytes]:
    """The report's files (name → bytes): report.html, report.md and the PNGs the Markdown links."""
    results = load_results(folder)
    old = load_results(older) if older else None
    reasons = _check(results, old, force) if old else []
    changed = compare(results, old, threshold=threshold) if old else None
    images = plots(results, changed)
    files = {f"report-{name}.png": png for name, (_title, png) in images.items() if png}
    files["report.html"] = _html(results, old, changed, reasons, images, threshold).encode()
    files["report.md"] = _markdown(results, old, changed, reasons, images, threshold).encode()
    return files


def write_report(folder: Path, files: dict[str, bytes], out: Path | None = None) -> Path:
    """Write every file whole (temporary names, then renamed); return the HTML's path."""
    out = out or Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    temps = []
    try:
        for name, data in files.items():
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(data)
            temps.append((tmp, out / name))
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in temps:
        os.replace(tmp, final)
    return out / "report.html"


# --- HTML -------------------------------------------------------------------------------------------------------

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2329;max-width:960px;margin:24px auto;
padding:0 16px}h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #dde;
padding-bottom:4px}h3{font-size:16px;margin-bottom:4px}.sub{color:#5b6670;margin-top:0}
table{border-collapse:collapse;width:100%;margin:8px 0 12px;font-size:14px}th,td{text-align:left;padding:4px 8px;
border-bottom:1px solid #eceff2;vertical-align:top}th{background:#f5f7f9}td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums;white-space:nowrap}.facts td:first-child{color:#5b6670;width:210px}
.headline{background:#f1f7ff;border:1px solid #cfe2ff;border-radius:6px;padding:8px 14px}
.headline li{margin:2px 0}figure{margin:12px 0 20px}figure img{max-width:100%;display:block}
figcaption{color:#5b6670;font-size:13px}.regression{color:#b52a1c;font-weight:600}
.improvement{color:#23764a;font-weight:600}.noise{color:#7a848d}.warn{background:#fff4e5;border:1px solid #f5c98b;
border-radius:6px;padding:6px 12px}code{font-size:13px}.note{color:#5b6670;font-size:13px}
"""


def _html(
    results: dict,
    old: dict | None,
    changed: list[Change] | None,
    reasons: list[str],
    images: dict[str, tuple[str, bytes | None]],
    threshold: float,
) -> str:
    e = html.escape
    ran = suites_run(results)
    parts = [
        (
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>edgevision bench {e(results['run']['id'])}"
            f"</title><meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
        ),
        f"<h1>edgevision benchmarks: {e(results['run']['id'])}</h1>",
        f"<p class=sub>Suites run: {e(', '.join(ran))}"
        + (f" · compared with {e(old['run']['id'])}" if old else "")
        + "</p>",
    ]
    headlines = _headlines(results)
    if headlines:
        parts.append(
            "<div class=headline><b>Headline figures</b> (medians)<ul>"
            + "".join(f"<li>{e(h)}</li>" for h in headlines)
            + "</ul></div>"
        )
    parts.append(
        "<h2>The run</h2><table class=facts>"
        + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in _facts(results))
        + "</table>"
    )
    parts.append(
        "<h3>Models</h3><table><tr><th>name</th><th>kind</th><th>size</th><th>sha256</th></tr>"
        + "".join(
            f"<tr><td>{e(m['name'])}</td><td>{e(m['kind'])}</td><td class=n>"
            f"{m['size']['value'] / 2**20:.1f} MiB</td><td><code>{e(m['sha256'][:16])}…</code></td></tr>"
            for m in results["models"]
        )
        + "</table>"
    )
    if old is not None and changed is not None:
        parts.append(_html_compare(results, old, changed, reasons, images, threshold))
    parts.append("<h2>Plots</h2>")
    for name, (title, png) in images.items():
        if name == "changes":
            continue
        if png is None:
            parts.append(f"<h3>{e(title)}</h3><p class=note>{e(_missing(name, results))}</p>")
            continue
        data = base64.b64encode(png).decode()
        parts.append(
            f"<figure><h3>{e(title)}</h3><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{e(CAPTIONS[name])}</figcaption></figure>"
        )
    parts.append("<h2>Suites</h2>")
    for name, suite in results["suites"].items():
        mem = suite.get("memory", {})
        peak = mem.get("peak_rss", {}).get("value")
        cpu = suite.get("cpu_seconds", {}).get("value")
        parts.append(
            f"<h3>{e(name)}</h3><p class=sub>{e(suite['description'])}: {suite['seconds']['value']:.1f} s"
            + (f" ({cpu:.1f} s of CPU)" if cpu is not None else "")
            + (f", peak RSS {peak:.0f} MiB" if peak else "")
            + "</p>"
        )
        parts.append(
            "<table><tr><th>figure</th><th>configuration</th><th class=n>median</th><th class=n>range</th><th class=n>n</th>"
            "<th>unit</th></tr>"
            + "".join(
                f"<tr><td>{e(f['name'])}</td><td>{e(f['config'])}</td><td class=n>{_value(f['median'])}</td>"
                f"<td class=n>{_spread(f)}</td><td class=n>{f['n']}</td><td>{e(f['unit'])}</td></tr>"
                for f in suite["figures"]
            )
            + "</table>"
        )
        for note in suite.get("notes", []):
            parts.append(f"<p class=note>{e(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_compare(
    results: dict,
    old: dict,
    changed: list[Change],
    reasons: list[str],
    images: dict[str, tuple[str, bytes | None]],
    threshold: float,
) -> str:
    e = html.escape
    out = [
        f"<h2>Against {e(old['run']['id'])}</h2>",
        (
            f"<p>{e(_counts(changed))} (threshold {threshold:.0%}; the ranges must not overlap; at least 3 rounds "
            f"each). Older run: commit {e(old['source']['git_commit'][:12])}, {e(old['run']['started_utc'])}.</p>"
        ),
    ]
    if reasons:
        out.append(f"<p class=warn>Compared with --force although: {e('; '.join(reasons))}.</p>")
    warning = _load_warning(results, old)
    if warning:
        out.append(f"<p class=warn>{e(warning)}</p>")
    png = images.get("changes", ("", None))[1]
    if png:
        out.append(
            f"<figure><img alt='changes' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<figcaption>{e(CAPTIONS['changes'])}</figcaption></figure>"
        )
    out.append("<table><tr><th>figure</th><th>older</th><th>this run</th><th>change</th><th>verdict</th></tr>")
    for c in changed:
        css = {"regression": "regression", "improvement": "improvement"}.get(c.verdict, "noise")
        out.append(
            f"<tr><td>{e(c.label)}</td><td class=n>{_value(c.old)} {e(c.unit)}</td><td class=n>"
            f"{_value(c.new)} {e(c.unit)}</td><td class=n>{(c.ratio - 1) * 100:+.1f}%</td>"
            f"<td class={css}>{MARKS[c.verdict]}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _missing(name: str, results: dict) -> str:
    if name in ("waterfall", "power") and "e2e" not in results["suites"]:
        return "The e2e suite did not run in this results folder."
    if name == "power":
        return (
            f"No power readings: {results['run'].get('power', {}).get('note') or 'no power monitor on this machine'}."
        )
    if name == "tokens":
        return "No suite measured tokens per second in this run (router or moe)."
    return "Nothing to draw."


# --- Markdown ---------------------------------------------------------------------------------------------------


def _markdown(
    results: dict,
    old: dict | None,
    changed: list[Change] | None,
    reasons: list[str],
    images: dict[str, tuple[str, bytes | None]],
    threshold: float,
) -> str:
    lines = [
        f"# edgevision benchmarks: {results['run']['id']}",
        "",
        f"Suites run: {', '.join(suites_run(results))}" + (f"; compared with {old['run']['id']}" if old else ""),
        "",
    ]
    headlines = _headlines(results)
    if headlines:
        lines += ["**Headline figures** (medians):", "", *[f"- {h}" for h in headlines], ""]
    lines += [
        "## The run",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {_md(v)} |" for k, v in _facts(results)],
        "",
        "| model | kind | size | sha256 |",
        "|---|---|---:|---|",
        *[
            f"| {m['name']} | {m['kind']} | {m['size']['value'] / 2**20:.1f} MiB | `{m['sha256'][:16]}` |"
            for m in results["models"]
        ],
        "",
    ]
    if old is not None and changed is not None:
        lines += [
            f"## Against {old['run']['id']}",
            "",
            f"{_counts(changed)} (threshold {threshold:.0%}; ranges must not overlap; at least 3 rounds each).",
            "",
        ]
        if reasons:
            lines += [f"Compared with --force although: {'; '.join(reasons)}.", ""]
        warning = _load_warning(results, old)
        if warning:
            lines += [warning, ""]
        if images.get("changes", ("", None))[1]:
            lines += ["![changes](report-changes.png)", ""]
        lines += [
            "| figure | older | this run | change | verdict |",
            "|---|---:|---:|---:|---|",
            *[
                f"| {_md(c.label)} | {_value(c.old)} {c.unit} | {_value(c.new)} {c.unit} | "
                f"{(c.ratio - 1) * 100:+.1f}% | {MARKS[c.verdict]} |"
                for c in changed
            ],
            "",
        ]
    lines += ["## Plots", ""]
    for name, (title, png) in images.items():
        if name == "changes":
            continue
        lines += [f"### {title}", ""]
        lines += [f"![{title}](report-{name}.png)", "", CAPTIONS[name], ""] if png else [_missing(name, results), ""]
    lines += ["## Suites", ""]
    for name, suite in results["suites"].items():
        cpu = suite.get("cpu_seconds", {}).get("value")
        lines += [
            f"### {name}",
            "",
            f"{suite['description']}: {suite['seconds']['value']:.1f} s"
            + (f" ({cpu:.1f} s of CPU)" if cpu is not None else ""),
            "",
            "| figure | configuration | median | range | n | unit |",
            "|---|---|---:|---:|---:|---|",
            *[
                f"| {_md(f['name'])} | {_md(f['config'])} | {_value(f['median'])} | {_spread(f)} | {f['n']} | "
                f"{f['unit']} |"
                for f in suite["figures"]
            ],
            "",
            *suite.get("notes", []),
            "",
        ]
    return "\n".join(lines)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
