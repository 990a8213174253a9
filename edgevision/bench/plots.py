"""The report's plots, drawn by matplotlib (Agg, no display) into PNG bytes.

Each function takes the results (and for the comparison the changes) and returns PNG bytes, or None where
the run has nothing to draw (no e2e suite, no power reading); the report says why in words instead.
"""

from __future__ import annotations

import io
from typing import Any

from edgevision.bench.results import Change, figures

COLORS = {
    "hold": "#9aa5b1",
    "think": "#e8a33d",
    "speak": "#3d8fe8",
    "power": "#c0392b",
    "rss": "#2c7fb8",
    "used": "#7f7f7f",
    "gpu": "#41ab5d",
    "regression": "#c0392b",
    "improvement": "#2e8b57",
    "within noise": "#9aa5b1",
    "too few rounds": "#d5dade",
    "changed": "#d5dade",
}
WIDTH = 9.0  # inches at 100 dpi: 900 px, the report's column


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titleweight": "bold",
            "axes.titlesize": 11,
        }
    )
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def waterfall(results: dict) -> bytes | None:
    """One answer per mode as a timeline: press → release → first token → first audio → last audio."""
    answers = (results["suites"].get("e2e") or {}).get("answer") or {}
    answers = {mode: a for mode, a in answers.items() if a}
    if not answers:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH, 1.6 + 0.9 * len(answers)))
    spans = (
        ("press", "release", "hold"),
        ("release", "first token", "think"),
        ("first token", "first audio", "think"),
        ("first audio", "last audio", "speak"),
    )
    longest = max(a["events_s"]["last audio"] for a in answers.values())
    for row, answer in enumerate(answers.values()):
        events = answer["events_s"]
        for start, end, color in spans:
            if start not in events or end not in events:
                continue
            width = events[end] - events[start]
            ax.barh(
                row,
                width,
                left=events[start],
                height=0.55,
                color=COLORS[color],
                alpha=0.55 if start == "first token" else 0.95,
                edgecolor="white",
            )
            if width > 0.07 * longest:  # the stage's length inside its bar, where it fits
                ax.annotate(f"{width:.1f} s", (events[start] + width / 2, row), ha="center", va="center", fontsize=8)
        for t in events.values():
            ax.plot([t, t], [row - 0.34, row + 0.34], color="black", lw=0.8)
        wait = events["first audio"] - events["release"]
        ax.annotate(
            f"waits {wait:.1f} s after release",
            (events["last audio"], row),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
            fontweight="bold",
        )
    first = next(iter(answers.values()))["events_s"]
    for i, (name, t) in enumerate(first.items()):  # event names over the top row, staggered so close ones part
        ax.annotate(
            name,
            (t, -0.36),
            xytext=(0, 3 + 11 * (i % 2)),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="#333333",
        )
    ax.set_yticks(range(len(answers)), list(answers))
    ax.set_ylim(len(answers) - 0.5, -0.9)
    ax.set_xlim(0, longest * 1.3)
    ax.set_xlabel("seconds since the button was pressed")
    ax.set_title("One answer, stage by stage (the median answer of each mode)", pad=10)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=COLORS[c], alpha=a)
        for c, a in (("hold", 0.95), ("think", 0.95), ("think", 0.55), ("speak", 0.95))
    ]
    ax.legend(
        handles,
        ["question spoken (held)", "release → first token", "first token → first audio", "answer spoken"],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        fontsize=8,
        frameon=False,
        ncol=4,
    )
    return _png(fig)


def power_over_answer(results: dict) -> bytes | None:
    """Board power across the median overlapped answer, the answer's energy shaded under the curve."""
    suite = results["suites"].get("e2e")
    if not suite or not suite.get("answer"):
        return None
    mode, answer = next(((m, a) for m, a in suite["answer"].items() if a), (None, None))
    series = suite["samples"]
    if answer is None or not any(w is not None for w in series["power_w"]):
        return None
    plt = _pyplot()
    press = answer["press_unix_s"] - series["start_unix_s"]
    events = answer["events_s"]
    end = events["last audio"]
    points = [
        (t - press, w)
        for t, w in zip(series["t_s"], series["power_w"], strict=True)
        if w is not None and -1.0 <= t - press <= end + 1.0
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, 3.2))
    ts, ws = [p[0] for p in points], [p[1] for p in points]
    ax.step(ts, ws, where="post", color=COLORS["power"], lw=1.5, label="board power (total)")
    inside = [(t, w) for t, w in points if 0 <= t <= end]
    if inside:
        ax.fill_between(
            [p[0] for p in inside],
            [p[1] for p in inside],
            step="post",
            color=COLORS["power"],
            alpha=0.2,
            label=f"energy of the answer: {answer.get('energy_j') or 0:.1f} J",
        )
    for name, t in events.items():
        ax.axvline(t, color="#555555", lw=0.7, ls="--")
        ax.annotate(
            name,
            (t, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="#333333",
        )
    ax.set_ylim(0, max(ws) * 1.5)  # room above the curve for the stage names
    ax.set_xlabel("seconds since the button was pressed")
    ax.set_ylabel("W")
    ax.set_title(f"Power over one answer ({mode} mode; {series['power_source']})")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return _png(fig)


def memory_over_run(results: dict) -> bytes | None:
    """Process RSS, system memory in use and GPU (NvMap) memory through every suite, suites side by side."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
    offset, drew, total_mib = 0.0, False, (results["machine"].get("memory_total") or {}).get("value")
    for i, (name, suite) in enumerate(results["suites"].items()):
        series = suite.get("samples")
        if not series or not series["t_s"]:
            continue
        ts = [offset + t for t in series["t_s"]]
        ax.axvspan(ts[0], ts[-1], color="#eef1f4" if i % 2 else "#f8f9fa", zorder=0)
        ax.annotate(
            name,
            ((ts[0] + ts[-1]) / 2, 1.0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            xytext=(0, 2 + 11 * (i % 2)),
            textcoords="offset points",
            fontsize=9,
            color="#333333",
        )
        first = not drew
        ax.plot(ts, series["rss_mib"], color=COLORS["rss"], lw=1.4, label="benchmark process RSS" if first else None)
        if total_mib and any(v is not None for v in series["mem_available_mib"]):
            used = [None if v is None else total_mib - v for v in series["mem_available_mib"]]
            ax.plot(
                ts,
                used,
                color=COLORS["used"],
                lw=1.0,
                ls="--",
                label="system RAM in use (MemTotal − MemAvailable)" if first else None,
            )
        if any(v is not None for v in series["gpu_mib"]):
            ax.plot(ts, series["gpu_mib"], color=COLORS["gpu"], lw=1.4, label="GPU memory (NvMap)" if first else None)
        offset = ts[-1] + 0.5
        drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("MiB")
    ax.set_title("Memory through the run (suites one after another)", pad=28)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    return _png(fig)


def tokens_per_second(results: dict) -> bytes | None:
    """Decode (and prefill) speed of every configuration, median with the range over repeats."""
    rows = [
        (f"{suite}: {fig['config'].removeprefix(suite + ' ')} — {fig['name']}", fig)
        for suite, fig in figures(results)
        if fig["unit"] == "tok/s" and fig["median"] is not None
    ]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH, 1.0 + 0.36 * len(rows)))
    medians = [f["median"] for _, f in rows]
    lows = [f["median"] - f["min"] for _, f in rows]
    highs = [f["max"] - f["median"] for _, f in rows]
    ax.barh(range(len(rows)), medians, xerr=[lows, highs], color="#3d8fe8", ecolor="#333333", capsize=3)
    for i, (_label, f) in enumerate(rows):
        ax.annotate(
            f"{f['median']:.3g}", (f["max"], i), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8
        )
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=9)
    ax.invert_yaxis()
    top = max(f["max"] for _, f in rows)
    if top / max(min(medians), 1e-9) > 30:  # speeds that far apart: a log axis keeps the slow ones readable
        ax.set_xscale("log")
        ax.set_xlim(min(f["min"] for _, f in rows) / 2, top * 3)
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        scale = "log scale; "
    else:
        ax.set_xlim(0, top * 1.18)
        scale = ""
    ax.set_xlabel(f"tokens per second ({scale}bar: median; whiskers: min to max over the repeats)")
    ax.set_title("Tokens per second per configuration")
    return _png(fig)


def changes(items: list[Change]) -> bytes | None:
    """Each shared figure's change against the older run, in per cent of it; worse is red, better green."""
    items = [c for c in items if c.old]
    if not items:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH, 0.9 + 0.3 * len(items)))
    percent = [(c.new / c.old - 1) * 100 for c in items]
    ax.barh(range(len(items)), percent, color=[COLORS[c.verdict] for c in items])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(items)), [c.label for c in items], fontsize=8)
    ax.invert_yaxis()
    for i, (c, p) in enumerate(zip(items, percent, strict=True)):
        mark = {"regression": " regression", "improvement": " improvement"}.get(c.verdict, "")
        ax.annotate(
            f"{p:+.1f}%{mark}",
            (p, i),
            xytext=(4 if p >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if p >= 0 else "right",
            va="center",
            fontsize=8,
        )
    span = max(abs(p) for p in percent) or 1
    ax.set_xlim(-span * 1.6, span * 1.6)
    ax.set_xlabel("change vs the older run, % of its median (tok/s: higher is better; s, J, MiB: lower)")
    ax.set_title("Change against the older run")
    return _png(fig)


def plots(results: dict, compared: list[Change] | None = None) -> dict[str, tuple[str, bytes | None]]:
    """name → (title, PNG or None) in the report's order."""
    out: dict[str, tuple[str, Any]] = {
        "waterfall": ("Stages of one answer", waterfall(results)),
        "power": ("Power over one answer", power_over_answer(results)),
        "memory": ("Memory and GPU memory over the run", memory_over_run(results)),
        "tokens": ("Tokens per second per configuration", tokens_per_second(results)),
    }
    if compared is not None:
        out["changes"] = ("Change against the older run", changes(compared))
    return out
