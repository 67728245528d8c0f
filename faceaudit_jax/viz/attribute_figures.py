"""Figures of a binary-attribute CAM audit: mean CAMs per predicted class over the mean face.

``figure2`` / ``figure3`` / ``figure4`` draw the paper's Figures 2-4 from the
running CAM sums of ``explain.attribute_audit.explain_test_set`` and the
per-model reports of ``summary.attribute_summary``; ``figure_energy`` plots
E+ / E- of both models per attribute from Table 1's rows.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from faceaudit_jax.explain import attribute_cams as attribute_cams_lib
from faceaudit_jax.summary.attribute_summary import METHOD_LABELS, model_label, row_models
from faceaudit_jax.viz.report import fmt, save_figure


def _save(fig: Figure, path: Path) -> str:
    """Save ``fig`` at ``path``; returns the file name (what results.json lists)."""
    return Path(save_figure(fig, path)).name


def _gray(image: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(image, np.float32).mean(-1), 0.0, 1.0)


def _show_mean_cam(ax, background, cam, mask_mean, text: str) -> None:
    ax.imshow(background, cmap="gray", vmin=0, vmax=1)
    if cam is not None and np.all(np.isfinite(cam)):
        ax.imshow(cam, cmap="jet", vmin=0, vmax=1, alpha=0.5, interpolation="bilinear")
        if mask_mean is not None and mask_mean.max() > 0:
            level = 0.5 if mask_mean.max() > 0.5 else 0.5 * float(mask_mean.max())
            ax.contour(mask_mean, levels=[level], colors="white", linewidths=0.8)
    else:
        ax.text(0.5, 0.5, "no such\nprediction", ha="center", va="center", color="white",
                fontsize=7, transform=ax.transAxes)
    ax.text(0.03, 0.03, text, ha="left", va="bottom", color="white", fontsize=6.5,
            transform=ax.transAxes, bbox=dict(facecolor="black", alpha=0.55, pad=1.2, lw=0))
    ax.set_xticks([])
    ax.set_yticks([])


class _Cell(NamedTuple):
    cam: Optional[np.ndarray]  # [H, W] mean CAM, None/NaN: no such prediction
    mask: Optional[np.ndarray]  # [H, W] mean attribute mask (contour)
    text: str  # shown in the cell's corner


def _cam_grid(path: Path, background: np.ndarray, cells: Sequence[Sequence[_Cell]],
              row_labels: Sequence[str], col_labels: Sequence[str], title: str) -> str:
    """A grid of mean CAMs over the mean face: row labels left, column labels on top."""
    rows, cols = len(cells), len(cells[0])
    cell = 1.25
    top, left, right = 0.75, 0.9, 0.75  # inches
    width, height = left + cols * cell + right, top + rows * cell + 0.1
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            _show_mean_cam(ax, background, cells[r][c].cam, cells[r][c].mask, cells[r][c].text)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=0.1 / height, wspace=0.04, hspace=0.04)
    fig.suptitle(title, fontsize=8, y=1 - 0.12 / height, va="top")
    bar_ax = fig.add_axes([1 - 0.6 / width, 0.15, 0.12 / width, 0.7])
    bar = fig.colorbar(cm.ScalarMappable(norm=mcolors.Normalize(0, 1), cmap="jet"), cax=bar_ax)
    bar.set_label("mean normalised CAM", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return _save(fig, path)


def _cam_means(evaluation, pair_index: int, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty sides: shown as "no such prediction"
        return attribute_cams_lib.finalize_cam_means(evaluation.sums.cams[pair_index], names)


def _background(evaluation):
    """(mean test face in grey [H, W], mean attribute masks [A, H, W])."""
    sums = evaluation.sums
    count = max(int(sums.count), 1)
    return _gray(np.asarray(sums.image_sum) / count), np.asarray(sums.mask_sum) / count


def _label(name: str) -> str:
    return name.replace("_", " ")


def _attribute_by_model_cells(evaluations, attributes, names, columns, cell) -> list[list]:
    """Rows: attributes; columns: model x `columns`; cell(model, column, attribute index)."""
    return [[cell(model, column, list(names).index(attribute))
             for model in evaluations for column in columns] for attribute in attributes]


def figure2(path: Path, evaluations, reports, pairs, main_method, attributes, names) -> str:
    """Mean CAM per predicted class and attribute, both models (the paper's Figure 2)."""
    key = f"{main_method}/predicted"
    background, mask_mean = _background(next(iter(evaluations.values())))
    means = {m: _cam_means(evaluations[m], pairs.index((main_method, "predicted")), names)
             for m in evaluations}

    def cell(model, side, a):
        count = getattr(means[model], f"num_{side}")[a]
        energy = reports[model]["energy"][key][side][a]
        return _Cell(getattr(means[model], side)[a], mask_mean[a],
                     f"n={count} E={fmt(energy, '.2f')}")

    cells = _attribute_by_model_cells(evaluations, attributes, names,
                                      ("positive", "negative"), cell)
    cols = [f"{model_label(m)}, {'z >= 0' if s == 'positive' else 'z < 0'}"
            for m in evaluations for s in ("positive", "negative")]
    return _cam_grid(path, background, cells, [_label(a) for a in attributes], cols,
                     f"Mean {METHOD_LABELS.get(main_method, main_method)} (target |z|) per "
                     "predicted class; white line: attribute mask; E: mean energy in it")


def figure3(path: Path, evaluations, reports, pairs, methods, attributes, names) -> str:
    """Mean CAMs per CAM method (rows: model x method; columns: attribute x predicted class)."""
    background, mask_mean = _background(next(iter(evaluations.values())))
    cells, row_labels = [], []
    for model in evaluations:
        for method in methods:
            means = _cam_means(evaluations[model], pairs.index((method, "predicted")), names)
            energy = reports[model]["energy"][f"{method}/predicted"]
            row = []
            for attribute in attributes:
                a = list(names).index(attribute)
                for side in ("positive", "negative"):
                    row.append(_Cell(getattr(means, side)[a], mask_mean[a],
                                     f"E={fmt(energy[side][a], '.2f')}"))
            cells.append(row)
            row_labels.append(f"{model_label(model)}\n{METHOD_LABELS.get(method, method)}")
    cols = [f"{_label(a)} {'+' if s == 'positive' else '-'}" for a in attributes
            for s in ("positive", "negative")]
    return _cam_grid(path, background, cells, row_labels, cols,
                     "Mean CAMs (target |z|) per CAM method over positively (+) and negatively "
                     "(-) predicted faces")


def figure4(path: Path, evaluations, reports, pairs, main_method, attributes, names) -> str:
    """Negatively predicted faces: positive target z vs predicted target |z| (Figure 4)."""
    background, mask_mean = _background(next(iter(evaluations.values())))
    modes = ("positive", "predicted")
    means = {(m, mode): _cam_means(evaluations[m], pairs.index((main_method, mode)), names)
             for m in evaluations for mode in modes}

    def cell(model, mode, a):
        energy = reports[model]["energy"][f"{main_method}/{mode}"]["negative"][a]
        return _Cell(means[model, mode].negative[a], mask_mean[a],
                     f"n={means[model, mode].num_negative[a]} E={fmt(energy, '.2f')}")

    cells = _attribute_by_model_cells(evaluations, attributes, names, modes, cell)
    cols = [f"{model_label(m)}, target {'z' if mode == 'positive' else '|z|'}"
            for m in evaluations for mode in modes]
    return _cam_grid(path, background, cells, [_label(a) for a in attributes], cols,
                     f"Mean {METHOD_LABELS.get(main_method, main_method)} on negatively "
                     "predicted faces (z < 0): positive target z vs predicted target |z|")


def figure_energy(path: Path, rows1: Sequence[dict], method_label: str) -> str:
    """E+ and E- of every model per attribute (with a mask), sorted by p_m."""
    rows = sorted((r for r in rows1 if r["mask_defined"]), key=lambda r: r["p_train"])
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.32 * len(rows) + 1.5), 5.2))
    axes = fig.subplots(2, 1, sharex=True)
    models = row_models(rows1[0])
    for ax, side in zip(axes, ("negative", "positive")):
        offsets = np.linspace(-0.18, 0.18, len(models)) if len(models) > 1 else [0.0]
        for offset, model, colour in zip(offsets, models, ("tab:red", "tab:blue", "tab:green")):
            values = np.array([r[model][f"energy_{side}"] for r in rows], np.float64)
            ax.bar(x + offset, np.nan_to_num(values), width=0.72 / len(models), color=colour,
                   label=model_label(model))
        uniform = np.array([r[models[0]][f"uniform_{side}"] for r in rows], np.float64)
        ax.plot(x, uniform, "k_", markersize=9, label="uniform map")
        ax.set_ylabel(f"E ({side}ly predicted)", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([f"{r['attribute'].replace('_', ' ')} ({r['p_train']:.2f})"
                             for r in rows], rotation=75, fontsize=6.5)
    fig.suptitle(f"Proportional energy of {method_label} (target |z|) in the attribute mask; "
                 "attributes sorted by p_m (in brackets)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)

