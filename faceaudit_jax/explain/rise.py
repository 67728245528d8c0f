"""RISE adapted to face verification (a CorrRISE baseline).

Petsiuk et al.'s masks: a grid of grid_size x grid_size cells, each kept
(1) with probability keep_prob, upsampled bilinearly to (grid_size + 1)
cells of ceil(H / grid_size) x ceil(W / grid_size) pixels, then cropped to
H x W at a random shift of less than one cell. The saliency of image A is
    sal_A = sum_k score_k * M_k / (N * keep_prob),
with score_k = cos(f(I_A * M_k), f(I_B)) (the similarity to the other image
replaces the class probability); sal_B likewise with the roles swapped.

It runs on the CorrRISE machinery: mask k is a function of (key, k), masks
are scored in chunks inside a `lax.scan` (one embed_fn call per chunk),
the weighted sum is a running [2P, H*W] accumulator (memory flat in N), and
the masks are sharded over devices with a `psum` at the end.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from faceaudit_jax.explain.corrrise import (
    ITEM_AXIS, EmbedFn, _image_hw, check_embeddings, check_pair, check_pair_batch,
    check_positive_int, chunk_layout, masked_pair_scores, resolve_devices, run_sharded,
    to_first_device)


def _rise_mask(key, index, height: int, width: int, grid_size: int, keep_prob: float):
    """Mask number `index` of the RISE set drawn from `key`: float32 [H, W] in [0, 1]."""
    mask_key = jax.random.fold_in(key, index)
    key_grid, key_y, key_x = jax.random.split(mask_key, 3)
    grid = (jax.random.uniform(key_grid, (grid_size, grid_size)) < keep_prob)
    cell_h = -(-height // grid_size)
    cell_w = -(-width // grid_size)
    up = jax.image.resize(grid.astype(jnp.float32),
                          ((grid_size + 1) * cell_h, (grid_size + 1) * cell_w), "bilinear")
    shift_y = jax.random.randint(key_y, (), 0, cell_h)
    shift_x = jax.random.randint(key_x, (), 0, cell_w)
    return lax.dynamic_slice(up, (shift_y, shift_x), (height, width))


def _check_rise_args(grid_size, keep_prob, height, width) -> float:
    check_positive_int("grid_size", grid_size)
    if grid_size > min(height, width):
        raise ValueError(
            f"grid_size={grid_size} is larger than the image ({height} x {width}); "
            "expected at most one cell per pixel")
    keep_prob = float(keep_prob)
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob}; expected a probability in (0, 1]")
    return keep_prob


def generate_rise_masks(key, num_masks: int, image_size, grid_size: int = 8,
                        keep_prob: float = 0.5) -> jax.Array:
    """The RISE mask set [num_masks, H, W]; mask k equals the one `rise` uses."""
    num_masks = check_positive_int("num_masks", num_masks)
    height, width = _image_hw(image_size)
    keep_prob = _check_rise_args(grid_size, keep_prob, height, width)
    return _generate(key, num_masks, height, width, int(grid_size), keep_prob)


@jax.jit(static_argnums=(1, 2, 3, 4, 5))
def _generate(key, num_masks, height, width, grid_size, keep_prob):
    return jax.vmap(lambda i: _rise_mask(key, i, height, width, grid_size, keep_prob))(
        jnp.arange(num_masks, dtype=jnp.int32))


def _multiply(images, masks):
    return images * masks


@jax.jit(static_argnames=("embed_fn", "num_masks", "grid_size", "keep_prob", "layout",
                          "devices"))
def _rise_impl(images_a, images_b, key, *, embed_fn, num_masks, grid_size, keep_prob,
               layout, devices):
    num_pairs, height, width, _ = images_a.shape
    num_pixels = height * width
    refs = check_embeddings(embed_fn(jnp.concatenate([images_a, images_b])), 2 * num_pairs)
    ref_a, ref_b = refs[:num_pairs], refs[num_pairs:]

    def local(indices):
        def step(total, chunk_indices):
            masks = jax.vmap(lambda i: _rise_mask(
                key, i, height, width, grid_size, keep_prob))(chunk_indices)
            scores = masked_pair_scores(embed_fn, images_a, images_b, ref_a, ref_b,
                                        masks, _multiply).reshape(2 * num_pairs, -1)
            weights = (chunk_indices < num_masks).astype(jnp.float32)
            return total + jnp.matmul(scores * weights, masks.reshape(-1, num_pixels),
                                      precision=lax.Precision.HIGHEST), None

        total, _ = lax.scan(step, jnp.zeros((2 * num_pairs, num_pixels), jnp.float32),
                            indices)
        return lax.psum(total, ITEM_AXIS)

    total = run_sharded(local, layout, devices, (), PartitionSpec())
    saliency = (total / (num_masks * keep_prob)).reshape(num_pairs, 2, height, width)
    return saliency[:, 0], saliency[:, 1]


def rise_batch(embed_fn: EmbedFn, images_a, images_b, key, num_masks: int = 1000,
               grid_size: int = 8, keep_prob: float = 0.5, chunk_size: int = 32,
               devices: Optional[Sequence] = None) -> tuple[jax.Array, jax.Array]:
    """Similarity RISE for P pairs: (sal_a, sal_b), each [P, H, W].

    images_a, images_b: [P, H, W, C]; embed_fn(images [B, H, W, C]) -> [B, D].
    All pairs share the N masks. chunk_size masks per embed call (batch
    2 * P * chunk_size); masks sharded over `devices` (default: all local).
    """
    images_a, images_b = check_pair_batch(images_a, images_b)
    _, height, width, _ = images_a.shape
    num_masks = check_positive_int("num_masks", num_masks)
    keep_prob = _check_rise_args(grid_size, keep_prob, height, width)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    devices = resolve_devices(devices, embed_fn)
    layout = chunk_layout(num_masks, chunk_size, len(devices))
    result = _rise_impl(images_a, images_b, key, embed_fn=embed_fn, num_masks=num_masks,
                        grid_size=int(grid_size), keep_prob=keep_prob, layout=layout,
                        devices=devices)
    return to_first_device(result, devices)


def rise(embed_fn: EmbedFn, image_a, image_b, key, num_masks: int = 1000,
         grid_size: int = 8, keep_prob: float = 0.5, chunk_size: int = 32,
         devices: Optional[Sequence] = None) -> tuple[jax.Array, jax.Array]:
    """Similarity RISE of one pair [H, W, C] each: (sal_a, sal_b), each [H, W]."""
    image_a, image_b = check_pair(image_a, image_b)
    sal_a, sal_b = rise_batch(embed_fn, image_a[None], image_b[None], key,
                              num_masks=num_masks, grid_size=grid_size,
                              keep_prob=keep_prob, chunk_size=chunk_size, devices=devices)
    return sal_a[0], sal_b[0]
