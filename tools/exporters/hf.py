"""Hugging Face CLIP vision checkpoints + LLaVA projector weights → `ClipTower`; and a tiny seeded
checkpoint of that shape for tests.

A checkpoint directory holds ``config.json`` (a CLIPVisionConfig, or a CLIPConfig with ``vision_config``)
and ``model.safetensors`` with ``vision_model.*`` tensors (CLIPVisionModel or CLIPModel); an optional
``preprocessor_config.json`` gives the normalisation. The projector file holds LLaVA's
``model.mm_projector.{0,2}.{weight,bias}`` (MoE-LLaVA / LLaVA-GM training output, converted to
safetensors) or transformers' ``multi_modal_projector.linear_{1,2}.*``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgevision.errors import ModelError
from exporters.clip import ClipLayer, ClipTower
from exporters.mmproj import MmprojError

_ACTS = {
    "quick_gelu": "gelu_quick",
    "gelu": "gelu_erf",
    "gelu_pytorch_tanh": "gelu",
    "gelu_new": "gelu",
    "silu": "silu",
}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}
    except Exception as exc:  # safetensors raises its own untyped errors for bad headers
        raise ModelError(f"{path} is not a readable safetensors file ({exc}); convert .bin weights first") from exc


def _projector(path: Path) -> tuple[tuple[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]:
    t = _read_safetensors(path)
    for first, second in (
        ("mm_projector.0", "mm_projector.2"),
        ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),
    ):
        names = {k.split(first)[0] for k in t if k.endswith(f"{first}.weight")}
        for prefix in names:
            if f"{prefix}{second}.weight" in t:
                return (
                    (t[f"{prefix}{first}.weight"], t.get(f"{prefix}{first}.bias")),
                    (t[f"{prefix}{second}.weight"], t.get(f"{prefix}{second}.bias")),
                )
    raise MmprojError(f"{path}: no 2-layer LLaVA projector (mm_projector.0/.2 or multi_modal_projector.linear_1/_2)")


def load(checkpoint: Path, projector: Path, *, feature_layer: int = -2) -> ClipTower:
    checkpoint = Path(checkpoint)
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{checkpoint} has no config.json; point at a Hugging Face CLIP checkpoint directory")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = config.get("vision_config", config)
    t = _read_safetensors(checkpoint / "model.safetensors")
    pre = "vision_model."
    n_layer = int(config["num_hidden_layers"])
    run = n_layer + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 0 < run <= n_layer:
        raise MmprojError(f"feature layer {feature_layer} is outside a {n_layer}-block tower")
    act = _ACTS.get(config.get("hidden_act", "quick_gelu"))
    if act is None:
        raise MmprojError(f"{config_path}: hidden_act {config.get('hidden_act')!r} is not supported")

    def pair(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        key = f"{pre}{name}.weight"
        if key not in t:
            raise MmprojError(f"{checkpoint}: tensor {key} is missing")
        return t[key], t.get(f"{pre}{name}.bias")

    layers = []
    for il in range(run):
        p = f"encoder.layers.{il}"
        layers.append(
            ClipLayer(
                ln1=pair(f"{p}.layer_norm1"), q=pair(f"{p}.self_attn.q_proj"), k=pair(f"{p}.self_attn.k_proj"),
                v=pair(f"{p}.self_attn.v_proj"), o=pair(f"{p}.self_attn.out_proj"), ln2=pair(f"{p}.layer_norm2"),
                up=pair(f"{p}.mlp.fc1"), down=pair(f"{p}.mlp.fc2"),
            )
        )  # fmt: skip
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pp = checkpoint / "preprocessor_config.json"
    if pp.is_file():
        raw = json.loads(pp.read_text(encoding="utf-8"))
        mean, std = tuple(raw.get("image_mean", mean)), tuple(raw.get("image_std", std))
    mm0, mm2 = _projector(Path(projector))
    return ClipTower(
        image_size=int(config["image_size"]),
        n_head=int(config["num_attention_heads"]),
        eps=float(config.get("layer_norm_eps", 1e-5)),
        act=act,
        patch_w=t[f"{pre}embeddings.patch_embedding.weight"],
        patch_b=t.get(f"{pre}embeddings.patch_embedding.bias"),
        class_embd=t[f"{pre}embeddings.class_embedding"],
        pos=t[f"{pre}embeddings.position_embedding.weight"],
        pre_ln=pair("pre_layrnorm"),
        post_ln=None,  # LLaVA reads hidden_states[feature_layer], before CLIP's post-LayerNorm
        layers=layers,
        mm0=mm0,
        mm2=mm2,
        proj_act="gelu_erf",  # LLaVA's projector is nn.GELU()
        mean=mean,
        std=std,
        source="hf:clip+llava",
        metadata={"edgevision.source_file": checkpoint.name},
    )


def write_tiny_checkpoint(
    directory: Path,
    *,
    n_embd: int = 128,
    seed: int = 0,
    image_size: int = 32,
    patch: int = 8,
    width: int = 32,
    n_head: int = 4,
    n_layer: int = 3,
    n_ff: int = 64,
) -> tuple[Path, Path]:
    """A seeded CLIPVisionModel checkpoint (config.json + model.safetensors) and an mm_projector file in
    ``directory``; returns (checkpoint directory, projector file)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def lin(out_f: int, in_f: int, name: str, into: dict) -> None:
        into[f"{name}.weight"] = (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)
        into[f"{name}.bias"] = (0.02 * rng.standard_normal(out_f)).astype(np.float32)

    def ln(name: str, into: dict) -> None:
        into[f"{name}.weight"] = (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)
        into[f"{name}.bias"] = (0.02 * rng.standard_normal(width)).astype(np.float32)

    n_pos = (image_size // patch) ** 2 + 1
    t: dict[str, np.ndarray] = {
        "vision_model.embeddings.class_embedding": rng.standard_normal(width).astype(np.float32),
        "vision_model.embeddings.patch_embedding.weight": (
            rng.standard_normal((width, 3, patch, patch)) / np.sqrt(3 * patch * patch)
        ).astype(np.float32),
        "vision_model.embeddings.position_embedding.weight": (0.5 * rng.standard_normal((n_pos, width))).astype(
            np.float32
        ),
    }
    ln("vision_model.pre_layrnorm", t)
    ln("vision_model.post_layernorm", t)
    for il in range(n_layer):
        p = f"vision_model.encoder.layers.{il}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin(width, width, f"{p}.self_attn.{proj}", t)
        ln(f"{p}.layer_norm1", t)
        ln(f"{p}.layer_norm2", t)
        lin(n_ff, width, f"{p}.mlp.fc1", t)
        lin(width, n_ff, f"{p}.mlp.fc2", t)
    save_file(t, str(directory / "model.safetensors"))
    config = {
        "model_type": "clip_vision_model",
        "architectures": ["CLIPVisionModel"],
        "hidden_size": width,
        "intermediate_size": n_ff,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "image_size": image_size,
        "patch_size": patch,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": width,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    proj: dict[str, np.ndarray] = {}
    lin(n_embd, width, "model.mm_projector.0", proj)
    lin(n_embd, n_embd, "model.mm_projector.2", proj)
    projector = directory / "mm_projector.safetensors"
    save_file(proj, str(projector))
    return directory, projector
