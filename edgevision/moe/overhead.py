"""What the router observer costs: decode and prefill speed with it and without (``edgevision bench router``).

Three decoders on the same model, measured interleaved in one run so machine load hits them alike:
``plain`` has no eval callback (llama.cpp computes each graph in one go); ``callback`` has a Python callback
that is asked about every node and wants none (the price of crossing into Python per node); ``observer`` is
the `RouterObserver` (two small nodes per MoE layer read back and counted, which also splits the graph there).
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from pathlib import Path

from edgevision.moe.router import RouterObserver

PROMPT = (
    "<|turn>user\nThe camera sees a person standing next to a table. On the table there is a red cup, a green "
    "bottle and two books. What do you see in the picture?<turn|>\n<|turn>model\n"
)


def _no_nodes(_tensor: int, _ask: bool) -> bool:
    return False


def bench_router(decoder_path: Path, *, tokens: int = 64, repeats: int = 3, n_threads: int = 0) -> str:
    """Run the benchmark and return its table."""
    from edgevision.decoder.llama import LlamaDecoder

    observer = RouterObserver.for_model(decoder_path)
    variants = {"plain": None, "callback": _no_nodes, "observer": observer}
    decode: dict[str, list[float]] = {name: [] for name in variants}
    prefill: dict[str, list[float]] = {name: [] for name in variants}
    with ExitStack() as stack:
        decoders = {
            name: stack.enter_context(LlamaDecoder(decoder_path, n_ctx=512, n_threads=n_threads, cb_eval=cb))
            for name, cb in variants.items()
        }
        prompt = decoders["plain"].tokenize(PROMPT)
        texts = {}
        for repeat in range(repeats + 1):  # the first round warms up and is not counted
            for name, decoder in decoders.items():
                decoder.reset()
                observer.phase = "prompt"
                start = time.perf_counter()
                decoder.prefill_tokens(prompt)
                middle = time.perf_counter()
                observer.phase = "generated"
                texts[name] = "".join(decoder.generate(tokens, stop_on_eog=False))
                end = time.perf_counter()
                if repeat:
                    prefill[name].append(len(prompt) / (middle - start))
                    decode[name].append((tokens - 1) / (end - middle))
    if len(set(texts.values())) != 1:
        raise AssertionError("the observer changed the generated text")  # it only reads; this would be a bug

    base_decode, base_prefill = statistics.median(decode["plain"]), statistics.median(prefill["plain"])
    lines = [
        (
            f"router observer overhead: {decoder_path.name}, {observer.n_layer} MoE layers x {observer.n_expert} "
            f"experts (top {observer.n_expert_used}); {tokens} tokens generated, {len(prompt)}-token prompt, "
            f"median of {repeats}"
        ),
        f"{'variant':<10} {'decode tok/s':>12} {'vs plain':>9} {'us/token':>9} {'prefill tok/s':>14} {'vs plain':>9}",
    ]
    for name in variants:
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        extra_us = (1 / d - 1 / base_decode) * 1e6
        lines.append(
            f"{name:<10} {d:>12.1f} {d / base_decode:>9.3f} {extra_us:>+9.0f} {p:>14.1f} {p / base_prefill:>9.3f}"
        )
    lines.append(f"observer saw {int(observer.tokens.sum())} rows; generated text identical with and without it: yes")
    return "\n".join(lines)
