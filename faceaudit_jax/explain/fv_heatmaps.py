"""Face-verification heatmaps for positive and negative decisions (Correia et al.).

Pipeline for a batch of B verification pairs (probe P, gallery G), given one
attention map per image ([B, H, W], e.g. from ``explain.attention``):

1. Binarise each map with Otsu's threshold (``otsu_threshold``, 256 bins).
2. Combine the two binary maps into the candidate masks (``TECHNIQUES``):
   OIM = intersection, UM = union, N-IUM = union minus intersection.
3. Remove each mask's pixels (set them to ``fill``, black by default) and
   measure distances d = ||e_P - e_G||^2 between L2-normalised embeddings:
   d (original pair), d_PP (probe vs masked gallery), d_PG (gallery vs masked
   probe), d_NPG (masked probe vs masked gallery). All 2B + 2KB images go
   through the embedder in one jitted call (``evaluate_masks``).
4. Selection metrics with RA = removed_area(mask), the share of pixels removed:
   SM+ = ((d_PG - d)/d)/(2 RA) + ((d_PP - d)/d)/(2 RA)   (eq. 1, positive pairs)
   SM- = ((d - d_NPG)/d)/RA                              (eq. 2, negative pairs)
   RA = 0 (nothing removed) or d = 0 gives NaN, never a division error.
   Positive decisions choose between OIM and UM by SM+, negative decisions
   between OIM, UM and N-IUM by SM- (``select_technique``).
5. Heatmap: inside the selected mask, the original attention values (the mean
   of both maps where both binary maps are on, the single map's value where
   only one is: this covers the OIM, UM and N-IUM rules of the paper), then an
   8 x 8 grey dilation (max filter) and a 56 x 56 Gaussian filter of variance
   6.6 (sigma = sqrt(6.6), the paper's "variance 6.6" taken literally), then
   ``overlay_on_luminance`` on the probe.

``explain_pairs`` runs steps 1-5 in one jitted call and warns on the host
about constant maps (Otsu undefined -> empty mask) and undefined SM values.

Even-sized windows (8, 56) have no centre pixel; they follow the MATLAB
``imfilter``/XLA "SAME" convention: for size n the window covers offsets
-(n-1)//2 .. n//2 around each pixel (-3..4 for 8, -27..28 for 56), with
zero padding outside the image (heat is zero outside the mask anyway).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.data import pipeline
from faceaudit_jax.explain import attention

TECHNIQUES = ("oim", "um", "n_ium")
POSITIVE_TECHNIQUES = ("oim", "um")  # the paper's candidates for SM+
NEGATIVE_TECHNIQUES = ("oim", "um", "n_ium")  # and for SM-


# ----------------------------------------------------------------------------------------
# Otsu thresholding.


def otsu_threshold(x: jax.Array, bins: int = 256) -> jax.Array:
    """Otsu's threshold of all values of x over a ``bins``-bin histogram (jittable).

    The histogram spans [min(x), max(x)] in equal-width bins; for every split
    after bin k the between-class variance w0 w1 (mu0 - mu1)^2 is computed from
    bin counts and bin centres, and the first k with the largest variance is
    kept. The returned threshold is the largest value of x that falls in bins
    0..k, so ``x > threshold`` is exactly the upper class (bins k+1 and above).

    A constant x (Otsu undefined) returns max(x), so ``x > threshold`` is empty;
    ``binarize_maps`` warns about it on the host.

    Args:
      x: any-shaped float array (one map).
      bins: number of histogram bins (static), >= 2.

    Returns:
      float32 scalar threshold.
    """
    if not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    if x.size == 0:
        raise ValueError("otsu_threshold needs a non-empty array")
    values = jnp.ravel(x).astype(jnp.float32)
    low, high = jnp.min(values), jnp.max(values)
    span = high - low
    width = jnp.where(span > 0, span / bins, 1.0)
    bin_index = jnp.clip(jnp.floor((values - low) / width), 0, bins - 1).astype(jnp.int32)
    counts = jnp.bincount(bin_index, length=bins).astype(jnp.float32)
    centres = low + (jnp.arange(bins, dtype=jnp.float32) + 0.5) * width
    weight_low = jnp.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = jnp.cumsum(counts * centres)
    sum_high = sum_low[-1] - sum_low
    valid = (weight_low > 0) & (weight_high > 0)
    mean_low = sum_low / jnp.where(valid, weight_low, 1.0)
    mean_high = sum_high / jnp.where(valid, weight_high, 1.0)
    between = jnp.where(valid, weight_low * weight_high * jnp.square(mean_low - mean_high),
                        -jnp.inf)
    split = jnp.argmax(between)
    threshold = jnp.max(jnp.where(bin_index <= split, values, -jnp.inf))
    return jnp.where(span > 0, threshold, high)


def otsu_binarize(maps: jax.Array, bins: int = 256) -> tuple[jax.Array, jax.Array]:
    """Per-map Otsu binarisation (jittable).

    Args:
      maps: [B, H, W] float maps.

    Returns:
      (masks [B, H, W] bool = map > its Otsu threshold, constant [B] bool: the
      maps where Otsu is undefined, whose mask is empty).
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, H, W], got shape {tuple(maps.shape)}")
    thresholds = jax.vmap(lambda m: otsu_threshold(m, bins))(maps)
    constant = jnp.max(maps, axis=(1, 2)) <= jnp.min(maps, axis=(1, 2))
    return maps > thresholds[:, None, None], constant


def binarize_maps(maps, bins: int = 256) -> jax.Array:
    """Host-side ``otsu_binarize`` that warns about constant maps (empty masks)."""
    masks, constant = otsu_binarize(jnp.asarray(maps), bins)
    constant = np.asarray(constant)
    if constant.any():
        warnings.warn(f"{int(constant.sum())} of {constant.size} attention maps are constant "
                      f"(indices {np.flatnonzero(constant)[:10].tolist()}): Otsu's threshold "
                      f"is undefined, their masks are empty", RuntimeWarning, stacklevel=2)
    return masks


# ----------------------------------------------------------------------------------------
# Masks, removed area, distances and selection metrics.


def oim(mask_p: jax.Array, mask_g: jax.Array) -> jax.Array:
    """Overlapping Important Mask: pixels on in both binary maps."""
    return jnp.logical_and(mask_p, mask_g)


def um(mask_p: jax.Array, mask_g: jax.Array) -> jax.Array:
    """Union Mask: pixels on in either binary map."""
    return jnp.logical_or(mask_p, mask_g)


def n_ium(mask_p: jax.Array, mask_g: jax.Array) -> jax.Array:
    """Non-Intersecting Union Mask: union minus intersection (on in exactly one map)."""
    return jnp.logical_xor(mask_p, mask_g)


def technique_masks(mask_p: jax.Array, mask_g: jax.Array) -> jax.Array:
    """[K=3, ...] stacked OIM, UM, N-IUM masks (order of ``TECHNIQUES``)."""
    if mask_p.shape != mask_g.shape:
        raise ValueError(f"binary maps of a pair must have the same shape, got "
                         f"{tuple(mask_p.shape)} and {tuple(mask_g.shape)}")
    return jnp.stack([oim(mask_p, mask_g), um(mask_p, mask_g), n_ium(mask_p, mask_g)])


def removed_area(mask: jax.Array) -> jax.Array:
    """RA: share of pixels removed by a [..., H, W] mask -> [...] in [0, 1]."""
    return jnp.mean(mask.astype(jnp.float32), axis=(-2, -1))


def squared_distance(emb_a: jax.Array, emb_b: jax.Array) -> jax.Array:
    """||a - b||^2 of L2-normalised embeddings [..., D] -> [...] in [0, 4].

    A zero-norm embedding is left at zero (distance 1 to any unit vector) rather
    than becoming NaN.
    """
    def unit(e):
        norm_sq = jnp.sum(jnp.square(e), axis=-1, keepdims=True)
        return e * jnp.where(norm_sq > 0, jax.lax.rsqrt(jnp.where(norm_sq > 0, norm_sq, 1.0)),
                             0.0)

    return jnp.sum(jnp.square(unit(emb_a) - unit(emb_b)), axis=-1)


def _safe_ratio(numerator, denominator):
    """numerator / denominator, NaN where the denominator is 0 (no division error)."""
    ok = denominator > 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), jnp.nan)


def sm_plus(d: jax.Array, d_pg: jax.Array, d_pp: jax.Array, ra: jax.Array) -> jax.Array:
    """Eq. 1: SM+ = ((d_PG - d)/d)/(2 RA) + ((d_PP - d)/d)/(2 RA); NaN where RA = 0 or d = 0.

    Broadcasts: d [B] with d_pg, d_pp, ra [K, B] (or all [B]).
    """
    relative = _safe_ratio(d_pg - d, d) + _safe_ratio(d_pp - d, d)
    return _safe_ratio(relative, 2.0 * ra)


def sm_minus(d: jax.Array, d_npg: jax.Array, ra: jax.Array) -> jax.Array:
    """Eq. 2: SM- = ((d - d_NPG)/d)/RA; NaN where RA = 0 or d = 0."""
    return _safe_ratio(_safe_ratio(d - d_npg, d), ra)


def apply_mask(images: jax.Array, masks: jax.Array, fill: float | str = 0.0) -> jax.Array:
    """Replace the pixels where ``masks`` is True.

    Args:
      images: [..., H, W, 3]; masks: bool broadcastable to [..., H, W].
      fill: a float (0.0 = black, the default) or "mean" (each image's own mean
        colour, so the removed area carries no edge of a black hole).
    """
    if fill == "mean":
        value = jnp.mean(images, axis=(-3, -2), keepdims=True)
    elif isinstance(fill, (int, float)):
        value = jnp.asarray(fill, images.dtype)
    else:
        raise ValueError(f"fill must be a float or 'mean', got {fill!r}")
    return jnp.where(masks[..., None], value, images)


def _check_pair_images(probes, galleries):
    for name, arr in (("probes", probes), ("galleries", galleries)):
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{name} must be [B, H, W, 3], got shape {tuple(arr.shape)}")
    if probes.shape != galleries.shape:
        raise ValueError(f"probe and gallery images must have the same size, got "
                         f"{tuple(probes.shape)} and {tuple(galleries.shape)}")


def _embed(embed_fn, embed_params, images):
    return embed_fn(images) if embed_params is None else embed_fn(embed_params, images)


def _evaluate_masks_impl(embed_fn, probes, galleries, masks, embed_params, fill):
    batch, num_masks = probes.shape[0], masks.shape[0]
    masked_p = apply_mask(probes[None], masks, fill)  # [K, B, H, W, 3]
    masked_g = apply_mask(galleries[None], masks, fill)
    image_shape = probes.shape[1:]
    stacked = jnp.concatenate([probes, galleries,
                               masked_p.reshape((num_masks * batch,) + image_shape),
                               masked_g.reshape((num_masks * batch,) + image_shape)])
    emb = _embed(embed_fn, embed_params, stacked)
    emb_p, emb_g = emb[:batch], emb[batch:2 * batch]
    emb_mp = emb[2 * batch:(2 + num_masks) * batch].reshape(num_masks, batch, -1)
    emb_mg = emb[(2 + num_masks) * batch:].reshape(num_masks, batch, -1)
    d = squared_distance(emb_p, emb_g)
    d_pg = squared_distance(emb_g[None], emb_mp)  # gallery vs masked probe
    d_pp = squared_distance(emb_p[None], emb_mg)  # probe vs masked gallery
    d_npg = squared_distance(emb_mp, emb_mg)  # both masked
    ra = removed_area(masks)
    return {"d": d, "d_pg": d_pg, "d_pp": d_pp, "d_npg": d_npg, "ra": ra,
            "sm_plus": sm_plus(d, d_pg, d_pp, ra), "sm_minus": sm_minus(d, d_npg, ra)}


_evaluate_masks_jit = jax.jit(_evaluate_masks_impl, static_argnames=("embed_fn", "fill"))


def evaluate_masks(embed_fn: Callable, probes: jax.Array, galleries: jax.Array,
                   masks: jax.Array, *, embed_params: Any = None,
                   fill: float | str = 0.0) -> dict[str, jax.Array]:
    """Distances and SM+/SM- for K masks on B pairs, all in one jitted embedder call.

    Args:
      embed_fn: ``embed_fn(images [N, H, W, 3]) -> [N, D]``, or
        ``embed_fn(embed_params, images)`` when ``embed_params`` is given (then
        new parameters do not recompile). Static for jit: reuse the same object.
      probes, galleries: [B, H, W, 3], same shape.
      masks: bool [K, B, H, W] (or [B, H, W] for K = 1), True = pixel removed.
      fill: value of removed pixels (see ``apply_mask``).

    Returns:
      dict with "d" [B] and "d_pg", "d_pp", "d_npg", "ra", "sm_plus",
      "sm_minus" [K, B] (NaN SM where RA = 0 or d = 0).
    """
    _check_pair_images(probes, galleries)
    masks = jnp.asarray(masks)
    if masks.ndim == 3:
        masks = masks[None]
    if masks.ndim != 4 or masks.shape[1:] != probes.shape[:3]:
        raise ValueError(f"masks must be [K, B, H, W] with (B, H, W) = "
                         f"{tuple(probes.shape[:3])}, got shape {tuple(masks.shape)}")
    if not (fill == "mean" or isinstance(fill, (int, float))):
        raise ValueError(f"fill must be a float or 'mean', got {fill!r}")
    fill = fill if fill == "mean" else float(fill)
    return _evaluate_masks_jit(embed_fn, probes, galleries, masks.astype(bool), embed_params,
                               fill)


def select_technique(scores: jax.Array, candidates: tuple[str, ...] = TECHNIQUES) -> jax.Array:
    """Index (into ``TECHNIQUES``) of the candidate with the largest score per pair.

    Args:
      scores: [K=3, B] SM values in ``TECHNIQUES`` order (NaN = undefined).
      candidates: technique names allowed to win (``POSITIVE_TECHNIQUES`` for
        SM+, ``NEGATIVE_TECHNIQUES`` for SM-).

    Returns:
      int32 [B]; ties go to the earlier technique; -1 where every candidate's
      score is NaN.
    """
    if scores.ndim != 2 or scores.shape[0] != len(TECHNIQUES):
        raise ValueError(f"scores must be [{len(TECHNIQUES)}, B] in the order {TECHNIQUES}, "
                         f"got shape {tuple(scores.shape)}")
    unknown = [c for c in candidates if c not in TECHNIQUES]
    if unknown or not candidates:
        raise ValueError(f"candidates must be a non-empty subset of {TECHNIQUES}, got "
                         f"{candidates!r}")
    allowed = jnp.asarray([t in candidates for t in TECHNIQUES])[:, None]
    usable = allowed & ~jnp.isnan(scores)
    best = jnp.argmax(jnp.where(usable, scores, -jnp.inf), axis=0).astype(jnp.int32)
    return jnp.where(jnp.any(usable, axis=0), best, -1)


# ----------------------------------------------------------------------------------------
# Heatmaps.


def combine_maps(map_p: jax.Array, map_g: jax.Array, bin_p: jax.Array, bin_g: jax.Array,
                 mask: jax.Array) -> jax.Array:
    """Attention values inside a technique mask, [B, H, W].

    The mean of both maps where both binary maps are on, the single map's value
    where only one is, 0 where neither is or outside ``mask``. For OIM this is
    the mean on the shared region; for UM the paper's union rule; for N-IUM the
    single map's value.
    """
    on_p, on_g = bin_p.astype(map_p.dtype), bin_g.astype(map_p.dtype)
    count = on_p + on_g
    value = (map_p * on_p + map_g * on_g) / jnp.maximum(count, 1.0)
    return jnp.where(mask & (count > 0), value, 0.0)


def gaussian_kernel_1d(size: int = 56, variance: float = 6.6) -> np.ndarray:
    """Normalised 1-D Gaussian taps at offsets i - (size-1)/2 (MATLAB fspecial's grid).

    The 2-D kernel is the outer product of this with itself.
    """
    if size < 1 or variance <= 0:
        raise ValueError(f"Gaussian size must be >= 1 and variance > 0, got size={size}, "
                         f"variance={variance}")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-offsets ** 2 / (2.0 * variance))
    return (taps / taps.sum()).astype(np.float32)


def smooth_heatmap(heat: jax.Array, dilation_size: int = 8, gaussian_size: int = 56,
                   gaussian_variance: float = 6.6) -> jax.Array:
    """Grey dilation (max filter) then separable Gaussian filter of [B, H, W] maps.

    Window offsets follow the "SAME" convention in the module docstring;
    outside the image counts as zero heat.
    """
    if heat.ndim != 3:
        raise ValueError(f"heat must be [B, H, W], got shape {tuple(heat.shape)}")
    if dilation_size < 1:
        raise ValueError(f"dilation_size must be >= 1, got {dilation_size}")
    dilated = jax.lax.reduce_window(heat, -jnp.inf, jax.lax.max, (1, dilation_size,
                                                                  dilation_size),
                                    (1, 1, 1), "SAME")
    taps = jnp.asarray(gaussian_kernel_1d(gaussian_size, gaussian_variance))
    x = dilated[..., None]  # NHWC with one channel
    dims = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, taps.reshape(-1, 1, 1, 1), (1, 1), "SAME",
                                     dimension_numbers=dims)
    x = jax.lax.conv_general_dilated(x, taps.reshape(1, -1, 1, 1), (1, 1), "SAME",
                                     dimension_numbers=dims)
    return x[..., 0]


# ----------------------------------------------------------------------------------------
# The whole pipeline for a batch of pairs.


def _explain_pairs_impl(embed_fn, probes, galleries, maps_p, maps_g, positive, embed_params,
                        fill, bins, dilation_size, gaussian_size, gaussian_variance):
    bin_p, constant_p = otsu_binarize(maps_p, bins)
    bin_g, constant_g = otsu_binarize(maps_g, bins)
    masks = technique_masks(bin_p, bin_g)  # [K, B, H, W]
    result = _evaluate_masks_impl(embed_fn, probes, galleries, masks, embed_params, fill)
    pick_pos = select_technique(result["sm_plus"], POSITIVE_TECHNIQUES)
    pick_neg = select_technique(result["sm_minus"], NEGATIVE_TECHNIQUES)
    selected = jnp.where(positive, pick_pos, pick_neg)
    # Pairs with no defined SM (e.g. empty masks) get an empty heatmap.
    chosen = masks[jnp.maximum(selected, 0), jnp.arange(masks.shape[1])]
    chosen = chosen & (selected >= 0)[:, None, None]
    raw = combine_maps(maps_p, maps_g, bin_p, bin_g, chosen)
    heat = smooth_heatmap(raw, dilation_size, gaussian_size, gaussian_variance)
    result.update(binary_p=bin_p, binary_g=bin_g, constant_p=constant_p,
                  constant_g=constant_g, masks=masks, selected=selected, heatmap_raw=raw,
                  heatmap=heat)
    return result


_explain_pairs_jit = jax.jit(_explain_pairs_impl, static_argnames=(
    "embed_fn", "fill", "bins", "dilation_size", "gaussian_size", "gaussian_variance"))


def explain_pairs(embed_fn: Callable, probes: jax.Array, galleries: jax.Array,
                  maps_p: jax.Array, maps_g: jax.Array, positive, *, embed_params: Any = None,
                  fill: float | str = 0.0, bins: int = 256, dilation_size: int = 8,
                  gaussian_size: int = 56, gaussian_variance: float = 6.6,
                  warn: bool = True) -> dict[str, jax.Array]:
    """Binarise, build masks, score them, select and draw heatmaps for B pairs (one jit).

    Args:
      embed_fn, embed_params, fill: as in ``evaluate_masks``.
      probes, galleries: [B, H, W, 3] in [0, 1], same shape.
      maps_p, maps_g: [B, H, W] attention maps of probes and galleries.
      positive: bool [B], the model's decision per pair (True = "same person":
        select by SM+ among OIM/UM; False: by SM- among OIM/UM/N-IUM).
      bins, dilation_size, gaussian_size, gaussian_variance: as the paper
        (256, 8, 56, 6.6).
      warn: emit RuntimeWarnings on the host for constant maps and NaN SMs.

    Returns:
      dict of arrays: everything ``evaluate_masks`` returns, plus "binary_p",
      "binary_g" [B, H, W] bool, "constant_p", "constant_g" [B] bool, "masks"
      [3, B, H, W] (``TECHNIQUES`` order), "selected" [B] int32 (index into
      ``TECHNIQUES``, -1 if no candidate has a defined SM), "heatmap_raw" and
      "heatmap" [B, H, W] (before / after dilation and smoothing).
    """
    _check_pair_images(probes, galleries)
    image_hw = probes.shape[:3]
    for name, arr in (("maps_p", maps_p), ("maps_g", maps_g)):
        if tuple(arr.shape) != tuple(image_hw):
            raise ValueError(f"{name} must be [B, H, W] = {tuple(image_hw)} to match the "
                             f"images, got {tuple(arr.shape)}")
    positive = jnp.asarray(positive, bool)
    if positive.shape != (probes.shape[0],):
        raise ValueError(f"positive must be bool [B] = ({probes.shape[0]},), got shape "
                         f"{tuple(positive.shape)}")
    if not (fill == "mean" or isinstance(fill, (int, float))):
        raise ValueError(f"fill must be a float or 'mean', got {fill!r}")
    fill = fill if fill == "mean" else float(fill)
    result = _explain_pairs_jit(embed_fn, probes, galleries, jnp.asarray(maps_p, jnp.float32),
                                jnp.asarray(maps_g, jnp.float32), positive, embed_params, fill,
                                int(bins), int(dilation_size), int(gaussian_size),
                                float(gaussian_variance))
    if warn:
        warn_undefined(result, positive)
    return result


def warn_undefined(result: Mapping[str, jax.Array], positive=None) -> None:
    """Host-side RuntimeWarnings for constant maps and NaN selection metrics."""
    for key, side in (("constant_p", "probe"), ("constant_g", "gallery")):
        if key in result:
            flags = np.asarray(result[key])
            if flags.any():
                warnings.warn(f"{int(flags.sum())} {side} attention map(s) "
                              f"are constant (pairs {np.flatnonzero(flags)[:10].tolist()}): "
                              f"Otsu is undefined, their binary maps are empty",
                              RuntimeWarning, stacklevel=3)
    ra = np.asarray(result["ra"])
    for k, name in enumerate(TECHNIQUES[:ra.shape[0]]):
        empty = ra[k] == 0
        if empty.any():
            warnings.warn(f"technique {name}: {int(empty.sum())} pair(s) remove nothing "
                          f"(RA = 0, pairs {np.flatnonzero(empty)[:10].tolist()}): SM is NaN",
                          RuntimeWarning, stacklevel=3)
    if "selected" in result:
        unselected = np.asarray(result["selected"]) < 0
        if unselected.any():
            warnings.warn(f"{int(unselected.sum())} pair(s) have no defined SM for any "
                          f"candidate technique: their heatmap is empty",
                          RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------
# Many pairs of a ViT: attention maps and explain_pairs in fixed-size batches.

# Per-pair results of ``explain_pair_batches``: the scalars ([K, P] per technique or [P])
# always, the maps only with keep_maps.
SCALAR_KEYS = ("d", "d_pg", "d_pp", "d_npg", "ra", "sm_plus", "sm_minus", "selected",
               "constant_p", "constant_g")
MAP_KEYS = ("heatmap", "heatmap_raw", "binary_p", "binary_g")


def _explain_one_batch(embed, params, probe, gallery, positive, method: str, explain_cfg,
                       grid_shape, centres):
    """(maps_p, maps_g, ``explain_pairs`` result) of one batch of float pairs."""
    maps_p, maps_g = attention.targeted_pair_maps(
        embed.apply, params, probe, gallery, method, str(explain_cfg.get("target", "pair")),
        centres, readout=embed.apply.model.config.pool, grid_shape=grid_shape)
    result = explain_pairs(
        embed, probe, gallery, maps_p, maps_g, jnp.asarray(positive),
        embed_params=params, fill=explain_cfg.fill, bins=int(explain_cfg.bins),
        dilation_size=int(explain_cfg.dilation_size),
        gaussian_size=int(explain_cfg.gaussian_size),
        gaussian_variance=float(explain_cfg.gaussian_variance), warn=False)
    return maps_p, maps_g, result


def _concat_axis(key: str, part: np.ndarray) -> int:
    """Pairs run along axis 1 of the masks and of per-technique scalars, else along axis 0."""
    return 1 if key == "masks" or (part.ndim == 2 and key in SCALAR_KEYS) else 0


def explain_pair_batches(embed, params, probes: np.ndarray, galleries: np.ndarray,
                         positive: np.ndarray, method: str, explain_cfg, grid_shape,
                         keep_maps: bool, centres=None) -> dict[str, np.ndarray]:
    """Attention maps, masks, SM and heatmaps of a ViT for P pairs, ``explain_cfg.batch_pairs`` at a time.

    embed: ``models.vit_embedder.ViTEmbed`` (its ``apply`` gives the attention);
    probes, galleries: uint8 [P, H, W, 3]; positive: bool [P] (the decision).
    ``explain_cfg``: batch_pairs, target ("pair" | "image", see
    ``attention.targeted_pair_maps``; "image" needs ``centres`` [D, C]), fill,
    bins, dilation_size, gaussian_size, gaussian_variance. Every batch has the
    same size (the last one padded with its final pair), so each jitted step
    compiles once. Returns numpy arrays: ``SCALAR_KEYS`` ([3, P] per technique
    or [P]); with keep_maps also "maps_p", "maps_g" and ``MAP_KEYS`` [P, H, W]
    and "masks" [3, P, H, W].
    """
    num_pairs = probes.shape[0]
    collected: dict[str, list] = {}
    for rows, real in pipeline.padded_index_batches(num_pairs, min(int(explain_cfg.batch_pairs), num_pairs)):
        maps_p, maps_g, result = _explain_one_batch(
            embed, params, pipeline.uint8_to_float(probes[rows]),
            pipeline.uint8_to_float(galleries[rows]), positive[rows], method, explain_cfg,
            grid_shape, centres)
        kept = {key: result[key] for key in SCALAR_KEYS}
        if keep_maps:
            kept.update(maps_p=maps_p, maps_g=maps_g, masks=result["masks"],
                        **{key: result[key] for key in MAP_KEYS})
        for key, value in kept.items():
            value = np.asarray(value)
            part = value[:, :real] if _concat_axis(key, value) == 1 else value[:real]
            collected.setdefault(key, []).append(part)
    return {key: np.concatenate(parts, axis=_concat_axis(key, parts[0]))
            for key, parts in collected.items()}


# ----------------------------------------------------------------------------------------
# Display.


def luminance(images: jax.Array) -> jax.Array:
    """ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B of [..., H, W, 3] -> [..., H, W]."""
    return images @ jnp.asarray([0.299, 0.587, 0.114], images.dtype)


def overlay_on_luminance(image: jax.Array, heatmap: jax.Array, alpha: float = 0.6,
                         cmap: str = "jet") -> jax.Array:
    """Colour a heatmap over the grey luminance of an image.

    Args:
      image: [H, W, 3] or [B, H, W, 3] in [0, 1].
      heatmap: [H, W] or [B, H, W], >= 0; scaled by its own maximum.
      alpha: opacity of the colour where the heat is maximal; the per-pixel
        opacity is alpha x heat, so zero heat shows the plain grey face.
      cmap: a matplotlib colormap name (its 256-entry table is used on device).

    Returns:
      float32 RGB [..., H, W, 3] in [0, 1].
    """
    import matplotlib

    image = jnp.asarray(image, jnp.float32)
    heatmap = jnp.asarray(heatmap, jnp.float32)
    if image.shape[-1] != 3 or image.shape[:-1] != heatmap.shape:
        raise ValueError(f"image [..., H, W, 3] and heatmap [..., H, W] must match, got "
                         f"{tuple(image.shape)} and {tuple(heatmap.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    table = jnp.asarray(matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3],
                        jnp.float32)
    peak = jnp.max(heatmap, axis=(-2, -1), keepdims=True)
    heat = jnp.clip(jnp.where(peak > 0, heatmap / jnp.where(peak > 0, peak, 1.0), 0.0), 0, 1)
    colour = table[jnp.round(heat * 255).astype(jnp.int32)]
    grey = luminance(image)[..., None]
    weight = alpha * heat[..., None]
    return (1.0 - weight) * grey + weight * colour


def pair_figure(probe, gallery, heatmap, maps=None, binary=None, title: str | None = None,
                alpha: float = 0.6, cmap: str = "jet"):
    """Matplotlib figure for one pair: probe, gallery, optional attention maps and
    binary maps, and the heatmap overlaid on the probe's luminance.

    Args:
      probe, gallery: [H, W, 3] in [0, 1]; heatmap: [H, W].
      maps: optional (map_p, map_g) [H, W] each; binary: optional (bin_p, bin_g).
    Returns:
      a ``matplotlib.figure.Figure`` (caller saves / closes it).
    """
    import matplotlib.pyplot as plt

    panels = [("probe", np.asarray(probe), None), ("gallery", np.asarray(gallery), None)]
    if maps is not None:
        panels += [("map P", np.asarray(maps[0]), "viridis"),
                   ("map G", np.asarray(maps[1]), "viridis")]
    if binary is not None:
        panels += [("Otsu P", np.asarray(binary[0]), "gray"),
                   ("Otsu G", np.asarray(binary[1]), "gray")]
    panels.append(("heatmap on probe",
                   np.asarray(overlay_on_luminance(probe, heatmap, alpha, cmap)), None))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
    for ax, (name, img, panel_cmap) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.clip(img, 0, 1) if img.ndim == 3 else img, cmap=panel_cmap)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
