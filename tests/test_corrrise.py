"""CorrRISE: correlation maps, masks, streaming/sharded equivalence, black-box adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from faceaudit_jax.explain import corrrise as cr

H = W = 20
REGION = (slice(6, 12), slice(8, 14))  # rows 6..11, cols 8..13


def region_embed(x):
    """Embedding at angle (1 - mean of the region) * pi/2: the cosine to an
    unmasked bright image is sin(region mean * pi/2), so the score grows with
    the region's brightness over the whole range and ignores other pixels."""
    theta = (1.0 - x[:, REGION[0], REGION[1], :].mean(axis=(1, 2, 3))) * (jnp.pi / 2)
    return jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)


def region_embed_np(x):
    theta = (1.0 - x[:, REGION[0], REGION[1], :].mean(axis=(1, 2, 3))) * (np.pi / 2)
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1)


REGION_EMBED_NP = cr.numpy_embed_fn(region_embed_np, 2)


def constant_embed(x):
    return jnp.ones((x.shape[0], 4), x.dtype) * jnp.array([1.0, 2.0, 3.0, 4.0])


def pair_images():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.6, (H, W, 3)).astype(np.float32)
    a[REGION[0], REGION[1]] = 1.0
    b = a.copy()
    b[REGION[0], REGION[1]] = 0.9
    return jnp.asarray(a), jnp.asarray(b)


KEY = jax.random.PRNGKey(3)
SMALL = dict(num_masks=100, num_patches=3, patch_size=4)
ONE_DEVICE = jax.devices()[:1]


def materialised_reference(embed, image_a, image_b, key, correlation="pearson", **kw):
    """Maps from the full mask stack and directly computed scores (no chunks)."""
    masks = cr.generate_masks(key, kw["num_masks"], image_a.shape[:2], kw["num_patches"],
                              kw["patch_size"], kw.get("patch_value", "random"))
    ea, eb = embed(image_a[None]), embed(image_b[None])
    sc_a = cr.cosine_similarity(embed(image_a[None] * masks[..., None]), eb)
    sc_b = cr.cosine_similarity(embed(image_b[None] * masks[..., None]), ea)
    fn = cr.pearson_map if correlation == "pearson" else cr.spearman_map
    return fn(sc_a, masks), fn(sc_b, masks)


# ---------------------------------------------------------------- correlations

def test_pearson_map_matches_numpy_corrcoef_with_constant_pixels():
    rng = np.random.default_rng(1)
    n, h, w = 40, 5, 6
    masks = rng.uniform(size=(n, h, w)).astype(np.float32)
    masks[:, 0, 0] = 1.0        # never covered
    masks[:, 2, 3] = 0.37       # constant, not exactly representable
    masks[:, 4, 5] = 0.0
    scores = (masks[:, 1, 1] * 2 + rng.normal(size=n) * 0.3).astype(np.float32)
    got = np.asarray(cr.pearson_map(scores, masks))
    for i in range(h):
        for j in range(w):
            col = masks[:, i, j].astype(np.float64)
            expected = 0.0 if np.ptp(col) == 0 else np.corrcoef(scores, col)[0, 1]
            assert got[i, j] == pytest.approx(expected, abs=2e-5), (i, j)
    assert got[0, 0] == 0.0 and got[2, 3] == 0.0 and got[4, 5] == 0.0
    assert got[1, 1] > 0.8


def test_pearson_map_constant_scores_is_zero_not_nan():
    masks = np.random.default_rng(2).uniform(size=(10, 3, 3)).astype(np.float32)
    got = np.asarray(cr.pearson_map(np.full(10, 0.73, np.float32), masks))
    assert np.all(got == 0.0)


def test_rankdata_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 4, size=(25, 7)).astype(np.float32)
    got = np.asarray(cr.rankdata(x, axis=0))
    np.testing.assert_allclose(got, scipy.stats.rankdata(x, axis=0), atol=1e-6)
    got1 = np.asarray(cr.rankdata(x, axis=1))
    np.testing.assert_allclose(got1, scipy.stats.rankdata(x, axis=1), atol=1e-6)


def test_spearman_map_matches_scipy_per_pixel():
    rng = np.random.default_rng(4)
    n, h, w = 30, 4, 5
    # Binary pixels (ties), continuous pixels and a constant pixel.
    masks = np.where(rng.uniform(size=(n, h, w)) < 0.4, rng.uniform(size=(n, h, w)), 1.0)
    masks[:, :2] = (masks[:, :2] < 1.0) * 0.0 + (masks[:, :2] == 1.0)
    masks[:, 3, 4] = 1.0
    masks = masks.astype(np.float32)
    scores = np.round(masks[:, 2, 2] + rng.normal(size=n) * 0.5, 1).astype(np.float32)
    got = np.asarray(cr.spearman_map(scores, masks))
    for i in range(h):
        for j in range(w):
            if np.ptp(masks[:, i, j]) == 0:
                assert got[i, j] == 0.0
            else:
                expected = scipy.stats.spearmanr(scores, masks[:, i, j]).statistic
                assert got[i, j] == pytest.approx(expected, abs=2e-5), (i, j)


def test_split_signed():
    s = jnp.array([[-0.5, 0.0], [0.25, 1.0]])
    plus, minus = cr.split_signed(s)
    np.testing.assert_array_equal(plus, [[0.0, 0.0], [0.25, 1.0]])
    np.testing.assert_array_equal(minus, [[-0.5, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(plus + minus, s)


# ---------------------------------------------------------------- masks

def numpy_mask(key, index, h, w, num_patches, patch_size, patch_value):
    """Independent painter: draw the same random numbers, paint patches in order."""
    k = jax.random.fold_in(key, index)
    ky, kx, kv = jax.random.split(k, 3)
    tops = np.asarray(jax.random.randint(ky, (num_patches,), 0, h - patch_size + 1))
    lefts = np.asarray(jax.random.randint(kx, (num_patches,), 0, w - patch_size + 1))
    values = (np.asarray(jax.random.uniform(kv, (num_patches,))) if patch_value == "random"
              else np.full(num_patches, patch_value))
    mask = np.ones((h, w), np.float32)
    for t, l, v in zip(tops, lefts, values):
        mask[t:t + patch_size, l:l + patch_size] = v  # later patch overwrites
    return mask


@pytest.mark.parametrize("patch_value", ["random", 0.0])
def test_generate_masks_matches_painter_and_stays_inside(patch_value):
    masks = np.asarray(cr.generate_masks(KEY, 12, (H, W + 3), num_patches=4, patch_size=7,
                                         patch_value=patch_value))
    assert masks.shape == (12, H, W + 3)
    for k in range(12):
        np.testing.assert_array_equal(
            masks[k], numpy_mask(KEY, k, H, W + 3, 4, 7, patch_value))
        covered = masks[k] != 1.0
        assert 49 <= covered.sum() <= 4 * 49
    if patch_value == 0.0:
        assert set(np.unique(masks)) <= {0.0, 1.0}
    else:
        assert masks.min() >= 0.0 and masks.max() <= 1.0


def test_masks_do_not_depend_on_count():
    a = cr.generate_masks(KEY, 5, 16, num_patches=2, patch_size=5)
    b = cr.generate_masks(KEY, 9, 16, num_patches=2, patch_size=5)
    np.testing.assert_array_equal(a, b[:5])


# ---------------------------------------------------------------- corrrise

# One configuration shared by several tests (each new configuration is a
# compilation): 250 masks in 4 chunks of 63 (2 padded), one device.
STREAM = dict(num_masks=250, num_patches=3, patch_size=4, chunk_size=64)


@pytest.fixture(scope="module")
def stream_maps():
    a, b = pair_images()
    return cr.corrrise(region_embed, a, b, KEY, devices=ONE_DEVICE, **STREAM)


def test_streaming_chunks_equal_materialised_pearson(stream_maps):
    a, b = pair_images()
    assert cr.chunk_layout(250, 64, 1) == cr.ChunkLayout(250, 1, 4, 63)
    kw = {k: v for k, v in STREAM.items() if k != "chunk_size"}
    ref_a, ref_b = materialised_reference(region_embed, a, b, KEY, **kw)
    np.testing.assert_allclose(stream_maps[0], ref_a, atol=2e-5)
    np.testing.assert_allclose(stream_maps[1], ref_b, atol=2e-5)


def test_similar_region_is_found_analytically(stream_maps):
    """Only the region matters to the score, and masking it can only lower the
    score, so S+ must sit on the region and be ~0 far from it."""
    for s in stream_maps:
        s = np.asarray(s)
        plus = np.asarray(cr.split_signed(s)[0])
        inside = np.zeros((H, W), bool)
        inside[REGION] = True
        near = np.zeros((H, W), bool)
        near[3:15, 5:17] = True  # region dilated by patch_size - 1
        assert plus[inside].mean() > 0.25
        assert inside[np.unravel_index(np.argmax(plus), plus.shape)]
        assert np.abs(s[~near]).mean() < 0.08
        assert plus[inside].sum() > 0.6 * plus.sum()


def test_compiles_once_per_configuration(stream_maps):
    a, b = pair_images()
    size = cr._corrrise_impl._cache_size()
    cr.corrrise(region_embed, b, a * 0.5, jax.random.PRNGKey(9), devices=ONE_DEVICE, **STREAM)
    assert cr._corrrise_impl._cache_size() == size


def test_sharded_equals_one_device_pearson_and_spearman(stream_maps):
    assert jax.device_count() == 4
    a, b = pair_images()
    four = cr.corrrise(region_embed, a, b, KEY, **STREAM)
    for x, y in zip(stream_maps, four):
        np.testing.assert_allclose(x, y, atol=2e-5)
    # Spearman, two pairs per call, 4 devices, against the unsharded reference.
    images_a = jnp.stack([a, b * 0.8])
    images_b = jnp.stack([b, a])
    s_a, s_b = cr.corrrise_batch(region_embed, images_a, images_b, KEY, chunk_size=16,
                                 correlation="spearman", **SMALL)
    for p in range(2):
        ref = materialised_reference(region_embed, images_a[p], images_b[p], KEY,
                                     correlation="spearman", **SMALL)
        np.testing.assert_allclose(s_a[p], ref[0], atol=2e-5)
        np.testing.assert_allclose(s_b[p], ref[1], atol=2e-5)


def test_numpy_callable_equals_jax_path(stream_maps):
    """A host model gives the JAX model's maps (it is kept on one device)."""
    a, b = pair_images()
    np_maps = cr.corrrise(REGION_EMBED_NP, a, b, KEY, **STREAM)
    assert cr.resolve_devices(None, REGION_EMBED_NP) == tuple(jax.local_devices()[:1])
    for x, y in zip(stream_maps, np_maps):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_numpy_embed_fn_under_jit_and_vmap():
    x = jax.random.uniform(KEY, (3, 5, H, W, 3))
    direct = region_embed_np(np.asarray(x).reshape(15, H, W, 3)).reshape(3, 5, 2)
    got = jax.jit(jax.vmap(REGION_EMBED_NP))(x)
    np.testing.assert_allclose(got, direct, rtol=1e-6)
    bad = cr.numpy_embed_fn(lambda imgs: np.zeros((imgs.shape[0], 3)), 2)
    with pytest.raises(Exception, match="expected"):
        jax.block_until_ready(bad(x[0]))


def test_constant_model_gives_zeros_and_warning():
    a, b = pair_images()
    with pytest.warns(RuntimeWarning, match="never varied"):
        s_a, s_b = cr.corrrise(constant_embed, a, b, KEY, chunk_size=32, devices=ONE_DEVICE,
                               **SMALL)
    assert np.all(np.asarray(s_a) == 0.0) and np.all(np.asarray(s_b) == 0.0)


def test_zero_norm_embeddings_never_nan():
    def sometimes_zero(x):
        # A zero vector whenever black patches cover the whole region.
        r = x[:, REGION[0], REGION[1], :].max(axis=(1, 2, 3))
        return jnp.stack([r, r], axis=-1) * x[:, REGION[0], REGION[1], :].mean(axis=(1, 2, 3))[:, None]

    a, b = pair_images()
    masks = cr.generate_masks(KEY, 60, (H, W), 10, 8, 0.0)
    assert np.any(np.all(np.asarray(masks)[:, REGION[0], REGION[1]] == 0, axis=(1, 2)))
    s_a, s_b = cr.corrrise(sometimes_zero, a, b, KEY, num_masks=60, num_patches=10,
                           patch_size=8, patch_value=0.0, chunk_size=32, devices=ONE_DEVICE)
    assert np.all(np.isfinite(s_a)) and np.all(np.isfinite(s_b))
    assert np.abs(np.asarray(s_a)).max() > 0.1
    assert np.all(np.asarray(cr.cosine_similarity(jnp.zeros((2, 3)), jnp.ones((2, 3)))) == 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_masks=1), "num_masks=1"),
    (dict(patch_size=H + 1), "larger than the image"),
    (dict(patch_size=0), "patch_size=0"),
    (dict(num_patches=0), "num_patches=0"),
    (dict(correlation="kendall"), "correlation="),
    (dict(patch_value="black"), "patch_value="),
    (dict(chunk_size=0), "chunk_size=0"),
])
def test_bad_arguments(kwargs, match):
    a, b = pair_images()
    args = dict(SMALL, **kwargs)
    with pytest.raises(ValueError, match=match):
        cr.corrrise(region_embed, a, b, KEY, **args)


def test_bad_pairs():
    a, b = pair_images()
    with pytest.raises(ValueError, match="same size"):
        cr.corrrise(region_embed, a, b[:-1], KEY, **SMALL)
    with pytest.raises(ValueError, match="channel count"):
        cr.corrrise(region_embed, a, b[..., :1], KEY, **SMALL)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        cr.corrrise(region_embed, a[..., 0], b[..., 0], KEY, **SMALL)
    with pytest.raises(ValueError, match="at least 2"):
        cr.pearson_map(jnp.ones(1), jnp.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="expected scores"):
        cr.pearson_map(jnp.ones(3), jnp.ones((4, 2, 2)))
    with pytest.raises(ValueError, match="embed_fn returned"):
        cr.corrrise(lambda x: x.mean(axis=(1, 2, 3)), a, b, KEY, **SMALL)
