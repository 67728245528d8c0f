"""Occlusion maps for face verification (xFace-style sliding occluder).

A square occluder of `patch_size` pixels filled with `fill_value` slides over
image A with step `stride`; for each position q the similarity drop is
    drop_q = cos(f(I_A), f(I_B)) - cos(f(occlude_q(I_A)), f(I_B)),
and each pixel's value is the mean drop over the positions covering it
(positive: hiding the pixel lowers the similarity). Image B gets its map the
same way against the unmodified A. When (size - patch_size) is not a
multiple of the stride, one more row/column of positions is placed flush
with the bottom/right edge so every pixel is covered.

All occluded images are built inside one jitted function from the position
index (no stack of occluded images is stored), embedded in chunks inside a
`lax.scan`, and mapped back to pixels with running sums (drop x coverage
matmul, coverage count); positions are sharded over devices with a `psum`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from faceaudit_jax.explain.corrrise import (
    ITEM_AXIS, EmbedFn, _image_hw, check_embeddings, check_pair, check_pair_batch,
    check_positive_int, check_square_fits, chunk_layout, masked_pair_scores, resolve_devices, run_sharded,
    to_first_device)
from faceaudit_jax.metrics.verification import cosine_similarity


def _starts(size: int, patch_size: int, stride: int) -> np.ndarray:
    starts = np.arange(0, size - patch_size + 1, stride)
    if starts[-1] != size - patch_size:
        starts = np.append(starts, size - patch_size)
    return starts


def occluder_positions(image_size, patch_size: int, stride: int) -> np.ndarray:
    """Top-left corners (row, col) of all occluder positions: int32 [Q, 2], row-major."""
    height, width = _image_hw(image_size)
    check_square_fits("patch_size", patch_size, height, width, "an occluder")
    check_positive_int("stride", stride)
    rows = _starts(height, patch_size, stride)
    cols = _starts(width, patch_size, stride)
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)
    return grid.reshape(-1, 2).astype(np.int32)


@jax.jit(static_argnames=("embed_fn", "patch_size", "stride", "fill_value", "layout",
                          "devices"))
def _occlusion_impl(images_a, images_b, *, embed_fn, patch_size, stride, fill_value,
                    layout, devices):
    num_pairs, height, width, _ = images_a.shape
    num_pixels = height * width
    positions = occluder_positions((height, width), patch_size, stride)
    num_positions = len(positions)
    corners = jnp.asarray(positions)
    refs = check_embeddings(embed_fn(jnp.concatenate([images_a, images_b])), 2 * num_pairs)
    ref_a, ref_b = refs[:num_pairs], refs[num_pairs:]
    base = cosine_similarity(ref_a, ref_b)  # [P]; cosine is symmetric
    base = jnp.repeat(base, 2)  # rows: pair0 A, pair0 B, ...
    rows = jnp.arange(height)
    cols = jnp.arange(width)

    def occluder(index):
        top, left = corners[jnp.minimum(index, num_positions - 1)]
        in_rows = (rows >= top) & (rows < top + patch_size)
        in_cols = (cols >= left) & (cols < left + patch_size)
        return (in_rows[:, None] & in_cols[None, :]).astype(jnp.float32)

    def compose(images, keep):
        return images * keep + fill_value * (1.0 - keep)

    def local(indices):
        def step(carry, chunk_indices):
            drop_sum, coverage = carry
            occluders = jax.vmap(occluder)(chunk_indices)  # [C, H, W]
            scores = masked_pair_scores(embed_fn, images_a, images_b, ref_a, ref_b,
                                        1.0 - occluders, compose).reshape(2 * num_pairs, -1)
            weights = (chunk_indices < num_positions).astype(jnp.float32)
            drops = (base[:, None] - scores) * weights
            flat = occluders.reshape(-1, num_pixels)
            drop_sum = drop_sum + jnp.matmul(drops, flat, precision=lax.Precision.HIGHEST)
            coverage = coverage + weights @ flat
            return (drop_sum, coverage), None

        init = (jnp.zeros((2 * num_pairs, num_pixels), jnp.float32),
                jnp.zeros((num_pixels,), jnp.float32))
        (drop_sum, coverage), _ = lax.scan(step, init, indices)
        return lax.psum(drop_sum, ITEM_AXIS), lax.psum(coverage, ITEM_AXIS)

    drop_sum, coverage = run_sharded(local, layout, devices, (),
                                     (PartitionSpec(), PartitionSpec()))
    maps = jnp.where(coverage > 0, drop_sum / jnp.maximum(coverage, 1.0), 0.0)
    maps = maps.reshape(num_pairs, 2, height, width)
    return maps[:, 0], maps[:, 1]


def occlusion_batch(embed_fn: EmbedFn, images_a, images_b, patch_size: int = 16,
                    stride: int = 8, fill_value: float = 0.0, chunk_size: int = 32,
                    devices: Optional[Sequence] = None) -> tuple[jax.Array, jax.Array]:
    """Occlusion maps for P pairs: (map_a, map_b), each [P, H, W] (mean similarity drop).

    images_a, images_b: [P, H, W, C]; chunk_size occluder positions per embed
    call (batch 2 * P * chunk_size); positions sharded over `devices`.
    """
    images_a, images_b = check_pair_batch(images_a, images_b)
    _, height, width, _ = images_a.shape
    positions = occluder_positions((height, width), patch_size, stride)
    fill_value = float(fill_value)
    if not np.isfinite(fill_value):
        raise ValueError(f"fill_value={fill_value}; expected a finite number")
    chunk_size = check_positive_int("chunk_size", chunk_size)
    devices = resolve_devices(devices, embed_fn)
    layout = chunk_layout(len(positions), chunk_size, len(devices))
    result = _occlusion_impl(
        images_a, images_b, embed_fn=embed_fn, patch_size=int(patch_size), stride=int(stride),
        fill_value=fill_value, layout=layout, devices=devices)
    return to_first_device(result, devices)


def occlusion(embed_fn: EmbedFn, image_a, image_b, patch_size: int = 16, stride: int = 8,
              fill_value: float = 0.0, chunk_size: int = 32,
              devices: Optional[Sequence] = None) -> tuple[jax.Array, jax.Array]:
    """Occlusion maps of one pair [H, W, C] each: (map_a, map_b), each [H, W]."""
    image_a, image_b = check_pair(image_a, image_b)
    map_a, map_b = occlusion_batch(embed_fn, image_a[None], image_b[None],
                                   patch_size=patch_size, stride=stride,
                                   fill_value=fill_value, chunk_size=chunk_size,
                                   devices=devices)
    return map_a[0], map_b[0]
