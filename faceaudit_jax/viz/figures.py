"""Figures and the audit report: patch galleries, CAM overlays, before/after
prototypes, and ``write_report`` (report.md + results.json).

Every plotting function returns a ``matplotlib.figure.Figure`` and, given
``path``, saves it as a PNG. Figures are built outside pyplot's registry, so an
audit writing many reports leaves no open figures behind; in a notebook, end a
cell with the returned figure to display it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from faceaudit_jax.regions import REGION_LABELS, REGIONS
from faceaudit_jax.viz import prototype
from faceaudit_jax.viz.report import fmt, save_figure

ImagesSource = Union[np.ndarray, Callable[[int], np.ndarray]]


def _save(fig: Figure, path: Optional[str], dpi: int) -> None:
    save_figure(fig, path or None, dpi)


def _label(name: str) -> str:
    return REGION_LABELS.get(name, name)


def _to_display(image: np.ndarray) -> np.ndarray:
    """[H, W, C] or [H, W] float image -> something imshow shows as intended."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return np.clip(image, 0.0, 1.0)


# --------------------------------------------------------------------------
# Patch gallery
# --------------------------------------------------------------------------

def _message_figure(message: str, path: Optional[str], dpi: int) -> Figure:
    fig = Figure(figsize=(6, 1.5))
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10)
    ax.axis("off")
    _save(fig, path, dpi)
    return fig


def _gallery_row(axes, label: str, top_patches, r: int, shown: int, valid: np.ndarray,
                 crop) -> None:
    """Row `r` of the gallery: its label, then its first `shown` patches (grey where none)."""
    axes[0].axis("off")
    axes[0].text(0.95, 0.5, label, ha="right", va="center", fontsize=9,
                 transform=axes[0].transAxes)
    for j in range(shown):
        ax = axes[j + 1]
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_linewidth(0.4)
            spine.set_color("#999999")
        if not valid[r, j]:
            ax.set_facecolor("#f3f3f3")
            continue
        ax.imshow(_to_display(crop(top_patches.image_ids[r, j], top_patches.rows[r, j],
                                   top_patches.cols[r, j])),
                  interpolation="nearest", cmap="gray")
        ax.set_title(f"{float(top_patches.values[r, j]):.3g}", fontsize=6, pad=2)
    if not valid[r, :shown].any():
        axes[1].text(0.0, 0.5, "  no patch", fontsize=8, va="center", color="#666666",
                     transform=axes[1].transAxes)


def plot_patch_gallery(images: ImagesSource, top_patches, patch_size: int,
                       regions: Optional[Sequence[str]] = None,
                       path: Optional[str] = None, names: Sequence[str] = REGIONS,
                       max_patches: Optional[int] = None, title: Optional[str] = None,
                       dpi: int = 150) -> Figure:
    """High-impact patches per region (FaceX's S_r), one row per region, best first.

    ``images`` is an array [N, H, W, C] indexed by image id, or a function
    ``image_id -> [H, W, C]`` (called once per distinct id shown).
    ``top_patches`` is a ``TopPatches`` ([R, k] values, image_ids, rows, cols,
    valid); ``patch_size`` is the patch side in pixels used to compute it.
    ``regions`` (names) selects and orders the rows; default: every region
    with at least one patch. Each patch is titled with its V value.
    """
    valid = np.asarray(top_patches.valid, bool)
    num_regions, k = valid.shape
    if len(names) != num_regions:
        raise ValueError(f"{len(names)} region names for top patches of {num_regions} regions")
    if regions is None:
        rows = [r for r in range(num_regions) if valid[r].any()]
    else:
        unknown = [n for n in regions if n not in names]
        if unknown:
            raise ValueError(f"unknown region(s) {unknown}; expected names from: {', '.join(names)}")
        rows = [list(names).index(n) for n in regions]
    shown = k if max_patches is None else min(k, int(max_patches))

    fetch = images if callable(images) else (lambda i, arr=np.asarray(images): arr[int(i)])
    cache: dict[int, np.ndarray] = {}

    def crop(image_id, row, col):
        image_id = int(image_id)
        if image_id not in cache:
            cache[image_id] = np.asarray(fetch(image_id))
        y, x = int(row) * patch_size, int(col) * patch_size
        return cache[image_id][y:y + patch_size, x:x + patch_size]

    if not rows:
        return _message_figure("no high-impact patches (no region received attribution)",
                               path, dpi)

    cell = 0.85
    fig = Figure(figsize=(1.4 + cell * shown, 0.35 + 1.0 * len(rows)))
    axes = fig.subplots(len(rows), shown + 1, squeeze=False,
                        gridspec_kw=dict(width_ratios=[1.6] + [1.0] * shown))
    for i, r in enumerate(rows):
        _gallery_row(axes[i], _label(names[r]), top_patches, r, shown, valid, crop)
    fig.suptitle(title or f"highest-impact {patch_size}x{patch_size} patches per region "
                          "(value V = sum of attribution on the region inside the patch)",
                 fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.5 / fig.get_figheight(), bottom=0.02,
                        wspace=0.08, hspace=0.45)
    _save(fig, path, dpi)
    return fig


# --------------------------------------------------------------------------
# CAM overlays
# --------------------------------------------------------------------------

def plot_cam_overlays(images, maps, titles: Optional[Sequence[str]] = None,
                      path: Optional[str] = None, alpha: float = 0.5, cmap: str = "jet",
                      ncols: int = 8, dpi: int = 150) -> Figure:
    """Images [n, H, W, C] above their CAM overlays (maps [n, H, W] in [0, 1]).

    Maps at another size than the images are shown stretched over them.
    ``titles`` label each instance (e.g. true and predicted class).
    """
    images = np.asarray(images)
    maps = np.asarray(maps, dtype=np.float32)
    if images.ndim != 4 or maps.ndim != 3 or images.shape[0] != maps.shape[0]:
        raise ValueError(
            f"expected images [n, H, W, C] and maps [n, H, W] with the same n; got "
            f"{images.shape} and {maps.shape}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images to overlay (n = 0)")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    cols = min(ncols, n)
    blocks = math.ceil(n / cols)
    fig = Figure(figsize=(1.9 * cols + 0.9, 3.9 * blocks + 0.3))
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    norm = mcolors.Normalize(0.0, 1.0)
    for idx in range(blocks * cols):
        block, col = divmod(idx, cols)
        top, bottom = axes[2 * block, col], axes[2 * block + 1, col]
        top.axis("off")
        bottom.axis("off")
        if idx >= n:
            continue
        image = _to_display(images[idx])
        extent = (0, image.shape[1], image.shape[0], 0)
        top.imshow(image, cmap="gray", extent=extent)
        bottom.imshow(image, cmap="gray", extent=extent)
        bottom.imshow(maps[idx], cmap=cmap, norm=norm, alpha=alpha, extent=extent,
                      interpolation="bilinear")
        if titles is not None:
            top.set_title(str(titles[idx]), fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.9, top=1 - 0.75 / fig.get_figheight(), bottom=0.02,
                        wspace=0.05, hspace=0.14)
    bar_ax = fig.add_axes([0.92, 0.1, 0.015, 0.8])
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=bar_ax)
    bar.set_label("normalised attribution", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle("images (top) and class activation maps (bottom)", fontsize=10)
    _save(fig, path, dpi)
    return fig


# --------------------------------------------------------------------------
# Before / after comparison
# --------------------------------------------------------------------------

def plot_ior_comparison(ior_a, ior_b, labels: Sequence[str] = ("before", "after"),
                        path: Optional[str] = None, title: Optional[str] = None,
                        names: Sequence[str] = REGIONS, cmap: str = prototype.DEFAULT_CMAP,
                        dpi: int = 150) -> Figure:
    """Two prototype heatmaps on one colour scale and the per-region IoR change (b - a).

    Regions absent (NaN) in either run have no bar and are marked "n/a".
    """
    a = np.asarray(ior_a, dtype=np.float64)
    b = np.asarray(ior_b, dtype=np.float64)
    if a.shape != (len(names),) or b.shape != (len(names),):
        raise ValueError(
            f"ior_a and ior_b must both be [{len(names)}]; got {a.shape} and {b.shape}")
    if len(labels) != 2:
        raise ValueError(f"labels must name the two runs; got {labels!r}")
    norm = prototype.color_scale([a, b])
    widths = [prototype.panel_width("face"), prototype.panel_width("accessories"), 0.5]
    fig = Figure(figsize=(12.5, 15.0))
    grid = fig.add_gridspec(3, 3, width_ratios=widths, height_ratios=[1.0, 1.0, 0.75],
                            left=0.07, right=0.93, top=0.94, bottom=0.08, hspace=0.2,
                            wspace=0.04)
    for row, (values, label) in enumerate(((a, labels[0]), (b, labels[1]))):
        ax_face = fig.add_subplot(grid[row, 0])
        ax_acc = fig.add_subplot(grid[row, 1])
        prototype.draw_prototype(ax_face, values, "face", norm, cmap)
        prototype.draw_prototype(ax_acc, values, "accessories", norm, cmap)
        ax_face.set_title(f"{label}: face regions", fontsize=10)
        ax_acc.set_title(f"{label}: hat and eyeglasses", fontsize=10)
    bar_ax = fig.add_subplot(grid[0:2, 2])
    colorbar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=bar_ax)
    colorbar.set_label("IoR", fontsize=9)

    ax = fig.add_subplot(grid[2, :])
    change = b - a
    x = np.arange(len(names))
    finite = np.isfinite(change)
    bar_colors = np.where(change > 0, "#c0392b", "#2c5aa0")
    ax.bar(x[finite], change[finite], color=bar_colors[finite], width=0.7)
    span = np.nanmax(np.abs(change)) if finite.any() else 1.0
    span = span if span > 0 else 1.0
    for i in np.flatnonzero(~finite):
        ax.text(i, 0.02 * span, "n/a", ha="center", va="bottom", fontsize=7, color="#666666",
                rotation=90)
    for i in np.flatnonzero(finite):
        ax.text(i, change[i] + (0.03 if change[i] >= 0 else -0.03) * span,
                f"{change[i]:+.3f}", ha="center", va="bottom" if change[i] >= 0 else "top",
                fontsize=6.5)
    ax.axhline(0.0, color="black", linewidth=0.7)
    ax.set_ylim(-1.25 * span, 1.25 * span)
    ax.set_xticks(x)
    ax.set_xticklabels([_label(n) for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"IoR change ({labels[1]} - {labels[0]})", fontsize=9)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title or f"IoR per region: {labels[0]} vs {labels[1]}", fontsize=12)
    _save(fig, path, dpi)
    return fig


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def to_json_compatible(value: Any) -> Any:
    """Numpy scalars/arrays, tuples and paths -> JSON types; NaN and inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): to_json_compatible(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_compatible(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_compatible(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "__array__"):
        return to_json_compatible(np.asarray(value))
    return str(value)


def _report_markdown(title: str, values: np.ndarray, counts: np.ndarray, ranking: Sequence,
                     relative: Mapping[str, str], extra: Optional[Mapping[str, Any]],
                     names: Sequence[str]) -> str:
    """report.md of `write_report`: the ranking table, exclusions, figures, extra results."""
    absent = [n for n, v in zip(names, values) if not np.isfinite(v)]
    lines = [f"# {title}", ""]
    lines += ["Intersection over Region (IoR, FaceX eq. 3-4): the mean share of the "
              "normalised attribution map on each region, averaged over the images where "
              "the region is present (N_r). Higher means the model looks there more.", ""]
    lines += ["## Region ranking", "", "| rank | region | IoR | images (N_r) |",
              "|---:|---|---:|---:|"]
    index = {n: i for i, n in enumerate(names)}
    for r, n, v in ranking:
        lines.append(f"| {r} | {_label(n)} (`{n}`) | {fmt(v, '.4f', 'absent')} | "
                     f"{int(counts[index[n]])} |")
    ranked = {name for _, name, _ in ranking}
    excluded = [n for n in names if n not in ranked and n not in absent]
    if excluded:
        lines += ["", "Excluded from the ranking: " + ", ".join(
            f"{_label(n)} (IoR {fmt(values[index[n]], '.4f', 'absent')})" for n in excluded) + "."]
    if absent:
        lines += ["", "Absent from every explained image (no IoR): "
                  + ", ".join(_label(n) for n in absent) + "."]
    for key, rel in relative.items():
        lines += ["", f"## {key.replace('_', ' ')}", "", f"![{key}]({rel})"]
    if extra:
        scalars = {k: v for k, v in extra.items()
                   if isinstance(v, (str, int, float, bool, np.integer, np.floating)) or v is None}
        nested = {k: v for k, v in extra.items() if k not in scalars}
        lines += ["", "## Further results", ""]
        if scalars:
            lines += ["| key | value |", "|---|---|"]
            for k, v in scalars.items():
                shown = fmt(float(v), ".4g") if isinstance(v, (float, np.floating)) else v
                lines.append(f"| {k} | {shown} |")
        if nested:
            lines += ["", "```json", json.dumps(to_json_compatible(nested), indent=2,
                                                allow_nan=False), "```"]
    lines += ["", "All values: `results.json`.", ""]
    return "\n".join(lines)


def write_report(workdir: str, ior_r, counts, ranking: Optional[Sequence] = None,
                 figure_paths: Union[Mapping[str, str], Sequence[str], None] = None,
                 extra: Optional[Mapping[str, Any]] = None,
                 names: Sequence[str] = REGIONS,
                 title: str = "FaceX audit: where the model looks") -> dict[str, str]:
    """Write ``report.md`` and ``results.json`` under ``workdir``; return their paths.

    ``ior_r`` [R] IoR per region (NaN where absent), ``counts`` [R] images per
    region (N_r), ``ranking`` the ``rank_regions`` list of (rank, name, value)
    (computed from ``ior_r`` when None), ``figure_paths`` name -> PNG path (or
    a list of paths) embedded in the page with paths relative to ``workdir``,
    ``extra`` any further JSON-compatible results (accuracy, RP, config...),
    stored under "extra" in the JSON and listed in the page. NaN is written
    as null.
    """
    from faceaudit_jax.summary.ior import rank_regions

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    values = np.asarray(ior_r, dtype=np.float64)
    counts = np.asarray(counts)
    if values.shape != (len(names),) or counts.shape != (len(names),):
        raise ValueError(
            f"ior_r and counts must both be [{len(names)}]; got {values.shape} and {counts.shape}")
    if ranking is None:
        ranking = rank_regions(values, names)
    ranking = [(int(r), str(n), float(v)) for r, n, v in ranking]
    if figure_paths is None:
        figure_paths = {}
    elif not isinstance(figure_paths, Mapping):
        figure_paths = {Path(p).stem: p for p in figure_paths}
    relative = {key: os.path.relpath(str(p), str(work)) for key, p in figure_paths.items()}
    absent = [n for n, v in zip(names, values) if not np.isfinite(v)]

    results = {
        "regions": list(names),
        "ior": {n: v for n, v in zip(names, values)},
        "counts": {n: int(c) for n, c in zip(names, counts)},
        "ranking": [{"rank": r, "region": n, "ior": v} for r, n, v in ranking],
        "absent_regions": absent,
        "figures": relative,
        "extra": dict(extra or {}),
    }
    json_path = work / "results.json"
    with open(json_path, "w") as f:
        json.dump(to_json_compatible(results), f, indent=2, allow_nan=False)
    md_path = work / "report.md"
    md_path.write_text(_report_markdown(title, values, counts, ranking, relative, extra, names))
    return {"report": str(md_path), "results": str(json_path)}


__all__ = [
    "plot_patch_gallery", "plot_cam_overlays", "plot_ior_comparison", "write_report",
    "to_json_compatible",
]


def write_audit_report(out_dir, result, source, indices: np.ndarray, *, title: str,
                       patch_size: int, extra: Optional[Mapping[str, Any]] = None) -> dict:
    """A FaceX audit's figures, report.md and results.json under ``out_dir``; returns the payload.

    ``result`` is a ``summary.audit.AuditResult`` of the images ``source`` rows
    ``indices``; the payload is ``summary.audit.audit_payload(result)`` plus
    ``extra``. Figures: prototype heatmap (titled ``title``), CAM overlays and
    the top-patch gallery of the six regions with the highest IoR.
    """
    from faceaudit_jax.summary import audit as audit_lib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"prototype": str(out / "prototype_heatmap.png"),
             "overlays": str(out / "cam_overlays.png"),
             "gallery": str(out / "patch_gallery.png")}
    prototype.plot_prototype_heatmap(result.ior, path=paths["prototype"], title=title)
    plot_cam_overlays(result.overlay_images, result.overlay_maps, result.overlay_titles,
                      path=paths["overlays"])
    gallery_regions = [r for r, _ in sorted(
        ((n, v) for n, v in zip(REGIONS, result.ior) if not np.isnan(v) and n != "background"),
        key=lambda t: -t[1])][:6]
    needed = np.unique(result.top.image_ids[result.top.valid])
    images = {int(i): np.asarray(img) for i, img in zip(
        needed, source.batch(indices[needed])["image"])} if needed.size else {}
    plot_patch_gallery(lambda i: images[int(i)], result.top, int(patch_size),
                       regions=gallery_regions, path=paths["gallery"])
    payload = {**audit_lib.audit_payload(result), **(extra or {})}
    write_report(str(out), result.ior, result.counts, result.ranking(), paths, payload)
    return payload
