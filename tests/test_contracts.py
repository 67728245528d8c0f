"""Value contracts of the explanation entry points: images and maps float, finite, in [0, 1];
parse ids in range. Each case used to run and return plausible-looking wrong numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import contracts
from faceaudit_jax.explain import cams, corrrise
from faceaudit_jax.summary import ior


def _pool_features(images):
    return jax.lax.reduce_window(images, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _head(fmap):
    return fmap.mean(axis=(1, 2)) @ jnp.asarray([[1.0], [-2.0], [0.5]])


_TARGET = cams.make_binary_target("predicted")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("convert, message", [
    (lambda x: (x * 255).astype(np.uint8), "dtype uint8; expected floating-point values in \\[0, 1\\]"),
    (lambda x: x * 255, "expected values in \\[0, 1\\]"),
    (lambda x: 2 * x - 1, "expected values in \\[0, 1\\]"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), "non-finite value nan at index"),
])
@pytest.mark.parametrize("as_jax", [False, True])
def test_compute_cams_rejects_images_outside_the_contract(images, convert, message, as_jax):
    bad = convert(images)
    bad = jnp.asarray(bad) if as_jax else bad
    with pytest.raises(ValueError, match=message):
        cams.compute_cams(_pool_features, _head, bad, _TARGET)
    with pytest.raises(ValueError, match=message):
        cams.make_cam_fn(_pool_features, _head, _TARGET)(jnp.asarray(bad))


def test_images_in_the_contract_pass_and_a_rounding_overshoot_is_tolerated(images):
    maps = cams.compute_cams(_pool_features, _head, np.clip(images, 0, 1) * (1 + 1e-6), _TARGET)
    assert maps.shape == (2, 8, 8) and bool(jnp.all(jnp.isfinite(maps)))


def test_inside_a_callers_jit_bad_images_give_nan_maps_not_zeros(images):
    cam_fn = cams.make_cam_fn(_pool_features, _head, _TARGET)
    bad = jnp.asarray(images).at[1, 0, 0, 0].set(jnp.nan)
    maps = np.asarray(jax.jit(cam_fn)(bad))
    assert np.isnan(maps[1]).all()
    np.testing.assert_allclose(maps[0], np.asarray(cam_fn(jnp.asarray(images)))[0], atol=1e-6)


def _embed(x):
    return x.reshape(x.shape[0], -1)[:, :16] + 0.1


@pytest.mark.parametrize("convert, message", [
    (lambda x: (x * 255).astype(np.uint8), "image_a has dtype uint8"),
    (lambda x: x * 255, "image_a holds .* expected values in \\[0, 1\\]"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x),
     "image_a holds a non-finite value nan at index \\(0, 2, 1\\)"),
])
def test_corrrise_rejects_images_outside_the_contract(images, convert, message):
    a, b = images[0], images[1]
    with pytest.raises(ValueError, match=message):
        corrrise.corrrise(_embed, convert(a), b, jax.random.key(0), num_masks=4, num_patches=1,
                          patch_size=2)


def test_corrrise_batch_checks_jax_arrays_too(images):
    with pytest.raises(ValueError, match="images_b holds 255"):
        corrrise.corrrise_batch(_embed, jnp.asarray(images), jnp.asarray(images).at[0, 0, 0, 0].set(255.0),
                                jax.random.key(0), num_masks=4, num_patches=1, patch_size=2)


@pytest.fixture(scope="module")
def maps_and_parse():
    rng = np.random.default_rng(1)
    maps = rng.uniform(size=(2, 8, 8)).astype(np.float32)
    parse = rng.integers(0, 19, size=(2, 8, 8)).astype(np.int32)
    return maps, parse


@pytest.mark.parametrize("convert, message", [
    (lambda m: m * 255, "maps holds .* expected values in \\[0, 1\\]"),
    (lambda m: m - 0.5, "maps holds -.* expected values in \\[0, 1\\]"),
    (lambda m: np.where(np.arange(m.size).reshape(m.shape) == 3, np.nan, m), "maps holds a non-finite value nan"),
])
@pytest.mark.parametrize("mode", ["soft", "thresholded"])
def test_region_ior_rejects_maps_outside_the_contract(maps_and_parse, convert, message, mode):
    maps, parse = maps_and_parse
    bad = convert(maps)
    with pytest.raises(ValueError, match=message):
        ior.region_ior(bad, parse, ior_mode=mode)
    state = ior.IoRAccumulator.init()
    with pytest.raises(ValueError, match=message):
        ior.IoRAccumulator.update(state, jnp.asarray(bad), jnp.asarray(parse), ior_mode=mode)


def test_region_ior_rejects_parse_ids_out_of_range(maps_and_parse):
    maps, parse = maps_and_parse
    with pytest.raises(ValueError, match="region id 19; expected ids in 0..18"):
        ior.region_ior(maps, jnp.asarray(parse).at[0, 0, 0].set(19))


def test_unit_violation_names_the_first_bad_index():
    x = np.zeros((2, 3))
    assert contracts.unit_violation(x, "x") is None
    x[1, 2] = 1.5
    assert "x holds 1.5 at index (1, 2) (range 0..1.5)" in contracts.unit_violation(x, "x")
    x[0, 1] = np.inf
    assert "non-finite value inf at index (0, 1)" in contracts.unit_violation(x, "x")
