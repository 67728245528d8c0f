"""Proportional energy of a saliency map inside a region mask.

Binary-attribute CAM paper, eq. 7: for an upsampled, non-negative CAM A* and a
binary attribute mask B of the same size,

    E = sum(B * A*) / sum(A*),

the share of the map's total activation that falls inside the mask; E = 0 where
the map has no activation at all (sum(A*) = 0), so an all-zero CAM counts as
"nothing in the region" rather than NaN. E is in [0, 1] for non-negative maps
and binary masks (soft masks in [0, 1] are accepted and weight pixels).

`energy_by_prediction` reduces per-sample energies to the two numbers the paper
reports per attribute: mean energy over positively and over negatively
predicted samples.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel for a nearest-neighbour resize.

    Half-pixel centres (the convention of jax.image.resize and PIL): output
    pixel i samples the input at (i + 0.5) * size_in / size_out.
    """
    centres = (np.arange(size_out) + 0.5) * (size_in / size_out)
    return np.minimum(np.floor(centres).astype(np.int32), size_in - 1)


def resize_masks_nearest(masks, height: int, width: int):
    """Resize masks [..., Hm, Wm] to [..., height, width] by nearest neighbour.

    Only aspect-preserving resizes are allowed (Hm * width == height * Wm):
    a mask stretched to another aspect would no longer cover the same face
    region, so that is a ValueError naming both shapes.
    """
    masks = jnp.asarray(masks)
    if masks.ndim < 2:
        raise ValueError(f"masks must be [..., H, W]; got shape {masks.shape}")
    mask_h, mask_w = masks.shape[-2:]
    if (mask_h, mask_w) == (height, width):
        return masks
    if mask_h * width != height * mask_w:
        raise ValueError(
            f"mask size {mask_h}x{mask_w} (HxW) has another aspect ratio than the "
            f"map size {height}x{width}; expected masks of the maps' size or an "
            "aspect-preserving multiple of it")
    rows = _nearest_indices(mask_h, height)
    cols = _nearest_indices(mask_w, width)
    # Two static gathers: rows first, then columns.
    return jnp.take(jnp.take(masks, rows, axis=-2), cols, axis=-1)


def proportional_energy(maps, masks):
    """Share of each map's activation inside its mask (paper eq. 7).

    Args:
      maps: float [B, H, W] non-negative saliency maps (CAMs after ReLU,
        upsampled to the image size). Any leading shape works: [B, A, H, W]
        gives [B, A].
      masks: bool or float [B, Hm, Wm] attribute masks; leading dimensions
        broadcast against the maps' (e.g. [B, A, Hm, Wm] with [B, A, H, W], or
        one [1, Hm, Wm] mask for all maps). Masks of another size are resized
        by nearest neighbour when the aspect ratio matches, else ValueError.

    Returns:
      float32 [B] (the broadcast leading shape): sum(mask * map) / sum(map),
      and 0 where a map sums to 0.

    Jit-friendly: all checks are on static shapes.
    """
    maps = jnp.asarray(maps)
    masks = jnp.asarray(masks)
    if maps.ndim < 2:
        raise ValueError(f"maps must be [B, H, W]; got shape {maps.shape}")
    if masks.ndim < 2:
        raise ValueError(f"masks must be [B, H, W]; got shape {masks.shape}")
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(jnp.float32)
    height, width = maps.shape[-2:]
    masks = resize_masks_nearest(masks, height, width).astype(maps.dtype)
    try:
        jnp.broadcast_shapes(maps.shape[:-2], masks.shape[:-2])
    except ValueError:
        raise ValueError(
            f"leading dimensions of maps {maps.shape} and masks {masks.shape} do "
            "not broadcast; expected e.g. maps [B, H, W] with masks [B, H, W]"
        ) from None
    inside = jnp.sum(maps * masks, axis=(-2, -1))
    total = jnp.sum(maps, axis=(-2, -1))
    total = jnp.broadcast_to(total, inside.shape)
    has_activation = total > 0
    # The safe denominator keeps the unused branch finite, so gradients and
    # NaN checks never see 0/0.
    return jnp.where(has_activation, inside / jnp.where(has_activation, total, 1.0), 0.0)


class EnergyByPrediction(NamedTuple):
    """Mean proportional energy per attribute, split by the predicted class."""

    positive: np.ndarray  # [A] mean over positively predicted samples (NaN if none)
    negative: np.ndarray  # [A] mean over negatively predicted samples (NaN if none)
    num_positive: np.ndarray  # [A] int, samples averaged in `positive`
    num_negative: np.ndarray  # [A] int, samples averaged in `negative`


def energy_by_prediction(energy, predicted_positive, valid=None,
                         names: Sequence[str] | None = None) -> EnergyByPrediction:
    """Mean energy over positively and over negatively predicted samples.

    Args:
      energy: float [N] or [N, A] per-sample energies (from
        `proportional_energy`).
      predicted_positive: bool [N] or [N, A], same shape: the sample was
        predicted positive for that attribute (e.g. logits >= 0, as in cams.binary_target).
      valid: optional bool of the same shape; False entries are left out of
        both means (e.g. samples whose target is unknown, or non-frontal).
      names: optional attribute names (length A) for the warnings.

    Returns:
      EnergyByPrediction with arrays [A] (scalars' shape () for 1-D input).
      A side with no samples is NaN, with a RuntimeWarning naming the
      attribute; the other attributes are unaffected.

    Host-side (numpy): it reduces whole test sets once and must warn.
    """
    energy = np.asarray(energy, dtype=np.float64)
    predicted_positive = np.asarray(predicted_positive)
    if predicted_positive.dtype != np.bool_:
        raise ValueError(
            f"predicted_positive must be bool; got dtype {predicted_positive.dtype} "
            "(use logits >= 0)")
    if energy.ndim not in (1, 2) or energy.shape != predicted_positive.shape:
        raise ValueError(
            f"energy {energy.shape} and predicted_positive {predicted_positive.shape} "
            "must have the same shape [N] or [N, A]")
    valid = np.ones(energy.shape, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != energy.shape:
        raise ValueError(f"valid has shape {valid.shape}; expected {energy.shape}")

    def side(selected, label):
        count = selected.sum(axis=0)
        total = np.where(selected, energy, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        empty = np.atleast_1d(count == 0)
        if empty.any():
            which = np.flatnonzero(empty)
            labels = [names[i] if names is not None else str(i) for i in which]
            warnings.warn(
                f"no {label}ly predicted samples for attribute(s) {', '.join(labels)}; "
                f"their {label} energy is NaN", RuntimeWarning, stacklevel=3)
        return mean, count

    pos_mean, pos_count = side(valid & predicted_positive, "positive")
    neg_mean, neg_count = side(valid & ~predicted_positive, "negative")
    return EnergyByPrediction(pos_mean, neg_mean, pos_count, neg_count)
