"""Figures of face-verification explanations: S+ / S- maps of pairs, Deletion / Insertion
curves, masking curves and per-pair examples of the ViT heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from faceaudit_jax.data.pipeline import uint8_to_float
from faceaudit_jax.explain import fv_heatmaps as fv
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


def masking_curves_figure(path: Path, curves: Mapping, num_positive: int, num_negative: int,
                          methods: Sequence[str], labels: Mapping[str, str]) -> str:
    """Two panels: recall vs masked share (TP pairs), TNR vs masked share (TN pairs).

    curves: {"positive" | "negative": {"fractions", method: {"values", "auc"}}};
    methods: the order to draw (those missing from ``curves`` are skipped;
    "random" dotted, "vit_heatmap" thick); labels: display name per method.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    panels = (("positive", f"true-positive pairs (n={num_positive}): probe masked", "recall"),
              ("negative", f"true-negative pairs (n={num_negative}): both masked", "TNR"))
    for i, (side, title, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        data = curves[side]
        for name in methods:
            if name not in data:
                continue
            style = "k:" if name == "random" else "-"
            ax.plot(data["fractions"], data[name]["values"], style, linewidth=2 if
                    name == "vit_heatmap" else 1.2,
                    label=f"{labels[name]} (AUC {data[name]['auc']:.3f})")
        ax.set_xlabel("share of masked pixels")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Deletion by descending relevance (black fill); a faster drop is better",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def pair_examples_figure(path: Path, probes, galleries, explained: Mapping, rows: Sequence[int],
                         positive: bool, method_label: str,
                         technique_labels: Mapping[str, str], fill: float = 0.0) -> str:
    """One row per pair: probe, gallery, both attention maps, the probe with the selected
    technique's mask removed (what SM scores), and the heatmap on the probe's luminance.

    probes, galleries: uint8 [P, H, W, 3]; explained: ``explain_pair_batches``
    output with maps; rows: pair indices to show; technique_labels: display
    name per mask technique (``explain.fv_heatmaps.TECHNIQUES``).
    """
    from matplotlib.figure import Figure

    rows = list(rows)
    fig = Figure(figsize=(13, 2.35 * max(len(rows), 1)))
    overlay = np.asarray(fv.overlay_on_luminance(uint8_to_float(probes[rows]),
                                                 jnp.asarray(explained["heatmap"][rows])))
    metric = "sm_plus" if positive else "sm_minus"
    candidates = fv.POSITIVE_TECHNIQUES if positive else fv.NEGATIVE_TECHNIQUES
    for r, i in enumerate(rows):
        selected = int(explained["selected"][i])
        mask = (explained["masks"][selected, i] if selected >= 0
                else np.zeros(explained["heatmap"].shape[1:], bool))
        sm_text = ", ".join(
            f"{technique_labels[t]} {explained[metric][fv.TECHNIQUES.index(t), i]:.2f}"
            for t in candidates)
        chosen = technique_labels[fv.TECHNIQUES[selected]] if selected >= 0 else "none"
        panels = [("probe", probes[i], None), ("gallery", galleries[i], None),
                  ("attention P", explained["maps_p"][i], "viridis"),
                  ("attention G", explained["maps_g"][i], "viridis"),
                  (f"probe, {chosen} removed", np.where(mask[..., None], fill, probes[i] / 255.0),
                   None),
                  ("heatmap on probe", overlay[r], None)]
        for c, (title, image, cmap) in enumerate(panels):
            ax = fig.add_subplot(len(rows), len(panels), r * len(panels) + c + 1)
            ax.imshow(image, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.text(0.01, 1 - (r + 0.5) / len(rows), f"d={explained['d'][i]:.3f}\n"
                 f"{'SM+' if positive else 'SM-'}: {sm_text}", fontsize=7, va="center",
                 rotation=90)
    kind = "true-positive" if positive else "true-negative"
    fig.suptitle(f"{kind} pairs, {method_label}", fontsize=9)
    fig.tight_layout(rect=(0.03, 0, 1, 0.97))
    return save_figure(fig, path, dpi=110)
