"""Image preprocessing recorded with each vision tower and applied identically by every back-end.

A tower's ONNX file carries its preprocessing as JSON in the model's metadata under
``edgevision.preprocess``; a TensorRT plan's manifest copies it. Nothing about resizing or
normalisation is hard-coded in a back-end.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import InputError, ModelError

METADATA_KEY = "edgevision.preprocess"

# CLIP's normalisation constants (OpenAI CLIP, also used by LLaVA and MoE-LLaVA).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A photo larger than this is refused before it is decoded (its header gives the size): 50 megapixels take
# 150 MB as RGB, and larger "photos" are decompression bombs or scans no camera of ours makes.
MAX_IMAGE_PIXELS = 50_000_000
# The largest square input side a tower may declare; the preprocessed image is 12 * side**2 bytes.
MAX_TOWER_IMAGE_SIZE = 4096

RESIZE_MODES = ("crop", "pad", "squash")
PAD_ROUNDINGS = ("round", "ceil")


@dataclass(frozen=True)
class TowerSpec:
    """What a vision tower expects and produces."""

    image_size: int
    """Square input side in pixels."""
    n_tokens: int
    """Image tokens (rows) the tower outputs per image."""
    n_embd: int
    """Width of each row: the decoder's embedding width."""
    resize: str = "crop"
    """crop: shortest side to image_size then centre crop; pad: longest side then pad; squash: stretch."""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_value: tuple[int, int, int] = (122, 116, 104)
    """Padding colour for resize=pad (CLIP's mean as 8-bit RGB, as LLaVA pads)."""
    pad_rounding: str = "round"
    """resize=pad: how the scaled image's sides are rounded to pixels; "ceil" (in float32) is llama.cpp's
    mtmd letterbox, which towers exported from an mmproj GGUF use so both paths see the same pixels."""
    source: str = ""
    """Where the tower came from (e.g. "mmproj:mlp", "hf:clip+llava"), for people and manifests."""

    def __post_init__(self) -> None:
        if not 1 <= self.image_size <= MAX_TOWER_IMAGE_SIZE:
            raise ModelError(
                f"tower preprocessing: image_size {self.image_size} is outside 1 to {MAX_TOWER_IMAGE_SIZE} pixels; "
                "the tower's metadata is wrong: re-export it with the tools in tools/"
            )
        if self.n_tokens < 1 or self.n_embd < 1:
            raise ModelError(
                f"tower preprocessing: n_tokens {self.n_tokens} and n_embd {self.n_embd} must be positive; "
                "re-export the tower with the tools in tools/"
            )
        if self.resize not in RESIZE_MODES:
            raise ModelError(f"tower preprocessing: unknown resize mode {self.resize!r} (one of {RESIZE_MODES})")
        if self.pad_rounding not in PAD_ROUNDINGS:
            raise ModelError(
                f"tower preprocessing: unknown pad rounding {self.pad_rounding!r} (one of {PAD_ROUNDINGS})"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "tower") -> TowerSpec:
        try:
            raw = json.loads(text)
            return cls(
                image_size=int(raw["image_size"]),
                n_tokens=int(raw["n_tokens"]),
                n_embd=int(raw["n_embd"]),
                resize=str(raw.get("resize", "crop")),
                mean=tuple(float(v) for v in raw.get("mean", CLIP_MEAN)),
                std=tuple(float(v) for v in raw.get("std", CLIP_STD)),
                pad_value=tuple(int(v) for v in raw.get("pad_value", (122, 116, 104))),
                pad_rounding=str(raw.get("pad_rounding", "round")),
                source=str(raw.get("source", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{source}: preprocessing metadata is malformed ({exc}); re-export the tower") from exc
        except ModelError as exc:  # out of its limits: say which tower
            raise ModelError(f"{source}: {exc}") from exc


def load_image(path: str | Path):
    """Open an image file as RGB, with a clear error for anything that is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise InputError(f"image {path} {what}; give the path of a JPEG or PNG photo")
    try:
        with warnings.catch_warnings():  # Pillow warns of large images while opening; ours is the refusal below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{path} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); edgevision takes "
                    f"photos of up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: scale it down first"
                )
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:  # Pillow's own limit, above ours, met while reading the header
        raise InputError(
            f"{path} declares more pixels than Pillow will decode ({exc}); edgevision takes photos of up to "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: scale it down first"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {path} as an image ({exc.__class__.__name__}); use a JPEG or PNG file") from exc


def preprocess(image, spec: TowerSpec) -> np.ndarray:
    """PIL RGB image → float32 array of shape (1, 3, S, S), normalised as the tower expects."""
    from PIL import Image

    size = spec.image_size
    w, h = image.size
    if spec.resize == "squash":
        image = image.resize((size, size), Image.BICUBIC)
    elif spec.resize == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:  # pad
        if spec.pad_rounding == "ceil":  # as llama.cpp's img_tool::resize (PAD_CEIL) computes it
            scale32 = min(np.float32(size) / np.float32(w), np.float32(size) / np.float32(h))
            nw = max(1, min(size, int(np.ceil(np.float32(w) * scale32))))
            nh = max(1, min(size, int(np.ceil(np.float32(h) * scale32))))
        else:
            scale = size / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), spec.pad_value)
        canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
        image = canvas
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
