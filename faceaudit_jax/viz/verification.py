"""Figures of face-verification explanations: S+ / S- maps of pairs, Deletion / Insertion curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from faceaudit_jax.viz.report import save_figure


def saliency_figure(path: Path, rows: list, outlines=None) -> str:
    """rows: [(title, image_a, image_b, s_a, s_b)] -> A, S+_A, S-_A, B, S+_B, S-_B per row.

    ``outlines``: optional bool [H, W] mask per row, drawn as a contour on A's panels.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 2.3 * len(rows)))
    axes = fig.subplots(len(rows), 6, squeeze=False)
    for r, (title, img_a, img_b, s_a, s_b) in enumerate(rows):
        panels = []
        for name, img, s in (("A", img_a, s_a), ("B", img_b, s_b)):
            pos, neg = np.maximum(s, 0.0), np.minimum(s, 0.0)
            panels += [(f"{title}: {name}", img, None),
                       (f"S+ {name} (max {pos.max():.2f})", img, pos),
                       (f"S- {name} (min {neg.min():.2f})", img, -neg)]
        for c, (ax, (label, img, heat)) in enumerate(zip(axes[r], panels)):
            ax.imshow(img)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=max(float(heat.max()), 1e-6))
            if outlines is not None and c < 3 and outlines[r].any():
                ax.contour(outlines[r].astype(float), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def curves_figure(path: Path, results: Mapping, labels: Mapping[str, str]) -> str:
    """Deletion and insertion accuracy curves, one line per method.

    results: {method: {"deletion": (fractions, accuracy), "insertion": ...,
    "deletion_auc", "insertion_auc"}} (``metrics.perturbation.deletion_insertion``);
    labels: display name per method.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, mode in zip(axes, ("deletion", "insertion")):
        for method, res in results.items():
            fractions, accuracy = res[mode]
            ax.plot(fractions, accuracy, label=f"{labels[method]} ({100 * res[mode + '_auc']:.1f})")
        ax.set_title(f"{mode.capitalize()} (AUC %)")
        ax.set_xlabel("fraction of pixels")
        ax.set_ylabel("verification accuracy")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
