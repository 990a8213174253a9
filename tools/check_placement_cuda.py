"""On a CUDA build (a Jetson, or any CUDA machine): the decoder placement with GPU layers, checked end to end.

Makes the synthetic Gemma-4 MoE of the tests (4 layers x 8 experts, Q8_0), plans it with a GPU budget of two
layers' expert tensors and a RAM budget for a few more experts, loads it through `DecoderPlacement` as the
product does, and checks:

1. llama.cpp's own loader log: the CPU-side layers' expert tensors are "overridden to CPU", the GPU layers'
   are not, and a CUDA buffer holds weights;
2. no expert of a GPU layer is pinned in RAM (each byte is counted once), and the pins are locked;
3. the first greedy tokens match a CPU-only load of the same file (GPU kernels round differently, so only the
   start is compared, as the `board` test in tests/test_moe_residency.py does).

    python tools/check_placement_cuda.py            # prints PASS or what failed; exit status 0 or 1

Not run on the development machine (no GPU): there it stops at the refusal a CPU-only build gives.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

PROMPT = "The camera sees a person standing next to a table."


def _greedy(decoder, n: int = 8) -> list[int]:
    decoder.prefill_tokens(decoder.tokenize(PROMPT))
    out = []
    for _ in range(n):
        token = int(np.argmax(decoder.logits()))
        out.append(token)
        decoder.prefill_tokens([token])
    return out


def main() -> int:
    import make_synthetic

    from edgevision.config import PlacementSettings
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.errors import EdgevisionError
    from edgevision.moe.layout import read_layout
    from edgevision.moe.placement import DecoderPlacement

    with tempfile.TemporaryDirectory() as tmp:
        model = make_synthetic.write_moe_decoder(Path(tmp) / "moe.gguf", ftype="q8_0", router_skew=1.5, n_ff_exp=256)
        layout = read_layout(model)
        with LlamaDecoder(model, n_ctx=256, n_threads=1, n_gpu_layers=0) as cpu:
            baseline = _greedy(cpu)
        settings = PlacementSettings(
            ram_budget=str(layout.other_bytes + 4 * layout.expert_bytes(0)),
            gpu_expert_budget=str(2 * layout.layer_bytes(0)),
            online=False,
            prefetch=False,
        )
        try:
            placement = DecoderPlacement.open(model, settings, n_ctx=256)
        except EdgevisionError as error:
            print(f"cannot check here: {error}")
            return 1
        problems = []
        try:
            with placement.loading():
                decoder = LlamaDecoder(model, n_ctx=256, n_threads=1, **placement.decoder_options())
            try:
                placement.start(decoder)
                plan, placed = placement.plan, placement.placed
                print(placement.describe())
                cpu_layers = [layer for layer in layout.moe_layers if layer not in plan.gpu_layers]
                if len(plan.gpu_layers) != 2:
                    problems.append(f"{len(plan.gpu_layers)} GPU layers planned, not 2")
                for tensor in layout.tensors:
                    where = placed.overridden.get(tensor.name)
                    if tensor.layer in cpu_layers and where != "CPU":
                        problems.append(f"{tensor.name} of a CPU layer is in {where or 'its default buffer'}")
                    if tensor.layer in plan.gpu_layers and where is not None:
                        problems.append(f"{tensor.name} of a GPU layer was overridden to {where}")
                if not any(name.startswith("CUDA") for name in placed.buffers):
                    problems.append(f"no CUDA buffer holds weights: {placed.buffers}")
                if any(layer in plan.gpu_layers for layer, _ in plan.pinned):
                    problems.append("an expert of a GPU layer is pinned in RAM as well")
                if placement.status()["locked_bytes"] < plan.pinned_bytes:
                    problems.append("the pinned experts are not locked")
                tokens = _greedy(decoder)
                if tokens[:4] != baseline[:4]:
                    problems.append(f"greedy start differs from the CPU load: {tokens} vs {baseline}")
            finally:
                decoder.close()
        finally:
            placement.close()
    print("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
