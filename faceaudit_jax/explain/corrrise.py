"""CorrRISE: similarity maps for face verification from correlated random masks.

Lu, Xu and Ebrahimi's method for a verification model f (black box) and a
pair (I_A, I_B):
- N masks M_k [H, W]: ones (pixel kept) with `num_patches` square patches of
  `patch_size` pixels at random locations fully inside the image; each patch
  holds one value, uniform in [0, 1) by default (the paper) or a constant
  such as 0 (the authors' released scripts).
- SC_A[k] = cos(f(I_A * M_k), f(I_B)) and SC_B[k] = cos(f(I_B * M_k), f(I_A));
  each image is masked on its own, never both at once.
- S_A[i, j] = corr(SC_A, M[:, i, j]) (Pearson by default, Spearman as in the
  released scripts), likewise S_B. S+ = max(S, 0) marks the regions that make
  the pair similar, S- = min(S, 0) the ones that make it dissimilar.

How it runs (the shape docs/design.md asks for):
- Mask k is a pure function of (key, k): `jax.random.fold_in(key, k)`. So the
  masks do not depend on the chunk size or on the number of devices, and the
  full [N, H, W] stack never has to exist.
- Masks are processed in chunks: one batched `embed_fn` call per chunk on the
  2 * pairs * chunk masked images, inside a `lax.scan`.
- Pearson maps come from streaming statistics (count, means, centred sums of
  squares and the centred co-moment per pixel), merged chunk by chunk with
  Chan et al.'s parallel update. Memory is flat in N and the result equals
  `pearson_map` on the materialised masks (up to float rounding). Within a
  chunk the statistics are one centred matmul [S, C] @ [C, H*W]. Scores are
  streamed relative to the unmasked pair's score and masks relative to 1,
  so float32 keeps its precision when scores sit near 1 and vary little.
- Masks are sharded over devices with `jax.shard_map` on a 1-D mesh: device d
  takes a contiguous range of mask indices, and the per-device statistics are
  merged with `psum` (the multi-group variance formula). One device and many
  give the same maps up to float rounding.
- Spearman ranks need every score and every mask value of a pixel, so that
  option keeps the scores of all N masks and regenerates the [N, H, W] mask
  stack once at the end (memory O(N * H * W), the only option that grows).

Black box: `embed_fn(images [B, H, W, C]) -> [B, D]` is traced into one
jitted function. A non-JAX model (numpy, another framework) goes through
`numpy_embed_fn`, a `jax.pure_callback` adapter that gives the same results;
it runs on one device (host callbacks inside a multi-device program can
deadlock XLA's CPU runtime, and the model runs on the host anyway).
Constant scores (a model that ignores the masks) give all-zero maps and a
RuntimeWarning; zero-norm embeddings score 0 (never NaN).
Keep the same `embed_fn` object across calls: it is a static argument of the
jitted function, so a new closure each call means a new compilation.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from faceaudit_jax import contracts
from faceaudit_jax.metrics.verification import cosine_similarity

EmbedFn = Callable[[jax.Array], jax.Array]
PatchValue = Union[str, float]

# Name of the mesh axis masks (or occluders) are sharded over.
ITEM_AXIS = "items"

# A variable whose standard deviation is at most this fraction of its mean's
# magnitude is treated as constant: float32 rounding (eps 1.2e-7) on values
# that never really varied must not turn into a +-1 correlation.
CONSTANT_RTOL = 1e-6


# --------------------------------------------------------------------------
# Validation helpers shared with rise.py and occlusion.py
# --------------------------------------------------------------------------

def _image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        height = width = int(image_size)
    else:
        size = tuple(int(v) for v in image_size)
        if len(size) != 2:
            raise ValueError(f"image_size={image_size!r}; expected an int or (height, width)")
        height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"image_size={image_size!r}; expected positive sizes")
    return height, width


def _check_two(first, second, names: tuple[str, str], ndim: int, expected: str):
    """The two image arrays as float32 after the value contract and the shape checks
    shared by pair batches (ndim 4) and single pairs (ndim 3)."""
    for array, name in zip((first, second), names):
        contracts.check_unit_range(array, name)
    first, second = jnp.asarray(first, jnp.float32), jnp.asarray(second, jnp.float32)
    if first.ndim != ndim or second.ndim != ndim:
        raise ValueError(f"{names[0]} has shape {first.shape} and {names[1]} {second.shape}; "
                         f"expected {expected}")
    if first.shape != second.shape:
        raise ValueError(
            f"{names[0]} has shape {first.shape} but {names[1]} has shape {second.shape}; "
            "the images of a pair must have the same size and channel count")
    return first, second


def check_pair_batch(images_a, images_b) -> tuple[jax.Array, jax.Array]:
    """Validates two pair batches [P, H, W, C] of equal shape; returns float32 arrays.

    The images' values must be float, finite and in [0, 1] (faceaudit_jax.contracts):
    NaN would turn every map to zeros, 0..255 or -1..1 into other maps.
    """
    images_a, images_b = _check_two(images_a, images_b, ("images_a", "images_b"), 4,
                                    "pair batches [P, H, W, C]")
    if images_a.shape[0] < 1:
        raise ValueError("the pair batch is empty; expected at least one pair")
    return images_a, images_b


def check_pair(image_a, image_b) -> tuple[jax.Array, jax.Array]:
    """Validates one pair of [H, W, C] images of equal shape, float with finite values in [0, 1]."""
    return _check_two(image_a, image_b, ("image_a", "image_b"), 3, "two images [H, W, C]")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}; expected an integer >= {minimum}")
    return int(value)


def check_square_fits(name: str, size, height: int, width: int, what: str) -> int:
    """`size` as a positive int no larger than the image's shorter side."""
    size = check_positive_int(name, size)
    if size > min(height, width):
        raise ValueError(
            f"{name}={size} is larger than the image ({height} x {width}); "
            f"expected {what} that fits inside the image")
    return size


def resolve_devices(devices, embed_fn=None) -> tuple:
    """None -> all local devices; otherwise a non-empty tuple of devices.

    A host model (`numpy_embed_fn`) runs on the host whatever the device, so
    sharding its masks gains nothing; worse, host callbacks inside a
    multi-device collective program can deadlock XLA's CPU runtime. Such an
    embed_fn gets the first device only.
    """
    if devices is None:
        devices = jax.local_devices()
    devices = tuple(devices)
    if not devices:
        raise ValueError("devices is empty; expected at least one device")
    if getattr(embed_fn, "runs_on_host", False):
        devices = devices[:1]
    return devices


def check_embeddings(embeddings, batch: int) -> jax.Array:
    """Checks (at trace time) that embed_fn returned [batch, D]."""
    if embeddings.ndim != 2 or embeddings.shape[0] != batch:
        raise ValueError(
            f"embed_fn returned shape {embeddings.shape} for {batch} images; "
            "expected embeddings [B, D]")
    return embeddings


def to_first_device(tree, devices: tuple):
    """Moves replicated results onto devices[0] (a no-op under an outer trace).

    Sharded runs return arrays replicated over the mesh; putting them on one
    device lets callers mix them with ordinary single-device arrays.
    """
    def move(x):
        if isinstance(x, jax.core.Tracer) or len(devices) == 1:
            return x
        return jax.device_put(x, devices[0])
    return jax.tree.map(move, tree)


def warn_where(flags, message_fn: Callable[[np.ndarray], Optional[str]]) -> None:
    """Issues a host-side warning if message_fn(flags) says so.

    Called on concrete arrays it checks at once; under an outer trace it
    defers the check to a `jax.debug.callback` so the function stays jittable.
    """
    def host(flag_values):
        message = message_fn(np.asarray(flag_values))
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    if isinstance(flags, jax.core.Tracer):
        jax.debug.callback(host, flags)
    else:
        host(flags)


# --------------------------------------------------------------------------
# Chunked, sharded iteration over mask indices (shared with RISE, occlusion)
# --------------------------------------------------------------------------

class ChunkLayout(NamedTuple):
    """How `num_items` indices are spread over devices and chunks.

    Device d handles indices [d * K * C, (d + 1) * K * C) as K chunks of C;
    indices >= num_items are padding (their results are weighted 0).
    """
    num_items: int
    num_devices: int
    chunks_per_device: int
    chunk_size: int

    @property
    def padded(self) -> int:
        return self.num_devices * self.chunks_per_device * self.chunk_size


def chunk_layout(num_items: int, chunk_size: int, num_devices: int) -> ChunkLayout:
    """Balanced chunks: at most `chunk_size` items each, as little padding as possible."""
    per_device = -(-num_items // num_devices)
    chunks = max(1, -(-per_device // chunk_size))
    size = max(1, -(-per_device // chunks))
    return ChunkLayout(num_items, num_devices, chunks, size)


def run_sharded(local_fn: Callable, layout: ChunkLayout, devices: tuple, args: tuple,
                out_specs) -> object:
    """Runs local_fn(indices [K, C], *args) on every device of a 1-D mesh.

    The index array [D*K*C] is sharded over the mesh axis ITEM_AXIS; args are
    replicated. local_fn reduces across devices itself (lax.psum over
    ITEM_AXIS) or returns per-device outputs that out_specs concatenates.
    """
    mesh = Mesh(np.asarray(devices), (ITEM_AXIS,))
    indices = jnp.arange(layout.padded, dtype=jnp.int32)

    def per_device(local_indices, *local_args):
        return local_fn(local_indices.reshape(layout.chunks_per_device, layout.chunk_size),
                        *local_args)

    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(PartitionSpec(ITEM_AXIS),) + (PartitionSpec(),) * len(args),
        out_specs=out_specs, check_vma=False)
    return sharded(indices, *args)


def masked_pair_scores(embed_fn: EmbedFn, images_a, images_b, ref_a, ref_b,
                       masks, compose: Callable) -> jax.Array:
    """Scores of every pair against every mask in one embed call.

    images_a, images_b: [P, H, W, C]; ref_a, ref_b: their embeddings [P, D];
    masks: [C, H, W]; compose(images [P, 1, H, W, C], masks [1, C, H, W, 1])
    -> masked images [P, C, H, W, C]. Returns scores [P, 2, C]:
    [:, 0] = cos(f(compose(A, M)), f(B)), [:, 1] = cos(f(compose(B, M)), f(A)).
    """
    num_pairs = images_a.shape[0]
    num_masks = masks.shape[0]
    m = masks[None, :, :, :, None]
    masked = jnp.stack([compose(images_a[:, None], m), compose(images_b[:, None], m)])
    flat = masked.reshape((-1,) + images_a.shape[1:])
    emb = check_embeddings(embed_fn(flat), flat.shape[0])
    emb = emb.reshape(2, num_pairs, num_masks, -1)
    score_a = cosine_similarity(emb[0], ref_b[:, None, :])
    score_b = cosine_similarity(emb[1], ref_a[:, None, :])
    return jnp.stack([score_a, score_b], axis=1)


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------

def _mask_from_index(key, index, height: int, width: int, num_patches: int,
                     patch_size: int, patch_value: PatchValue) -> jax.Array:
    """Mask number `index` of the set drawn from `key`: [H, W] float32.

    Overlaps: where patches overlap, the later patch (higher patch number)
    overwrites the earlier ones, so every pixel holds exactly one patch value
    or 1. Built from separable row/column tests, no loop over patches.
    """
    mask_key = jax.random.fold_in(key, index)
    key_y, key_x, key_v = jax.random.split(mask_key, 3)
    top = jax.random.randint(key_y, (num_patches,), 0, height - patch_size + 1)
    left = jax.random.randint(key_x, (num_patches,), 0, width - patch_size + 1)
    if patch_value == "random":
        values = jax.random.uniform(key_v, (num_patches,), jnp.float32)
    else:
        values = jnp.full((num_patches,), patch_value, jnp.float32)
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + patch_size)
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + patch_size)
    covered = in_rows[:, :, None] & in_cols[:, None, :]  # [P, H, W]
    patch_ids = jnp.arange(num_patches)[:, None, None]
    last_patch = jnp.max(jnp.where(covered, patch_ids, -1), axis=0)
    return jnp.where(last_patch >= 0, values[jnp.maximum(last_patch, 0)], 1.0)


def _check_mask_args(height, width, num_patches, patch_size, patch_value) -> PatchValue:
    check_positive_int("num_patches", num_patches)
    check_square_fits("patch_size", patch_size, height, width, "a patch")
    if isinstance(patch_value, str):
        if patch_value != "random":
            raise ValueError(f"patch_value={patch_value!r}; expected 'random' or a number")
        return patch_value
    value = float(patch_value)
    if not math.isfinite(value):
        raise ValueError(f"patch_value={patch_value!r}; expected a finite number")
    return value


def generate_masks(key, num_masks: int, image_size, num_patches: int = 10,
                   patch_size: int = 30, patch_value: PatchValue = "random") -> jax.Array:
    """The CorrRISE mask set: float32 [num_masks, H, W].

    Each mask is ones with `num_patches` squares of `patch_size` pixels at
    uniformly random positions fully inside the image. patch_value="random"
    draws one value per patch uniformly in [0, 1) (the paper); a number (e.g.
    0.0, the released scripts) fills every patch with it. Where patches
    overlap, the later patch overwrites. Mask k depends only on (key, k), so
    these are exactly the masks `corrrise` uses with the same key.
    """
    check_positive_int("num_masks", num_masks)
    height, width = _image_hw(image_size)
    patch_value = _check_mask_args(height, width, num_patches, patch_size, patch_value)
    return _generate_masks(key, int(num_masks), height, width, int(num_patches),
                           int(patch_size), patch_value)


@jax.jit(static_argnums=(1, 2, 3, 4, 5, 6))
def _generate_masks(key, num_masks, height, width, num_patches, patch_size, patch_value):
    indices = jnp.arange(num_masks, dtype=jnp.int32)
    return jax.vmap(lambda i: _mask_from_index(
        key, i, height, width, num_patches, patch_size, patch_value))(indices)


# --------------------------------------------------------------------------
# Correlation statistics
# --------------------------------------------------------------------------

class CorrStats(NamedTuple):
    """Streaming Pearson statistics of S score vectors against P pixels.

    count: scalar (number of masks seen); mean_s, m2_s: [S] mean and centred
    sum of squares of the scores; mean_m, m2_m: [P] the same per pixel;
    comoment: [S, P] centred sum of products.
    """
    count: jax.Array
    mean_s: jax.Array
    m2_s: jax.Array
    mean_m: jax.Array
    m2_m: jax.Array
    comoment: jax.Array


def empty_stats(num_scores: int, num_pixels: int) -> CorrStats:
    zeros_s = jnp.zeros((num_scores,), jnp.float32)
    zeros_m = jnp.zeros((num_pixels,), jnp.float32)
    return CorrStats(jnp.zeros((), jnp.float32), zeros_s, zeros_s, zeros_m, zeros_m,
                     jnp.zeros((num_scores, num_pixels), jnp.float32))


def _weighted_moments(x, weights, count):
    """Mean and centred sum of squares over axis 0, shifted by the first row.

    Subtracting the first row first makes a column that never varies come
    out with exactly zero deviation (no rounding residue), and keeps the
    float32 sums well conditioned.
    """
    shifted = x - x[:1]
    mean_shift = jnp.tensordot(weights, shifted, axes=(0, 0)) / jnp.maximum(count, 1.0)
    centred = shifted - mean_shift
    m2 = jnp.tensordot(weights, centred * centred, axes=(0, 0))
    return x[0] + mean_shift, centred, m2


def chunk_stats(scores, masks_flat, weights) -> CorrStats:
    """Statistics of one chunk: scores [S, C], masks_flat [C, P], weights [C] in {0, 1}.

    The co-moment is one centred matmul [S, C] @ [C, P].
    """
    weights = weights.astype(jnp.float32)
    count = jnp.sum(weights)
    mean_s, centred_s, m2_s = _weighted_moments(scores.T, weights, count)
    mean_m, centred_m, m2_m = _weighted_moments(masks_flat, weights, count)
    comoment = jnp.matmul((centred_s * weights[:, None]).T, centred_m,
                          precision=lax.Precision.HIGHEST)
    return CorrStats(count, mean_s, m2_s, mean_m, m2_m, comoment)


def merge_stats(a: CorrStats, b: CorrStats) -> CorrStats:
    """Chan et al.'s pairwise merge of two sets of statistics."""
    count = a.count + b.count
    safe = jnp.maximum(count, 1.0)
    frac_b = b.count / safe
    cross = a.count * b.count / safe
    delta_s = b.mean_s - a.mean_s
    delta_m = b.mean_m - a.mean_m
    return CorrStats(
        count,
        a.mean_s + delta_s * frac_b,
        a.m2_s + b.m2_s + delta_s * delta_s * cross,
        a.mean_m + delta_m * frac_b,
        a.m2_m + b.m2_m + delta_m * delta_m * cross,
        a.comoment + b.comoment + cross * delta_s[:, None] * delta_m[None, :],
    )


def psum_stats(stats: CorrStats, axis_name: str) -> CorrStats:
    """Merges the statistics of all devices along axis_name (multi-group formula)."""
    count = lax.psum(stats.count, axis_name)
    safe = jnp.maximum(count, 1.0)
    mean_s = lax.psum(stats.count * stats.mean_s, axis_name) / safe
    mean_m = lax.psum(stats.count * stats.mean_m, axis_name) / safe
    dev_s = stats.mean_s - mean_s
    dev_m = stats.mean_m - mean_m
    m2_s = lax.psum(stats.m2_s + stats.count * dev_s * dev_s, axis_name)
    m2_m = lax.psum(stats.m2_m + stats.count * dev_m * dev_m, axis_name)
    comoment = lax.psum(stats.comoment + stats.count * dev_s[:, None] * dev_m[None, :],
                        axis_name)
    return CorrStats(count, mean_s, m2_s, mean_m, m2_m, comoment)


def _is_constant(m2, magnitude, count):
    """True where the standard deviation is within rounding of the values' size."""
    tol = CONSTANT_RTOL * jnp.abs(magnitude)
    return m2 <= jnp.maximum(count, 1.0) * tol * tol


def stats_to_correlation(stats: CorrStats, offset_s=0.0, offset_m=0.0
                         ) -> tuple[jax.Array, jax.Array]:
    """Pearson r [S, P] from the statistics, and constant_scores [S] bool.

    offset_s [S] / offset_m: what was subtracted from the scores / mask
    values before streaming (the constant test compares the spread with the
    size of the original values). r is 0 wherever the scores or the pixel
    never varied (never NaN).
    """
    const_s = _is_constant(stats.m2_s, stats.mean_s + offset_s, stats.count)
    const_m = _is_constant(stats.m2_m, stats.mean_m + offset_m, stats.count)
    denom = jnp.sqrt(jnp.where(const_s, 1.0, stats.m2_s))[:, None] * \
        jnp.sqrt(jnp.where(const_m, 1.0, stats.m2_m))[None, :]
    r = jnp.where(const_s[:, None] | const_m[None, :], 0.0, stats.comoment / denom)
    return jnp.clip(r, -1.0, 1.0), const_s


def _check_scores_masks(scores, masks) -> tuple[jax.Array, jax.Array]:
    scores = jnp.asarray(scores, jnp.float32)
    masks = jnp.asarray(masks, jnp.float32)
    if scores.ndim != 1 or masks.ndim != 3 or masks.shape[0] != scores.shape[0]:
        raise ValueError(
            f"scores has shape {scores.shape} and masks {masks.shape}; "
            "expected scores [N] and masks [N, H, W]")
    if scores.shape[0] < 2:
        raise ValueError(f"N={scores.shape[0]} masks; a correlation needs at least 2")
    return scores, masks


@jax.jit
def _pearson_map(scores, masks):
    num, height, width = masks.shape
    stats = chunk_stats(scores[None, :], masks.reshape(num, height * width),
                        jnp.ones((num,), jnp.float32))
    r, _ = stats_to_correlation(stats)
    return r.reshape(height, width)


def pearson_map(scores, masks) -> jax.Array:
    """Pixel-wise Pearson correlation of scores [N] with masks [N, H, W] -> [H, W].

    One centred matmul. 0 where a pixel (or the scores) never varies.
    """
    scores, masks = _check_scores_masks(scores, masks)
    return _pearson_map(scores, masks)


def rankdata(x, axis: int = 0) -> jax.Array:
    """Ranks (1-based, ties get the average rank) along `axis`, float32.

    Matches scipy.stats.rankdata(method="average"). One sort per column; the
    tie groups come from cumulative max/min of the group boundaries.
    """
    x = jnp.asarray(x)
    moved = jnp.moveaxis(x, axis, 0)
    return jnp.moveaxis(_rank_axis0(moved), 0, axis)


@jax.jit
def _rank_axis0(x):
    n = x.shape[0]
    flat = x.reshape(n, -1)
    order = jnp.argsort(flat, axis=0, stable=True)
    sorted_x = jnp.take_along_axis(flat, order, axis=0)
    pos = jnp.broadcast_to(jnp.arange(n)[:, None], flat.shape)
    change = sorted_x[1:] != sorted_x[:-1]
    starts = jnp.concatenate([jnp.ones((1, flat.shape[1]), bool), change], axis=0)
    ends = jnp.concatenate([change, jnp.ones((1, flat.shape[1]), bool)], axis=0)
    first = lax.cummax(jnp.where(starts, pos, 0), axis=0)
    last = lax.cummin(jnp.where(ends, pos, n - 1), axis=0, reverse=True)
    average = (first + last).astype(jnp.float32) * 0.5 + 1.0
    columns = jnp.arange(flat.shape[1])[None, :]
    ranks = jnp.zeros(flat.shape, jnp.float32).at[order, columns].set(average)
    return ranks.reshape(x.shape)


def spearman_map(scores, masks) -> jax.Array:
    """Pixel-wise Spearman correlation of scores [N] with masks [N, H, W] -> [H, W].

    Pearson on average ranks (scores ranked over N; each pixel's N mask
    values ranked on their own). 0 where a pixel never varies.
    """
    scores, masks = _check_scores_masks(scores, masks)
    return _pearson_map(rankdata(scores), rankdata(masks, axis=0))


def split_signed(s) -> tuple[jax.Array, jax.Array]:
    """(S+, S-) = (max(s, 0), min(s, 0)): similar and dissimilar regions."""
    s = jnp.asarray(s)
    return jnp.maximum(s, 0.0), jnp.minimum(s, 0.0)


# --------------------------------------------------------------------------
# CorrRISE
# --------------------------------------------------------------------------

def _multiply(images, masks):
    return images * masks


@jax.jit(static_argnames=("embed_fn", "num_masks", "num_patches", "patch_size",
                          "patch_value", "correlation", "layout", "devices"))
def _corrrise_impl(images_a, images_b, key, *, embed_fn, num_masks, num_patches,
                   patch_size, patch_value, correlation, layout, devices):
    num_pairs, height, width, _ = images_a.shape
    num_pixels = height * width
    refs = check_embeddings(embed_fn(jnp.concatenate([images_a, images_b])), 2 * num_pairs)
    ref_a, ref_b = refs[:num_pairs], refs[num_pairs:]

    def masks_for(indices):
        return jax.vmap(lambda i: _mask_from_index(
            key, i, height, width, num_patches, patch_size, patch_value))(indices)

    # Scores are streamed relative to the unmasked pair's score and masks
    # relative to 1 (an unmasked pixel): the running means then stay of the
    # order of the spread, so float32 keeps its precision even when the
    # scores sit at 0.9999 and vary in the fifth decimal. Correlations do
    # not change under these shifts.
    base = jnp.repeat(cosine_similarity(ref_a, ref_b), 2)[:, None]

    def chunk_scores(indices):
        masks = masks_for(indices)
        scores = masked_pair_scores(embed_fn, images_a, images_b, ref_a, ref_b,
                                    masks, _multiply)
        return masks, scores.reshape(2 * num_pairs, -1) - base  # rows: pair0 A, pair0 B, ...

    if correlation == "pearson":
        def local(indices):
            def step(stats, chunk_indices):
                masks, scores = chunk_scores(chunk_indices)
                weights = (chunk_indices < num_masks).astype(jnp.float32)
                chunk = chunk_stats(scores, masks.reshape(-1, num_pixels) - 1.0, weights)
                return merge_stats(stats, chunk), None

            stats, _ = lax.scan(step, empty_stats(2 * num_pairs, num_pixels), indices)
            return psum_stats(stats, ITEM_AXIS)

        stats = run_sharded(local, layout, devices, (), PartitionSpec())
        r, constant = stats_to_correlation(stats, base[:, 0], 1.0)
    else:
        def local(indices):
            def step(carry, chunk_indices):
                return carry, chunk_scores(chunk_indices)[1]

            _, scores = lax.scan(step, None, indices)  # [K, 2P, C]
            return scores

        scores = run_sharded(local, layout, devices, (), PartitionSpec(ITEM_AXIS))
        scores = jnp.moveaxis(scores, 1, 0).reshape(2 * num_pairs, -1)[:, :num_masks]
        masks = masks_for(jnp.arange(num_masks, dtype=jnp.int32)).reshape(num_masks, -1)
        score_ranks = rankdata(scores, axis=1)
        stats = chunk_stats(score_ranks, rankdata(masks, axis=0),
                            jnp.ones((num_masks,), jnp.float32))
        r, constant = stats_to_correlation(stats)

    maps = r.reshape(num_pairs, 2, height, width)
    return maps[:, 0], maps[:, 1], constant.reshape(num_pairs, 2)


def _constant_message(constant: np.ndarray) -> Optional[str]:
    if not constant.any():
        return None
    which = [f"pair {p} image {'AB'[i]}" for p, i in zip(*np.nonzero(constant))]
    shown = ", ".join(which[:8]) + (" ..." if len(which) > 8 else "")
    return ("CorrRISE: the similarity score never varied across the masks for "
            f"{shown} (constant model output?); those maps are all zeros")


def corrrise_batch(embed_fn: EmbedFn, images_a, images_b, key, num_masks: int = 500,
                   num_patches: int = 10, patch_size: int = 30,
                   correlation: str = "pearson", patch_value: PatchValue = "random",
                   chunk_size: int = 32, devices: Optional[Sequence] = None
                   ) -> tuple[jax.Array, jax.Array]:
    """CorrRISE maps for P pairs in one call: (s_a, s_b), each [P, H, W] in [-1, 1].

    images_a, images_b: [P, H, W, C] (pair p = (images_a[p], images_b[p])).
    All pairs share the same N masks (mask k is a function of (key, k)), so
    `corrrise` on one pair gives the same maps as its row here. chunk_size:
    masks per chunk; each chunk is one embed_fn call on 2 * P * chunk_size
    images, so peak memory is set by that batch, not by N. devices: the
    masks are sharded over these (default: all local devices). See the
    module doc for the algorithm and the memory of correlation="spearman".
    """
    images_a, images_b = check_pair_batch(images_a, images_b)
    _, height, width, _ = images_a.shape
    num_masks = check_positive_int("num_masks", num_masks, minimum=2)
    patch_value = _check_mask_args(height, width, num_patches, patch_size, patch_value)
    if correlation not in ("pearson", "spearman"):
        raise ValueError(f"correlation={correlation!r}; expected 'pearson' or 'spearman'")
    chunk_size = check_positive_int("chunk_size", chunk_size)
    devices = resolve_devices(devices, embed_fn)
    layout = chunk_layout(num_masks, chunk_size, len(devices))
    s_a, s_b, constant = _corrrise_impl(
        images_a, images_b, key, embed_fn=embed_fn, num_masks=num_masks,
        num_patches=int(num_patches), patch_size=int(patch_size), patch_value=patch_value,
        correlation=correlation, layout=layout, devices=devices)
    warn_where(constant, _constant_message)
    return to_first_device((s_a, s_b), devices)


def corrrise(embed_fn: EmbedFn, image_a, image_b, key, num_masks: int = 500,
             num_patches: int = 10, patch_size: int = 30, correlation: str = "pearson",
             patch_value: PatchValue = "random", chunk_size: int = 32,
             devices: Optional[Sequence] = None) -> tuple[jax.Array, jax.Array]:
    """CorrRISE maps of one pair: (s_a, s_b), signed correlations [H, W] in [-1, 1].

    image_a, image_b: [H, W, C] in [0, 1]. embed_fn(images [B, H, W, C]) ->
    [B, D]. s_a[i, j] = corr(SC_A, M[:, i, j]) with SC_A[k] =
    cos(f(I_A * M_k), f(I_B)); s_b likewise with the roles swapped. Use
    `split_signed` for S+ / S-. Arguments as in `corrrise_batch`.
    """
    image_a, image_b = check_pair(image_a, image_b)
    s_a, s_b = corrrise_batch(
        embed_fn, image_a[None], image_b[None], key, num_masks=num_masks,
        num_patches=num_patches, patch_size=patch_size, correlation=correlation,
        patch_value=patch_value, chunk_size=chunk_size, devices=devices)
    return s_a[0], s_b[0]


# --------------------------------------------------------------------------
# Non-JAX models
# --------------------------------------------------------------------------

class HostEmbedFn:
    """A traceable embed_fn around a host (numpy) model; see `numpy_embed_fn`.

    Hashes by identity (it is a static jit argument). ``runs_on_host`` tells
    the explanation functions to keep it on one device.
    """

    runs_on_host = True

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], out_dim: int, dtype):
        self.fn = fn
        self.out_dim = out_dim
        self.dtype = np.dtype(dtype)

    def _host(self, images):
        images = np.asarray(images)
        lead = images.shape[:-3]
        flat = images.reshape((-1,) + images.shape[-3:])
        out = np.asarray(self.fn(flat), dtype=self.dtype)
        if out.shape != (flat.shape[0], self.out_dim):
            raise ValueError(
                f"the numpy model returned shape {out.shape} for {flat.shape[0]} images; "
                f"expected ({flat.shape[0]}, {self.out_dim})")
        return out.reshape(lead + (self.out_dim,))

    def __call__(self, images):
        result = jax.ShapeDtypeStruct(images.shape[:-3] + (self.out_dim,), self.dtype)
        return jax.pure_callback(self._host, result, images, vmap_method="expand_dims")


def numpy_embed_fn(fn: Callable[[np.ndarray], np.ndarray], out_dim: int,
                   dtype=np.float32) -> HostEmbedFn:
    """Wraps a host (numpy) model fn(images [B, H, W, C]) -> [B, out_dim] for JAX.

    The result is a traceable embed_fn built on `jax.pure_callback`; it can be
    jitted, vmapped (vmap_method="expand_dims": extra leading axes are folded
    into the host batch and unfolded after), and used inside `corrrise`,
    `rise` and `occlusion` (on one device: the model runs on the host).
    Create it once and reuse it: each new wrapper is a new static argument.
    """
    return HostEmbedFn(fn, check_positive_int("out_dim", out_dim), dtype)


# --------------------------------------------------------------------------
# Gradient baseline on the same pairs
# --------------------------------------------------------------------------

def similarity_cam(features_fn: Callable, head_fn: Callable, images_a, images_b,
                   method: str = "grad_cam", upsample: bool = True
                   ) -> tuple[jax.Array, jax.Array]:
    """Grad-CAM family on the cosine score of P pairs: (cam_a, cam_b), [P, H, W] in [0, 1].

    A thin wrapper over `faceaudit_jax.explain.cams.compute_cams`: cam_a
    explains cos(head(features(A)), f(B)) through A's last feature map, cam_b
    the same with the roles swapped; both images go through one call.
    features_fn(images) -> fmap [B, h, w, C], head_fn(fmap) -> embeddings
    [B, D] (e.g. from `models.embedder.embedder_fns`). The cosine target
    holds this batch's reference embeddings, so each call compiles anew:
    explain many pairs per call.
    """
    from faceaudit_jax.explain import cams

    images_a, images_b = check_pair_batch(images_a, images_b)
    num_pairs = images_a.shape[0]
    both = jnp.concatenate([images_a, images_b])
    references = head_fn(features_fn(both))
    swapped = jnp.concatenate([references[num_pairs:], references[:num_pairs]])
    maps = cams.compute_cams(features_fn, head_fn, both, cams.cosine_target(swapped),
                             method=method, upsample=upsample)
    return maps[:num_pairs], maps[num_pairs:]
