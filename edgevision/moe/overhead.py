"""What the router observer costs: decode and prefill speed with it and without (``edgevision bench router``).

Decoders on the same model, measured interleaved in one run so machine load hits them alike: ``plain`` has
no eval callback (llama.cpp computes each graph in one go); ``callback`` has a Python callback that is asked
about every node and wants none (the price of crossing into Python per node); ``observer`` is the
`RouterObserver` (two small nodes per MoE layer read back and counted, which also splits the graph there);
``predicting`` is the `PredictingObserver` the router-aware policy uses (the router logits node per MoE
layer: the choice, the gates and the router input for predicting the next layers); ``captured`` is the same
observer with ``capture=True``: the C node filter copies the logits nodes during the decode and the observer
reads them after it (for statistics: profiles, calibration), so the decode never enters Python; ``sampled 1/4`` observes
one decode in 4 (the others run as one graph; the C filter decides which), ``captured 1/4`` both; ``policy`` is the router-aware policy as it runs: the
decoding thread copies each layer's router logits and input and queues them, and the policy's own thread
does the top-k, the cache's bookkeeping and the next layer's predicted routing (`ExpertManager.attach`),
here with room for every expert so that nothing is read or evicted. CPU time counts every thread.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from pathlib import Path

from edgevision.moe.predict import PredictingObserver
from edgevision.moe.router import RouterObserver

PROMPT = (
    "<|turn>user\nThe camera sees a person standing next to a table. On the table there is a red cup, a green "
    "bottle and two books. What do you see in the picture?<turn|>\n<|turn>model\n"
)


def _no_nodes(_tensor: int, _ask: bool) -> bool:
    return False


VARIANTS = ("plain", "callback", "observer", "predicting", "captured", "sampled 1/4", "captured 1/4", "policy")
SAMPLE_EVERY = 4


def _attach_policy(stack: ExitStack, path: Path, decoder: object, observer: PredictingObserver) -> None:
    import numpy as np

    from edgevision.moe.layout import read_layout
    from edgevision.moe.manager import ExpertManager
    from edgevision.moe.mapping import ModelMapping
    from edgevision.moe.predict import RoutePredictor

    layout = read_layout(path)
    mapping = stack.enter_context(ModelMapping(layout, decoder.mapping_base))  # type: ignore[attr-defined]
    prior = np.full((layout.n_layer, layout.n_expert), 1 / layout.n_expert)
    manager = ExpertManager(
        layout,
        mapping,
        prior,
        budget=layout.expert_total,
        predictor=RoutePredictor.from_gguf(path),
        prefetch=False,
        evict=False,
        warm=False,
        random_access=False,
    )
    stack.enter_context(manager)
    manager.attach(observer)
    manager.start()


def measure_router(
    decoder_path: Path,
    *,
    tokens: int = 64,
    repeats: int = 5,
    n_threads: int = 1,
    variants: tuple[str, ...] = ("plain", "callback", "observer"),
) -> dict[str, list[tuple[float, float, float]]]:
    """Per variant, one (prefill tok/s, decode tok/s, CPU s per decoded token) per repeat, interleaved.

    Raises AssertionError if the observer changed the generated text (it only reads; that would be a bug).
    """
    return _measure(decoder_path, tokens, repeats, n_threads, variants)[0]


def _measure(decoder_path: Path, tokens: int, repeats: int, n_threads: int, wanted: tuple[str, ...]) -> tuple:
    from edgevision.decoder.llama import LlamaDecoder

    observer = RouterObserver.for_model(decoder_path)
    every = {
        "plain": None,
        "callback": _no_nodes,
        "observer": observer,
        "predicting": PredictingObserver.for_model(decoder_path),
        "captured": PredictingObserver.for_model(decoder_path, capture=True),
        f"sampled 1/{SAMPLE_EVERY}": PredictingObserver.for_model(decoder_path, sample_every=SAMPLE_EVERY),
        f"captured 1/{SAMPLE_EVERY}": PredictingObserver.for_model(
            decoder_path, sample_every=SAMPLE_EVERY, capture=True
        ),
        "policy": PredictingObserver.for_model(decoder_path),
    }
    variants = {name: cb for name, cb in every.items() if name in wanted}
    observers = [cb for cb in variants.values() if isinstance(cb, RouterObserver)]
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    with ExitStack() as stack:
        decoders = {
            name: stack.enter_context(LlamaDecoder(decoder_path, n_ctx=512, n_threads=n_threads, cb_eval=cb))
            for name, cb in variants.items()
        }
        if "policy" in decoders:
            _attach_policy(stack, decoder_path, decoders["policy"], variants["policy"])
        prompt = next(iter(decoders.values())).tokenize(PROMPT)
        texts = {}
        for repeat in range(repeats + 1):  # the first round warms up and is not counted
            for name, decoder in decoders.items():
                decoder.reset()
                for obs in observers:
                    obs.phase = "prompt"
                start = time.perf_counter()
                decoder.prefill_tokens(prompt)
                middle, cpu_start = time.perf_counter(), time.process_time()
                for obs in observers:
                    obs.phase = "generated"
                texts[name] = "".join(decoder.generate(tokens, stop_on_eog=False))
                end, cpu_end = time.perf_counter(), time.process_time()
                if repeat:
                    n = tokens - 1  # the first token comes from the prefill's logits
                    runs[name].append((len(prompt) / (middle - start), n / (end - middle), (cpu_end - cpu_start) / n))
    if len(set(texts.values())) != 1:
        raise AssertionError("the observer changed the generated text")
    return runs, observer, prompt


def bench_router(decoder_path: Path, *, tokens: int = 64, repeats: int = 5, n_threads: int = 1) -> str:
    """Run the benchmark and return its table.

    Wall-clock speed is what a user sees, but on a shared machine it swings with other load; CPU time per
    token (the process's, so worker threads count too) is steadier, and is what the overhead column uses.
    """
    variants = VARIANTS
    runs, observer, prompt = _measure(decoder_path, tokens, repeats, n_threads, variants)

    def median(name: str, i: int) -> float:
        return statistics.median(run[i] for run in runs[name])

    lines = [
        (
            f"router observer overhead: {decoder_path.name}, {observer.n_layer} MoE layers x {observer.n_expert} "
            f"experts (top {observer.n_expert_used}); {n_threads or 'all'} thread(s), {tokens} tokens generated, "
            f"{len(prompt)}-token prompt, median of {repeats}"
        ),
        (
            f"{'variant':<12} {'decode tok/s':>12} {'vs plain':>8} {'CPU us/tok':>10} {'extra':>7} {'CPU vs plain':>12}"
            f" {'prefill tok/s':>13} {'vs plain':>8}"
        ),
    ]
    for name in variants:
        cpu, base_cpu = median(name, 2), median("plain", 2)
        lines.append(
            f"{name:<12} {median(name, 1):>12.1f} {median(name, 1) / median('plain', 1):>8.3f} {cpu * 1e6:>10.0f}"
            f" {(cpu - base_cpu) * 1e6:>+7.0f} {base_cpu / cpu:>12.3f}"
            f" {median(name, 0):>13.1f} {median(name, 0) / median('plain', 0):>8.3f}"
        )
    lines.append(
        f"observer saw {int(observer.tokens.sum())} rows; generated text identical with and without it: yes. "
        "'CPU vs plain' is the speed ratio on an otherwise idle core."
    )
    return "\n".join(lines)
