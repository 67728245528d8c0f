"""Model-agnostic patch attribution: sliding-window confidence maps (De Coninck et al.).

A region classifier (`faceaudit_jax.models.patch_net.PatchNet`, or any
function of (patches, position ids)) classifies every grid patch of an image.
Its confidence at a position says how much information about the image label
that region carries. This module:

- classifies all windows of a batch of images inside one jitted function
  (patches gathered per chunk, chunks classified under `lax.map` to bound
  memory; no Python loop over positions);
- turns logits into three confidences, each normalised to [0, 1] with C
  classes:
    * `top_softmax`: p_max lies in [1/C, 1]; reported as (p_max - 1/C) / (1 - 1/C).
    * `margin`: p_1 - p_2 (top minus second) already lies in [0, 1].
    * `negative_entropy`: 1 - H / log C, with H = -sum p log p in [0, log C].
  All three are 0 for a uniform softmax and 1 for a one-hot one. (The paper
  min-max normalises maps afterwards anyway; this fixed normalisation makes
  patch confidences comparable across images and models.)
- maps patch confidences to pixels (paper Algorithm 1: each pixel gets the
  mean confidence of all patches that contain it, 0 where none does). Patches
  on a product grid (what `patch_net.grid_positions` makes, the usual case)
  take a separable path: the covering sums are R^T C X, two small matmuls of
  the [rows, cols] confidence grid with 0/1 interval-membership matrices, and
  the counts an outer product, O(g H (g + W)) with no scatter. Any other set
  of locations takes a summed-area scatter: 4 scatter-adds per patch and two
  prefix sums, O(Q + H W) instead of O(Q k^2). Both equal Algorithm 1;
- min-max normalises maps and averages them over a data set with a streaming
  accumulator.

Host front doors (`patches_to_pixels`, `confidence_maps`, ...) validate
concrete inputs (NaN confidences, patches outside the image, k larger than
the image) and raise ValueError; the same functions stay jittable, in which
case the checks that need values are skipped.

Whole uint8 data sets in fixed-shape batches: `raw_attribution_maps`,
`specific_and_general_maps` (the paper's per-image and data-set maps) and
`patch_calibration` (every window as a prediction: ECE, reliability, accuracy
per grid position).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from faceaudit_jax.data import pipeline
from faceaudit_jax.metrics import calibration
from faceaudit_jax.models.patch_net import crop_patches, image_hw

Array = jax.Array

CONFIDENCE_KINDS = ("top_softmax", "margin", "negative_entropy")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------------------
# Confidences
# ---------------------------------------------------------------------------

def confidence_from_logits(logits: Array, kind: str = "top_softmax",
                           normalised: bool = True) -> Array:
    """Confidence of each softmax prediction.

    Args:
      logits: [..., C] with C >= 2.
      kind: "top_softmax", "margin" or "negative_entropy".
      normalised: map to [0, 1] as described in the module docstring. With
        False the raw values are returned: p_max, p_1 - p_2, -H (use the raw
        p_max as the confidence for calibration / ECE).

    Returns:
      [...] float32.
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence kind {kind!r}; expected one of {CONFIDENCE_KINDS}")
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"confidences need at least 2 classes, got logits of shape {logits.shape}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    probs = jnp.exp(log_probs)
    if kind == "top_softmax":
        top = jnp.max(probs, axis=-1)
        if not normalised:
            return top
        value = (top - 1.0 / num_classes) / (1.0 - 1.0 / num_classes)
    elif kind == "margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        value = top2[..., 0] - top2[..., 1]
        if not normalised:
            return value
    else:
        # p log p -> 0 as p -> 0; guard the 0 * -inf of saturated logits.
        plogp = jnp.where(probs > 0, probs * log_probs, 0.0)
        entropy = -jnp.sum(plogp, axis=-1)
        if not normalised:
            return -entropy
        value = 1.0 - entropy / math.log(num_classes)
    return jnp.clip(value, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Sliding window
# ---------------------------------------------------------------------------

def _call(apply_fn: Callable, variables: Any, patches: Array, position_ids: Array) -> Array:
    if variables is None:
        return apply_fn(patches, position_ids)
    return apply_fn(variables, patches, position_ids)


@functools.partial(jax.jit, static_argnames=("apply_fn", "k", "chunk_size"))
def _sliding_window_logits(apply_fn, variables, images, positions, k, chunk_size):
    batch = images.shape[0]
    num_positions = positions.shape[0]
    total = batch * num_positions
    num_chunks = -(-total // chunk_size)
    # Flat (image, position) requests, padded to whole chunks by repeating the
    # last request; the padding rows are dropped after classification.
    request = jnp.minimum(jnp.arange(num_chunks * chunk_size, dtype=jnp.int32), total - 1)
    request = request.reshape(num_chunks, chunk_size)

    def classify_chunk(chunk_requests):
        image_ids = chunk_requests // num_positions
        position_ids = chunk_requests % num_positions
        patches = crop_patches(images, image_ids, positions[position_ids], k)
        return _call(apply_fn, variables, patches, position_ids)

    logits = jax.lax.map(classify_chunk, request)
    logits = logits.reshape(num_chunks * chunk_size, -1)[:total]
    return logits.reshape(batch, num_positions, -1)


def _check_window_inputs(images: Array, k: int, positions: Any) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    height, width = images.shape[1:3]
    if k < 1 or k > height or k > width:
        raise ValueError(
            f"patch size k={k} does not fit images of {height} x {width}; expected 1 <= k <= min(H, W)")
    if np.ndim(positions) != 2 or np.shape(positions)[-1] != 2:
        raise ValueError(f"positions must be [p, 2] (x, y), got shape {np.shape(positions)}")
    if _is_concrete(positions):
        pos = np.asarray(positions)
        if pos.size and (pos.min() < 0 or pos[:, 0].max() > width - k or pos[:, 1].max() > height - k):
            raise ValueError(
                f"positions must keep {k} px patches inside the {height} x {width} images: "
                f"x in [0, {width - k}], y in [0, {height - k}]; got x in "
                f"[{pos[:, 0].min()}, {pos[:, 0].max()}], y in [{pos[:, 1].min()}, {pos[:, 1].max()}]")


def sliding_window_logits(apply_fn: Callable, images: Array, k: int, positions: Array,
                          variables: Any = None, chunk_size: int = 512) -> Array:
    """Classify every grid window of every image.

    Args:
      apply_fn: `apply_fn(patches [N, k, k, C], position_ids int [N])` ->
        logits [N, classes], or `apply_fn(variables, patches, position_ids)`
        when `variables` is given. apply_fn is a static jit argument (hashed
        by identity): pass a stable function and the parameters through
        `variables` to compile once (closures re-created per call recompile
        and bake their parameters in as constants).
      images: [B, H, W, C].
      k: patch side.
      positions: int [p, 2] (x, y) top-left corners; position id = row index.
      variables: optional pytree passed to apply_fn as a traced argument.
      chunk_size: patches classified per step of the `lax.map`; bounds memory.

    Returns:
      logits [B, p, classes].
    """
    _check_window_inputs(images, int(k), positions)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    positions = jnp.asarray(positions, jnp.int32)
    chunk_size = int(min(chunk_size, images.shape[0] * positions.shape[0]))
    return _sliding_window_logits(apply_fn, variables, images, positions, int(k), chunk_size)


def grid_shape(num_positions: int) -> tuple[int, int]:
    side = math.isqrt(int(num_positions))
    if side * side != int(num_positions):
        raise ValueError(
            f"{num_positions} positions do not form a square sqrt(p) x sqrt(p) grid")
    return side, side


def confidence_maps(apply_fn: Callable, images: Array, k: int, positions: Array,
                    kind: str = "top_softmax", variables: Any = None,
                    chunk_size: int = 512) -> tuple[Array, Array]:
    """Sliding-window confidence maps on the position grid.

    Args: as `sliding_window_logits`; `positions` must be a square grid in
    row-major order (as `patch_net.grid_positions` makes), kind as
    `confidence_from_logits`.

    Returns:
      (confidence [B, g, g] in [0, 1], predicted class int32 [B, g, g]),
      g = sqrt(p); rows run along y.
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence kind {kind!r}; expected one of {CONFIDENCE_KINDS}")
    rows, cols = grid_shape(np.shape(positions)[0])
    logits = sliding_window_logits(apply_fn, images, k, positions, variables, chunk_size)
    confidence = confidence_from_logits(logits, kind)
    predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    batch = images.shape[0]
    return confidence.reshape(batch, rows, cols), predicted.reshape(batch, rows, cols)


# ---------------------------------------------------------------------------
# Patches -> pixels (Algorithm 1)
# ---------------------------------------------------------------------------

def _patches_to_pixels(confidences: Array, locations: Array, k: int,
                       height: int, width: int) -> Array:
    """Jittable core of `patches_to_pixels` (no value checks).

    Summed-area trick: a patch covering rows [y0, y1) and columns [x0, x1)
    adds +c at (y0, x0) and (y1, x1) and -c at (y0, x1) and (y1, x0) of a
    difference array; its 2-D prefix sum is the per-pixel sum of covering
    patches. Corners on row H or column W never reach a pixel, so they are
    dropped. Sums and coverage counts share one scatter (counts are small
    integers, exact in float32, so the "0 where no patch covers" rule does not
    depend on round-off). Prefix sums use `lax.associative_scan` (log-depth),
    which XLA runs about twice as fast as `cumsum` on CPU. Patches partly
    outside the image contribute to the part inside.
    """
    confidences = confidences.astype(jnp.float32)
    x0 = jnp.clip(locations[:, 0], 0, width)
    y0 = jnp.clip(locations[:, 1], 0, height)
    x1 = jnp.clip(locations[:, 0] + k, 0, width)
    y1 = jnp.clip(locations[:, 1] + k, 0, height)
    rows = jnp.concatenate([y0, y0, y1, y1])
    cols = jnp.concatenate([x0, x1, x0, x1])
    signs = jnp.repeat(jnp.array([1.0, -1.0, -1.0, 1.0], jnp.float32), confidences.shape[0])
    # Channel-first [2, H, W] (sums, counts): measured faster than [H, W, 2].
    weights = jnp.stack([jnp.tile(confidences, 4) * signs, signs])             # [2, 4Q]
    diff = jnp.zeros((2, height, width), jnp.float32).at[:, rows, cols].add(weights, mode="drop")
    summed = jax.lax.associative_scan(jnp.add, diff, axis=1)
    sums, counts = jax.lax.associative_scan(jnp.add, summed, axis=2)
    return _mean_where_covered(sums, counts)


def _mean_where_covered(sums: Array, counts: Array) -> Array:
    # counts are exact small integers, so "0 where no patch covers" does not
    # depend on round-off.
    covered = counts > 0.5
    return jnp.where(covered, sums / jnp.where(covered, counts, 1.0), 0.0)


def _interval_membership(starts: np.ndarray, k: int, length: int) -> np.ndarray:
    """[n, length] float32: 1 where start <= i < start + k."""
    index = np.arange(length)
    starts = starts[:, None]
    return ((index >= starts) & (index < starts + k)).astype(np.float32)


def _grid_patches_to_pixels(confidences: Array, xs: Sequence[int], ys: Sequence[int], k: int,
                            height: int, width: int) -> Array:
    """Algorithm 1 for patches on a product grid, separably.

    confidences [..., R * C] in row-major order (position id = row * C + col)
    at corners (xs[col], ys[row]). A pixel's covering sum is
    sum_{r, c} conf[r, c] [y in patch row r] [x in patch col c] = (Y^T conf X)
    with Y [R, H] and X [C, W] 0/1 membership matrices, and its covering count
    the outer product of Y's and X's column sums. Two small matmuls (done at
    full float32 precision, also on TPU) replace the scatter and the two
    prefix sums, which on CPU cost a dozen small kernels each. The corners
    are static (tuples of ints), so the membership matrices and counts are
    compile-time constants.
    """
    rows_member = _interval_membership(np.asarray(ys), k, height)             # [R, H]
    cols_member = _interval_membership(np.asarray(xs), k, width)              # [C, W]
    grid = confidences.astype(jnp.float32).reshape(
        confidences.shape[:-1] + (len(ys), len(xs)))
    highest = jax.lax.Precision.HIGHEST
    sums = jnp.einsum("...rc,cw->...rw", grid, cols_member, precision=highest)
    sums = jnp.einsum("rh,...rw->...hw", rows_member, sums, precision=highest)
    counts = np.sum(rows_member, axis=0)[:, None] * np.sum(cols_member, axis=0)[None, :]
    return _mean_where_covered(sums, counts)


def _grid_axes(locations: Any) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(xs [C], ys [R]) as tuples when concrete `locations` [Q, 2] are a row-major
    product grid (position id = row * C + col, every row with the same x's and
    one y), as `patch_net.grid_positions` makes; None otherwise (traced, per
    image, or scattered locations), which selects the summed-area path."""
    if not _is_concrete(locations) or np.ndim(locations) != 2 or np.shape(locations)[0] == 0:
        return None
    loc = np.asarray(locations)
    num = loc.shape[0]
    cols = int(np.argmax(loc[:, 1] != loc[0, 1])) or num    # length of the first row
    if num % cols:
        return None
    grid = loc.reshape(num // cols, cols, 2)
    xs, ys = grid[:1, :, 0], grid[:, :1, 1]
    if not ((grid[..., 0] == xs).all() and (grid[..., 1] == ys).all()):
        return None
    return tuple(xs[0].tolist()), tuple(ys[:, 0].tolist())


def _pixel_mean_maps(confidences: Array, locations: Array, k: int, height: int, width: int,
                     grid_axes: Optional[tuple] = None) -> Array:
    """confidences [..., Q] -> [..., H, W], jittable: the separable path when
    `grid_axes` (static (xs, ys), from `_grid_axes`) is given, else the
    summed-area scatter with locations [Q, 2] or, for [B, Q], [B, Q, 2]."""
    if grid_axes is not None:
        return _grid_patches_to_pixels(confidences, *grid_axes, k, height, width)
    return _scatter_pixel_mean_maps(confidences, locations, k, height, width)


# A grid's corners are static: a new grid compiles once, like a new k or size.
_pixel_mean_maps_jit = jax.jit(_pixel_mean_maps, static_argnums=(2, 3, 4, 5))


def _pixel_layout(locations: Any) -> tuple[Any, Optional[tuple]]:
    """(locations for the jitted call, static grid axes or None). The grid path
    does not read the locations, so they are not shipped to the device then."""
    grid_axes = _grid_axes(locations)
    return (None if grid_axes else locations), grid_axes


def _pixel_mean_maps_front(confidences: Any, locations: Any, k: int, height: int,
                           width: int) -> Array:
    locations, grid_axes = _pixel_layout(locations)
    return _pixel_mean_maps_jit(confidences, locations, k, height, width, grid_axes)


def _scatter_pixel_mean_maps(confidences, locations, k, height, width):
    locations = locations.astype(jnp.int32)
    if confidences.ndim == 1:
        return _patches_to_pixels(confidences, locations, k, height, width)
    if locations.ndim == 2:
        return jax.vmap(lambda c: _patches_to_pixels(c, locations, k, height, width))(confidences)
    return jax.vmap(lambda c, l: _patches_to_pixels(c, l, k, height, width))(confidences, locations)


def _check_pixel_inputs(confidences: Any, locations: Any, k: int, height: int, width: int) -> None:
    if k < 1 or k > height or k > width:
        raise ValueError(
            f"patch size k={k} does not fit an image of {height} x {width}; expected 1 <= k <= min(H, W)")
    loc_shape, conf_shape = np.shape(locations), np.shape(confidences)
    # locations either match confidences one to one or are shared by a batch.
    if loc_shape[-1:] != (2,) or loc_shape[:-1] not in (conf_shape, conf_shape[-1:]):
        raise ValueError(
            f"locations must be [..., Q, 2] matching confidences [..., Q]; got "
            f"{np.shape(locations)} and {np.shape(confidences)}")
    if _is_concrete(confidences):
        values = np.asarray(confidences)
        if np.isnan(values).any():
            raise ValueError(
                f"confidences contain {int(np.isnan(values).sum())} NaN value(s); "
                "expected finite patch confidences")
    if _is_concrete(locations):
        loc = np.asarray(locations)
        if loc.size and (loc.min() < 0 or loc[..., 0].max() > width - k or loc[..., 1].max() > height - k):
            raise ValueError(
                f"locations (x, y) must keep {k} px patches inside the {height} x {width} image: "
                f"x in [0, {width - k}], y in [0, {height - k}]; got x in "
                f"[{loc[..., 0].min()}, {loc[..., 0].max()}], y in [{loc[..., 1].min()}, {loc[..., 1].max()}]")


def patches_to_pixels(confidences: Array, locations: Array, k: int,
                      image_size: int | Sequence[int]) -> Array:
    """Pixel map from patch confidences (paper Algorithm 1), vectorised.

    Args:
      confidences: [Q] one value per patch.
      locations: int [Q, 2] (x, y) top-left corner of each patch.
      k: patch side.
      image_size: H or (H, W).

    Returns:
      [H, W] float32: each pixel's mean confidence over all patches that
      contain it, 0 where no patch does.

    Raises:
      ValueError: NaN confidences, mismatched shapes, k larger than the image,
        or a patch outside the image (checked when the inputs are concrete).
    """
    height, width = image_hw(image_size)
    k = int(k)
    if np.ndim(confidences) != 1:
        raise ValueError(f"confidences must be [Q], got shape {np.shape(confidences)}; "
                         "use patches_to_pixels_batched for [B, Q]")
    _check_pixel_inputs(confidences, locations, k, height, width)
    return _pixel_mean_maps_front(confidences, locations, k, height, width)


def patches_to_pixels_batched(confidences: Array, locations: Array, k: int,
                              image_size: int | Sequence[int]) -> Array:
    """`patches_to_pixels` for a batch: confidences [B, Q], locations [Q, 2]
    (shared) or [B, Q, 2] -> [B, H, W]."""
    height, width = image_hw(image_size)
    k = int(k)
    if np.ndim(confidences) != 2:
        raise ValueError(f"confidences must be [B, Q], got shape {np.shape(confidences)}")
    _check_pixel_inputs(confidences, locations, k, height, width)
    return _pixel_mean_maps_front(confidences, locations, k, height, width)


def normalise_map(maps: Array) -> Array:
    """Min-max normalise a map [H, W] or each map of [B, H, W] to [0, 1].

    A constant map becomes all zeros. Jittable.
    """
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim not in (2, 3):
        raise ValueError(f"maps must be [H, W] or [B, H, W], got shape {maps.shape}")
    axes = (-2, -1)
    low = jnp.min(maps, axis=axes, keepdims=True)
    span = jnp.max(maps, axis=axes, keepdims=True) - low
    return jnp.where(span > 0, (maps - low) / jnp.where(span > 0, span, 1.0), 0.0)


def confidence_pixel_maps(apply_fn: Callable, images: Array, k: int, positions: Array,
                          kind: str = "top_softmax", variables: Any = None,
                          chunk_size: int = 512, normalise: bool = True) -> Array:
    """Per-image pixel attribution maps [B, H, W]: sliding window -> confidences ->
    Algorithm 1 -> (optionally) min-max normalised per image.

    For a data-set ("general") map, average the *unnormalised* maps with
    `mean_map` and normalise the mean once (as the authors' code does).
    """
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence kind {kind!r}; expected one of {CONFIDENCE_KINDS}")
    logits = sliding_window_logits(apply_fn, images, k, positions, variables, chunk_size)
    height, width = images.shape[1:3]
    positions, grid_axes = _pixel_layout(positions)
    return _pixel_maps_from_logits(logits, positions, int(k), height, width, kind, normalise,
                                   grid_axes)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _pixel_maps_from_logits(logits, positions, k, height, width, kind, normalise, grid_axes):
    maps = _pixel_mean_maps(confidence_from_logits(logits, kind), positions, k, height, width,
                            grid_axes)
    return normalise_map(maps) if normalise else maps


# ---------------------------------------------------------------------------
# Mean maps over a data set (streaming)
# ---------------------------------------------------------------------------

@struct.dataclass
class RunningMeanMap:
    """Streaming mean of maps: memory does not grow with the number of images.

    Usage: `acc = RunningMeanMap.create((H, W)); acc = acc.update(maps [B, H, W]);
    acc.result()`. `update` is jittable (float32 sums).
    """

    total: Array
    count: Array

    @classmethod
    def create(cls, shape: Sequence[int]) -> "RunningMeanMap":
        return cls(total=jnp.zeros(tuple(shape), jnp.float32), count=jnp.zeros((), jnp.int32))

    def update(self, maps: Array) -> "RunningMeanMap":
        maps = jnp.asarray(maps, jnp.float32)
        if maps.shape[1:] != self.total.shape:
            raise ValueError(f"maps must be [B, {', '.join(map(str, self.total.shape))}], "
                             f"got shape {maps.shape}")
        return RunningMeanMap(total=self.total + jnp.sum(maps, axis=0),
                              count=self.count + maps.shape[0])

    def result(self) -> Array:
        return self.total / jnp.maximum(self.count, 1).astype(jnp.float32)


def mean_map(maps: Array | Iterable[Array]) -> Array:
    """Mean map over a data set: an array [N, H, W] or an iterable of [B, H, W] batches."""
    if isinstance(maps, (np.ndarray, jax.Array)):
        batches: Iterable[Array] = [maps]
    else:
        batches = maps
    accumulator: Optional[RunningMeanMap] = None
    for batch in batches:
        if np.ndim(batch) != 3:
            raise ValueError(f"each batch of maps must be [B, H, W], got shape {np.shape(batch)}")
        if accumulator is None:
            accumulator = RunningMeanMap.create(np.shape(batch)[1:])
        accumulator = accumulator.update(batch)
    if accumulator is None or int(accumulator.count) == 0:
        raise ValueError("mean_map needs at least one map")
    return accumulator.result()


def general_confidence_map(apply_fn: Callable, batches: Iterable[Array], k: int,
                           positions: Array, kind: str = "top_softmax", variables: Any = None,
                           chunk_size: int = 512) -> Array:
    """The data set's ("general") attribution map [H, W], over every process's images.

    ``batches`` yields this process's image batches [B, H, W, C] (in a
    multi-process job, its own block of the data set, e.g. from
    ``distributed.process_shard``; padding rows must be cut off). Each
    batch's unnormalised per-image maps (``confidence_pixel_maps`` with
    ``normalise=False``) go into a ``RunningMeanMap``; its sums and counts
    add over processes (``distributed.global_sum``; nothing is exchanged
    with one process), and the mean is min-max normalised once, as the
    authors' code does for the general map. Every process returns the same
    map, equal to a one-process run over all images up to float summation
    order.
    """
    from faceaudit_jax import distributed  # only the reduction needs it

    accumulator: Optional[RunningMeanMap] = None
    for images in batches:
        maps = confidence_pixel_maps(apply_fn, images, k, positions, kind, variables,
                                     chunk_size, normalise=False)
        if accumulator is None:
            accumulator = RunningMeanMap.create(maps.shape[1:])
        accumulator = accumulator.update(maps)
    if accumulator is None:
        raise ValueError("general_confidence_map needs at least one batch of images on every "
                         "process")
    accumulator = distributed.global_sum(accumulator)
    return normalise_map(accumulator.result())


# ----------------------------------------------------------------------------- whole data sets (uint8)

def raw_attribution_maps(apply_fn: Callable, variables: Any, images_u8: np.ndarray, k: int,
                         positions: np.ndarray, kind: str, batch_size: int,
                         chunk_size: int) -> np.ndarray:
    """Unnormalised pixel maps [N, H, W] (sliding window -> confidences -> Algorithm 1).

    Batches have one fixed shape (the last one padded), so this compiles once.
    """
    batch_size = int(min(batch_size, images_u8.shape[0]))
    out = []
    for idx, real in pipeline.padded_index_batches(images_u8.shape[0], batch_size):
        maps = confidence_pixel_maps(apply_fn, pipeline.uint8_to_float(images_u8[idx]), k,
                                                 positions, kind, variables, chunk_size,
                                                 normalise=False)
        out.append(np.asarray(maps)[:real])
    return np.concatenate(out)


def specific_and_general_maps(raw_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(specific [N, H, W]: each map min-max normalised; general [H, W]: the mean of
    the unnormalised maps, normalised once, as the authors' code does)."""
    specific = np.asarray(normalise_map(raw_maps))
    general = np.asarray(normalise_map(mean_map(raw_maps)))
    return specific, general


def patch_calibration(apply_fn: Callable, variables: Any, images_u8: np.ndarray,
                      labels: np.ndarray, k: int, positions: np.ndarray, num_bins: int,
                      batch_size: int, chunk_size: int) -> dict[str, Any]:
    """Every sliding window of every image as a prediction of the image's label.

    Returns {"reliability": ReliabilityData (raw top-softmax confidence, the
    ECE over `num_bins` equal-width bins), "patch_accuracy": float,
    "position_accuracy": [g, g] accuracy per grid position (image-oriented),
    "num_predictions": int}.
    """
    batch_size = int(min(batch_size, images_u8.shape[0]))
    confidences, correct = [], []
    for idx, real in pipeline.padded_index_batches(images_u8.shape[0], batch_size):
        logits = sliding_window_logits(apply_fn, pipeline.uint8_to_float(images_u8[idx]), k,
                                                   positions, variables, chunk_size)
        logits = np.asarray(logits)[:real]                                # [b, p, 2]
        confidences.append(np.asarray(confidence_from_logits(
            jnp.asarray(logits), "top_softmax", normalised=False)))
        correct.append(np.argmax(logits, -1) == np.asarray(labels)[idx[:real], None])
    confidences = np.concatenate(confidences)
    correct = np.concatenate(correct)
    data = calibration.reliability_diagram_data(confidences.ravel(),
                                                correct.ravel().astype(np.float32),
                                                int(num_bins))
    rows, cols = grid_shape(positions.shape[0])
    return {"reliability": data, "patch_accuracy": float(correct.mean()),
            "position_accuracy": correct.mean(axis=0).reshape(rows, cols),
            "num_predictions": int(correct.size)}
