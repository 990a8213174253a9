"""Make tiny synthetic models that the real native back-ends load and run.

``decoder`` writes a Gemma-4 mixture-of-experts decoder as GGUF (architecture ``gemma4``), laid out like
the real Gemma 4 26B-A4B but a few megabytes in size: every layer has a dense shared MLP beside a router
(``ffn_gate_inp``) and fused experts (``ffn_gate_up_exps``, ``ffn_down_exps``), sliding-window and full
attention layers alternate, and a small Gemma-4 style tokenizer (BPE over ``▁``-escaped text with
``<0xXX>`` byte fallback and the Gemma 4 chat and image markers) is embedded. llama.cpp loads, tokenizes
and runs it like the real model, so tests and benchmarks exercise the real native path in seconds.

The weights are random (seeded, so the same settings give a byte-identical file) and scaled so activations
stay finite; the text it generates is printable nonsense (it never emits special or byte tokens, so it runs
to max_tokens). ``router_skew`` biases each layer's router towards a
seeded ranking of its experts, so a few experts take most tokens (see ``MoeDecoderSpec.router_skew``).
``upcycle_noise`` makes the experts of a layer variations of one shared FFN, as in models whose experts were
upcycled from a dense FFN (MoE-LLaVA, LLaVA-GM); without it every expert is an independent random FFN.

    python tools/make_synthetic.py decoder --out models/ --ftype f32 q8_0 q4_0 --router-skew 1.5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

ARCH = "gemma4"
PREFERENCE_KEY = "edgevision.synthetic.expert_preference"
SKEW_KEY = "edgevision.synthetic.router_skew"
SEED_KEY = "edgevision.synthetic.seed"
UPCYCLE_KEY = "edgevision.synthetic.upcycle_noise"
TOPICS_KEY = "edgevision.synthetic.n_topics"
TOPIC_KEY = "edgevision.synthetic.token_topic"
IMAGE_CHANNEL_KEY = "edgevision.synthetic.image_channel"

# Gemma 4's special tokens. Ids 0-3 match the real tokenizer; the rest sit together here, where the real
# one has them far apart (<|turn> 105, <turn|> 106, <|image> 255999, <|image|> 258880, <image|> 258882).
# Types follow convert_hf_to_gguf.py: the markers a chat parser must see are USER_DEFINED.
SPECIAL_TOKENS: tuple[tuple[str, TokenType], ...] = (
    ("<pad>", TokenType.CONTROL),
    ("<eos>", TokenType.CONTROL),
    ("<bos>", TokenType.CONTROL),
    ("<unk>", TokenType.UNKNOWN),
    ("<mask>", TokenType.CONTROL),
    ("<|turn>", TokenType.CONTROL),  # start of turn: "<|turn>user\n"
    ("<turn|>", TokenType.CONTROL),  # end of turn; llama.cpp treats it as end of generation
    ("<|image>", TokenType.CONTROL),  # begins an image's embeddings (mtmd's img_beg for Gemma 4)
    ("<image|>", TokenType.CONTROL),  # ends them (mtmd's img_end)
    ("<|image|>", TokenType.CONTROL),  # one placeholder per image soft token
    ("<|audio>", TokenType.CONTROL),
    ("<audio|>", TokenType.CONTROL),
    ("<|audio|>", TokenType.CONTROL),
    ("<|video|>", TokenType.CONTROL),
    ("<|think|>", TokenType.CONTROL),
    ("<|channel>", TokenType.USER_DEFINED),
    ("<channel|>", TokenType.USER_DEFINED),
    ("<|tool>", TokenType.CONTROL),
    ("<tool|>", TokenType.CONTROL),
    ("<|tool_call>", TokenType.USER_DEFINED),
    ("<tool_call|>", TokenType.USER_DEFINED),
    ("<|tool_response>", TokenType.USER_DEFINED),
    ("<tool_response|>", TokenType.USER_DEFINED),
    ('<|"|>', TokenType.USER_DEFINED),
)
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# After the specials come the 256 byte-fallback tokens "<0x00>".."<0xFF>", then text tokens.
FIRST_TEXT_ID = len(SPECIAL_TOKENS) + 256

# The real template is 16 kB (tools, thinking); this keeps only its turn layout.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

SPACE = "\u2581"  # "▁", which stands for a space inside tokens
ALPHABET = SPACE + "".join(chr(c) for c in range(33, 127))
NEWLINES = ("\n", "\n\n")

# English the merges are learned from, so common words become single tokens.
CORPUS = """\
The camera sees a person standing next to a table. On the table there is a red cup, a green bottle and
two books. The person is holding a phone in the left hand. Behind them is a window with white curtains,
and the light from the window is bright. What do you see in the picture? I can see a kitchen with a
sink, a stove and a small plant on the shelf. There is a dog on the floor near the door. The dog is brown
and it is looking at the camera. Read the label on the bottle for me. The label says water, five hundred
millilitres. Is the street in front of me clear? There is a car parked on the right side of the street
and a bicycle on the left. A man is walking with a bag. The traffic light is green. Please describe the
room. It is a living room with a sofa, a lamp and a television. The walls are blue and the floor is made
of wood. There are three pictures on the wall. How many people are there? I can see four people sitting
at a table outside. They are eating and talking. One of them is wearing a hat. What colour is the shirt?
The shirt is yellow with black stripes. Where are my keys? Your keys are on the desk, next to the laptop
and the glasses. The screen shows the time: it is ten past nine in the morning.
"""

# Every token embedding carries this value (after Gemma's sqrt(n_embd) input scaling) in channel 0, and no
# layer reads or writes channel 0, so it is a constant "bias channel" only the routers read (for router_skew).
BIAS_CHANNEL_VALUE = 4.0
OUTPUT_LOGIT_STD = 3.0
TOPIC_OUTPUT_LOGIT_STD = 1.5
# With topics, each token also carries a random code in this many reserved channels, which the routers read:
# routing that depends on the token itself, with no component common to all tokens.
TOKEN_CODE_CHANNELS = 16
# Special and byte-fallback tokens get this much taken off their logits (through the bias channel), so
# generation never emits them: it runs to max_tokens and stays printable text.
SUPPRESSED_LOGIT_OFFSET = 40.0
# Gemma 4 26B-A4B rotates a quarter of each full-attention head ("proportional" rope via rope_freqs).
FULL_ROPE_FRACTION = 0.25

FTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
QUANT_BLOCK = 32


@dataclass(frozen=True)
class MoeDecoderSpec:
    """Shape and content of a synthetic Gemma-4 MoE decoder; every field is also a CLI option."""

    seed: int = field(default=0, metadata={"help": "seed for all weights; same seed, same bytes"})
    ftype: str = field(default="f32", metadata={"help": "weight type: " + ", ".join(FTYPES)})
    n_layer: int = field(default=4, metadata={"help": "decoder layers (at least 2)"})
    n_embd: int = field(default=128, metadata={"help": "hidden size (a multiple of 32)"})
    n_head: int = field(default=4, metadata={"help": "query heads per layer"})
    n_ff: int = field(default=256, metadata={"help": "width of each layer's dense shared MLP"})
    n_ff_exp: int = field(default=64, metadata={"help": "width of each expert's MLP (a multiple of 32)"})
    n_expert: int = field(default=8, metadata={"help": "experts per layer (Gemma 4 26B-A4B: 128)"})
    n_expert_used: int = field(default=2, metadata={"help": "experts each token is routed to (26B-A4B: 8)"})
    router_skew: float = field(
        default=0.0,
        metadata={
            "help": "Zipf exponent of each layer's expert preference; 0 = none, "
            "1-2 = a few experts take most tokens, 4 = nearly always the same top-k"
        },
    )
    upcycle_noise: float = field(
        default=0.0,
        metadata={
            "help": "upcycled experts: each is one shared base FFN plus this much independent perturbation "
            "(relative std); 0 = independent random experts"
        },
    )
    n_topics: int = field(
        default=0,
        metadata={
            "help": "content-dependent routing: every token belongs to one of this many topics, each with its own "
            "expert preference per layer; 0 = none (routing depends on the token and router_skew only)"
        },
    )
    topic_skew: float = field(
        default=0.0, metadata={"help": "Zipf exponent of each topic's own expert preference (with n_topics)"}
    )
    topic_persistence: float = field(
        default=0.0,
        metadata={
            "help": "logit bonus of next tokens from the current token's topic: text stays on a topic, so "
            "routing has temporal locality (with n_topics)"
        },
    )
    image_skew: float = field(
        default=0.0,
        metadata={
            "help": "Zipf exponent of the expert preference of image-like rows (rows carrying the image channel; "
            "with n_topics)"
        },
    )
    context_routing: float = field(
        default=1.0,
        metadata={
            "help": "with topics: scale of the routers' reading of the residual stream (the context, which all "
            "tokens share in part) beside the token's own code (logit std 1) and its topic"
        },
    )
    full_attention_every: int = field(
        default=2, metadata={"help": "every N-th layer uses full attention, the rest a sliding window"}
    )
    sliding_window: int = field(default=64, metadata={"help": "tokens a sliding-window layer attends to"})
    context_length: int = field(default=4096, metadata={"help": "trained context length in the metadata"})
    n_vocab: int = field(default=512, metadata={"help": "vocabulary size, special and byte tokens included"})

    # router_skew, in detail: each layer gets a seeded ranking of its experts (stored in the GGUF under
    # edgevision.synthetic.expert_preference, most preferred first), and the expert of rank r gets
    # -router_skew * ln(1 + r) added to its router logit through the bias channel. Without the
    # token-dependent part (about unit variance in logits) the router's softmax would be Zipf:
    # p(r) ~ (1 + r) ** -router_skew. Measured on CORPUS (about 500 tokens) with the defaults, 8 experts
    # and top-2, the share of routing slots taken by each layer's 2 preferred experts is: 0 -> 0.22-0.35
    # (a random router is uneven by itself), 1 -> 0.52-0.67, 2 -> 0.71-0.89, 4 -> 0.94-0.96.
    #
    # n_topics, topic_skew, topic_persistence, image_skew, in detail: channels 1..n_topics of the residual
    # stream are topic channels and channel n_topics + 1 the image channel; like channel 0 no layer reads or
    # writes them. Each token's embedding carries BIAS_CHANNEL_VALUE in the channel of its topic (a seeded
    # draw per token, stored under edgevision.synthetic.token_topic), so a router sees which topic the
    # current token is on and adds that topic's preference, -topic_skew * ln(1 + rank), for the topic's own
    # seeded ranking of the layer's experts. Different text uses different topics, so a plan learned on one
    # set of questions covers another set less well, as with real models. The output matrix gives tokens of
    # the current token's topic topic_persistence more logit: generated text stays on a topic for a while and
    # then moves on, so consecutive tokens share hot experts (temporal locality) without any one set of
    # experts being hot for everything. Image-like rows (rows carrying the image channel instead of a topic,
    # see `image_rows`) route by their own ranking with image_skew.
    #
    # upcycle_noise, in detail: sparse upcycling (MoE-LLaVA, LLaVA-GM) starts every expert of a layer as a copy
    # of the dense FFN, and training moves them apart only partly. With upcycle_noise s > 0 each expert's
    # matrices are (base + s * own) / sqrt(1 + s**2), with base one random FFN per layer (drawn like an
    # expert) and own the expert's independent draw of today's experts, so the output keeps its scale and
    # the relative distance between two experts is about s * sqrt(2 / (1 + s**2)); the per-expert output
    # scale becomes 1 + s * (u - 1) with u the independent experts' uniform(0.75, 1.25) draw.

    def __post_init__(self) -> None:
        if self.ftype not in FTYPES:
            raise ValueError(f"ftype {self.ftype!r} is not one of {', '.join(FTYPES)}")
        if self.n_layer < 2:
            raise ValueError("n_layer must be at least 2: llama.cpp's gemma4 KV cache needs two layers")
        if not 2 <= self.full_attention_every <= self.n_layer:
            raise ValueError("full_attention_every must be between 2 and n_layer so both layer kinds exist")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError("n_expert_used must be between 1 and n_expert")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        for name in ("n_embd", "n_ff", "n_ff_exp"):
            if getattr(self, name) % QUANT_BLOCK:
                raise ValueError(f"{name} must be a multiple of {QUANT_BLOCK}, the quantization block size")
        if self.router_skew < 0:
            raise ValueError("router_skew must be 0 or more")
        if self.upcycle_noise < 0:
            raise ValueError("upcycle_noise must be 0 (independent experts) or more")
        if self.context_routing < 0:
            raise ValueError("context_routing must be 0 or more")
        if self.n_topics < 0 or min(self.topic_skew, self.topic_persistence, self.image_skew) < 0:
            raise ValueError("n_topics, topic_skew, topic_persistence and image_skew must be 0 or more")
        if self.n_topics and self.n_topics + 2 > self.n_embd // 4:
            raise ValueError("n_topics must leave most of n_embd to the model: at most n_embd / 4 - 2")
        if self.n_vocab < _fixed_vocab_size() + 1:
            raise ValueError(f"n_vocab must be more than {_fixed_vocab_size()} to leave room for merges")

    @property
    def reserved_channels(self) -> int:
        """Channels only the routers (and the output matrix) read: the bias channel, then with topics one
        channel per topic and the image channel."""
        return 1 + (self.n_topics + 1 + TOKEN_CODE_CHANNELS if self.n_topics else 0)

    @property
    def image_channel(self) -> int | None:
        return self.n_topics + 1 if self.n_topics else None

    @property
    def code_channels(self) -> slice:
        """The token code's channels (empty without topics)."""
        first = self.n_topics + 2 if self.n_topics else 1
        return slice(first, self.reserved_channels)

    @property
    def head_dim_swa(self) -> int:
        return self.n_embd // self.n_head

    @property
    def head_dim_full(self) -> int:
        """Gemma 4 gives full-attention layers twice the head size (26B-A4B: 512 against 256)."""
        return 2 * self.head_dim_swa

    def is_swa(self, layer: int) -> bool:
        return (layer + 1) % self.full_attention_every != 0

    def head_dim(self, layer: int) -> int:
        return self.head_dim_swa if self.is_swa(layer) else self.head_dim_full

    def n_head_kv(self, layer: int) -> int:
        """Grouped-query attention as in 26B-A4B: more KV heads on sliding layers than on full ones."""
        return max(1, self.n_head // 2) if self.is_swa(layer) else 1


# Routing presets (see docs/moe-benchmark.md for where the target figures come from). "static" is the old
# benchmark model: one fixed preference for every token (hottest quarter of experts ~0.9 of the gate mass,
# calibration transfers perfectly). The realistic ones route by content and topic with temporal locality;
# their figures, as `edgevision bench routing` measures them, are in docs/moe-benchmark.md: realistic-0.5 meets
# the static skew (hottest quarter ~0.5-0.6) with weaker temporal locality than published, realistic-0.7 the
# temporal locality (per-layer LRU with a quarter of the experts ~0.7) with more skew than published (~0.8).
PRESETS: dict[str, dict[str, float | int]] = {
    "static": {"router_skew": 0.8},
    "realistic-0.5": {
        "n_topics": 16,
        "topic_skew": 0.6,
        "topic_persistence": 3.0,
        "context_routing": 0.3,
        "image_skew": 0.3,
    },
    "realistic-0.7": {
        "n_topics": 16,
        "topic_skew": 3.0,
        "topic_persistence": 4.0,
        "context_routing": 0.3,
        "image_skew": 0.3,
    },
}


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[TokenType]
    merges: list[str]

    def id(self, text: str) -> int:
        return self.tokens.index(text)


def _fixed_vocab_size() -> int:
    return FIRST_TEXT_ID + len(NEWLINES) + len(ALPHABET)


def build_vocab(n_vocab: int = 512) -> Vocab:
    """Specials, 256 byte-fallback tokens, the printable alphabet, then BPE merges learned on CORPUS."""
    tokens = [text for text, _ in SPECIAL_TOKENS]
    types = [kind for _, kind in SPECIAL_TOKENS]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += [*NEWLINES, *ALPHABET]
    types += [TokenType.NORMAL] * (len(NEWLINES) + len(ALPHABET))

    text = " ".join(CORPUS.split()).replace(" ", SPACE)
    words = Counter(tuple(word) for word in re.findall(f"{SPACE}?[^{SPACE}]+", text))
    known = set(tokens)
    merges = []
    while len(tokens) < n_vocab:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the corpus supports only {len(tokens)} tokens; ask for a smaller n_vocab")
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(f"{best[0]} {best[1]}")
        words = Counter({_merge(word, best): count for word, count in words.items()})
        merged = best[0] + best[1]
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
            types.append(TokenType.NORMAL)
    return Vocab(tokens, types, merges)


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class _Weights:
    """Seeded random tensors; each tensor draws from its own stream, keyed by the seed and its name.

    Channel 0 of the residual stream is the bias channel (see BIAS_CHANNEL_VALUE), and with topics the topic
    and image channels follow it (`MoeDecoderSpec.reserved_channels`): matrices that read the stream ignore
    them and matrices that write to it leave them alone, so only the routers (and the output) see them.
    """

    def __init__(self, seed: int, reserved: int = 1) -> None:
        self.seed = seed
        self.reserved = reserved  # leading channels no layer reads or writes

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(self, name: str, shape: Sequence[int], std: float) -> np.ndarray:
        return (self.rng(name).standard_normal(shape) * std).astype(np.float32)

    def reader(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """A matrix over the residual stream (last axis n_embd), giving unit-variance outputs."""
        matrix = self.normal(name, shape, shape[-1] ** -0.5)
        matrix[..., : self.reserved] = 0.0
        return matrix

    def writer(self, name: str, shape: Sequence[int]) -> np.ndarray:
        """A matrix into the residual stream (second-last axis n_embd), giving unit-variance outputs."""
        matrix = self.normal(name, shape, shape[-1] ** -0.5)
        matrix[..., : self.reserved, :] = 0.0
        return matrix


def _ones(n: int, value: float = 1.0) -> np.ndarray:
    return np.full(n, value, dtype=np.float32)


def expert_preference(spec: MoeDecoderSpec) -> np.ndarray:
    """[n_layer, n_expert]: each layer's experts, most preferred first (what router_skew favours)."""
    weights = _Weights(spec.seed)
    return np.stack(
        [weights.rng(f"blk.{il}.preference").permutation(spec.n_expert) for il in range(spec.n_layer)]
    ).astype(np.int32)


def token_topics(spec: MoeDecoderSpec, n_vocab: int) -> np.ndarray:
    """[n_vocab]: each token's topic (a seeded draw), -1 for tokens without one: special, byte and newline
    tokens (so the chat template's last token, the same for every question, sets no topic for the answer);
    all -1 without topics."""
    if not spec.n_topics:
        return np.full(n_vocab, -1, dtype=np.int32)
    topic = _Weights(spec.seed).rng("token_topic").integers(0, spec.n_topics, n_vocab).astype(np.int32)
    topic[: FIRST_TEXT_ID + len(NEWLINES)] = -1
    return topic


def topic_preference(spec: MoeDecoderSpec) -> np.ndarray:
    """[n_layer, n_topics + 1, n_expert]: per layer, each topic's experts most preferred first, then the
    image rows' ranking."""
    weights = _Weights(spec.seed)
    return np.array(
        [
            [weights.rng(f"blk.{il}.topic{t}.preference").permutation(spec.n_expert) for t in range(spec.n_topics + 1)]
            for il in range(spec.n_layer)
        ],
        dtype=np.int32,
    ).reshape(spec.n_layer, spec.n_topics + 1, spec.n_expert)


def image_rows(spec: MoeDecoderSpec, n: int, seed: int = 0) -> np.ndarray:
    """`n` image-like input rows for `spec`'s model (as `LlamaDecoder.prefill_embeddings` takes them): random
    unit-variance content, the bias channel, and the image channel where the model has one."""
    rows = np.random.default_rng([spec.seed, seed, 0x1A6E]).standard_normal((n, spec.n_embd)).astype(np.float32)
    rows[:, : spec.code_channels.start] = 0.0  # the token code's channels keep their draw: a code per row
    rows[:, 0] = BIAS_CHANNEL_VALUE
    if spec.image_channel is not None:
        rows[:, spec.image_channel] = BIAS_CHANNEL_VALUE
    return rows


def _log_rank(ranking: np.ndarray) -> np.ndarray:
    rank = np.empty(ranking.shape[-1], dtype=np.float32)
    rank[ranking] = np.arange(ranking.shape[-1])
    return np.log1p(rank)


def _router(spec: MoeDecoderSpec, weights: _Weights, il: int, preference: np.ndarray) -> np.ndarray:
    """Router rows: a unit-variance token-dependent part plus the skew, read from the bias channel.

    llama.cpp feeds the router rms_norm(x) / sqrt(n_embd), a unit vector whose channel 0 is about
    BIAS / |x|; |x| grows with depth as each block adds a unit-RMS output, so the bias weight is divided by
    the expected channel-0 share to give every layer the same skew.
    """
    router = weights.normal(f"blk.{il}.ffn_gate_inp.weight", (spec.n_expert, spec.n_embd), 1.0)
    # attention and FFN of earlier layers, and this layer's attention
    share = _bias_share(spec, blocks_before=2 * il + 1)
    router[:, 0] = -spec.router_skew * _log_rank(preference[il]) / share
    if spec.n_topics:
        router[:, spec.reserved_channels :] *= spec.context_routing
        # the token code's channels carry BIAS * z, z ~ N(0, 1 / TOKEN_CODE_CHANNELS): unit-variance logits
        router[:, spec.code_channels] /= share
        topics = topic_preference(spec)[il]
        for t in range(spec.n_topics):
            router[:, 1 + t] = -spec.topic_skew * _log_rank(topics[t]) / share
        router[:, spec.image_channel] = -spec.image_skew * _log_rank(topics[spec.n_topics]) / share
    return router


def _bias_share(spec: MoeDecoderSpec, blocks_before: int) -> float:
    """Expected value of a reserved channel (bias, topic) of the normalized residual stream after the embedding
    and this many blocks. A token carries the bias, and with topics its topic and a code of the same total size."""
    fixed = 3 if spec.n_topics else 1  # bias, topic and (in all) the token code
    moving = (spec.n_embd - spec.reserved_channels) * (1 + blocks_before)
    return BIAS_CHANNEL_VALUE / np.sqrt(fixed * BIAS_CHANNEL_VALUE**2 + moving)


def _upcycle(
    spec: MoeDecoderSpec,
    weights: _Weights,
    il: int,
    gate_up: np.ndarray,
    down_exps: np.ndarray,
    expert_scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The experts as one shared base FFN plus `upcycle_noise` times their own draws (see MoeDecoderSpec)."""
    s = spec.upcycle_noise
    norm = np.float32(1 / np.sqrt(1 + s * s))
    base_gate_up = weights.reader(f"blk.{il}.ffn_exps_base.gate_up", (2 * spec.n_ff_exp, spec.n_embd))
    base_down = weights.writer(f"blk.{il}.ffn_exps_base.down", (spec.n_embd, spec.n_ff_exp))
    gate_up = (base_gate_up + np.float32(s) * gate_up) * norm
    down_exps = (base_down + np.float32(s) * down_exps) * norm
    return gate_up.astype(np.float32), down_exps.astype(np.float32), 1 + s * (expert_scale - 1)


def _decoder_tensors(spec: MoeDecoderSpec, n_vocab: int) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(GGUF name, float32 array in numpy order, whether it is a matrix that takes the file's ftype)."""
    weights = _Weights(spec.seed, spec.reserved_channels)
    n = spec.n_embd
    preference = expert_preference(spec)
    topic = token_topics(spec, n_vocab)

    embd = weights.normal("token_embd.weight", (n_vocab, n), 1 / np.sqrt(n))
    embd[:, 1 : spec.reserved_channels] = 0.0
    embd[:, 0] = BIAS_CHANNEL_VALUE / np.sqrt(n)  # llama.cpp scales embeddings by sqrt(n_embd)
    if spec.n_topics:
        on_topic = np.flatnonzero(topic >= 0)
        embd[on_topic, 1 + topic[on_topic]] = BIAS_CHANNEL_VALUE / np.sqrt(n)
        code = weights.normal("token_code", (n_vocab, TOKEN_CODE_CHANNELS), TOKEN_CODE_CHANNELS**-0.5)
        embd[:, spec.code_channels] = BIAS_CHANNEL_VALUE * code / np.sqrt(n)
    yield "token_embd.weight", embd, True
    n_rot = int(spec.head_dim_full // 2 * FULL_ROPE_FRACTION)
    rope_freqs = np.array([1.0] * n_rot + [1e30] * (spec.head_dim_full // 2 - n_rot), dtype=np.float32)
    yield "rope_freqs.weight", rope_freqs, False

    for il in range(spec.n_layer):
        p = f"blk.{il}"
        hd = spec.head_dim(il)
        q_dim, kv_dim = spec.n_head * hd, spec.n_head_kv(il) * hd
        yield f"{p}.attn_norm.weight", _ones(n), False
        yield f"{p}.attn_q.weight", weights.reader(f"{p}.attn_q.weight", (q_dim, n)), True
        yield f"{p}.attn_k.weight", weights.reader(f"{p}.attn_k.weight", (kv_dim, n)), True
        yield f"{p}.attn_v.weight", weights.reader(f"{p}.attn_v.weight", (kv_dim, n)), True
        # Gemma 4 does not scale q.k; norm weights of hd ** -0.25 keep the scores near unit variance.
        yield f"{p}.attn_q_norm.weight", _ones(hd, hd**-0.25), False
        yield f"{p}.attn_k_norm.weight", _ones(hd, hd**-0.25), False
        yield f"{p}.attn_output.weight", weights.writer(f"{p}.attn_output.weight", (n, q_dim)), True
        yield f"{p}.post_attention_norm.weight", _ones(n), False

        yield f"{p}.ffn_norm.weight", _ones(n), False
        yield f"{p}.ffn_gate.weight", weights.reader(f"{p}.ffn_gate.weight", (spec.n_ff, n)), True
        yield f"{p}.ffn_up.weight", weights.reader(f"{p}.ffn_up.weight", (spec.n_ff, n)), True
        yield f"{p}.ffn_down.weight", weights.writer(f"{p}.ffn_down.weight", (n, spec.n_ff)), True
        yield f"{p}.post_ffw_norm_1.weight", _ones(n), False

        yield f"{p}.ffn_gate_inp.weight", _router(spec, weights, il, preference), False
        yield f"{p}.ffn_gate_inp.scale", _ones(n), False
        yield f"{p}.pre_ffw_norm_2.weight", _ones(n), False
        # ggml shape {n_embd, 2 * n_ff_exp, n_expert}: per expert, the gate rows then the up rows
        gate_up = weights.reader(f"{p}.ffn_gate_up_exps.weight", (spec.n_expert, 2 * spec.n_ff_exp, n))
        down_exps = weights.writer(f"{p}.ffn_down_exps.weight", (spec.n_expert, n, spec.n_ff_exp))
        # Gemma 4's per-expert output scale (router.per_expert_scale in the checkpoint)
        expert_scale = weights.rng(f"{p}.ffn_down_exps.scale").uniform(0.75, 1.25, spec.n_expert)
        if spec.upcycle_noise > 0:
            gate_up, down_exps, expert_scale = _upcycle(spec, weights, il, gate_up, down_exps, expert_scale)
        yield f"{p}.ffn_gate_up_exps.weight", gate_up, True
        yield f"{p}.ffn_down_exps.weight", down_exps, True
        yield f"{p}.ffn_down_exps.scale", expert_scale.astype(np.float32), False
        yield f"{p}.post_ffw_norm_2.weight", _ones(n), False
        yield f"{p}.post_ffw_norm.weight", _ones(n), False
        yield f"{p}.layer_output_scale.weight", _ones(1), False

    yield "output_norm.weight", _ones(n), False
    # with topics, a flatter output: sampled text spreads over more of the vocabulary, and so over more topics
    logit_std = TOPIC_OUTPUT_LOGIT_STD if spec.n_topics else OUTPUT_LOGIT_STD
    output = weights.reader("output.weight", (n_vocab, n)) * logit_std
    # the final norm leaves channel 0 at about its share times sqrt(n_embd)
    final_bias = _bias_share(spec, blocks_before=2 * spec.n_layer) * np.sqrt(n)
    output[:FIRST_TEXT_ID, 0] = -SUPPRESSED_LOGIT_OFFSET / final_bias
    if spec.n_topics:  # text tokens of the current token's topic get topic_persistence more logit
        text = np.flatnonzero(topic >= 0)
        output[text, 1 + topic[text]] = spec.topic_persistence / final_bias
    yield "output.weight", output, True


def _encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return array
    if qtype == GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def _add_metadata(writer: gguf.GGUFWriter, spec: MoeDecoderSpec, vocab: Vocab) -> None:
    writer.add_name(f"edgevision synthetic gemma4 moe {spec.ftype}")
    writer.add_file_type(FTYPES[spec.ftype][1])
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_expert_feed_forward_length(spec.n_ff_exp)
    writer.add_expert_count(spec.n_expert)
    writer.add_expert_used_count(spec.n_expert_used)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv([spec.n_head_kv(il) for il in range(spec.n_layer)])
    writer.add_key_length(spec.head_dim_full)
    writer.add_value_length(spec.head_dim_full)
    writer.add_key_length_swa(spec.head_dim_swa)
    writer.add_value_length_swa(spec.head_dim_swa)
    writer.add_rope_dimension_count(spec.head_dim_full)
    writer.add_rope_dimension_count_swa(spec.head_dim_swa)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_rope_freq_base_swa(10_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(spec.sliding_window)
    writer.add_sliding_window_pattern([spec.is_swa(il) for il in range(spec.n_layer)])
    writer.add_shared_kv_layers(0)
    writer.add_embedding_length_per_layer_input(0)
    writer.add_final_logit_softcapping(30.0)

    writer.add_tokenizer_model("gemma4")
    writer.add_tokenizer_pre("gemma4")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores([0.0] * len(vocab.tokens))
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_uint32(SEED_KEY, spec.seed)
    writer.add_float32(SKEW_KEY, spec.router_skew)
    if spec.upcycle_noise > 0:  # absent otherwise, so files without it keep their bytes
        writer.add_float32(UPCYCLE_KEY, spec.upcycle_noise)
    writer.add_array(PREFERENCE_KEY, expert_preference(spec).reshape(-1).tolist())
    if spec.n_topics:  # absent otherwise, so files without topics keep their bytes
        writer.add_uint32(TOPICS_KEY, spec.n_topics)
        writer.add_uint32(IMAGE_CHANNEL_KEY, spec.image_channel)
        writer.add_array(TOPIC_KEY, token_topics(spec, len(vocab.tokens)).tolist())


def write_moe_decoder(path: str | Path, spec: MoeDecoderSpec | None = None, **fields: object) -> Path:
    """Write a synthetic Gemma-4 MoE decoder GGUF to ``path`` and return it.

    ``fields`` override ``spec`` (or the defaults): ``write_moe_decoder(p, ftype="q4_0", router_skew=1.5)``.
    """
    spec = dataclasses.replace(spec or MoeDecoderSpec(), **fields)
    vocab = build_vocab(spec.n_vocab)
    qtype = FTYPES[spec.ftype][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(path, ARCH)
    try:
        _add_metadata(writer, spec, vocab)
        for name, array, is_matrix in _decoder_tensors(spec, len(vocab.tokens)):
            if is_matrix:
                writer.add_tensor(name, _encode(array, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def default_filename(spec: MoeDecoderSpec) -> str:
    skew = f"-skew{spec.router_skew:g}" if spec.router_skew else ""
    skew += f"-up{spec.upcycle_noise:g}" if spec.upcycle_noise else ""
    if spec.n_topics:
        skew += f"-t{spec.n_topics}s{spec.topic_skew:g}p{spec.topic_persistence:g}i{spec.image_skew:g}c{spec.context_routing:g}"
    return f"gemma4-moe-synthetic-l{spec.n_layer}-e{spec.n_expert}k{spec.n_expert_used}{skew}-{spec.ftype}.gguf"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_synthetic.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    decoder = commands.add_parser("decoder", help="a Gemma-4 MoE decoder GGUF for llama.cpp")
    decoder.add_argument("--out", type=Path, required=True, help="folder to write into")
    decoder.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="routing settings: "
        + "; ".join(f"{k}: {_describe(v)}" for k, v in PRESETS.items())
        + " (options given beside it win)",
    )
    for spec_field in dataclasses.fields(MoeDecoderSpec):
        flag = "--" + spec_field.name.replace("_", "-")
        if spec_field.name == "ftype":
            decoder.add_argument(
                flag,
                nargs="+",
                choices=list(FTYPES),
                default=[spec_field.default],
                help="one file per type: " + ", ".join(FTYPES),
            )
        else:
            kind = type(spec_field.default)
            # None: not given, so a preset's value or the default applies
            decoder.add_argument(
                flag, type=kind, default=None, help=f"{spec_field.metadata['help']} (default {spec_field.default})"
            )
    return parser


def _describe(settings: dict[str, float | int]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in settings.items())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = dict(PRESETS[args.preset]) if args.preset else {}
    for f in dataclasses.fields(MoeDecoderSpec):
        if f.name != "ftype" and getattr(args, f.name) is not None:
            options[f.name] = getattr(args, f.name)
    try:
        specs = [MoeDecoderSpec(ftype=ftype, **options) for ftype in args.ftype]
    except ValueError as error:
        print(f"make_synthetic.py: {error}", file=sys.stderr)
        return 2
    for spec in specs:
        path = write_moe_decoder(args.out / default_filename(spec), spec)
        print(
            f"{path}\t{path.stat().st_size} bytes\t{ARCH} {spec.ftype}, {spec.n_layer} layers, "
            f"{spec.n_expert} experts (top {spec.n_expert_used}), router_skew {spec.router_skew:g}, "
            f"upcycle_noise {spec.upcycle_noise:g}, topics {spec.n_topics} (skew {spec.topic_skew:g}, persistence "
            f"{spec.topic_persistence:g}, image skew {spec.image_skew:g}), seed {spec.seed}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
