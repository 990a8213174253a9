"""The router heat-map: a picture of a `RouterProfile`, layers down, experts across.

Each cell is the expert's share of its layer's gate mass (all phases), on a log colour scale so that both
a dominant expert and the long tail show; beside each row are the layer's entropy and the share of mass
carried by its hottest 10% and 25% of experts. Small panels below repeat the map per phase (image, prompt,
generated), since a plan made from text alone can miss the experts images use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from edgevision.moe.profile import PHASES, RouterProfile


def draw_heatmap(profile: RouterProfile, path: str | os.PathLike[str]) -> Path:
    """Write the heat-map of `profile` as a PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    share = profile.share()
    n_layer, n_expert = share.shape
    floor = 0.1 / (n_expert * max(1, int(profile.tokens.sum())))
    norm = LogNorm(vmin=max(floor, 1e-4), vmax=1.0)
    phases = [p for p in PHASES if profile.tokens[PHASES.index(p)] > 0]

    width = min(16.0, 4.0 + 0.09 * n_expert)
    main_height = min(9.0, 1.2 + 0.28 * n_layer)
    sub_height = main_height * 0.6 if phases else 0.0
    fig = plt.figure(figsize=(width, main_height + sub_height + 0.8), dpi=100)
    grid = fig.add_gridspec(
        2 if phases else 1,
        max(1, len(phases)),
        height_ratios=[main_height, sub_height] if phases else [1],
        hspace=0.45,
        wspace=0.25,
    )
    ax = fig.add_subplot(grid[0, :])
    image = ax.imshow(np.maximum(share, norm.vmin), aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    entropy, top10, top25 = profile.entropy(), profile.top_share(0.10), profile.top_share(0.25)
    ax.set_yticks(range(n_layer))
    ax.set_yticklabels([str(il) for il in range(n_layer)], fontsize=7 if n_layer > 16 else 9)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(range(n_layer))
    right.set_yticklabels(
        [f"H {entropy[il]:.2f}  10% {top10[il]:.2f}  25% {top25[il]:.2f}" for il in range(n_layer)],
        fontsize=7 if n_layer > 16 else 9,
        family="monospace",
    )
    ax.set_title(
        f"{profile.model}: router mass share per layer ({int(profile.tokens.sum())} rows; "
        f"entropy H in bits, max {math.log2(n_expert):.2f}; mean top-10% {top10.mean():.2f}, "
        f"top-25% {top25.mean():.2f})",
        fontsize=9,
    )
    colorbar = fig.colorbar(image, ax=[ax, right], location="left", pad=0.06, fraction=0.02)
    colorbar.set_label("share of layer's gate mass", fontsize=8)

    for i, phase in enumerate(phases):
        sub = fig.add_subplot(grid[1, i])
        sub.imshow(
            np.maximum(profile.share(phase), norm.vmin), aspect="auto", cmap="magma", norm=norm, interpolation="nearest"
        )
        sub.set_title(f"{phase} ({int(profile.tokens[PHASES.index(phase)])} rows)", fontsize=8)
        sub.set_xlabel("expert", fontsize=7)
        sub.tick_params(labelsize=6)
        if i == 0:
            sub.set_ylabel("layer", fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
