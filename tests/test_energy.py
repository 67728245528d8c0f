"""Proportional energy (eq. 7) against numpy loops, mask resizing, per-prediction means."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.metrics.energy import (
    energy_by_prediction, proportional_energy, resize_masks_nearest)


def _energy_loop(maps, masks):
    """Independent reference: explicit loops over images and pixels."""
    out = np.zeros(maps.shape[0])
    for b in range(maps.shape[0]):
        inside = total = 0.0
        for i in range(maps.shape[1]):
            for j in range(maps.shape[2]):
                total += maps[b, i, j]
                if masks[b, i, j]:
                    inside += maps[b, i, j]
        out[b] = inside / total if total > 0 else 0.0
    return out


def _rng_maps_masks(seed, b=5, h=6, w=8):
    rng = np.random.default_rng(seed)
    maps = rng.random((b, h, w)).astype(np.float32)
    maps[maps < 0.4] = 0.0  # sparse activations, like a CAM after ReLU
    maps[1] = 0.0  # a map with no activation at all
    masks = rng.random((b, h, w)) < 0.3
    masks[2] = False  # an empty mask
    masks[3] = True  # a full mask
    return maps, masks


def test_proportional_energy_matches_numpy_loop_including_all_zero_map():
    maps, masks = _rng_maps_masks(0)
    energy = np.asarray(proportional_energy(maps, masks))
    np.testing.assert_allclose(energy, _energy_loop(maps, masks), rtol=1e-5, atol=1e-7)
    assert energy[1] == 0.0  # no activation -> 0, not NaN
    assert energy[2] == 0.0  # empty mask
    assert energy[3] == pytest.approx(1.0)  # full mask holds all the energy
    assert np.all((energy >= 0) & (energy <= 1 + 1e-6))


def test_proportional_energy_under_jit_and_gradient_finite_for_zero_map():
    maps, masks = _rng_maps_masks(1)
    jitted = jax.jit(proportional_energy)(maps, masks)
    np.testing.assert_allclose(jitted, _energy_loop(maps, masks), rtol=1e-5, atol=1e-7)
    grads = jax.grad(lambda m: proportional_energy(m, masks).sum())(jnp.asarray(maps))
    assert np.all(np.isfinite(np.asarray(grads)))  # the all-zero map does not poison gradients


def test_leading_dimensions_broadcast_per_attribute():
    rng = np.random.default_rng(2)
    maps = rng.random((3, 4, 5, 6)).astype(np.float32)  # [B, A, H, W]
    masks = rng.random((3, 4, 5, 6)) < 0.5
    energy = np.asarray(proportional_energy(maps, masks))
    assert energy.shape == (3, 4)
    expected = _energy_loop(maps.reshape(12, 5, 6), masks.reshape(12, 5, 6)).reshape(3, 4)
    np.testing.assert_allclose(energy, expected, rtol=1e-5)
    # One shared mask [1, A, H, W] for every image.
    shared = np.asarray(proportional_energy(maps, masks[:1]))
    expected_shared = _energy_loop(
        maps.reshape(12, 5, 6), np.broadcast_to(masks[:1], maps.shape).reshape(12, 5, 6))
    np.testing.assert_allclose(shared, expected_shared.reshape(3, 4), rtol=1e-5)


def _nearest_loop(mask, h, w):
    hm, wm = mask.shape
    out = np.zeros((h, w), mask.dtype)
    for i in range(h):
        for j in range(w):
            out[i, j] = mask[min(int((i + 0.5) * hm / h), hm - 1), min(int((j + 0.5) * wm / w), wm - 1)]
    return out


@pytest.mark.parametrize("mask_size", [(12, 16), (3, 4), (9, 12)])
def test_masks_of_another_size_are_resized_by_nearest_neighbour(mask_size):
    rng = np.random.default_rng(3)
    maps = rng.random((2, 6, 8)).astype(np.float32)
    masks = rng.random((2, *mask_size)) < 0.5
    resized = np.asarray(resize_masks_nearest(masks, 6, 8))
    expected = np.stack([_nearest_loop(m, 6, 8) for m in masks])
    np.testing.assert_array_equal(resized, expected)
    # jax.image.resize's nearest mode (an independent implementation) agrees.
    jax_nearest = np.asarray(jax.image.resize(masks.astype(np.float32), (2, 6, 8), "nearest")) > 0.5
    np.testing.assert_array_equal(resized, jax_nearest)
    np.testing.assert_allclose(proportional_energy(maps, masks), _energy_loop(maps, expected),
                               rtol=1e-5)


def test_mask_with_another_aspect_ratio_is_a_clear_error():
    maps = np.ones((2, 6, 8), np.float32)
    with pytest.raises(ValueError, match=r"aspect ratio.*6x8"):
        proportional_energy(maps, np.ones((2, 6, 6), bool))
    with pytest.raises(ValueError, match="do not broadcast"):
        proportional_energy(maps, np.ones((3, 6, 8), bool))
    with pytest.raises(ValueError, match="maps must be"):
        proportional_energy(np.ones(5), np.ones((5, 2, 2)))


def test_energy_by_prediction_matches_hand_means():
    energy = np.array([[0.1, 0.5], [0.3, 0.7], [0.9, 0.2], [0.4, 0.6]])
    predicted = np.array([[True, False], [True, False], [False, False], [False, True]])
    result = energy_by_prediction(energy, predicted)
    np.testing.assert_allclose(result.positive, [0.2, 0.6])
    np.testing.assert_allclose(result.negative, [0.65, (0.5 + 0.7 + 0.2) / 3])
    np.testing.assert_array_equal(result.num_positive, [2, 1])
    np.testing.assert_array_equal(result.num_negative, [2, 3])
    # valid=False entries are left out of both sides.
    valid = np.ones_like(predicted)
    valid[0, 0] = False
    masked = energy_by_prediction(energy, predicted, valid=valid)
    assert masked.positive[0] == pytest.approx(0.3)
    assert masked.positive[1] == pytest.approx(0.6)


def test_energy_by_prediction_side_without_samples_is_nan_with_warning():
    energy = np.array([[0.1, 0.5, 0.2], [0.3, 0.7, 0.4]])
    predicted = np.array([[True, False, True], [True, True, False]])  # attr 0: no negatives
    with pytest.warns(RuntimeWarning, match=r"no negatively predicted.*Smiling"):
        result = energy_by_prediction(energy, predicted, names=["Smiling", "Male", "Young"])
    assert np.isnan(result.negative[0])
    np.testing.assert_allclose(result.positive, [0.2, 0.7, 0.2])  # others unaffected
    np.testing.assert_allclose(result.negative[1:], [0.5, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        energy_by_prediction(energy[:, 1:], predicted[:, 1:])  # both sides present: silent


def test_energy_by_prediction_rejects_bad_input():
    with pytest.raises(ValueError, match="must be bool"):
        energy_by_prediction(np.zeros(3), np.array([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="same shape"):
        energy_by_prediction(np.zeros((3, 2)), np.zeros((3,), bool))
