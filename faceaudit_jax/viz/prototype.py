"""FaceX's abstract face prototype, coloured by region IoR (the paper's Figure 1).

Two drawings built procedurally from matplotlib patches (no image assets):

* the *face* panel holds the face regions: background, skin, nose, eyes,
  brows, ears, earrings, mouth, lips, hair, neck, necklace and cloth;
* the *accessories* panel shows the same head, in neutral grey, wearing a hat
  and eyeglasses, the two regions that would hide face regions if drawn on
  the first face.

Each region is filled with the colour of its IoR_r on a blue (low) to red
(high) colour map, with a colour bar and a label "name / value" joined to the
region by a leader line. Regions that were never present (NaN) are grey,
hatched and labelled "absent".

Left/right follow the image: ``l_eye``, ``l_brow``, ``l_ear`` are drawn on the
left of the picture (the viewer's left), as the parse maps are indexed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib import patches as mpatches
from matplotlib.figure import Figure

from faceaudit_jax.regions import NUM_REGIONS, REGION_ID, REGION_LABELS, REGIONS

DEFAULT_CMAP = "coolwarm"
ABSENT_COLOR = "#c8c8c8"
NEUTRAL_COLOR = "#efefef"
EDGE_COLOR = "#3a3a3a"

# Drawing box of one panel (face units): the background rectangle; labels go
# in the margins on either side.
BOX_W, BOX_H = 10.0, 12.0
PANEL_MARGIN = {"face": 3.9, "accessories": 2.7}


def panel_width(panel: str) -> float:
    """Width of a panel in face units (drawing box plus label margins)."""
    return BOX_W + 2 * PANEL_MARGIN[panel]


# --------------------------------------------------------------------------
# Geometry (face units, y up)
# --------------------------------------------------------------------------

def _ellipse_points(cx, cy, w, h, n=80, t0=0.0, t1=2 * np.pi):
    t = np.linspace(t0, t1, n)
    return np.stack([cx + 0.5 * w * np.cos(t), cy + 0.5 * h * np.sin(t)], axis=1)


def _face_outline(cx=5.0, cy=6.7, w=4.3, h=5.9, n=120):
    """Egg-shaped face: the lower half narrows towards the chin."""
    t = np.linspace(0, 2 * np.pi, n)
    s = np.sin(t)
    narrowing = np.where(s < 0, 1.0 - 0.22 * s * s, 1.0)
    return np.stack([cx + 0.5 * w * np.cos(t) * narrowing, cy + 0.5 * h * s], axis=1)


def _almond(cx, cy, w, h, n=40):
    """Eye shape: an upper and a lower arc meeting at the corners."""
    x = np.linspace(-0.5 * w, 0.5 * w, n)
    upper = 0.5 * h * (1 - (2 * x / w) ** 2) ** 0.8
    lower = -0.38 * h * (1 - (2 * x / w) ** 2)
    top = np.stack([cx + x, cy + upper], axis=1)
    bottom = np.stack([cx + x[::-1], cy + lower[::-1]], axis=1)
    return np.concatenate([top, bottom])


def _arc_band(cx, cy, w, h, thickness, t0, t1, n=50):
    """A curved band (brow, necklace) between two parallel elliptic arcs."""
    outer = _ellipse_points(cx, cy, w, h, n, t0, t1)
    inner = _ellipse_points(cx, cy, w - 2 * thickness, h - 2 * thickness, n, t0, t1)[::-1]
    return np.concatenate([outer, inner])


def _brow(cx, cy, w, mirror):
    x = np.linspace(-0.5, 0.5, 30)
    arch = 0.28 * (1 - (2 * x) ** 2) + (0.1 * x if mirror else -0.1 * x)
    thick = 0.24 - 0.1 * (x if mirror else -x)
    top = np.stack([cx + w * x, cy + arch + 0.5 * thick], axis=1)
    bottom = np.stack([cx + w * x[::-1], cy + arch[::-1] - 0.5 * thick[::-1]], axis=1)
    return np.concatenate([top, bottom])


def _upper_lip(cx, cy, w):
    x = np.linspace(-0.5, 0.5, 41)
    # Cupid's bow on top, a straight mouth line below.
    top = 0.32 - 0.34 * np.abs(2 * x) ** 2.2 - 0.09 * np.exp(-(x / 0.07) ** 2) \
        + 0.05 * np.exp(-((np.abs(x) - 0.16) / 0.08) ** 2)
    upper = np.stack([cx + w * x, cy + np.maximum(top, 0.0)], axis=1)
    lower = np.stack([cx + w * x[::-1], cy + np.zeros_like(x)], axis=1)
    return np.concatenate([upper, lower])


def _lower_lip(cx, cy, w):
    x = np.linspace(-0.5, 0.5, 41)
    depth = 0.42 * (1 - np.abs(2 * x) ** 2.2)
    top = np.stack([cx + w * x, cy + np.zeros_like(x)], axis=1)
    bottom = np.stack([cx + w * x[::-1], cy - depth[::-1]], axis=1)
    return np.concatenate([top, bottom])


def _hair_shape():
    arc = _ellipse_points(5.0, 7.0, 5.6, 7.2, 70, 0.0, np.pi)  # right -> top -> left
    left_side = np.array([[2.2, 6.6], [2.05, 5.2], [2.35, 4.2], [3.2, 4.5], [3.0, 6.2]])
    right_side = np.array([[7.0, 6.2], [6.8, 4.5], [7.65, 4.2], [7.95, 5.2], [7.8, 6.6]])
    return np.concatenate([arc, left_side, right_side])


def _cloth():
    return np.array([[0.4, 0.0], [0.7, 1.7], [1.6, 2.45], [3.55, 2.95], [5.0, 1.55],
                     [6.45, 2.95], [8.4, 2.45], [9.3, 1.7], [9.6, 0.0]])


def _neck():
    return np.array([[3.75, 1.2], [3.85, 4.3], [6.15, 4.3], [6.25, 1.2]])


def _hat():
    """Rounded crown sitting on the brim."""
    return np.concatenate([_ellipse_points(5.0, 9.15, 4.8, 3.5, 50, 0.0, np.pi),
                           np.array([[2.6, 9.1], [7.4, 9.1]])])


def _lens(cx, cy, w=1.45, h=1.05):
    """Rounded-rectangle lens."""
    return mpatches.FancyBboxPatch((cx - w / 2, cy - h / 2), w, h,
                                   boxstyle="round,pad=0.0,rounding_size=0.32")


@dataclass(frozen=True)
class _Part:
    region: str
    make: Callable[[], mpatches.Patch]
    anchor: tuple[float, float]          # point inside the region for the leader line


def _poly(points):
    return lambda: mpatches.Polygon(points, closed=True)


def _face_parts() -> list[_Part]:
    """Face panel, in drawing order (later parts on top)."""
    return [
        _Part("background", lambda: mpatches.Rectangle((0, 0), BOX_W, BOX_H), (9.5, 11.3)),
        _Part("hair", _poly(_hair_shape()), (3.0, 9.6)),
        _Part("cloth", _poly(_cloth()), (1.7, 1.2)),
        _Part("neck", _poly(_neck()), (4.3, 2.6)),
        _Part("neck_l", _poly(_arc_band(5.0, 3.75, 2.5, 2.3, 0.17, np.pi * 1.08, np.pi * 1.92)),
              (5.0, 2.68)),
        _Part("l_ear", lambda: mpatches.Ellipse((2.75, 6.55), 0.75, 1.5), (2.62, 6.7)),
        _Part("r_ear", lambda: mpatches.Ellipse((7.25, 6.55), 0.75, 1.5), (7.38, 6.7)),
        _Part("ear_r", lambda: mpatches.Circle((2.72, 5.55), 0.2), (2.72, 5.55)),
        _Part("ear_r", lambda: mpatches.Circle((7.28, 5.55), 0.2), (7.28, 5.55)),
        _Part("skin", _poly(_face_outline()), (3.55, 5.4)),
        _Part("l_brow", _poly(_brow(4.05, 7.85, 1.35, mirror=False)), (3.75, 7.95)),
        _Part("r_brow", _poly(_brow(5.95, 7.85, 1.35, mirror=True)), (6.25, 7.95)),
        _Part("l_eye", _poly(_almond(4.05, 7.2, 1.05, 0.5)), (3.9, 7.22)),
        _Part("r_eye", _poly(_almond(5.95, 7.2, 1.05, 0.5)), (6.1, 7.22)),
        _Part("nose", _poly(np.array([[4.9, 7.0], [5.1, 7.0], [5.5, 5.75], [5.3, 5.5],
                                       [4.7, 5.5], [4.5, 5.75]])), (5.15, 6.0)),
        _Part("mouth", lambda: mpatches.Ellipse((5.0, 4.6), 1.45, 0.32), (4.75, 4.6)),
        _Part("u_lip", _poly(_upper_lip(5.0, 4.72, 1.75)), (5.45, 4.9)),
        _Part("l_lip", _poly(_lower_lip(5.0, 4.5, 1.6)), (5.35, 4.27)),
    ]


def _accessory_parts() -> list[_Part]:
    """Accessories panel: a neutral head with hat and eyeglasses."""
    neutral = {"hair", "neck", "cloth", "skin", "l_ear", "r_ear", "l_eye", "r_eye",
               "l_brow", "r_brow", "nose", "mouth", "u_lip", "l_lip"}
    base = [p for p in _face_parts() if p.region in neutral]
    base = [_Part("neutral", p.make, p.anchor) for p in base]
    return base + [
        _Part("hat", _poly(_hat()), (6.0, 10.2)),
        _Part("hat", lambda: mpatches.Ellipse((5.0, 9.05), 6.6, 0.8), (6.8, 9.0)),
        _Part("eye_g", lambda: _lens(4.05, 7.15), (6.45, 7.45)),
        _Part("eye_g", lambda: _lens(5.95, 7.15), (6.45, 7.45)),
        _Part("eye_g", lambda: mpatches.Rectangle((4.75, 7.3), 0.5, 0.1), (5.0, 7.35)),
    ]


# Label slots: region -> (side, label y). Chosen so leader lines do not cross.
_FACE_LABELS = {
    "hair": ("left", 11.0), "l_brow": ("left", 9.4), "l_eye": ("left", 8.1),
    "l_ear": ("left", 6.8), "ear_r": ("left", 5.5), "skin": ("left", 4.2),
    "mouth": ("left", 3.0), "neck": ("left", 1.9), "cloth": ("left", 0.6),
    "background": ("right", 11.0), "r_brow": ("right", 9.4), "r_eye": ("right", 8.1),
    "r_ear": ("right", 6.8), "nose": ("right", 5.7), "u_lip": ("right", 4.6),
    "l_lip": ("right", 3.5), "neck_l": ("right", 2.3),
}
_ACCESSORY_LABELS = {"hat": ("left", 10.6), "eye_g": ("right", 7.8)}

FACE_PANEL_REGIONS = tuple(_FACE_LABELS)
ACCESSORY_PANEL_REGIONS = tuple(_ACCESSORY_LABELS)
assert set(FACE_PANEL_REGIONS) | set(ACCESSORY_PANEL_REGIONS) == set(REGIONS)


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------

def _as_region_values(ior_r) -> np.ndarray:
    values = np.asarray(ior_r, dtype=np.float64)
    if values.shape != (NUM_REGIONS,):
        raise ValueError(
            f"ior_r must hold one value per region, shape ({NUM_REGIONS},); got {values.shape}")
    return values


def color_scale(ior_values: Sequence[np.ndarray], vmin=None, vmax=None) -> mcolors.Normalize:
    """A shared Normalize over the finite values of one or more IoR vectors.

    Defaults to the finite min and max; (0, 1) when nothing is finite; a
    degenerate range is widened so a single value still gets a colour.
    """
    finite = np.concatenate([np.asarray(v, np.float64).ravel() for v in ior_values])
    finite = finite[np.isfinite(finite)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
    if hi <= lo:
        pad = max(abs(lo) * 0.05, 1e-3)
        lo, hi = lo - pad, hi + pad
    return mcolors.Normalize(vmin=lo, vmax=hi)


def _format_value(value: float, fmt: str) -> str:
    return "absent" if np.isnan(value) else format(value, fmt)


def draw_prototype(ax, ior_r, panel: str = "face", norm: Optional[mcolors.Normalize] = None,
                   cmap=DEFAULT_CMAP, labels: bool = True, fontsize: float = 8.0,
                   value_fmt: str = ".3f") -> None:
    """Draw one prototype panel ("face" or "accessories") on ``ax``, coloured by ``ior_r`` [19]."""
    values = _as_region_values(ior_r)
    if panel not in ("face", "accessories"):
        raise ValueError(f"unknown prototype panel {panel!r}; expected 'face' or 'accessories'")
    norm = norm if norm is not None else color_scale([values])
    cmap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    parts = _face_parts() if panel == "face" else _accessory_parts()
    slots = _FACE_LABELS if panel == "face" else _ACCESSORY_LABELS
    for z, part in enumerate(parts):
        patch = part.make()
        if part.region == "neutral":
            patch.set(facecolor=NEUTRAL_COLOR, edgecolor="#9a9a9a", linewidth=0.6)
        else:
            value = values[REGION_ID[part.region]]
            if np.isnan(value):
                patch.set(facecolor=ABSENT_COLOR, edgecolor=EDGE_COLOR, hatch="////",
                          linewidth=0.7)
            else:
                patch.set(facecolor=cmap(norm(value)), edgecolor=EDGE_COLOR, linewidth=0.7)
        if panel == "accessories" and part.region == "background":
            continue
        patch.set_zorder(z + 1)
        ax.add_patch(patch)
    if panel == "accessories":
        ax.add_patch(mpatches.Rectangle((0, 0), BOX_W, BOX_H, facecolor="none",
                                        edgecolor="#9a9a9a", linewidth=0.6, zorder=0))
    if labels:
        anchors = {}
        for part in parts:
            anchors.setdefault(part.region, part.anchor)
        for region, (side, y) in slots.items():
            value = values[REGION_ID[region]]
            x_text = -0.35 if side == "left" else BOX_W + 0.35
            text = f"{REGION_LABELS[region]}\n{_format_value(value, value_fmt)}"
            ax.annotate(
                text, xy=anchors[region], xytext=(x_text, y),
                ha="right" if side == "left" else "left", va="center", fontsize=fontsize,
                color="#555555" if np.isnan(value) else "black",
                fontstyle="italic" if np.isnan(value) else "normal",
                arrowprops=dict(arrowstyle="-", color="#222222", linewidth=0.6,
                                shrinkA=1, shrinkB=0),
                zorder=100)
            ax.plot(*anchors[region], marker="o", markersize=2.2, color="#111111", zorder=101)
    ax.set_xlim(-PANEL_MARGIN[panel], BOX_W + PANEL_MARGIN[panel])
    ax.set_ylim(-0.3, BOX_H + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")


def plot_prototype_heatmap(ior_r, path: Optional[str] = None, title: Optional[str] = None,
                           vmin: Optional[float] = None, vmax: Optional[float] = None,
                           cmap=DEFAULT_CMAP, dpi: int = 150) -> Figure:
    """The FaceX heatmap: face and accessories prototypes coloured by IoR_r [19].

    Blue = low, red = high IoR (``cmap``), on a colour bar from ``vmin`` to
    ``vmax`` (default: the finite min and max); NaN regions are grey and
    marked "absent". Saves a PNG to ``path`` when given; returns the figure
    (a ``matplotlib.figure.Figure`` outside pyplot's registry, so many
    reports leak no open figures; in a notebook, end the cell with it to show it).
    """
    values = _as_region_values(ior_r)
    norm = color_scale([values], vmin, vmax)
    fig = Figure(figsize=(12.0, 5.7))
    grid = fig.add_gridspec(1, 3, width_ratios=[panel_width("face"), panel_width("accessories"),
                                                0.45], wspace=0.04,
                            left=0.01, right=0.93, top=0.88, bottom=0.06)
    ax_face, ax_acc, ax_bar = (fig.add_subplot(grid[0, i]) for i in range(3))
    draw_prototype(ax_face, values, "face", norm, cmap)
    draw_prototype(ax_acc, values, "accessories", norm, cmap)
    ax_face.set_title("face regions", fontsize=10)
    ax_acc.set_title("accessories (hat, eyeglasses)", fontsize=10)
    _add_colorbar(fig, ax_bar, norm, cmap, "IoR (intersection over region)")
    if np.isnan(values).any():
        fig.text(0.5, 0.015, "grey, hatched: region absent from every explained image",
                 ha="center", fontsize=8, color="#555555")
    if title:
        fig.suptitle(title, fontsize=12)
    if path:
        fig.savefig(path, dpi=dpi)
    return fig


def _add_colorbar(fig, ax_bar, norm, cmap, label):
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(mappable, cax=ax_bar)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return bar


__all__ = [
    "plot_prototype_heatmap", "draw_prototype", "color_scale",
    "FACE_PANEL_REGIONS", "ACCESSORY_PANEL_REGIONS", "DEFAULT_CMAP",
]
