"""Frontal filter (sec. 3.3) on hand-made landmarks."""

import jax
import numpy as np
import pytest

from faceaudit_jax.data.frontal import frontal_filter, frontal_ratio, select

# CelebA order: left eye, right eye, nose, left mouth corner, right mouth corner.
FRONTAL = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], np.float32)


def _with_nose_shift(dx):
    face = FRONTAL.copy()
    face[2, 0] += dx
    return face


def _ratio_reference(face):
    """Projection-based distance (a different formula than the cross product)."""
    eye = (face[0] + face[1]) / 2
    mouth = (face[3] + face[4]) / 2
    axis = mouth - eye
    t = np.dot(face[2] - eye, axis) / np.dot(axis, axis)
    foot = eye + t * axis
    return np.linalg.norm(face[2] - foot) / np.linalg.norm(axis)


def _rotate(face, angle, centre=(50.0, 60.0)):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]], np.float32)
    return (face - centre) @ rot.T + centre


def test_frontal_yawed_and_threshold():
    # eye centre (50, 40), mouth centre (50, 80): eye-mouth distance 40, so a
    # nose shift of dx gives ratio dx / 40.
    faces = np.stack([FRONTAL, _with_nose_shift(10.0), _with_nose_shift(3.9),
                      _with_nose_shift(-4.1), _rotate(_with_nose_shift(1.0), 0.7)])
    keep, counts = frontal_filter(faces)
    np.testing.assert_array_equal(keep, [True, False, True, False, True])
    assert counts == {"total": 5, "kept": 3, "excluded": 2, "not_frontal": 2, "degenerate": 0}
    ratio, degenerate = frontal_ratio(faces)
    np.testing.assert_allclose(ratio, [0.0, 0.25, 3.9 / 40, 4.1 / 40, 1.0 / 40], rtol=1e-5,
                               atol=1e-7)
    assert not np.asarray(degenerate).any()
    # A stricter threshold drops the 3.9 px shift too.
    keep_strict, _ = frontal_filter(faces, max_ratio=0.05)
    np.testing.assert_array_equal(keep_strict, [True, False, False, False, True])


def test_ratio_matches_projection_reference_and_is_scale_free():
    rng = np.random.default_rng(0)
    faces = FRONTAL[None] + rng.normal(scale=4.0, size=(20, 5, 2)).astype(np.float32)
    ratio, _ = frontal_ratio(faces)
    np.testing.assert_allclose(ratio, [_ratio_reference(f) for f in faces], rtol=1e-4, atol=1e-6)
    # Normalised coordinates (divide by the image size) give the same ratios.
    scaled, _ = frontal_ratio(faces / 128.0)
    np.testing.assert_allclose(scaled, ratio, rtol=1e-4, atol=1e-6)


def test_degenerate_and_missing_landmarks_are_excluded_and_counted_without_nan():
    coincide = FRONTAL.copy()
    coincide[3:] = coincide[:2]  # mouth corners on the eyes: the centres coincide
    missing = FRONTAL.copy()
    missing[2] = np.nan
    infinite = FRONTAL.copy()
    infinite[4, 1] = np.inf
    faces = np.stack([FRONTAL, coincide, missing, infinite, _with_nose_shift(20.0)])
    keep, counts = frontal_filter(faces)
    np.testing.assert_array_equal(keep, [True, False, False, False, False])
    assert counts == {"total": 5, "kept": 1, "excluded": 4, "not_frontal": 1, "degenerate": 3}
    # No operation divides by zero: debug_nans raises on any NaN produced.
    with jax.debug_nans(True):
        ratio, degenerate = jax.jit(frontal_ratio)(np.stack([FRONTAL, coincide]))
    np.testing.assert_array_equal(degenerate, [False, True])
    assert np.isinf(ratio[1])


def test_select_keeps_rows_of_every_batch_array():
    batch = {"image": np.arange(3 * 2).reshape(3, 2), "landmarks": np.stack([FRONTAL] * 3),
             "name": "synthetic"}
    out = select(batch, np.array([True, False, True]))
    np.testing.assert_array_equal(out["image"], [[0, 1], [4, 5]])
    assert out["landmarks"].shape == (2, 5, 2) and out["name"] == "synthetic"


def test_bad_shapes_and_thresholds():
    with pytest.raises(ValueError, match=r"\[B, 5, 2\]"):
        frontal_filter(np.zeros((3, 68, 2)))
    with pytest.raises(ValueError, match="max_ratio"):
        frontal_filter(FRONTAL[None], max_ratio=0.0)
