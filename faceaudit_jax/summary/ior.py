"""Intersection over Region (IoR, FaceX eqs. 3-4), region rankings and RP.

Per image i and region r, with G_i in [0, 1]^(H x W) a normalised attribution
map and M_ir the binary mask of region r:

    IoR_ir = sum(G_i * M_ir) / sum(M_ir)                      (eq. 3, "soft")
    IoR_r  = (1 / N_r) sum_{i : r present in i} IoR_ir         (eq. 4)

N_r counts only the images where region r is present, so rare regions
(earrings, hats, glasses) are not diluted by the images that lack them.

Everything is computed with one ``jax.ops.segment_sum`` over segment ids
``b * R + parse[b, y, x]`` (no one-hot masks), and ``IoRAccumulator`` streams
over a data set with running sums and counts (split by an integer group per
image, e.g. predicted or true class), so memory does not grow with the number
of images.

``ior_mode="thresholded"`` mirrors FaceX's released code instead of eq. 3: the
map is quantised to 8 bits and resized to 64 x 64 (bicubic), binarised at the
mean of its non-zero pixels t, and each region scores |(G > t) AND M_r| / |M_r|
with M_r the region mask resized to 64 x 64 (bilinear, antialiased) and taken
where > 0.

Ranking: regions are ranked by IoR_r, highest first, regions with NaN
(never present) left out. Background is left out by default (``exclude``):
it is not a face region and FaceX's ranking position (RP) is the rank among
the face regions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import contracts
from faceaudit_jax.regions import NUM_REGIONS, REGIONS, region_id

Array = jax.Array

IOR_MODES = ("soft", "thresholded")
# FaceX's released code scores the thresholded maps at this resolution.
THRESHOLDED_SIZE = 64
DEFAULT_RANK_EXCLUDE = ("background",)


# --------------------------------------------------------------------------
# Input checks and parse-map resizing (host side, static shapes)
# --------------------------------------------------------------------------

def check_maps(maps) -> tuple[int, int, int]:
    """Validate a batch of attribution maps [B, H, W]; return its shape."""
    shape = getattr(maps, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(
            f"maps must be [B, H, W]; got shape {None if shape is None else tuple(shape)}")
    if shape[0] == 0:
        raise ValueError("maps is an empty batch (B = 0); expected at least one map")
    return tuple(int(s) for s in shape)


def check_parse(parse, batch_size: int, num_regions: int) -> tuple[int, int]:
    """Validate parse maps [B, H', W'] (shape and ids in 0..R-1); return (H', W').

    The id range is checked on the host for numpy inputs and with one
    on-device min/max (two scalars transferred) for JAX arrays.
    """
    shape = getattr(parse, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(
            f"parse must be [B, H, W] region ids; got shape {None if shape is None else tuple(shape)}")
    if shape[0] != batch_size:
        raise ValueError(f"parse holds {shape[0]} maps for a batch of {batch_size} maps")
    dtype = np.dtype(getattr(parse, "dtype", np.int32))
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"parse must hold integer region ids; got dtype {dtype}")
    if isinstance(parse, np.ndarray):
        lo, hi = int(parse.min()), int(parse.max())
    else:
        lo, hi = (int(v) for v in jax.device_get(_min_max(parse)))
    if lo < 0 or hi >= num_regions:
        bad = lo if lo < 0 else hi
        names = ", ".join(REGIONS[:num_regions]) if num_regions <= NUM_REGIONS else ""
        raise ValueError(
            f"parse map holds region id {bad}; expected ids in 0..{num_regions - 1}"
            + (f" ({names})" if names else ""))
    return int(shape[1]), int(shape[2])


@jax.jit
def _min_max(x):
    return jnp.min(x), jnp.max(x)


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output pixels for a nearest resize (half-pixel centres)."""
    idx = np.floor((np.arange(dst) + 0.5) * (src / dst)).astype(np.int32)
    return np.clip(idx, 0, src - 1)


def check_same_aspect(src_hw: tuple[int, int], dst_hw: tuple[int, int],
                      what: str = "parse maps") -> None:
    """Raise unless src and dst sizes have the same aspect ratio."""
    (sh, sw), (dh, dw) = src_hw, dst_hw
    if sh * dw != dh * sw:
        raise ValueError(
            f"{what} of size {sh}x{sw} cannot be reconciled with maps of size {dh}x{dw}: "
            f"aspect ratios differ ({sh}/{sw} vs {dh}/{dw}); expected the same aspect ratio")


def resize_parse_nearest(parse: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of parse maps [B, H', W'] -> [B, H, W] (ids preserved).

    Any size with the same aspect ratio works (e.g. CelebAMask-HQ's 512 masks
    for 1024 images, factor 2). Shapes are static, so the gather indices are
    computed on the host; a same-size call returns ``parse`` unchanged.
    """
    src = (int(parse.shape[1]), int(parse.shape[2]))
    if src == tuple(size):
        return parse
    check_same_aspect(src, tuple(size))
    rows = nearest_indices(src[0], size[0])
    cols = nearest_indices(src[1], size[1])
    return parse[:, rows[:, None], cols[None, :]]


# --------------------------------------------------------------------------
# Per-image IoR
# --------------------------------------------------------------------------

def region_sums_and_counts(maps: Array, parse: Array, num_regions: int) -> tuple[Array, Array]:
    """sum(G * M_r) and sum(M_r) per image and region -> ([B, R] float32, [B, R] int32).

    ``maps`` [B, H, W] and ``parse`` [B, H, W] at the same size. One segment
    sum with segment id b * R + parse[b, y, x].
    """
    batch = maps.shape[0]
    offsets = (jnp.arange(batch, dtype=jnp.int32) * num_regions)[:, None, None]
    segment_ids = (parse.astype(jnp.int32) + offsets).reshape(-1)
    num_segments = batch * num_regions
    sums = jax.ops.segment_sum(maps.reshape(-1).astype(jnp.float32), segment_ids,
                               num_segments=num_segments)
    counts = jax.ops.segment_sum(jnp.ones_like(segment_ids), segment_ids,
                                 num_segments=num_segments)
    return sums.reshape(batch, num_regions), counts.reshape(batch, num_regions)


def _soft_ior(maps: Array, parse: Array, num_regions: int) -> tuple[Array, Array]:
    sums, counts = region_sums_and_counts(maps, parse, num_regions)
    present = counts > 0
    ior = jnp.where(present, sums / jnp.maximum(counts, 1).astype(jnp.float32), 0.0)
    return ior, present


def _thresholded_ior(maps: Array, parse: Array, num_regions: int) -> tuple[Array, Array]:
    size = THRESHOLDED_SIZE
    batch = maps.shape[0]
    # FaceX: uint8(map * 255) -> PIL resize to 64x64 (bicubic) -> / 255.
    levels = jnp.floor(jnp.clip(maps.astype(jnp.float32), 0.0, 1.0) * 255.0)
    small = jax.image.resize(levels, (batch, size, size), method="cubic")
    small = jnp.clip(jnp.round(small), 0.0, 255.0) / 255.0
    # Threshold: mean of the non-zero pixels (no non-zero pixel -> nothing passes).
    nonzero = small > 0
    num_nonzero = jnp.sum(nonzero, axis=(1, 2), keepdims=True)
    threshold = jnp.sum(small, axis=(1, 2), keepdims=True) / jnp.maximum(num_nonzero, 1)
    active = (small > threshold) & (num_nonzero > 0)
    # FaceX: torchvision F.resize(mask, 64) (bilinear, antialiased), then > 0.
    # One region at a time (lax.map) so memory stays at one mask per image,
    # not a [B, H', W', R] one-hot.
    def region_counts(region):
        mask = (parse == region).astype(jnp.float32)
        small_mask = jax.image.resize(mask, (batch, size, size), method="linear") > 0
        return jnp.sum(small_mask, axis=(1, 2)), jnp.sum(small_mask & active, axis=(1, 2))

    region_pixels, hits = jax.lax.map(region_counts, jnp.arange(num_regions))  # [R, B]
    region_pixels, hits = region_pixels.T, hits.T
    present = region_pixels > 0
    ior = jnp.where(present, hits / jnp.maximum(region_pixels, 1), 0.0).astype(jnp.float32)
    return ior, present


@functools.partial(jax.jit, static_argnames=("num_regions", "ior_mode"))
def _region_ior_jit(maps, parse, num_regions, ior_mode):
    if ior_mode == "soft":
        parse = resize_parse_nearest(parse, maps.shape[1:])
        return _soft_ior(maps, parse, num_regions)
    return _thresholded_ior(maps, parse, num_regions)


def _check_mode(ior_mode: str) -> None:
    if ior_mode not in IOR_MODES:
        raise ValueError(f"unknown ior_mode {ior_mode!r}; expected one of: {', '.join(IOR_MODES)}")


def _prepare(maps, parse, num_regions: int, ior_mode: str):
    _check_mode(ior_mode)
    if not isinstance(num_regions, (int, np.integer)) or num_regions < 1:
        raise ValueError(f"num_regions must be a positive int; got {num_regions!r}")
    batch, height, width = check_maps(maps)
    # Maps outside [0, 1] (0..255, signed) give IoR far from eq. 3's meaning; NaN
    # would pass through soft IoR and vanish in thresholded IoR.
    contracts.check_unit_range(maps, "maps")
    parse_hw = check_parse(parse, batch, int(num_regions))
    check_same_aspect(parse_hw, (height, width))
    return jnp.asarray(maps), jnp.asarray(parse)


def region_ior(maps, parse, num_regions: int = NUM_REGIONS,
               ior_mode: str = "soft") -> tuple[Array, Array]:
    """Per-image IoR -> (ior [B, R] float32, present [B, R] bool).

    ``maps`` [B, H, W] normalised attribution maps (e.g. from
    ``compute_cams``): float, finite, in [0, 1], else ValueError naming the
    first bad value (faceaudit_jax.contracts); ``parse`` [B, H', W'] integer
    region ids in 0..R-1 (else ValueError), resized to
    H x W by nearest neighbour when its size differs (same aspect ratio
    required). ``ior_mode="soft"`` is eq. 3, sum(G*M)/sum(M);
    ``"thresholded"`` is FaceX's released variant (module docstring). A
    region absent from an image has ior 0 and present False; a map with no
    activation gives 0 everywhere.
    """
    maps, parse = _prepare(maps, parse, num_regions, ior_mode)
    return _region_ior_jit(maps, parse, num_regions=int(num_regions), ior_mode=ior_mode)


def summarize_ior(ior, present) -> Array:
    """IoR_r [R]: the mean of ior[:, r] over the images where r is present (eq. 4).

    NaN for a region present in no image.
    """
    ior = jnp.asarray(ior, dtype=jnp.float32)
    present = jnp.asarray(present, dtype=bool)
    if ior.ndim != 2 or present.shape != ior.shape:
        raise ValueError(
            f"ior and present must both be [B, R]; got {ior.shape} and {present.shape}")
    counts = jnp.sum(present, axis=0)
    sums = jnp.sum(jnp.where(present, ior, 0.0), axis=0)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)


# --------------------------------------------------------------------------
# Streaming accumulator
# --------------------------------------------------------------------------

class IoRState(NamedTuple):
    """Running totals; a pytree of fixed-size arrays (memory flat in the data set size).

    sums [G, R]: sum of IoR_ir over images of group g where r is present;
    counts [G, R]: number of those images (N_r per group);
    num_images [G]: images seen per group.
    """
    sums: Array
    counts: Array
    num_images: Array


class IoRSummary(NamedTuple):
    """Result of ``IoRAccumulator.finalize`` (numpy arrays).

    ior [R] over all images; counts [R] (N_r); num_images (int);
    ior_by_group [G, R] (NaN where a group never shows a region);
    counts_by_group [G, R]; num_images_by_group [G].
    """
    ior: np.ndarray
    counts: np.ndarray
    num_images: int
    ior_by_group: np.ndarray
    counts_by_group: np.ndarray
    num_images_by_group: np.ndarray


@functools.partial(jax.jit, static_argnames=("num_regions", "ior_mode"))
def _ior_update_jit(state: IoRState, maps, parse, groups, num_regions, ior_mode):
    ior, present = _region_ior_jit(maps, parse, num_regions=num_regions, ior_mode=ior_mode)
    num_groups = state.sums.shape[0]
    sums = jax.ops.segment_sum(jnp.where(present, ior, 0.0), groups, num_segments=num_groups)
    counts = jax.ops.segment_sum(present.astype(jnp.int32), groups, num_segments=num_groups)
    images = jax.ops.segment_sum(jnp.ones_like(groups), groups, num_segments=num_groups)
    return IoRState(state.sums + sums, state.counts + counts, state.num_images + images)


class IoRAccumulator:
    """Streaming IoR over a data set, split by an integer group id per image.

    Pure functional (the state is an explicit pytree)::

        state = IoRAccumulator.init(num_regions=19, num_groups=2)
        for batch in data:                    # maps from compute_cams
            state = IoRAccumulator.update(state, maps, batch["parse"], predicted)
        summary = IoRAccumulator.finalize(state)   # IoRSummary

    Use one state per grouping (e.g. one grouped by predicted class, one by
    true class). The update is jitted once per (batch shape, mode).
    """

    @staticmethod
    def init(num_regions: int = NUM_REGIONS, num_groups: int = 1) -> IoRState:
        if num_regions < 1 or num_groups < 1:
            raise ValueError(
                f"num_regions and num_groups must be >= 1; got {num_regions}, {num_groups}")
        return IoRState(sums=jnp.zeros((num_groups, num_regions), jnp.float32),
                        counts=jnp.zeros((num_groups, num_regions), jnp.int32),
                        num_images=jnp.zeros((num_groups,), jnp.int32))

    @staticmethod
    def update(state: IoRState, maps, parse, groups=None, ior_mode: str = "soft") -> IoRState:
        """Add a batch: maps [B, H, W], parse [B, H', W'], groups [B] ints in 0..G-1 (default 0)."""
        num_groups, num_regions = (int(s) for s in state.sums.shape)
        maps, parse = _prepare(maps, parse, num_regions, ior_mode)
        batch = maps.shape[0]
        if groups is None:
            groups = jnp.zeros((batch,), jnp.int32)
        else:
            groups_host = np.asarray(groups)
            if groups_host.shape != (batch,) or not np.issubdtype(groups_host.dtype, np.integer):
                raise ValueError(
                    f"groups must be integer ids of shape [{batch}]; got shape "
                    f"{groups_host.shape} and dtype {groups_host.dtype}")
            if groups_host.min() < 0 or groups_host.max() >= num_groups:
                bad = groups_host.min() if groups_host.min() < 0 else groups_host.max()
                raise ValueError(
                    f"group id {int(bad)} out of range; expected ids in 0..{num_groups - 1}")
            groups = jnp.asarray(groups_host, jnp.int32)
        return _ior_update_jit(state, maps, parse, groups,
                               num_regions=num_regions, ior_mode=ior_mode)

    @staticmethod
    def finalize(state: IoRState) -> IoRSummary:
        """IoR_r overall and per group (NaN where never present). Raises on an empty data set."""
        sums, counts, images = (np.asarray(a) for a in jax.device_get(tuple(state)))
        if images.sum() == 0:
            raise ValueError("IoRAccumulator saw no images (empty data set); nothing to summarise")
        with np.errstate(invalid="ignore", divide="ignore"):
            by_group = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            total_counts = counts.sum(0)
            overall = np.where(total_counts > 0, sums.sum(0) / np.maximum(total_counts, 1), np.nan)
        return IoRSummary(ior=overall.astype(np.float32), counts=total_counts,
                          num_images=int(images.sum()),
                          ior_by_group=by_group.astype(np.float32), counts_by_group=counts,
                          num_images_by_group=images)


def merge_ior_states(stacked: IoRState) -> IoRState:
    """One ``IoRState`` from states stacked on a leading axis ([S, G, R], [S, G, R], [S, G]).

    The totals add, so merging the states of disjoint image sets equals the
    state of their union (up to float summation order): how the running sums
    of several processes (``distributed.global_ior_state``) or chunks combine.
    """
    sums, counts, images = (jnp.asarray(a) for a in stacked)
    if sums.ndim != 3 or counts.shape != sums.shape or images.shape != sums.shape[:2]:
        raise ValueError(
            f"stacked IoR states must be sums/counts [S, G, R] and num_images [S, G]; got "
            f"{sums.shape}, {counts.shape}, {images.shape}")
    return IoRState(sums=jnp.sum(sums, axis=0), counts=jnp.sum(counts, axis=0),
                    num_images=jnp.sum(images, axis=0))


# --------------------------------------------------------------------------
# Ranking and ranking position (RP)
# --------------------------------------------------------------------------

def _ranked_values(ior_r, names: Sequence[str], exclude: Sequence[str]):
    values = np.asarray(jax.device_get(ior_r), dtype=np.float64)
    if values.ndim != 1 or values.shape[0] != len(names):
        raise ValueError(
            f"ior_r must be [R] with R = {len(names)} region names; got shape {values.shape}")
    for name in exclude:
        if name not in names:
            raise ValueError(f"excluded region {name!r} is not one of: {', '.join(names)}")
    keep = [i for i, n in enumerate(names) if n not in exclude and not np.isnan(values[i])]
    return values, keep


def rank_regions(ior_r, names: Sequence[str] = REGIONS,
                 exclude: Sequence[str] = DEFAULT_RANK_EXCLUDE) -> list[tuple[int, str, float]]:
    """Regions by IoR_r, highest first: [(rank, name, value), ...].

    NaN (never present) regions and ``exclude`` (background by default) are
    left out. Rank is 1 + the number of ranked regions with a strictly higher
    value, so ties share a rank (and agree with ``ranking_position``).
    """
    values, keep = _ranked_values(ior_r, names, exclude)
    kept_values = values[keep]
    order = sorted(keep, key=lambda i: (-values[i], i))
    return [(1 + int(np.sum(kept_values > values[i])), names[i], float(values[i])) for i in order]


def region_ranks(ior_r, names: Sequence[str] = REGIONS,
                 exclude: Sequence[str] = DEFAULT_RANK_EXCLUDE) -> dict[str, int]:
    """name -> 1-based rank for every ranked region (see ``rank_regions``)."""
    return {name: rank for rank, name, _ in rank_regions(ior_r, names, exclude)}


def ranking_position(ior_r, region_names: Sequence[str], names: Sequence[str] = REGIONS,
                     exclude: Sequence[str] = DEFAULT_RANK_EXCLUDE) -> Optional[int]:
    """FaceX's RP: the best (smallest) 1-based rank among ``region_names``.

    Background is excluded from the ranking by default, so RP counts face
    regions only. Returns None when none of the given regions is ranked
    (never present, NaN). Raises on unknown region names.
    """
    if isinstance(region_names, str):
        region_names = (region_names,)
    if not region_names:
        raise ValueError("region_names is empty; expected at least one region name")
    for name in region_names:
        if names is REGIONS:
            region_id(name)
        elif name not in names:
            raise ValueError(f"unknown region {name!r}; expected one of: {', '.join(names)}")
    ranks = region_ranks(ior_r, names, exclude)
    found = [ranks[n] for n in region_names if n in ranks]
    return min(found) if found else None


# --------------------------------------------------------------------------
# Left-right symmetry diagnostic
# --------------------------------------------------------------------------

# (left, right) twins among the regions: a model that looks at a face without
# a side preference scores them alike on average.
SYMMETRIC_PAIRS = (("l_ear", "r_ear"), ("l_eye", "r_eye"), ("l_brow", "r_brow"))


def left_right_symmetry(ior_r, names: Sequence[str] = REGIONS,
                        pairs: Sequence[tuple[str, str]] = SYMMETRIC_PAIRS) -> dict:
    """Right-minus-left IoR over twin regions: a standing check for misplaced maps.

    ``ior_r`` is [R] (one audit) or [..., R] (several audits stacked); each
    (audit, pair) with both IoRs finite is one comparison. Returns
    ``mean_right_minus_left`` (mean of IoR(right) - IoR(left); NaN if no
    comparison), ``right_wins_share`` (share of comparisons where the right
    twin scores strictly higher), ``num_pairs`` and ``pairs`` (pair name ->
    mean difference, NaN where never comparable). On faces rendered
    left-right symmetric, a map placed where the model looks gives a mean
    near 0 and a share near 0.5; a map shifted sideways does not
    (docs/design.md, "Findings that shape the defaults").
    """
    values = np.asarray(jax.device_get(ior_r), dtype=np.float64)
    if values.ndim < 1 or values.shape[-1] != len(names):
        raise ValueError(
            f"ior_r must be [..., R] with R = {len(names)} region names; got shape {values.shape}")
    values = values.reshape(-1, len(names))
    index = {n: i for i, n in enumerate(names)}
    for left, right in pairs:
        for name in (left, right):
            if name not in index:
                raise ValueError(f"unknown region {name!r} in pairs; expected one of: "
                                 f"{', '.join(names)}")
    diffs, per_pair = [], {}
    for left, right in pairs:
        d = values[:, index[right]] - values[:, index[left]]
        d = d[np.isfinite(d)]
        diffs.append(d)
        per_pair[f"{right}-{left}"] = float(d.mean()) if d.size else float("nan")
    all_diffs = np.concatenate(diffs)
    n = int(all_diffs.size)
    return {
        "mean_right_minus_left": float(all_diffs.mean()) if n else float("nan"),
        "right_wins_share": float(np.mean(all_diffs > 0)) if n else float("nan"),
        "num_pairs": n,
        "pairs": per_pair,
    }


__all__ = [
    "IOR_MODES", "THRESHOLDED_SIZE", "region_ior", "summarize_ior",
    "region_sums_and_counts", "resize_parse_nearest", "nearest_indices",
    "check_maps", "check_parse", "check_same_aspect",
    "IoRState", "IoRSummary", "IoRAccumulator", "merge_ior_states",
    "rank_regions", "region_ranks", "ranking_position",
    "SYMMETRIC_PAIRS", "left_right_symmetry",
]
