"""What takes an expert llama.cpp has read out of RAM? Each release method on the real decoder, measured with
mincore (the share of the experts' whole pages still in the page cache afterwards).

    python tools/measure_eviction.py MODEL.gguf

Methods: MADV_COLD / MADV_PAGEOUT through a second mapping (what `ExpertPinner` did when unpinning),
posix_fadvise(DONTNEED) alone, MADV_PAGEOUT on llama.cpp's own mapping, and MADV_DONTNEED on llama.cpp's
mapping followed by FADV_DONTNEED (`ModelMapping.evict`). Before each, every expert is read through llama.cpp's
mapping and a few tokens are decoded.
"""

from __future__ import annotations

import ctypes
import os
import sys

import llama_cpp  # noqa: F401  - before numpy (see tools/cuda_check.py)
import numpy as np

from edgevision.decoder.llama import LlamaDecoder
from edgevision.moe.layout import read_layout
from edgevision.moe.mapping import MADV_PAGEOUT, PAGE, ModelMapping
from edgevision.moe.pinning import ExpertPinner, _libc


def main(path: str) -> int:
    layout = read_layout(path)
    experts = [(layer, e) for layer in layout.moe_layers for e in range(layout.n_expert)]
    ranges = []
    for expert in experts:
        for start, end in layout.expert_ranges(*expert):
            lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
            if lo < hi:
                ranges.append((lo, hi))
    fd = os.open(path, os.O_RDONLY)
    with LlamaDecoder(path, n_ctx=256, n_threads=1) as decoder, ModelMapping(layout, decoder.mapping_base) as mapping:

        def touch() -> None:
            for start, end in ranges:
                ctypes.string_at(decoder.mapping_base + start, end - start)
            decoder.reset()
            decoder.prefill_tokens(decoder.tokenize("The camera sees a person standing next to a table."))
            for _ in range(4):
                decoder.prefill_tokens([int(np.argmax(decoder.logits()))])

        def second_mapping(release: str) -> None:
            with ExpertPinner(layout, release=release) as pinner:
                pinner.pin(experts)  # locks (and maps) them through a second mapping
                pinner.pin([])  # unlocks and releases them

        methods = {
            "MADV_COLD via a second mapping": lambda: second_mapping("cold"),
            "MADV_PAGEOUT via a second mapping": lambda: second_mapping("pageout"),
            "posix_fadvise(DONTNEED) alone": lambda: [
                os.posix_fadvise(fd, s, e - s, os.POSIX_FADV_DONTNEED) for s, e in ranges
            ],
            "MADV_PAGEOUT on llama.cpp's mapping": lambda: [
                _libc().madvise(decoder.mapping_base + s, e - s, MADV_PAGEOUT) for s, e in ranges
            ],
            "MADV_DONTNEED on llama.cpp's mapping + FADV_DONTNEED": lambda: mapping.evict(ranges),
        }
        print(
            f"{os.path.basename(path)}: {len(experts)} experts, {sum(e - s for s, e in ranges) / 2**20:.1f} MiB of whole pages"
        )
        print(f"{'method':<54} {'resident before':>15} {'after':>7}")
        for name, method in methods.items():
            touch()
            before = mapping.resident(ranges)
            method()
            print(f"{name:<54} {100 * before:>14.1f}% {100 * mapping.resident(ranges):>6.1f}%")
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
