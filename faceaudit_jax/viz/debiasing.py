"""Figures of the noise-debiasing study (De Coninck et al., Figures 7 and 8, and the maps).

Each builder takes plain data (the run records of `experiments/debias_noise`
results, example maps) and returns a `matplotlib.figure.Figure`, saved as a
PNG when given ``path`` (via `viz.report.save_figure`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from faceaudit_jax import keys
from faceaudit_jax.mitigation import noise
from faceaudit_jax.viz.report import PathLike, save_figure

_COLOURS = ["tab:gray", "tab:green", "tab:blue", "tab:cyan", "tab:red", "tab:orange"]


def plot_gaps(runs: Mapping[str, Mapping[str, Mapping]], labels: Mapping[str, str],
              quantile: float, path: Optional[PathLike] = None) -> Figure:
    """Figure 7 analogue: gap and accuracy per confounder (x) and training set (bars).

    Args:
      runs: {confounder: {method: run record with "gap", "accuracy" and optional
        "gap_std" / "accuracy_std" (error bars: s.d. over repeated trainings)}}.
      labels: legend text per method; quantile: the main q (title).
    """
    confounders = list(runs)
    methods = list(runs[confounders[0]])
    width = 0.8 / len(methods)
    x = np.arange(len(confounders))
    fig = Figure(figsize=(max(6.0, 1.9 * len(confounders)), 6.0))
    axes = [fig.add_subplot(2, 1, i + 1) for i in range(2)]
    for j, method in enumerate(methods):
        for ax, key in zip(axes, ("gap", "accuracy")):
            records = [runs[c][method] for c in confounders]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, [r[key] for r in records], width,
                   yerr=[r.get(f"{key}_std", 0.0) for r in records], capsize=2,
                   error_kw={"elinewidth": 0.8}, label=labels[method],
                   color=_COLOURS[j % len(_COLOURS)])
    axes[0].set_ylabel("gap |men - women|")
    axes[0].set_ylim(0.0, 1.35)  # headroom for the legend
    axes[1].set_ylabel("accuracy")
    axes[1].set_ylim(0.0, 1.0)
    axes[1].axhline(0.5, color="black", linewidth=0.5, linestyle=":")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels([c.replace("_", " ") for c in confounders])
    axes[0].legend(fontsize=7, ncol=3, loc="upper center")
    axes[0].set_title(f"Gender classifiers: debiasing at q = {quantile}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return fig


def plot_sweep(sweep: Sequence[Mapping], original_gap: float, balanced_gap: float, title: str,
               path: Optional[PathLike] = None) -> Figure:
    """Figure 8 analogue: gap and accuracies against the quantile q of one augmentation.

    sweep: rows with "quantile", "gap", "accuracy", "men", "women" (and optional
    "<key>_std"); the original / balanced gaps are drawn as reference lines.
    """
    qs = [r["quantile"] for r in sweep]
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for key, style in (("gap", "o-"), ("accuracy", "s-"), ("men", "^--"), ("women", "v--")):
        std = [r.get(f"{key}_std", 0.0) for r in sweep]
        ax.errorbar(qs, [r[key] for r in sweep], yerr=std if any(std) else None, fmt=style,
                    capsize=3, label=key)
    ax.axhline(original_gap, color="tab:gray", linestyle=":", label="gap, original")
    ax.axhline(balanced_gap, color="tab:green", linestyle=":", label="gap, balanced")
    ax.set_xlabel("quantile q (the top 1 - q of pixels altered)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return fig


def augmented_examples(image: np.ndarray, general: np.ndarray, specific: np.ndarray, q: float,
                       methods: Sequence[tuple[str, str]], key: jax.Array, noise_std: float,
                       mask_fill: float) -> list[np.ndarray]:
    """One image [H, W, 3] in [0, 1] under each (scope, mode) augmentation at quantile q.

    Eager library calls: no compile per method for a one-image figure.
    """
    selection = np.asarray(noise.quantile_mask(jnp.asarray(general), q))
    out = []
    for scope, mode in methods:
        chosen = selection if scope == "general" else np.asarray(
            noise.quantile_mask(jnp.asarray(specific), q))
        batch = jnp.asarray(image[None])
        if mode == "noise":
            altered = noise.apply_noise(key, batch, jnp.asarray(chosen), float(noise_std))
        else:
            altered = noise.apply_mask(batch, jnp.asarray(chosen), float(mask_fill))
        out.append(np.asarray(altered)[0])
    return out


def plot_maps(examples: Mapping[str, Mapping], q: float, methods: Mapping[str, tuple[str, str]],
              noise_std: float, mask_fill: float, path: Optional[PathLike] = None) -> Figure:
    """Per confounder (row): the general map, its top-(1 - q) selection on an example
    training image, that image's specific map, and the augmented image per method.

    Args:
      examples: {confounder: {"image": uint8 [H, W, 3], "general_map": [H, W],
        "specific_map": [H, W]}}.
      methods: {column label: (scope, mode)}; the noise key of a row is
        `jax.random.key(keys.name_hash("figure", confounder))`.
    """
    columns = ["general map", f"general top {round((1 - q) * 100)}%", "image",
               "specific map"] + list(methods)
    confounders = list(examples)
    fig = Figure(figsize=(1.6 * len(columns), 1.75 * len(confounders) + 0.3))
    for i, confounder in enumerate(confounders):
        ex = examples[confounder]
        image = ex["image"].astype(np.float32) / 255.0
        general, specific = ex["general_map"], ex["specific_map"]
        selection = np.asarray(noise.quantile_mask(jnp.asarray(general), q))
        shaded = image * np.where(selection[..., None], 1.0, 0.35)
        key = jax.random.key(keys.name_hash("figure", confounder))
        augmented = augmented_examples(image, general, specific, q, list(methods.values()), key,
                                       noise_std, mask_fill)
        panels = [(general, "inferno"), (shaded, None), (image, None), (specific, "inferno")]
        panels += [(a, None) for a in augmented]
        for j, (panel, cmap) in enumerate(panels):
            ax = fig.add_subplot(len(confounders), len(columns), i * len(columns) + j + 1)
            ax.imshow(np.clip(panel, 0, 1), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(confounder.replace("_", " "), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return fig


__all__ = ["augmented_examples", "plot_gaps", "plot_maps", "plot_sweep"]
