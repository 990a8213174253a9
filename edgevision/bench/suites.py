"""The benchmark suites a board run chooses from, each one registry entry.

A suite is a function ``run(ctx: SuiteContext) -> SuiteResult`` named in `SUITES` as "module:function" (imported
only when chosen, so a suite's heavy libraries load only when it runs). Adding one is one line in `SUITES`.
Every suite repeats its measurement `ctx.rounds` times (a quick run uses few rounds) and reports each
figure's median and range; the runner samples power and memory around it.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from edgevision.bench.results import figure
from edgevision.bench.sampler import energy_between
from edgevision.config import Config
from edgevision.errors import EdgevisionError, ModelError

# name → ("module:function", what it measures). The order is the order they run in.
SUITES: dict[str, tuple[str, str]] = {
    "idle": ("edgevision.bench.suites:idle", "the board at rest: power and memory with nothing running"),
    "vision": ("edgevision.bench.suites:vision", "vision tower: time to encode one camera frame, per back-end"),
    "e2e": (
        "edgevision.bench.suites:e2e",
        "spoken questions through the daemon, overlapped vs sequential: press → first audio, energy",
    ),
    "router": ("edgevision.bench.suites:router", "MoE decoder speed with and without the router observer"),
    "moe": ("edgevision.bench.suites:moe", "MoE decoder speed per quantisation (f32, q8_0, q4_0)"),
}
MOE_DECODERS = "synthetic/gemma4-moe-synthetic-l4-e8k2-{}.gguf"
MOE_VARIANTS = ("f32", "q8_0", "q4_0")
PROMPT = (
    "<|turn>user\nThe camera sees a person standing next to a table. On the table there is a red cup, a "
    "green bottle and two books. What do you see in the picture?<turn|>\n<|turn>model\n"
)


@dataclass(frozen=True)
class SuiteContext:
    config: Config
    models_dir: Path
    rounds: int
    quick: bool
    threads: int = 0


@dataclass
class SuiteResult:
    figures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    answer: dict[str, Any] | None = None  # one answer's stage times (e2e)
    models: list[Path] = field(default_factory=list)  # the model files measured (their sha256 go in the results)
    # figures that need the power and memory sampled through the suite (energy per answer)
    after: Callable[[dict[str, Any]], list[dict]] | None = None


def suite_function(name: str) -> Callable[[SuiteContext], SuiteResult]:
    module, function = SUITES[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelError(f"{what} {path} is missing; run 'make models' on this machine")
    return path


# --- idle ------------------------------------------------------------------------------------------------------


def idle(ctx: SuiteContext) -> SuiteResult:
    """Nothing runs for `rounds` windows; the runner's samples give power and memory at rest."""
    window = 1.0 if ctx.quick else 10.0
    starts = []
    for _ in range(ctx.rounds):
        starts.append(time.time())
        time.sleep(window)

    def after(series: dict[str, Any]) -> list[dict]:
        means = [energy_between(series, s, s + window) for s in starts]
        watts = [None if j is None else j / window for j in means]
        return [figure("idle power", "W", watts, config="board at rest")]

    return SuiteResult(notes=[f"{ctx.rounds} windows of {window:g} s"], after=after)


# --- vision ------------------------------------------------------------------------------------------------------


def vision(ctx: SuiteContext) -> SuiteResult:
    """Encode one frame through the configured tower; with TensorRT, also ONNX Runtime on its ONNX."""
    import numpy as np
    from PIL import Image

    from edgevision.vision.encoder import encode_image, open_encoder

    tower = _need(ctx.config.vision.tower, "vision tower")
    paths = {ctx.config.vision.backend: tower}
    if ctx.config.vision.backend != "onnxruntime" and tower.with_suffix(".onnx").is_file():
        paths["onnxruntime"] = tower.with_suffix(".onnx")
    encoders = {name: open_encoder(name, path, threads=ctx.config.vision.threads) for name, path in paths.items()}
    try:
        spec = next(iter(encoders.values())).spec
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (spec.image_size, spec.image_size, 3), dtype=np.uint8))
        times: dict[str, list[float]] = {name: [] for name in encoders}
        for encoder in encoders.values():
            encode_image(encoder, image)  # warm-up
        for _ in range(ctx.rounds):  # the back-ends take turns, so load hits them alike
            for name, encoder in encoders.items():
                start = time.perf_counter()
                encode_image(encoder, image)
                times[name].append((time.perf_counter() - start) * 1000)
    finally:
        for encoder in encoders.values():
            encoder.close()
    figures = [figure("encode one frame", "ms", t, config=name) for name, t in times.items()]
    figures += [
        figure("frames per second", "frames/s", [1000 / v for v in t], config=name) for name, t in times.items()
    ]
    return SuiteResult(
        figures, [f"{tower.name}: {spec.image_size} px → {spec.n_tokens} image tokens"], models=list(paths.values())
    )


# --- e2e ---------------------------------------------------------------------------------------------------------

# (figure name, record key, unit)
E2E_STAGES = (
    ("press → release (question spoken)", "recording", "s"),
    ("release → first token", "release_to_first_token", "s"),
    ("release → first audio", "release_to_first_audio", "s"),
    ("press → last audio", "total", "s"),
    ("vision encode", "vision_encode", "s"),
    ("recognition", "recognition", "s"),
    ("decode", "decode_tokens_per_s", "tok/s"),
)


def e2e(ctx: SuiteContext) -> SuiteResult:
    """`rounds` spoken questions in each mode through the daemon (edgevision.daemon.bench)."""
    from edgevision.daemon.bench import MODES, run_e2e

    report = run_e2e(ctx.config, n=ctx.rounds)
    failed = [r for r in report.records if r["answer"] is None]
    if failed:
        raise EdgevisionError(f"e2e: {len(failed)} question(s) got no answer: {failed[0]['error']}")
    figures = []
    for mode in MODES:
        records = report.by_mode(mode)
        for name, key, unit in E2E_STAGES:
            figures.append(figure(name, unit, [r["durations_s"].get(key) for r in records], config=mode))
        figures.append(
            figure("answer tokens", "tokens", [r["n_tokens"] for r in records], config=mode, better="neither")
        )
    answers = {mode: waterfall(report.by_mode(mode)) for mode in MODES}

    def after(series: dict[str, Any]) -> list[dict]:
        out = []
        for mode in MODES:
            joules = [energy_between(series, *_answer_span(r)) for r in report.by_mode(mode)]
            out.append(figure("energy per answer", "J", joules, config=mode))
            if answers[mode] is not None:
                answers[mode]["energy_j"] = energy_between(series, *_answer_span(answers[mode]["record"]))
        for answer in answers.values():
            if answer is not None:
                answer.pop("record")
        return out

    notes = [
        f"questions: {', '.join(sorted({r['question'] or '' for r in report.records}))}",
        f"scenes: {', '.join(report.images)}",
    ]
    speech, config = ctx.config.speech, ctx.config
    models = [
        *speech.recognizer.paths().values(),
        *speech.synthesizer.paths().values(),
        config.vision.tower,
        config.decoder.model,
    ]
    return SuiteResult(figures, notes, answer=answers, after=after, models=models)


def waterfall(records: list[dict]) -> dict[str, Any] | None:
    """The answer with the median release → first audio, as stage times from the press (s) and its press time."""
    timed = [r for r in records if "release_to_first_audio" in r["durations_s"]]
    if not timed:
        return None
    timed.sort(key=lambda r: r["durations_s"]["release_to_first_audio"])
    record = timed[(len(timed) - 1) // 2]
    d = record["durations_s"]
    release = d["recording"]
    events = {"press": 0.0, "release": release}
    if "release_to_first_token" in d:
        events["first token"] = release + d["release_to_first_token"]
    events["first audio"] = release + d["release_to_first_audio"]
    events["last audio"] = d["total"]
    return {
        "question": record["question"],
        "answer": record["answer"],
        "press_unix_s": _unix(record),
        "events_s": {k: round(v, 4) for k, v in events.items()},
        "record": record,
    }


def _unix(record: dict) -> float:
    return datetime.fromisoformat(record["timestamps"]["press"]).timestamp()


def _answer_span(record: dict) -> tuple[float, float]:
    start = _unix(record)
    return start, start + record["durations_s"]["total"]


# --- router and moe ------------------------------------------------------------------------------------------------


def router(ctx: SuiteContext) -> SuiteResult:
    """Decode speed of the MoE decoder with no callback and with the router observer (edgevision.moe.overhead)."""
    from edgevision.moe.overhead import measure_router

    decoder = _need(ctx.models_dir / MOE_DECODERS.format("f32"), "MoE decoder")
    tokens = 16 if ctx.quick else 64
    runs = measure_router(
        decoder, tokens=tokens, repeats=ctx.rounds, n_threads=ctx.threads or 1, variants=("plain", "observer")
    )
    figures = []
    for name, rows in runs.items():
        figures.append(figure("decode", "tok/s", [r[1] for r in rows], config=f"router {name}"))
        figures.append(figure("decode CPU time per token", "ms", [r[2] * 1000 for r in rows], config=f"router {name}"))
    return SuiteResult(figures, [f"{decoder.name}, {tokens} tokens, {ctx.threads or 1} thread(s)"], models=[decoder])


def moe(ctx: SuiteContext) -> SuiteResult:
    """Prefill and decode speed of the MoE decoder in each quantisation, interleaved round by round."""
    from contextlib import ExitStack

    from edgevision.decoder.llama import LlamaDecoder

    paths = {v: ctx.models_dir / MOE_DECODERS.format(v) for v in MOE_VARIANTS}
    paths = {v: p for v, p in paths.items() if p.is_file()}
    if not paths:
        raise ModelError(f"no MoE decoder under {ctx.models_dir / 'synthetic'}; run 'make models' on this machine")
    tokens = 16 if ctx.quick else 64
    speed: dict[str, list[float]] = {v: [] for v in paths}
    prefill: dict[str, list[float]] = {v: [] for v in paths}
    with ExitStack() as stack:
        decoders = {v: stack.enter_context(LlamaDecoder(p, n_ctx=512, n_threads=ctx.threads)) for v, p in paths.items()}
        for round_ in range(ctx.rounds + 1):  # the first round warms up
            for variant, decoder in decoders.items():
                decoder.reset()
                prompt = decoder.tokenize(PROMPT)
                start = time.perf_counter()
                decoder.prefill_tokens(prompt)
                middle = time.perf_counter()
                n = sum(1 for _ in decoder.generate(tokens, stop_on_eog=False))
                end = time.perf_counter()
                if round_:
                    prefill[variant].append(len(prompt) / (middle - start))
                    speed[variant].append((n - 1) / (end - middle))
    figures = [figure("decode", "tok/s", speed[v], config=f"moe {v}") for v in paths]
    figures += [figure("prefill", "tok/s", prefill[v], config=f"moe {v}") for v in paths]
    return SuiteResult(
        figures,
        [
            (
                f"{', '.join(p.name for p in paths.values())}: {tokens} tokens after a "
                f"{len(PROMPT.split())}-word prompt, median of {ctx.rounds}"
            ),
            "memory-capped residency is 'edgevision bench moe'",
        ],
        models=list(paths.values()),
    )
