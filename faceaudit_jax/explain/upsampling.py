"""Where a feature cell sits in the image, and upsampling that puts it there.

A map computed on a feature grid [h, w] (a CAM, an attribute CAM, an attention
map over patch tokens) has to be brought back to the image [H, W] before it can
be compared with pixel masks (IoR, proportional energy). Bilinear upsampling
places each cell at some pixel and interpolates between cells; which pixel is a
property of the network, not of the resize:

* A conv net with symmetric padding (torchvision ResNets: 3x3 convs padded by
  1, the 7x7 stem by 3, the max pool by 1, 1x1 shortcuts unpadded) has cell j
  of a stride-s feature map looking at pixel ``s * j`` (pixel centres at
  integer coordinates). The receptive field of the last cell ends ``s`` pixels
  before the image's far border.
* cv2.resize / ``jax.image.resize`` / pytorch-grad-cam use half-pixel centres:
  cell j at ``s * j + s / 2 - 0.5``. That is right for non-overlapping patches
  (ViT tokens) but shifts a ResNet's map down and right by half a stride
  (7.5 px at stride 16, 15.5 px at stride 32; docs/design.md, "Findings that
  shape the defaults").

``CellGrid`` states the geometry per axis: the pixel coordinate of cell 0's
receptive-field centre and the spacing between cells. ``upsampling_matrix``
builds the interpolation weights for any grid; ``resolve_upsample`` turns the
``upsample=`` option of the CAM functions into a grid:

* ``True`` / ``"aligned"`` (default): the grid the model declares
  (``features_fn.cell_grid``, set by ``models.resnet.classifier_fns``), else
  the symmetric-padding convention (cell 0 at pixel 0, stride H / h), exact for
  any symmetric-padding conv net whose input size is a multiple of its stride;
* ``"half_pixel"``: the cv2 / pytorch-grad-cam convention, to compare with
  that library;
* a ``CellGrid``: that geometry;
* ``False``: no resize (feature-grid maps).

``measure_cell_centre`` reads a cell's receptive-field centre off the network
itself (the centroid of the input gradient of that cell's activations), to
check a declared grid or to find one for a model that declares none.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

UPSAMPLE_MODES = ("aligned", "half_pixel")


@dataclasses.dataclass(frozen=True)
class CellGrid:
    """Pixel coordinates of a feature grid's cell centres: cell (i, j) sits at
    (offset[0] + stride[0] * i, offset[1] + stride[1] * j), pixel centres at
    integer coordinates. Hashable, so it can be a static jit argument."""

    offset: tuple[float, float]
    stride: tuple[float, float]

    def __post_init__(self):
        offset = tuple(float(v) for v in self.offset)
        stride = tuple(float(v) for v in self.stride)
        if len(offset) != 2 or len(stride) != 2:
            raise ValueError(f"CellGrid needs (y, x) pairs; got offset={self.offset!r}, "
                             f"stride={self.stride!r}")
        if min(stride) <= 0 or not all(np.isfinite(offset + stride)):
            raise ValueError(f"CellGrid stride must be positive and finite, offset finite; "
                             f"got offset={offset}, stride={stride}")
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "stride", stride)

    def centres(self, axis: int, n_cells: int) -> np.ndarray:
        """float64 [n_cells]: pixel coordinates of the cell centres along ``axis`` (0 y, 1 x)."""
        return self.offset[axis] + self.stride[axis] * np.arange(n_cells, dtype=np.float64)


def symmetric_padding_grid(stride: float) -> CellGrid:
    """A symmetric-padding conv net of total stride ``stride``: cell j at pixel stride * j."""
    return CellGrid((0.0, 0.0), (float(stride), float(stride)))


def patch_grid(patch: float) -> CellGrid:
    """Non-overlapping ``patch`` x ``patch`` tokens (ViT): cell j at patch * j + (patch - 1) / 2."""
    centre = (float(patch) - 1.0) / 2.0
    return CellGrid((centre, centre), (float(patch), float(patch)))


def compose_layers(layers) -> tuple[float, float]:
    """(offset, stride) of the output cells of a chain of convs/pools along one axis.

    ``layers`` lists (kernel, stride, pad_before) from the input to the output.
    A layer maps its output cell j to the input position stride * j +
    (kernel - 1) / 2 - pad_before (the centre of the window it reads); composing
    these affine maps from the last layer back to the first gives the pixel of
    output cell j as offset + stride * j.
    """
    offset, stride = 0.0, 1.0
    for kernel, layer_stride, pad in reversed(list(layers)):
        if kernel < 1 or layer_stride < 1 or pad < 0:
            raise ValueError(f"layer (kernel, stride, pad_before) must have kernel >= 1, "
                             f"stride >= 1, pad >= 0; got {(kernel, layer_stride, pad)}")
        offset = layer_stride * offset + (kernel - 1) / 2.0 - pad
        stride = layer_stride * stride
    return float(offset), float(stride)


def half_pixel_offset(n_in: int, n_out: int) -> tuple[float, float]:
    """(offset, stride) of the half-pixel (cv2) convention for n_in cells -> n_out pixels."""
    stride = n_out / n_in
    return stride / 2.0 - 0.5, stride


@functools.lru_cache(maxsize=256)
def upsampling_matrix(n_in: int, n_out: int, offset: float, stride: float) -> np.ndarray:
    """float32 [n_out, n_in]: linear interpolation between cell centres along one axis.

    Output pixel y reads the fractional cell u = (y - offset) / stride, clamped
    to [0, n_in - 1] (beyond the first or last centre the map is constant), and
    mixes cells floor(u) and floor(u) + 1. Rows sum to 1. With the half-pixel
    (offset, stride) this is ``jax.image.resize(..., "bilinear")`` when
    enlarging.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"upsampling_matrix needs n_in, n_out >= 1; got {n_in}, {n_out}")
    u = np.clip((np.arange(n_out, dtype=np.float64) - offset) / stride, 0.0, n_in - 1)
    j0 = np.floor(u).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_in - 1)
    t = u - j0
    weights = np.zeros((n_out, n_in), np.float64)
    np.add.at(weights, (np.arange(n_out), j0), 1.0 - t)
    np.add.at(weights, (np.arange(n_out), j1), t)
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=256)
def extreme_rows(n_in: int, n_out: int, offset: float, stride: float) -> np.ndarray:
    """Rows of ``upsampling_matrix`` where an upsampled map can take its min or max.

    Consecutive rows that mix the same two inputs form a run along which the
    weights change monotonically, so the map is linear in the row within a run
    and its extremes sit on the first or last row of some run.
    """
    support = upsampling_matrix(n_in, n_out, offset, stride) > 0
    change = np.any(support[1:] != support[:-1], axis=1)
    first = np.concatenate([[True], change])
    last = np.concatenate([change, [True]])
    return np.flatnonzero(first | last)


UpsampleSpec = Union[bool, str, CellGrid, None]


def resolve_upsample(upsample: UpsampleSpec, features_fn: Optional[Callable] = None):
    """The static upsampling choice of a CAM function: None (no resize), "half_pixel",
    "aligned" (symmetric-padding convention, stride from the sizes) or a CellGrid.

    ``True`` and ``"aligned"`` prefer the grid the model declares as
    ``features_fn.cell_grid`` (a CellGrid).
    """
    if upsample is False or upsample is None:
        return None
    if isinstance(upsample, CellGrid):
        return upsample
    if upsample is True or upsample == "aligned":
        declared = getattr(features_fn, "cell_grid", None)
        if declared is not None:
            if not isinstance(declared, CellGrid):
                raise ValueError(f"features_fn.cell_grid must be a CellGrid; got {declared!r}")
            return declared
        return "aligned"
    if upsample == "half_pixel":
        return "half_pixel"
    raise ValueError(f"upsample must be True, False, one of {UPSAMPLE_MODES} or a CellGrid; "
                     f"got {upsample!r}")


def axis_geometry(spec, axis: int, n_in: int, n_out: int) -> tuple[float, float]:
    """(offset, stride) along one axis for a resolved spec (see ``resolve_upsample``)."""
    if spec == "half_pixel":
        return half_pixel_offset(n_in, n_out)
    if spec == "aligned":
        return 0.0, n_out / n_in
    if isinstance(spec, CellGrid):
        return spec.offset[axis], spec.stride[axis]
    raise ValueError(f"unresolved upsample spec {spec!r}; pass it through resolve_upsample")


def axis_matrices(spec, in_hw: tuple[int, int], out_hw: tuple[int, int]):
    """(wy [H, h], wx [W, w], rows_y, rows_x): interpolation weights and extreme rows."""
    (h, w), (height, width) = in_hw, out_hw
    gy = axis_geometry(spec, 0, h, height)
    gx = axis_geometry(spec, 1, w, width)
    return (upsampling_matrix(h, height, *gy), upsampling_matrix(w, width, *gx),
            extreme_rows(h, height, *gy), extreme_rows(w, width, *gx))


def upsample_grid_maps(maps: Array, size: tuple[int, int], spec="aligned") -> Array:
    """[B, h, w] -> [B, H, W] by linear interpolation between the cell centres of ``spec``."""
    wy, wx, _, _ = axis_matrices(spec, maps.shape[1:3], (int(size[0]), int(size[1])))
    return jnp.einsum("oh,bhw,pw->bop", wy, maps.astype(jnp.float32), wx)


def measure_cell_centre(features_fn: Callable[[Array], Array], images: Array,
                        cell: tuple[int, int], window: Optional[int] = None) -> np.ndarray:
    """float64 (y, x): centroid of |d sum_c fmap[b, i, j, c] / d images| over pixels.

    The input-gradient footprint of one feature cell, summed over channels and
    the batch; its centroid is the cell's effective receptive-field centre.
    Average over several images (or initialisations) for a stable estimate.

    With ``window`` (pixels) the centroid is taken over the (2 window + 1)^2
    square around the footprint's peak (peak of the footprint box-smoothed over
    ``window``), not the whole image: a footprint clipped by the image border,
    or a normalisation layer that spreads gradient over the whole image
    (GroupNorm), pulls the global centroid of an off-centre cell towards the
    middle, but leaves the peak and its neighbourhood in place.
    """
    i, j = int(cell[0]), int(cell[1])

    def cell_sum(x):
        fmap = features_fn(x)
        if not (0 <= i < fmap.shape[1] and 0 <= j < fmap.shape[2]):
            raise ValueError(f"cell {(i, j)} outside the feature grid {fmap.shape[1:3]}")
        return jnp.sum(fmap[:, i, j, :])

    grads = jax.grad(cell_sum)(jnp.asarray(images, jnp.float32))
    weight = np.asarray(jnp.sum(jnp.abs(grads), axis=(0, 3)), np.float64)
    if weight.sum() <= 0:
        raise ValueError(f"cell {(i, j)} has a zero input gradient; no centre to measure")
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
    if window is not None:
        if int(window) < 1:
            raise ValueError(f"window must be a positive number of pixels; got {window!r}")
        r = int(window)
        kernel = np.ones(2 * r + 1) / (2 * r + 1)
        smooth = np.apply_along_axis(np.convolve, 0, weight, kernel, "same")
        smooth = np.apply_along_axis(np.convolve, 1, smooth, kernel, "same")
        py, px = np.unravel_index(np.argmax(smooth), smooth.shape)
        near = (np.abs(ys - py) <= r) & (np.abs(xs - px) <= r)
        weight = np.where(near, weight, 0.0)
    total = weight.sum()
    return np.array([(weight * ys).sum() / total, (weight * xs).sum() / total])


__all__ = [
    "UPSAMPLE_MODES", "CellGrid", "symmetric_padding_grid", "patch_grid", "compose_layers",
    "half_pixel_offset", "upsampling_matrix", "extreme_rows", "resolve_upsample",
    "axis_geometry", "axis_matrices", "upsample_grid_maps", "measure_cell_centre",
]
