"""`edgevision plan`: what a MoE decoder needs on a board, from its GGUF header alone.

`read_header` reads the shapes and the tensor table (no weights: it works on a header-only copy of a GGUF);
`fit` works out, for a board (`BOARDS`) or explicit budgets, what stays resident (non-expert weights, the
experts the residency planner pins, GPU layers), what pages from storage, what prune-to-fit would keep, the KV
cache and the other stages' footprints, and a predicted hit rate and decode speed; `render` prints it all with
the arithmetic, and the config section to paste.

The routing it predicts with is a router profile (``edgevision calibrate``) when given, else an assumed skew:
each layer's experts are selected with Zipf shares ``p(r) ~ (1 + r) ** -skew`` over their rank r. The speed is
a bandwidth estimate: each token reads every non-expert weight and its routed experts from RAM at a share of
the board's memory bandwidth, and each miss (a routed expert not resident) reads that expert from storage, the
two not overlapping. Both are stated in the output; measure on the board (``edgevision bench e2e``).

Pure logic apart from reading the header: no llama.cpp.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgevision.errors import ConfigError, ModelError
from edgevision.moe.layout import ExpertLayout, read_layout
from edgevision.moe.residency import ResidencyPlan, plan_residency

GIB = 2**30
MIB = 2**20
PAGE = 4096
DEFAULT_SKEW = 0.6
DEFAULT_STORAGE_GBPS = 1.5  # NVMe on an Orin NX carrier, reading whole experts (MB-sized runs)


@dataclass(frozen=True)
class Stage:
    name: str
    bytes: int


@dataclass(frozen=True)
class Board:
    """A board's memory as the plan sees it. `usable` is what the kernel offers after firmware carve-outs;
    on a Jetson the GPU shares it (unified memory), so GPU buffers come out of the same bytes."""

    name: str
    usable: int
    memory_gbps: float  # peak DRAM bandwidth
    unified: bool = True
    stages: tuple[Stage, ...] = ()


_JETSON_STAGES = (
    Stage("OS and system services (JetPack, no desktop)", int(1.0 * GIB)),
    Stage("vision tower (Gemma 4's ~550M-weight encoder, FP16 TensorRT engine + activations)", int(1.1 * GIB)),
    Stage("speech: Whisper tiny.en (CTranslate2 int8) and a Piper medium voice", int(0.25 * GIB)),
    Stage("runtime: Python, ONNX Runtime/TensorRT contexts, llama.cpp compute buffers", int(0.5 * GIB)),
)

BOARDS: dict[str, Board] = {
    "orin-nx-16": Board("Jetson Orin NX 16GB", int(15.3 * GIB), 102.4, stages=_JETSON_STAGES),
    "orin-nx-8": Board("Jetson Orin NX 8GB", int(7.3 * GIB), 102.4, stages=_JETSON_STAGES),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. "Q4_K"
    shape: tuple[int, ...]  # numpy order, outermost first
    n_elements: int
    nbytes: int


@dataclass(frozen=True)
class ModelHeader:
    """What a plan needs from a GGUF header."""

    path: Path
    arch: str
    layout: ExpertLayout
    n_embd: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    key_length_swa: int
    value_length_swa: int
    swa_layers: tuple[bool, ...]  # per layer: sliding-window attention
    sliding_window: int
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def n_layer(self) -> int:
        return self.layout.n_layer

    @property
    def parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def expert_parameters(self) -> int:
        names = {t.name for t in self.layout.tensors}
        return sum(t.n_elements for t in self.tensors if t.name in names)

    @property
    def active_parameters(self) -> int:
        """Weights used per token: every non-expert weight and top-k of each layer's experts."""
        lay = self.layout
        return self.parameters - self.expert_parameters + self.expert_parameters * lay.n_expert_used // lay.n_expert

    def kv_cache_bytes(self, n_ctx: int, *, swa_full: bool = True, n_ubatch: int = 512, type_size: int = 2) -> int:
        """The KV cache llama.cpp allocates (F16). With ``swa_full`` (LlamaDecoder's default) sliding-window layers
        keep every position too; without, about window + ubatch cells, padded to 256."""
        swa_cells = n_ctx if swa_full else min(n_ctx, _pad(self.sliding_window + n_ubatch, 256))
        total = 0
        for il in range(self.n_layer):
            swa = self.swa_layers[il] if il < len(self.swa_layers) else False
            k, v = (self.key_length_swa, self.value_length_swa) if swa else (self.key_length, self.value_length)
            cells = swa_cells if swa else n_ctx
            total += self.n_head_kv[il] * (k + v) * cells * type_size
        return total


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def read_header(path: str | os.PathLike[str]) -> ModelHeader:
    """Shapes, KV-cache geometry and the tensor table of a MoE GGUF; reads no tensor data.

    Raises:
        ModelError: not a readable GGUF, or not a mixture-of-experts model.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path} does not exist; give the path of a .gguf file")
    layout = read_layout(path)
    reader = gguf.GGUFReader(path, "r")

    def value(key: str, default=None):
        f = reader.get_field(key)
        if f is None:
            return default
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.parts[i].tolist()[0] for i in f.data]
        out = f.contents()
        return out

    arch = str(value("general.architecture"))
    n_layer = layout.n_layer
    heads_kv = value(f"{arch}.attention.head_count_kv", 1)
    heads_kv = list(heads_kv) if isinstance(heads_kv, list) else [int(heads_kv)] * n_layer
    n_embd = int(value(f"{arch}.embedding_length", 0))
    n_head = int(value(f"{arch}.attention.head_count", 1))
    key = int(value(f"{arch}.attention.key_length", n_embd // max(1, n_head)))
    val = int(value(f"{arch}.attention.value_length", key))
    pattern = value(f"{arch}.attention.sliding_window_pattern", [])
    pattern = [bool(p) for p in pattern] if isinstance(pattern, list) else []
    tensors = tuple(
        TensorInfo(
            t.name,
            t.tensor_type.name,
            tuple(int(d) for d in reversed(t.shape.tolist())),
            int(t.n_elements),
            int(t.n_bytes),
        )
        for t in reader.tensors
    )
    return ModelHeader(
        path=path,
        arch=arch,
        layout=layout,
        n_embd=n_embd,
        n_head_kv=tuple(int(h) for h in heads_kv),
        key_length=key,
        value_length=val,
        key_length_swa=int(value(f"{arch}.attention.key_length_swa", key)),
        value_length_swa=int(value(f"{arch}.attention.value_length_swa", val)),
        swa_layers=tuple(pattern) or (False,) * n_layer,
        sliding_window=int(value(f"{arch}.attention.sliding_window", 0) or 0),
        tensors=tensors,
    )


# -- routing -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """How often each expert is selected: ``rate[l, e]`` expected selections per token (each MoE layer's row sums
    to top-k) and ``share`` the routing mass the residency planner ranks by."""

    source: str
    rate: np.ndarray
    share: np.ndarray


def zipf_routing(layout: ExpertLayout, skew: float) -> Routing:
    """Every layer's experts selected with Zipf shares over rank (expert id = rank: the ids do not matter)."""
    if skew < 0:
        raise ConfigError("the routing skew must be 0 (uniform) or more")
    n, k = layout.n_expert, max(1, layout.n_expert_used)
    p = (1.0 + np.arange(n)) ** -skew
    p /= p.sum()
    rate = np.minimum(1.0, k * p)  # an expert is selected at most once per token
    rate *= k / rate.sum()
    share = np.zeros((layout.n_layer, n))
    share[list(layout.moe_layers)] = p
    rates = np.zeros_like(share)
    rates[list(layout.moe_layers)] = np.minimum(1.0, rate)
    return Routing(f"assumed Zipf routing, skew {skew:g} (no router profile)", rates, share)


def profile_routing(layout: ExpertLayout, profile_path: str | os.PathLike[str]) -> Routing:
    from edgevision.moe.profile import RouterProfile

    profile = RouterProfile.load(profile_path)
    profile.check_model(layout.n_layer, layout.n_expert, layout.path.name)
    counts = profile.counts.sum(axis=0).astype(np.float64)
    per_layer = counts.sum(axis=1, keepdims=True) / max(1, profile.n_expert_used)
    rate = np.divide(counts, per_layer, out=np.zeros_like(counts), where=per_layer > 0)
    return Routing(
        f"router profile {Path(profile_path).name} ({int(profile.tokens.sum())} rows)", rate, profile.share()
    )


# -- the fit -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    header: ModelHeader
    routing: Routing
    board: Board | None
    n_ctx: int
    kv_bytes: int
    stages: tuple[Stage, ...]
    weights_budget: int  # bytes of memory for the decoder's weights (RAM, plus GPU where unified)
    paging_room: int  # of it, left to the page cache for one token's paged experts (boards, when experts page)
    gpu_budget: int
    plan: ResidencyPlan | None  # None: the non-expert weights alone do not fit
    hit_rate: float  # share of expert selections served from resident experts
    misses_per_token: float
    keep_per_layer: int | None  # prune-to-fit: experts per layer whose pruned file fits; None: all fit
    dropped_mass: float  # routing mass of the experts prune-to-fit would drop (mean over MoE layers)
    memory_gbps: float
    storage_gbps: float
    efficiency: float

    @property
    def layout(self) -> ExpertLayout:
        return self.header.layout

    @property
    def locked_bytes(self) -> int:
        """What locking the resident set takes (page-rounded, generously): the LimitMEMLOCK to give."""
        if self.plan is None:
            return 0
        # on a board the non-expert weights go to GPU buffers (gpu_layers -1) and are not locked from the file
        resident = 0 if self.board is not None else self.plan.resident_bytes
        ranges = (0 if self.board is not None else len(self.layout.other_ranges)) + len(self.plan.pinned) * 3
        return _pad(resident + self.plan.pinned_bytes + 2 * PAGE * ranges, MIB)

    def active_bytes(self) -> float:
        lay = self.layout
        per_layer = sum(lay.expert_bytes(layer) for layer in lay.moe_layers) / max(1, len(lay.moe_layers))
        return lay.other_bytes + lay.n_expert_used * len(lay.moe_layers) * per_layer

    def seconds_per_token(self, storage_gbps: float | None = None) -> tuple[float, float]:
        """(from RAM, from storage) seconds per generated token."""
        storage = self.storage_gbps if storage_gbps is None else storage_gbps
        ram = self.active_bytes() / (self.memory_gbps * 1e9 * self.efficiency)
        return ram, self.misses_per_token * self.mean_expert_bytes() / (storage * 1e9)

    def tokens_per_s(self, storage_gbps: float | None = None) -> float:
        return 1.0 / sum(self.seconds_per_token(storage_gbps))

    def mean_expert_bytes(self) -> float:
        lay = self.layout
        return sum(lay.expert_bytes(layer) for layer in lay.moe_layers) / max(1, len(lay.moe_layers))


def fit(
    header: ModelHeader,
    *,
    board: Board | None = None,
    ram: int | None = None,
    gpu: int = 0,
    n_ctx: int = 2048,
    profile: str | os.PathLike[str] | None = None,
    skew: float = DEFAULT_SKEW,
    stages: int | None = None,
    storage_gbps: float = DEFAULT_STORAGE_GBPS,
    memory_gbps: float | None = None,
    efficiency: float = 0.6,
) -> Fit:
    """Plan `header`'s model for a board (its usable memory less the other stages and the KV cache) or for an
    explicit RAM budget for the decoder's weights (`ram`), with `gpu` bytes of GPU memory for expert tensors.

    On a unified-memory board the GPU's expert tensors come out of the same DRAM: they are counted once, in
    the weights budget, and the residency planner is given the rest for RAM (it never pins a GPU layer's
    experts a second time).
    """
    if (board is None) == (ram is None):
        raise ConfigError("plan for a board (--board) or for an explicit RAM budget (--ram), not both or neither")
    layout = header.layout
    routing = profile_routing(layout, profile) if profile else zipf_routing(layout, skew)
    kv = header.kv_cache_bytes(n_ctx)
    if board is not None:
        listed = board.stages if stages is None else (Stage("other stages (given with --stages)", stages),)
        budget = board.usable - sum(s.bytes for s in listed) - kv
        bandwidth = board.memory_gbps
    else:
        listed = () if stages is None else (Stage("other stages (given with --stages)", stages),)
        budget = int(ram or 0)
        bandwidth = 102.4  # Orin NX; give --memory-gbps for another machine
    bandwidth = memory_gbps or bandwidth
    unified = board is not None and board.unified
    plan: ResidencyPlan | None = None
    capacity = budget + (0 if unified else gpu)  # RAM and GPU memory for weights, each byte counted once
    # on a board, when experts page, the page cache must hold what one token may read (pins are not reclaimable)
    paging = board is not None and layout.other_bytes + layout.expert_total > capacity
    paging_room = layout.n_expert_used * sum(layout.expert_bytes(layer) for layer in layout.moe_layers) if paging else 0
    if budget >= layout.other_bytes:
        # GPU layers first; on unified memory they are paid for out of the same budget as the RAM pins
        probe = plan_residency(layout, routing.share, ram_budget=max(budget, layout.other_bytes), gpu_budget=gpu)
        ram_budget = budget - (probe.gpu_bytes if unified else 0) - paging_room
        if ram_budget >= layout.other_bytes:
            plan = plan_residency(layout, routing.share, ram_budget=ram_budget, gpu_budget=gpu)
            if unified and plan.gpu_bytes != probe.gpu_bytes:
                plan = None
    resident = np.zeros((layout.n_layer, layout.n_expert), dtype=bool)
    if plan is not None:
        for layer in plan.gpu_layers:
            resident[layer] = True
        for layer, expert in plan.pinned:
            resident[layer, expert] = True
    moe = list(layout.moe_layers)
    selections = float(routing.rate[moe].sum())
    misses = float(routing.rate[moe][~resident[moe]].sum())
    hit = 1.0 - misses / selections if selections else 1.0

    keep, dropped = None, 0.0
    if layout.other_bytes + layout.expert_total > capacity:
        per_expert = sum(layout.expert_bytes(layer) for layer in moe)
        room = capacity - layout.other_bytes
        keep = max(0, min(layout.n_expert, room // per_expert)) if per_expert else layout.n_expert
        if keep >= layout.n_expert_used:
            ranked = np.sort(routing.share[moe], axis=1)[:, ::-1]
            dropped = float(ranked[:, keep:].sum(axis=1).mean())
    return Fit(
        header=header,
        routing=routing,
        board=board,
        n_ctx=n_ctx,
        kv_bytes=kv,
        stages=tuple(listed),
        weights_budget=budget,
        paging_room=paging_room,
        gpu_budget=gpu,
        plan=plan,
        hit_rate=hit if plan is not None else 0.0,
        misses_per_token=misses if plan is not None else float(selections),
        keep_per_layer=keep,
        dropped_mass=dropped,
        memory_gbps=bandwidth,
        storage_gbps=storage_gbps,
        efficiency=efficiency,
    )


# -- per-layer quantisation ----------------------------------------------------------------------------------

_LOWER_TYPES = ("Q3_K", "Q2_K", "IQ2_XS")


def requantize_options(fit_: Fit) -> list[tuple[str, int, int | None]]:
    """For each lower type llama-quantize can give whole expert tensors (``--tensor-type``): bytes saved per MoE
    layer (only tensors whose rows divide into the type's blocks), and how many layers to requantize so that
    every expert fits unpruned (None: even all layers are not enough)."""
    import gguf

    layout = fit_.layout
    unified = fit_.board is not None and fit_.board.unified
    capacity = fit_.weights_budget + (0 if unified else fit_.gpu_budget)
    overflow = layout.other_bytes + layout.expert_total - capacity
    infos = {t.name: t for t in fit_.header.tensors}
    out = []
    for name in _LOWER_TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        saved = 0
        for tensor in layout.layer_tensors(layout.moe_layers[0]):
            info = infos[tensor.name]
            if len(info.shape) < 3 or info.shape[-1] % block:
                continue
            smaller = info.n_elements // block * size
            saved += max(0, info.nbytes - smaller)
        layers = None
        if saved and overflow > 0:
            need = math.ceil(overflow / saved)
            layers = need if need <= len(layout.moe_layers) else None
        elif overflow <= 0:
            layers = 0
        out.append((name, saved, layers))
    return out


# -- text ----------------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB (small test models)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB or n == 0 else f"{n / MIB:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def render(fit_: Fit, *, profile: str | None = None) -> str:
    h, lay, plan = fit_.header, fit_.layout, fit_.plan
    moe = lay.moe_layers
    n_moe = len(moe)
    per_expert = fit_.mean_expert_bytes()
    lines = [
        f"{h.path.name}: {h.arch}, {h.n_layer} layers ({n_moe} MoE) of {lay.n_expert} experts, top {lay.n_expert_used}",
        (f"  weights: {_count(h.parameters)} ({_count(h.active_parameters)} per token); file {gib(lay.file_size)}"),
        (
            f"  experts: {n_moe} x {lay.n_expert} x {mb(per_expert)} = {gib(lay.expert_total)}; "
            f"other weights (always resident) {gib(lay.other_bytes)}"
        ),
        "",
    ]
    if fit_.board is not None:
        b = fit_.board
        lines.append(
            f"memory on {b.name}: {gib(b.usable)} usable{' (unified: the GPU shares it)' if b.unified else ''}"
        )
        for stage in fit_.stages:
            lines.append(f"  - {gib(stage.bytes):>10}  {stage.name}")
        lines.append(f"  - {gib(fit_.kv_bytes):>10}  KV cache, {fit_.n_ctx} tokens (F16, sliding layers kept whole)")
        lines.append(f"  = {gib(fit_.weights_budget):>10}  left for the decoder's weights")
        if fit_.paging_room:
            lines.append(
                f"    of which {gib(fit_.paging_room)} stays page cache for the experts one token may read from "
                f"storage ({lay.n_expert_used} per layer; pinned pages cannot be reclaimed)"
            )
    else:
        lines.append(f"budget for the decoder's weights: {gib(fit_.weights_budget)} RAM, {gib(fit_.gpu_budget)} GPU")
        if fit_.stages:
            lines.append(f"  (other stages, for reference: {gib(sum(s.bytes for s in fit_.stages))})")
        lines.append(f"  KV cache, {fit_.n_ctx} tokens (beside the budget): {gib(fit_.kv_bytes)}")
    lines.append("")
    if plan is None:
        lines.append(
            f"DOES NOT FIT: the non-expert weights alone take {gib(lay.other_bytes)} and must stay resident, "
            f"but only {gib(fit_.weights_budget)} is left for the decoder. Use a smaller model or context, "
            "or free memory from the other stages."
        )
        return "\n".join(lines)
    paged = lay.expert_total - plan.pinned_bytes - plan.gpu_bytes
    lines += [
        "resident:",
        f"  non-expert weights      {gib(plan.resident_bytes)} "
        + ("(GPU buffers, gpu_layers -1)" if fit_.board else "(locked)"),
        f"  GPU expert layers       {len(plan.gpu_layers)} ({gib(plan.gpu_bytes)})"
        + (f": {', '.join(map(str, plan.gpu_layers))}" if plan.gpu_layers else ""),
        f"  pinned experts          {len(plan.pinned)} of {n_moe * lay.n_expert} ({gib(plan.pinned_bytes)}, locked)",
        (
            f"pages from storage:       {n_moe * lay.n_expert - len(plan.pinned) - len(plan.gpu_layers) * lay.n_expert} "
            f"experts ({gib(max(0, paged))})"
        ),
        f"routing ({fit_.routing.source}):",
        (
            f"  resident experts carry {100 * plan.covered_mass:.1f}% of the routing mass; predicted hit rate "
            f"{100 * fit_.hit_rate:.1f}% of {lay.n_expert_used * n_moe} expert selections per token"
        ),
        f"  misses per token: {fit_.misses_per_token:.1f}",
    ]
    ram_s, storage_s = fit_.seconds_per_token()
    lines += [
        "decode speed (estimate):",
        (
            f"  from RAM:     {gib(fit_.active_bytes())} per token (non-expert + {lay.n_expert_used * n_moe} routed "
            f"experts) / ({fit_.memory_gbps:g} GB/s x {fit_.efficiency:g}) = {1000 * ram_s:.1f} ms"
        ),
        (
            f"  from storage: {fit_.misses_per_token:.1f} misses x {mb(per_expert)} = "
            f"{mb(fit_.misses_per_token * per_expert)} / {fit_.storage_gbps:g} GB/s = {1000 * storage_s:.1f} ms"
        ),
        (
            f"  = {fit_.tokens_per_s():.1f} tokens/s (no overlap assumed; storage at 0.5 GB/s: "
            f"{fit_.tokens_per_s(0.5):.1f}, at 3 GB/s: {fit_.tokens_per_s(3.0):.1f})"
        ),
        "",
    ]
    if fit_.keep_per_layer is None:
        lines.append("prune-to-fit: not needed, every expert fits resident.")
    elif fit_.keep_per_layer < lay.n_expert_used:
        lines.append(
            f"prune-to-fit: impossible; even keeping the minimum of {lay.n_expert_used} experts per layer does not "
            "fit beside the other weights."
        )
    else:
        k = fit_.keep_per_layer
        pruned = lay.other_bytes + k * per_expert * n_moe
        lines += [
            f"prune-to-fit: keep {k} of {lay.n_expert} experts per layer ({gib(pruned)} of weights, all resident);",
            f"  drops {100 * fit_.dropped_mass:.1f}% of the routing mass (by {fit_.routing.source.split(' (')[0]}).",
            "  Measure what it costs (top-1 agreement and KL on held-out prompts, image rows included):",
            f"  edgevision prune --decoder {h.path} --keep {k} --calibration calibration --tower TOWER.onnx",
        ]
    options = requantize_options(fit_)
    if fit_.keep_per_layer is not None:
        lines.append("per-layer quantisation (whole expert tensors, llama-quantize --tensor-type):")
        for name, saved, layers in options:
            if not saved:
                lines.append(f"  {name}: no expert tensor's rows divide into its blocks")
                continue
            what = f"{layers} of {n_moe} layers" if layers is not None else f"all {n_moe} layers are not enough"
            lines.append(f"  {name}: saves {mb(saved)} per layer; for every expert to fit: {what}")
    lines += [
        "",
        f"locked memory: {gib(fit_.locked_bytes)} ("
        + (
            "pinned experts; the non-expert weights are in GPU buffers"
            if fit_.board
            else "non-expert weights and pinned experts"
        )
        + f") -> systemd LimitMEMLOCK={fit_.locked_bytes} (or CAP_IPC_LOCK)",
        "",
        "config section (decoder):",
        *config_section(fit_, profile).splitlines(),
    ]
    return "\n".join(lines)


def config_section(fit_: Fit, profile: str | None = None) -> str:
    assert fit_.plan is not None
    ram = fit_.weights_budget - fit_.paging_room
    ram -= fit_.plan.gpu_bytes if fit_.board is not None and fit_.board.unified else 0
    return "\n".join(
        [
            "decoder:",
            f"  n_ctx: {fit_.n_ctx}",
            "  placement:",
            f'    ram_budget: "{ram // MIB}MiB"',
            f"    gpu_layers: {-1 if fit_.gpu_budget or fit_.board is not None else 0}",
            f'    gpu_expert_budget: "{fit_.gpu_budget // MIB}MiB"',
            f"    router_profile: {profile if profile else 'null'}",
            "    lock_resident: true",
            "    prefetch: true",
            "    online: true",
        ]
    )
