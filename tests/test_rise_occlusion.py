"""RISE and occlusion baselines (similarity versions) and the similarity CAM wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.explain import corrrise as cr
from faceaudit_jax.explain import occlusion as occ
from faceaudit_jax.explain import rise

H = W = 20
REGION = (slice(6, 12), slice(8, 14))
KEY = jax.random.PRNGKey(5)
ONE_DEVICE = jax.devices()[:1]


def region_embed(x):
    """cos to the unmasked bright image = sin(region mean * pi / 2)."""
    theta = (1.0 - x[:, REGION[0], REGION[1], :].mean(axis=(1, 2, 3))) * (jnp.pi / 2)
    return jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)


def pair_images():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.6, (H, W, 3)).astype(np.float32)
    a[REGION[0], REGION[1]] = 1.0
    return jnp.asarray(a), jnp.asarray(a)


def inside_mask():
    inside = np.zeros((H, W), bool)
    inside[REGION] = True
    return inside


# ---------------------------------------------------------------- RISE

def test_rise_masks():
    masks = np.asarray(rise.generate_rise_masks(KEY, 6, (H, W + 4), grid_size=4, keep_prob=0.5))
    assert masks.shape == (6, H, W + 4)
    assert masks.min() >= 0.0 and masks.max() <= 1.0 + 1e-6
    assert np.ptp(masks) > 0.5
    ones = rise.generate_rise_masks(KEY, 3, (H, W), grid_size=4, keep_prob=1.0)
    np.testing.assert_allclose(ones, 1.0, atol=1e-6)


def test_rise_matches_materialised_and_sharded():
    a, b = pair_images()
    masks = rise.generate_rise_masks(KEY, 90, (H, W), grid_size=5, keep_prob=0.5)
    scores = cr.cosine_similarity(region_embed(a[None] * masks[..., None]), region_embed(b[None]))
    expected = np.einsum("k,khw->hw", np.asarray(scores, np.float64),
                         np.asarray(masks, np.float64)) / (90 * 0.5)
    one = rise.rise(region_embed, a, b, KEY, num_masks=90, grid_size=5, chunk_size=16,
                    devices=ONE_DEVICE)
    four = rise.rise(region_embed, a, b, KEY, num_masks=90, grid_size=5, chunk_size=16)
    np.testing.assert_allclose(one[0], expected, rtol=1e-5, atol=1e-5)
    for x, y in zip(one, four):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_rise_peaks_on_region():
    a, b = pair_images()
    sal_a, _ = rise.rise(region_embed, a, b, KEY, num_masks=500, grid_size=5, chunk_size=128,
                         devices=ONE_DEVICE)
    sal = np.asarray(sal_a)
    inside = inside_mask()
    far = np.ones((H, W), bool)
    far[2:16, 4:18] = False
    assert inside[np.unravel_index(np.argmax(sal), sal.shape)]
    assert sal[inside].mean() > sal[far].mean() + 0.1


# ---------------------------------------------------------------- occlusion

def test_occluder_positions_cover_edges():
    pos = occ.occluder_positions((10, 11), patch_size=4, stride=3)
    rows, cols = np.unique(pos[:, 0]), np.unique(pos[:, 1])
    np.testing.assert_array_equal(rows, [0, 3, 6])
    np.testing.assert_array_equal(cols, [0, 3, 6, 7])
    assert len(pos) == 12


def test_occlusion_matches_numpy_loop_and_peaks_on_region():
    a, b = pair_images()
    b = b.at[0:3].set(0.1)
    map_a, map_b = occ.occlusion(region_embed, a, b, patch_size=5, stride=3, fill_value=0.2,
                                 chunk_size=8)
    ea, eb = np.asarray(region_embed(a[None]))[0], np.asarray(region_embed(b[None]))[0]

    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    base = cos(ea, eb)
    for image, other, got in ((a, eb, map_a), (b, ea, map_b)):
        total = np.zeros((H, W))
        count = np.zeros((H, W))
        for top, left in occ.occluder_positions((H, W), 5, 3):
            x = np.asarray(image).copy()
            x[top:top + 5, left:left + 5] = 0.2
            drop = base - cos(np.asarray(region_embed(x[None]))[0], other)
            total[top:top + 5, left:left + 5] += drop
            count[top:top + 5, left:left + 5] += 1
        np.testing.assert_allclose(got, total / count, atol=1e-5)
    m = np.asarray(map_a)
    near = np.zeros((H, W), bool)
    near[2:16, 4:18] = True  # occluders that can touch the region
    assert np.all(m[~near] == 0.0)
    assert np.all(m[inside_mask()] > 0.0)
    one = occ.occlusion(region_embed, a, b, patch_size=5, stride=3, fill_value=0.2,
                        chunk_size=8, devices=ONE_DEVICE)
    np.testing.assert_allclose(one[0], map_a, atol=1e-6)


def test_bad_inputs():
    a, b = pair_images()
    with pytest.raises(ValueError, match="same size"):
        rise.rise(region_embed, a, b[:-2], KEY)
    with pytest.raises(ValueError, match="keep_prob"):
        rise.rise(region_embed, a, b, KEY, keep_prob=0.0)
    with pytest.raises(ValueError, match="grid_size"):
        rise.rise(region_embed, a, b, KEY, grid_size=H + 1)
    with pytest.raises(ValueError, match="larger than the image"):
        occ.occlusion(region_embed, a, b, patch_size=H + 1)
    with pytest.raises(ValueError, match="stride=0"):
        occ.occlusion(region_embed, a, b, stride=0)
    with pytest.raises(ValueError, match="channel count"):
        occ.occlusion(region_embed, a, b[..., :2])


# ---------------------------------------------------------------- similarity CAM

def test_similarity_cam_is_compute_cams_on_the_cosine():
    from faceaudit_jax.explain import cams

    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    dense = jnp.asarray(rng.normal(size=(4 * 4 * 4, 6)), jnp.float32)

    def features_fn(x):
        y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y)

    def head_fn(fmap):
        return fmap.reshape(fmap.shape[0], -1) @ dense

    images_a = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
    images_b = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
    cam_a, cam_b = cr.similarity_cam(features_fn, head_fn, images_a, images_b,
                                     method="grad_cam_plusplus")
    ref_a = head_fn(features_fn(images_a))
    ref_b = head_fn(features_fn(images_b))
    exp_a = cams.compute_cams(features_fn, head_fn, images_a, cams.cosine_target(ref_b),
                              method="grad_cam_plusplus")
    exp_b = cams.compute_cams(features_fn, head_fn, images_b, cams.cosine_target(ref_a),
                              method="grad_cam_plusplus")
    assert cam_a.shape == (2, 8, 8)
    np.testing.assert_allclose(cam_a, exp_a, atol=1e-5)
    np.testing.assert_allclose(cam_b, exp_b, atol=1e-5)
