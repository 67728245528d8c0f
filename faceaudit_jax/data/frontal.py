"""Frontal-face filter (binary-attribute CAM paper, sec. 3.3).

A face counts as frontal when its nose lies close to the line that joins the
centre of the eyes and the centre of the mouth: with eye centre E (mean of the
two eye landmarks), mouth centre M (mean of the two mouth corners) and nose N,

    ratio = dist(N, line(E, M)) / |M - E| = |cross(M - E, N - E)| / |M - E|^2,

and the face is kept when ratio < 0.1. Yawed faces push the nose sideways off
that line. The ratio is scale free, so pixel and normalised coordinates give
the same answer.

Landmarks are [B, 5, 2] (x, y) in the CelebA order: left eye, right eye, nose,
left mouth corner, right mouth corner. Missing landmarks (NaN or inf) and
degenerate ones (eye centre and mouth centre coincide, so there is no line)
make the image excluded and counted as degenerate; the ratio is never computed
with a zero denominator.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

LEFT_EYE, RIGHT_EYE, NOSE, LEFT_MOUTH, RIGHT_MOUTH = range(5)
DEFAULT_MAX_RATIO = 0.1


def _check_landmarks(landmarks):
    landmarks = jnp.asarray(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
        raise ValueError(
            f"landmarks must be [B, 5, 2] (x, y of left eye, right eye, nose, left and "
            f"right mouth corner); got shape {landmarks.shape}")
    if not jnp.issubdtype(landmarks.dtype, jnp.floating):
        landmarks = landmarks.astype(jnp.float32)
    return landmarks


def frontal_ratio(landmarks, min_eye_mouth_distance: float = 1e-6):
    """Nose offset from the eye-mouth line, relative to the eye-mouth distance.

    Args:
      landmarks: float [B, 5, 2] in the CelebA order.
      min_eye_mouth_distance: eye-centre to mouth-centre distances at or below
        this (in landmark units) count as degenerate.

    Returns:
      (ratio float [B], degenerate bool [B]); ratio is +inf where degenerate.
      Jit-friendly.
    """
    landmarks = _check_landmarks(landmarks)
    eye_centre = 0.5 * (landmarks[:, LEFT_EYE] + landmarks[:, RIGHT_EYE])
    mouth_centre = 0.5 * (landmarks[:, LEFT_MOUTH] + landmarks[:, RIGHT_MOUTH])
    axis = mouth_centre - eye_centre  # [B, 2]
    to_nose = landmarks[:, NOSE] - eye_centre
    cross = axis[:, 0] * to_nose[:, 1] - axis[:, 1] * to_nose[:, 0]
    squared_length = jnp.sum(axis * axis, axis=-1)
    finite = jnp.all(jnp.isfinite(landmarks), axis=(1, 2))
    degenerate = ~finite | ~(squared_length > min_eye_mouth_distance ** 2)
    # Safe denominator: the degenerate branch never divides by zero (nor by NaN).
    safe = jnp.where(degenerate, 1.0, squared_length)
    ratio = jnp.where(degenerate, jnp.inf, jnp.abs(jnp.where(degenerate, 0.0, cross)) / safe)
    return ratio, degenerate


def frontal_filter(landmarks, max_ratio: float = DEFAULT_MAX_RATIO,
                   min_eye_mouth_distance: float = 1e-6) -> tuple[np.ndarray, dict[str, int]]:
    """Keep mask of frontal faces and counts of what was excluded and why.

    Args:
      landmarks: [B, 5, 2] in the CelebA order; NaN marks a missing landmark.
      max_ratio: keep faces with ratio < max_ratio (the paper: 0.1).

    Returns:
      keep: bool numpy [B].
      counts: {"total", "kept", "excluded", "not_frontal", "degenerate"};
        excluded = not_frontal + degenerate.
    """
    if not (np.isfinite(max_ratio) and max_ratio > 0):
        raise ValueError(f"max_ratio must be a positive number; got {max_ratio!r}")
    ratio, degenerate = frontal_ratio(landmarks, min_eye_mouth_distance)
    ratio = np.asarray(ratio)
    degenerate = np.asarray(degenerate)
    keep = ~degenerate & (ratio < max_ratio)
    counts = {
        "total": int(keep.size),
        "kept": int(keep.sum()),
        "excluded": int((~keep).sum()),
        "not_frontal": int((~keep & ~degenerate).sum()),
        "degenerate": int(degenerate.sum()),
    }
    return keep, counts


def select(batch: Mapping[str, object], keep) -> dict:
    """The batch restricted to the kept images (every array's first axis).

    Entries that are not arrays with a leading batch axis of the right size
    (e.g. metadata strings) are passed through unchanged.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 1:
        raise ValueError(f"keep must be a bool vector [B]; got shape {keep.shape}")
    index = np.flatnonzero(keep)
    out = {}
    for name, value in batch.items():
        if hasattr(value, "shape") and len(value.shape) >= 1 and value.shape[0] == keep.size:
            out[name] = value[index]
        else:
            out[name] = value
    return out
