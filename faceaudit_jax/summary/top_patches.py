"""High-impact patches per region (FaceX eqs. 6-7), streamed over a data set.

Each image is split into square patches P_iq of ``patch_size`` x ``patch_size``
pixels (16 in FaceX's released code, so a 512 image has 32 x 32 patches). The
impact of patch q of image i on region r is

    V_iqr = sum(G_i * M_ir * P'_iq)                                  (eq. 6)

with G_i the normalised attribution map, M_ir the region mask and P'_iq the
patch's indicator mask. S_r, the k patches with the highest V_iqr over all
images, is the gallery of region r (eq. 7; k = 20 in the released code).

V for a whole batch is one ``jax.ops.segment_sum`` with segment id
((b * Q + q) * R + parse), no one-hot masks. ``TopPatchAccumulator`` keeps a
running top-k per region (merge of the batch's top-k with the state's), so
memory does not grow with the number of images.

Only patches with V > 0 are candidates (a patch that holds none of the region,
or no attribution on it, is not high impact), as in the released code.
``one_per_image=True`` mirrors the released code further: each image offers at
most its best patch per region, so a gallery shows k different images. (The
released code scores patches on the raw, unnormalised Grad-CAM; here G is the
normalised map of eq. 6, so images weigh alike.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.regions import NUM_REGIONS
from faceaudit_jax.summary.ior import (check_maps, check_parse, check_same_aspect,
                                       resize_parse_nearest)

Array = jax.Array

DEFAULT_PATCH_SIZE = 16
DEFAULT_K = 20


def check_patch_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols); raises unless ``patch_size`` divides both sides."""
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int; got {patch_size!r}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch_size {patch_size}; "
            f"expected both sides to be multiples of it")
    return height // patch_size, width // patch_size


def _patch_ids(height: int, width: int, patch_size: int) -> np.ndarray:
    """Row-major patch index q of every pixel -> int32 [H, W] (static, host-side)."""
    cols = width // patch_size
    rows_idx = np.arange(height) // patch_size
    cols_idx = np.arange(width) // patch_size
    return (rows_idx[:, None] * cols + cols_idx[None, :]).astype(np.int32)


def _patch_values(maps: Array, parse: Array, patch_size: int, num_regions: int) -> Array:
    """V [B, Q, R] for maps and parse [B, H, W] at the same size (one segment sum)."""
    batch, height, width = maps.shape
    rows, cols = height // patch_size, width // patch_size
    num_patches = rows * cols
    patch_of_pixel = jnp.asarray(_patch_ids(height, width, patch_size))
    image_offset = jnp.arange(batch, dtype=jnp.int32)[:, None, None] * num_patches
    segment_ids = ((image_offset + patch_of_pixel[None]) * num_regions
                   + parse.astype(jnp.int32)).reshape(-1)
    values = jax.ops.segment_sum(maps.reshape(-1).astype(jnp.float32), segment_ids,
                                 num_segments=batch * num_patches * num_regions)
    return values.reshape(batch, num_patches, num_regions)


@functools.partial(jax.jit, static_argnames=("patch_size", "num_regions"))
def _patch_values_jit(maps, parse, patch_size, num_regions):
    parse = resize_parse_nearest(parse, maps.shape[1:])
    return _patch_values(maps, parse, patch_size, num_regions)


def _prepare(maps, parse, patch_size: int, num_regions: int):
    batch, height, width = check_maps(maps)
    parse_hw = check_parse(parse, batch, num_regions)
    check_same_aspect(parse_hw, (height, width))
    check_patch_size(height, width, patch_size)
    return jnp.asarray(maps), jnp.asarray(parse)


def patch_values(maps, parse, patch_size: int = DEFAULT_PATCH_SIZE,
                 num_regions: int = NUM_REGIONS) -> Array:
    """V_iqr (eq. 6) -> [B, rows, cols, R] for maps [B, H, W] and parse [B, H', W'].

    Parse maps at another size (same aspect ratio) are resized to H x W by
    nearest neighbour; ``patch_size`` must divide H and W.
    """
    maps, parse = _prepare(maps, parse, patch_size, num_regions)
    rows, cols = maps.shape[1] // patch_size, maps.shape[2] // patch_size
    values = _patch_values_jit(maps, parse, patch_size=patch_size, num_regions=num_regions)
    return values.reshape(maps.shape[0], rows, cols, num_regions)


# --------------------------------------------------------------------------
# Running top-k per region
# --------------------------------------------------------------------------

class TopPatchState(NamedTuple):
    """Running top-k per region; fixed-size arrays [R, k], sorted by value (descending).

    Empty slots hold value -inf and image id, row, col -1.
    """
    values: Array
    image_ids: Array
    rows: Array
    cols: Array


class TopPatches(NamedTuple):
    """``TopPatchAccumulator.finalize`` result (numpy), each [R, k], best first.

    ``rows``/``cols`` are patch-grid indices (pixel top-left = index *
    patch_size); ``valid`` is False for empty slots (fewer than k candidates).
    """
    values: np.ndarray
    image_ids: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    valid: np.ndarray


def _merge_top_k(state: TopPatchState, values, image_ids, rows, cols) -> TopPatchState:
    """Keep the k best of the state's and the candidates' entries (all [R, n])."""
    k = state.values.shape[1]
    all_values = jnp.concatenate([state.values, values], axis=1)
    best_values, best = jax.lax.top_k(all_values, k)
    take = functools.partial(jnp.take_along_axis, indices=best, axis=1)
    return TopPatchState(
        values=best_values,
        image_ids=take(jnp.concatenate([state.image_ids, image_ids], axis=1)),
        rows=take(jnp.concatenate([state.rows, rows], axis=1)),
        cols=take(jnp.concatenate([state.cols, cols], axis=1)))


@functools.partial(jax.jit, static_argnames=("patch_size", "one_per_image"))
def _top_patch_update_jit(state, maps, parse, image_ids, patch_size, one_per_image):
    num_regions, k = state.values.shape
    batch, height, width = maps.shape
    grid_cols = width // patch_size
    values = _patch_values_jit(maps, parse, patch_size=patch_size,
                               num_regions=num_regions)  # [B, Q, R]
    num_patches = values.shape[1]
    if one_per_image:
        best_patch = jnp.argmax(values, axis=1)                      # [B, R]
        candidates = jnp.max(values, axis=1).T                       # [R, B]
        patch_index = best_patch.T                                   # [R, B]
        image_index = jnp.broadcast_to(jnp.arange(batch)[None, :], (num_regions, batch))
    else:
        candidates = values.transpose(2, 0, 1).reshape(num_regions, batch * num_patches)
        flat = jnp.arange(batch * num_patches)
        patch_index = jnp.broadcast_to(flat % num_patches, candidates.shape)
        image_index = jnp.broadcast_to(flat // num_patches, candidates.shape)
    candidates = jnp.where(candidates > 0, candidates, -jnp.inf)
    # Reduce the batch to its own top-k first so the merge sorts only 2k entries.
    num_kept = min(k, candidates.shape[1])
    batch_values, picked = jax.lax.top_k(candidates, num_kept)
    patch_index = jnp.take_along_axis(patch_index, picked, axis=1)
    image_index = jnp.take_along_axis(image_index, picked, axis=1)
    valid = jnp.isfinite(batch_values)
    batch_ids = jnp.where(valid, image_ids[image_index], -1)
    rows = jnp.where(valid, patch_index // grid_cols, -1).astype(jnp.int32)
    cols = jnp.where(valid, patch_index % grid_cols, -1).astype(jnp.int32)
    return _merge_top_k(state, batch_values, batch_ids.astype(jnp.int32), rows, cols)


class TopPatchAccumulator:
    """Streaming top-k high-impact patches per region (pure functional).

    ::

        state = TopPatchAccumulator.init(k=20, num_regions=19)
        for batch in data:
            state = TopPatchAccumulator.update(state, maps, batch["parse"], image_ids)
        top = TopPatchAccumulator.finalize(state)       # TopPatches, [R, k] each

    ``image_ids`` [B] are the images' global indices (what a gallery later
    uses to fetch the pixels). The update is jitted once per (batch shape,
    patch_size, one_per_image); the state never grows.
    """

    @staticmethod
    def init(k: int = DEFAULT_K, num_regions: int = NUM_REGIONS) -> TopPatchState:
        if k < 1 or num_regions < 1:
            raise ValueError(f"k and num_regions must be >= 1; got {k}, {num_regions}")
        shape = (num_regions, k)
        minus_one = jnp.full(shape, -1, jnp.int32)
        return TopPatchState(values=jnp.full(shape, -jnp.inf, jnp.float32),
                             image_ids=minus_one, rows=minus_one, cols=minus_one)

    @staticmethod
    def update(state: TopPatchState, maps, parse, image_ids,
               patch_size: int = DEFAULT_PATCH_SIZE, one_per_image: bool = False) -> TopPatchState:
        """Merge a batch: maps [B, H, W], parse [B, H', W'], image_ids [B] ints."""
        num_regions = int(state.values.shape[0])
        maps, parse = _prepare(maps, parse, patch_size, num_regions)
        ids = np.asarray(image_ids)
        if ids.shape != (maps.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"image_ids must be integers of shape [{maps.shape[0]}]; got shape "
                f"{ids.shape} and dtype {ids.dtype}")
        if ids.min() < 0:
            raise ValueError(f"image id {int(ids.min())} is negative; expected ids >= 0")
        return _top_patch_update_jit(state, maps, parse, jnp.asarray(ids, jnp.int32),
                                     patch_size=int(patch_size),
                                     one_per_image=bool(one_per_image))

    @staticmethod
    def finalize(state: TopPatchState) -> TopPatches:
        values, image_ids, rows, cols = (np.asarray(a) for a in jax.device_get(tuple(state)))
        return TopPatches(values=values, image_ids=image_ids, rows=rows, cols=cols,
                          valid=np.isfinite(values))


def merge_top_patch_states(stacked: TopPatchState) -> TopPatchState:
    """The k best entries per region of states stacked on a leading axis (each [S, R, k]).

    Entries are taken in stacking order, so among equal values the earlier
    state's wins, as when one process streams the states' images in that
    order. Used to merge the running top-k of several processes
    (``distributed.global_top_patch_state``).
    """
    values, image_ids, rows, cols = (jnp.asarray(a) for a in stacked)
    if values.ndim != 3 or any(a.shape != values.shape for a in (image_ids, rows, cols)):
        raise ValueError(
            f"stacked top-patch states must all be [S, R, k]; got {values.shape}, "
            f"{image_ids.shape}, {rows.shape}, {cols.shape}")
    num_states, num_regions, k = values.shape

    def flat(a):  # [S, R, k] -> [R, S * k], state-major along the candidate axis
        return jnp.moveaxis(a, 0, 1).reshape(num_regions, num_states * k)

    empty = TopPatchAccumulator.init(k, num_regions)
    return _merge_top_k(empty, flat(values), flat(image_ids).astype(jnp.int32),
                        flat(rows).astype(jnp.int32), flat(cols).astype(jnp.int32))


def top_patches(maps, parse, image_ids=None, k: int = DEFAULT_K,
                patch_size: int = DEFAULT_PATCH_SIZE, num_regions: int = NUM_REGIONS,
                one_per_image: bool = False) -> TopPatches:
    """One-shot S_r (eq. 7) for a single batch; ``image_ids`` default 0..B-1."""
    if image_ids is None:
        image_ids = np.arange(check_maps(maps)[0], dtype=np.int32)
    state = TopPatchAccumulator.init(k, num_regions)
    state = TopPatchAccumulator.update(state, maps, parse, image_ids, patch_size, one_per_image)
    return TopPatchAccumulator.finalize(state)


__all__ = [
    "DEFAULT_PATCH_SIZE", "DEFAULT_K", "check_patch_size", "patch_values",
    "TopPatchState", "TopPatches", "TopPatchAccumulator", "top_patches",
    "merge_top_patch_states",
]
