"""A router profile: how often, and with how much gate weight, each layer's router chose each expert.

Counts and mass are split by phase (`PHASES`): image rows, prompt text and generated tokens route
differently, and a residency plan may weigh them differently. Profiles are stored as JSON (small: 30 layers
x 128 experts x 3 phases is about 1 MB) so they can be read, diffed and merged without the package.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import InputError, ModelError

PHASES = ("image", "prompt", "generated")
FORMAT = "edgevision.router-profile"
VERSION = 1


@dataclass(frozen=True, eq=False)
class RouterProfile:
    """Routing statistics of one model.

    Attributes:
        model: the model they were measured on (a file name).
        counts: ``(len(PHASES), n_layer, n_expert)`` int64, times each expert was selected.
        mass: same shape, float64, the summed gate weight each expert received (per token the selected
            experts' gates sum to 1 in Gemma 4, so a layer's mass sums to its token count).
        tokens: ``(len(PHASES),)`` int64, rows observed per phase.
    """

    model: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    counts: np.ndarray
    mass: np.ndarray
    tokens: np.ndarray

    def __post_init__(self) -> None:
        shape = (len(PHASES), self.n_layer, self.n_expert)
        for name in ("counts", "mass"):
            if np.shape(getattr(self, name)) != shape:
                raise InputError(f"router profile {name} has shape {np.shape(getattr(self, name))}, expected {shape}")
        if np.shape(self.tokens) != (len(PHASES),):
            raise InputError(f"router profile tokens has shape {np.shape(self.tokens)}, expected ({len(PHASES)},)")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise InputError(f"router profile uses {self.n_expert_used} of {self.n_expert} experts per token")
        object.__setattr__(self, "counts", np.asarray(self.counts, dtype=np.int64))
        object.__setattr__(self, "mass", np.asarray(self.mass, dtype=np.float64))
        object.__setattr__(self, "tokens", np.asarray(self.tokens, dtype=np.int64))
        for name in ("counts", "mass", "tokens"):
            array = getattr(self, name)
            if not np.isfinite(array).all() or (array < 0).any():
                raise InputError(f"router profile {name} has negative or non-finite values")
            array.setflags(write=False)

    # -- derived statistics -----------------------------------------------------------------------

    def share(self, phase: str | None = None) -> np.ndarray:
        """``(n_layer, n_expert)``: each expert's fraction of its layer's gate mass, over all phases or one.
        A layer with no observations is all zeros."""
        mass = self.mass.sum(axis=0) if phase is None else self.mass[_phase_index(phase)]
        total = mass.sum(axis=1, keepdims=True)
        return np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)

    def entropy(self) -> np.ndarray:
        """``(n_layer,)`` entropy of each layer's mass share, in bits: ``log2(n_expert)`` is uniform
        routing, 0 one expert taking everything."""
        p = self.share()
        logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
        return -(p * logs).sum(axis=1) + 0.0

    def top_share(self, fraction: float) -> np.ndarray:
        """``(n_layer,)`` share of each layer's mass carried by its hottest ``ceil(fraction * n_expert)``
        experts (at least one)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = max(1, math.ceil(fraction * self.n_expert - 1e-9))
        return np.sort(self.share(), axis=1)[:, ::-1][:, :n].sum(axis=1)

    def ranking(self, phase: str | None = None) -> np.ndarray:
        """``(n_layer, n_expert)`` expert ids per layer, hottest first (by mass, then count, then id)."""
        mass = self.mass.sum(axis=0) if phase is None else self.mass[_phase_index(phase)]
        counts = self.counts.sum(axis=0) if phase is None else self.counts[_phase_index(phase)]
        ids = np.arange(self.n_expert)
        return np.stack([np.lexsort((ids, -counts[il], -mass[il])) for il in range(self.n_layer)])

    def merge(self, other: RouterProfile, weight: float = 1.0) -> RouterProfile:
        """This profile plus `weight` times `other` (e.g. a live profile onto a calibration prior); counts
        and tokens are rounded to whole numbers."""
        if (other.n_layer, other.n_expert, other.n_expert_used) != (self.n_layer, self.n_expert, self.n_expert_used):
            raise ModelError(
                f"cannot merge router profiles of different models: {self.model} ({self.n_layer} layers, "
                f"{self.n_expert} experts, top {self.n_expert_used}) and {other.model} ({other.n_layer}, "
                f"{other.n_expert}, top {other.n_expert_used})"
            )
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"merge weight must be finite and non-negative, got {weight}")
        return RouterProfile(
            model=self.model,
            n_layer=self.n_layer,
            n_expert=self.n_expert,
            n_expert_used=self.n_expert_used,
            counts=self.counts + np.rint(weight * other.counts).astype(np.int64),
            mass=self.mass + weight * other.mass,
            tokens=self.tokens + np.rint(weight * other.tokens).astype(np.int64),
        )

    def check_model(self, n_layer: int, n_expert: int, model: str = "the model") -> None:
        """Raise ModelError unless the profile was measured on a model of this shape."""
        if (n_layer, n_expert) != (self.n_layer, self.n_expert):
            raise ModelError(
                f"router profile of {self.model} has {self.n_layer} layers x {self.n_expert} experts but "
                f"{model} has {n_layer} x {n_expert}; run 'edgevision calibrate' on {model}"
            )

    # -- files ------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "phases": list(PHASES),
            "tokens": self.tokens.tolist(),
            "counts": self.counts.tolist(),
            "mass": [[[round(float(v), 6) for v in row] for row in layer] for layer in self.mass],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON (atomically: a crash leaves the old file or none)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RouterProfile:
        """Read a profile written by `save`; InputError names what is wrong with a bad file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"router profile {path} does not exist; make one with 'edgevision calibrate'") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(
                f"router profile {path} is not readable JSON ({exc}); run 'edgevision calibrate' again"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f'{path} is not an edgevision router profile (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise InputError(f"router profile {path} is version {data.get('version')}, this edgevision reads {VERSION}")
        if data.get("phases") != list(PHASES):
            raise InputError(f"router profile {path} has phases {data.get('phases')}, expected {list(PHASES)}")
        try:
            return cls(
                model=str(data["model"]),
                n_layer=int(data["n_layer"]),
                n_expert=int(data["n_expert"]),
                n_expert_used=int(data["n_expert_used"]),
                counts=np.array(data["counts"], dtype=np.int64),
                mass=np.array(data["mass"], dtype=np.float64),
                tokens=np.array(data["tokens"], dtype=np.int64),
            )
        except KeyError as exc:
            raise InputError(f"router profile {path} lacks the field {exc}; run 'edgevision calibrate' again") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"router profile {path} is malformed ({exc}); run 'edgevision calibrate' again") from exc
        except InputError as exc:
            raise InputError(f"router profile {path}: {exc}") from None

    def summary(self) -> str:
        """A per-layer table: tokens, entropy, top-10% and top-25% mass shares."""
        entropy, top10, top25 = self.entropy(), self.top_share(0.10), self.top_share(0.25)
        n10 = max(1, math.ceil(0.10 * self.n_expert - 1e-9))
        n25 = max(1, math.ceil(0.25 * self.n_expert - 1e-9))
        lines = [
            f"{self.model}: {self.n_layer} layers, {self.n_expert} experts, top {self.n_expert_used}; "
            + ", ".join(f"{n} {p} rows" for p, n in zip(PHASES, self.tokens.tolist(), strict=True)),
            f"layer  entropy (max {math.log2(self.n_expert):.2f} bits)  top-10% ({n10})  top-25% ({n25})",
        ]
        for il in range(self.n_layer):
            lines.append(f"{il:>5}  {entropy[il]:>24.2f}  {top10[il]:>13.3f}  {top25[il]:>13.3f}")
        lines.append(f" mean  {entropy.mean():>24.2f}  {top10.mean():>13.3f}  {top25.mean():>13.3f}")
        return "\n".join(lines)


def _phase_index(phase: str) -> int:
    try:
        return PHASES.index(phase)
    except ValueError:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}") from None
