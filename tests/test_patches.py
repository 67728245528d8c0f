"""Sliding-window patch attribution: Algorithm 1, confidences, confidence maps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.explain import patches as P
from faceaudit_jax.models import patch_net as pn


def algorithm1(confidences, locations, k, height, width):
    """Straight transcription of the paper's Algorithm 1 (and the authors' loop)."""
    total = np.zeros((height, width), np.float64)
    counts = np.zeros((height, width), np.int64)
    for c, (x, y) in zip(confidences, locations):
        total[y:y + k, x:x + k] += c
        counts[y:y + k, x:x + k] += 1
    out = np.zeros((height, width), np.float64)
    covered = counts > 0
    out[covered] = total[covered] / counts[covered]
    return out


# ---------------------------------------------------------------------------
# patches_to_pixels
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_patches_to_pixels_matches_algorithm1(k):
    rng = np.random.default_rng(k)
    height, width = 13, 17
    num_patches = 40
    conf = rng.uniform(0, 1, num_patches).astype(np.float32)
    locs = np.stack([rng.integers(0, width - k + 1, num_patches),
                     rng.integers(0, height - k + 1, num_patches)], axis=1)
    got = np.asarray(P.patches_to_pixels(conf, locs, k, (height, width)))
    want = algorithm1(conf, locs, k, height, width)
    assert got.shape == (height, width)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_patches_to_pixels_zero_where_uncovered():
    height, width, k = 10, 12, 3
    locs = np.array([[0, 0], [1, 0], [9, 7]])
    conf = np.array([0.2, 0.9, 0.5], np.float32)
    got = np.asarray(P.patches_to_pixels(conf, locs, k, (height, width)))
    counts = np.zeros((height, width), int)
    for x, y in locs:
        counts[y:y + k, x:x + k] += 1
    assert np.all(got[counts == 0] == 0.0)
    assert np.all(got[counts > 0] > 0.0)
    # Pixel (0, 1) is in the first two patches: their mean.
    assert got[0, 1] == pytest.approx(0.55, abs=1e-6)
    assert got[0, 0] == pytest.approx(0.2, abs=1e-6)
    assert got[9, 11] == pytest.approx(0.5, abs=1e-6)


def test_patches_to_pixels_full_grid_and_batched():
    height, width, k = 20, 16, 6
    positions = pn.grid_positions((height, width), k, 5)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, (3, positions.shape[0])).astype(np.float32)
    want = np.stack([algorithm1(c, positions, k, height, width) for c in conf])
    shared = np.asarray(P.patches_to_pixels_batched(conf, positions, k, (height, width)))
    np.testing.assert_allclose(shared, want, rtol=1e-5, atol=1e-6)
    per_image_locs = np.stack([positions, positions[::-1], positions])
    per_image_conf = conf.copy()
    per_image_conf[1] = conf[1][::-1]
    per_image = np.asarray(P.patches_to_pixels_batched(per_image_conf, per_image_locs, k,
                                                       (height, width)))
    np.testing.assert_allclose(per_image, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,k,grid", [((20, 16), 6, 5), (13, 4, 7), ((9, 30), 9, 1), (128, 32, 49)])
def test_grid_path_equals_scatter_path_and_algorithm1(size, k, grid):
    """Product-grid locations take the separable matmul path, any other order
    the summed-area scatter; both must be Algorithm 1."""
    height, width = (size, size) if isinstance(size, int) else size
    positions = pn.grid_positions((height, width), k, grid)
    assert P._grid_axes(positions) is not None
    rng = np.random.default_rng(grid)
    conf = rng.uniform(0, 1, positions.shape[0]).astype(np.float32)
    want = algorithm1(conf, positions, k, height, width)
    on_grid = np.asarray(P.patches_to_pixels(conf, positions, k, (height, width)))
    np.testing.assert_allclose(on_grid, want, rtol=1e-5, atol=1e-6)
    order = rng.permutation(positions.shape[0])
    if grid > 1:
        assert P._grid_axes(positions[order]) is None
    scattered = np.asarray(P.patches_to_pixels(conf[order], positions[order], k, (height, width)))
    np.testing.assert_allclose(scattered, want, rtol=1e-5, atol=1e-6)


def test_grid_axes_detection():
    positions = pn.grid_positions((20, 16), 6, 5)
    xs, ys = P._grid_axes(positions)
    assert xs == tuple(np.unique(positions[:, 0]).tolist())
    assert ys == tuple(np.unique(positions[:, 1]).tolist())
    # One row, one column, and a grid missing its last corner.
    assert P._grid_axes(np.array([[0, 3], [2, 3], [5, 3]])) == ((0, 2, 5), (3,))
    assert P._grid_axes(np.array([[4, 0], [4, 1], [4, 7]])) == ((4,), (0, 1, 7))
    assert P._grid_axes(positions[:-1]) is None
    # Column-major order is not the row-major layout the reshape assumes.
    column_major = positions.reshape(5, 5, 2).transpose(1, 0, 2).reshape(-1, 2)
    assert P._grid_axes(column_major) is None
    # Per-image locations and traced locations use the scatter path.
    assert P._grid_axes(np.stack([positions, positions])) is None
    seen = []
    jax.jit(lambda l: seen.append(P._grid_axes(l)) or l)(positions)
    assert seen == [None]


def test_grid_path_compiles_once_per_grid():
    positions = pn.grid_positions(24, 8, 6)
    conf = np.linspace(0, 1, positions.shape[0], dtype=np.float32)
    P.patches_to_pixels(conf, positions, 8, 24)
    before = P._pixel_mean_maps_jit._cache_size()
    for scale in (0.5, 2.0):
        # Fresh but equal arrays and corner tuples hit the same executable.
        P.patches_to_pixels(conf * scale, positions.copy(), 8, 24).block_until_ready()
    assert P._pixel_mean_maps_jit._cache_size() == before


def test_patches_to_pixels_is_jittable():
    conf = jnp.linspace(0, 1, 6)
    locs = jnp.array([[0, 0], [2, 1], [4, 4], [1, 3], [0, 4], [4, 0]])
    jitted = jax.jit(lambda c, l: P.patches_to_pixels(c, l, 4, 8))
    np.testing.assert_allclose(np.asarray(jitted(conf, locs)),
                               algorithm1(np.asarray(conf), np.asarray(locs), 4, 8, 8),
                               rtol=1e-5, atol=1e-6)


def test_patches_to_pixels_bad_inputs():
    locs = np.array([[0, 0], [1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        P.patches_to_pixels(np.array([0.5, np.nan]), locs, 3, 8)
    with pytest.raises(ValueError, match="NaN"):
        P.patches_to_pixels_batched(np.array([[0.5, 0.1], [np.nan, 0.2]]), locs, 3, 8)
    with pytest.raises(ValueError, match="larger|fit"):
        P.patches_to_pixels(np.array([0.5, 0.1]), locs, 9, 8)
    with pytest.raises(ValueError, match="inside"):
        P.patches_to_pixels(np.array([0.5, 0.1]), np.array([[0, 0], [6, 0]]), 3, 8)
    with pytest.raises(ValueError, match="matching"):
        P.patches_to_pixels(np.array([0.5, 0.1, 0.3]), locs, 3, 8)


# ---------------------------------------------------------------------------
# Confidences
# ---------------------------------------------------------------------------

def reference_confidences(logits):
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    c = p.shape[-1]
    s = np.sort(p, -1)[..., ::-1]
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
    return {
        "top_softmax": (s[..., 0] - 1 / c) / (1 - 1 / c),
        "margin": s[..., 0] - s[..., 1],
        "negative_entropy": 1 - entropy / np.log(c),
    }


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_confidences_match_closed_forms_and_range(num_classes):
    rng = np.random.default_rng(num_classes)
    logits = rng.normal(0, 3, (200, num_classes)).astype(np.float32)
    want = reference_confidences(logits)
    for kind in P.CONFIDENCE_KINDS:
        got = np.asarray(P.confidence_from_logits(logits, kind))
        assert got.min() >= 0.0 and got.max() <= 1.0
        np.testing.assert_allclose(got, want[kind], atol=2e-5)


def test_confidence_orderings_and_extremes():
    flat = jnp.zeros((1, 4))
    mild = jnp.array([[1.0, 0.0, 0.0, 0.0]])
    peaked = jnp.array([[6.0, 0.0, 0.0, 0.0]])
    saturated = jnp.array([[1e4, 0.0, 0.0, -1e4]])
    for kind in P.CONFIDENCE_KINDS:
        values = [float(P.confidence_from_logits(x, kind)[0]) for x in (flat, mild, peaked, saturated)]
        assert values[0] == pytest.approx(0.0, abs=1e-6), kind
        assert values[0] < values[1] < values[2] <= values[3], (kind, values)
        assert values[3] == pytest.approx(1.0, abs=1e-6), kind


def test_raw_confidences_and_bad_kind():
    logits = jnp.array([[2.0, 0.0]])
    p = 1 / (1 + math.exp(-2))
    assert float(P.confidence_from_logits(logits, "top_softmax", normalised=False)[0]) == pytest.approx(p, 1e-6)
    assert float(P.confidence_from_logits(logits, "margin", normalised=False)[0]) == pytest.approx(2 * p - 1, 1e-6)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(P.confidence_from_logits(logits, "negative_entropy", normalised=False)[0]) == pytest.approx(-h, 1e-5)
    with pytest.raises(ValueError, match="unknown confidence"):
        P.confidence_from_logits(logits, "entropy")
    with pytest.raises(ValueError, match="at least 2"):
        P.confidence_from_logits(jnp.zeros((3, 1)), "margin")


# ---------------------------------------------------------------------------
# Sliding window
# ---------------------------------------------------------------------------

IMAGE, K, GRID = 12, 4, 5


@pytest.fixture(scope="module")
def tiny_model():
    model = pn.PatchNet(num_classes=3, num_positions=GRID * GRID, patch_size=K, widths=(4, 8))
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, K, K, 3)), jnp.zeros((1,), jnp.int32))
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, IMAGE, IMAGE, 3))
    return model, variables, images


def test_sliding_window_equals_patch_by_patch(tiny_model):
    model, variables, images = tiny_model
    positions = pn.grid_positions(IMAGE, K, GRID)
    axis = np.rint(np.linspace(0, IMAGE - K, GRID)).astype(int)
    # Reference: cut every patch on the host and classify it on its own.
    single = jax.jit(lambda p, i: model.apply(variables, p[None], i[None])[0])
    images_np = np.asarray(images)
    want_logits = np.zeros((2, GRID, GRID, 3), np.float32)
    for b in range(2):
        for row, y in enumerate(axis):
            for col, x in enumerate(axis):
                patch = images_np[b, y:y + K, x:x + K]
                want_logits[b, row, col] = single(patch, jnp.int32(row * GRID + col))
    apply_fn = pn.make_patch_apply_fn(model)
    # chunk 7 does not divide the 50 windows: exercises the padding path.
    logits = P.sliding_window_logits(apply_fn, images, K, positions, variables, chunk_size=7)
    np.testing.assert_allclose(np.asarray(logits).reshape(2, GRID, GRID, 3), want_logits,
                               rtol=1e-4, atol=1e-5)
    for kind in P.CONFIDENCE_KINDS:
        conf, pred = P.confidence_maps(apply_fn, images, K, positions, kind, variables, chunk_size=16)
        assert conf.shape == pred.shape == (2, GRID, GRID)
        np.testing.assert_allclose(np.asarray(conf), reference_confidences(want_logits)[kind], atol=1e-4)
        np.testing.assert_array_equal(np.asarray(pred), want_logits.argmax(-1))


def test_sliding_window_accepts_closures(tiny_model):
    model, variables, images = tiny_model
    positions = pn.grid_positions(IMAGE, K, GRID)
    closure = lambda p, i: model.apply(variables, p, i)
    with_closure = P.sliding_window_logits(closure, images, K, positions, chunk_size=25)
    with_vars = P.sliding_window_logits(pn.make_patch_apply_fn(model), images, K, positions,
                                        variables, chunk_size=25)
    np.testing.assert_allclose(np.asarray(with_closure), np.asarray(with_vars), rtol=1e-5, atol=1e-6)


def test_sliding_window_compiles_once(tiny_model):
    model, variables, images = tiny_model
    positions = pn.grid_positions(IMAGE, K, GRID)
    traces = []

    def apply_fn(v, patches, ids):
        traces.append(1)  # runs only while tracing
        return model.apply(v, patches, ids)

    for seed in range(3):
        new_images = jax.random.uniform(jax.random.PRNGKey(seed + 10), images.shape)
        P.confidence_maps(apply_fn, new_images, K, positions, "margin", variables, chunk_size=10)
    assert len(traces) == 1


def test_pixel_maps_pipeline(tiny_model):
    model, variables, images = tiny_model
    positions = pn.grid_positions(IMAGE, K, GRID)
    apply_fn = pn.make_patch_apply_fn(model)
    conf, _ = P.confidence_maps(apply_fn, images, K, positions, "negative_entropy", variables)
    maps = np.asarray(P.confidence_pixel_maps(apply_fn, images, K, positions, "negative_entropy",
                                              variables, normalise=False))
    for b in range(2):
        want = algorithm1(np.asarray(conf[b]).ravel(), positions, K, IMAGE, IMAGE)
        np.testing.assert_allclose(maps[b], want, rtol=1e-5, atol=1e-6)
    normed = np.asarray(P.confidence_pixel_maps(apply_fn, images, K, positions, "negative_entropy",
                                                variables))
    for b in range(2):
        lo, hi = maps[b].min(), maps[b].max()
        np.testing.assert_allclose(normed[b], (maps[b] - lo) / (hi - lo), atol=1e-5)


def test_sliding_window_bad_inputs(tiny_model):
    model, variables, images = tiny_model
    apply_fn = pn.make_patch_apply_fn(model)
    positions = pn.grid_positions(IMAGE, K, GRID)
    with pytest.raises(ValueError, match="does not fit"):
        P.confidence_maps(apply_fn, images, IMAGE + 1, positions, variables=variables)
    with pytest.raises(ValueError, match="square"):
        P.confidence_maps(apply_fn, images, K, positions[:24], variables=variables)
    with pytest.raises(ValueError, match="inside"):
        P.confidence_maps(apply_fn, images, K, positions + 1, variables=variables)
    with pytest.raises(ValueError, match="unknown confidence"):
        P.confidence_maps(apply_fn, images, K, positions, "entropy", variables)


# ---------------------------------------------------------------------------
# Normalisation and mean maps
# ---------------------------------------------------------------------------

def test_normalise_and_mean_map():
    rng = np.random.default_rng(3)
    maps = rng.uniform(-2, 5, (7, 6, 5)).astype(np.float32)
    normed = np.asarray(P.normalise_map(maps))
    assert np.allclose(normed.min((1, 2)), 0) and np.allclose(normed.max((1, 2)), 1)
    single = np.asarray(P.normalise_map(maps[0]))
    np.testing.assert_allclose(single, normed[0], atol=1e-6)
    assert np.all(np.asarray(P.normalise_map(np.full((4, 4), 3.0))) == 0)
    np.testing.assert_allclose(np.asarray(P.mean_map(maps)), maps.mean(0), rtol=1e-6)
    streamed = P.mean_map(iter([maps[:3], maps[3:5], maps[5:]]))
    np.testing.assert_allclose(np.asarray(streamed), maps.mean(0), rtol=1e-6)
    acc = P.RunningMeanMap.create((6, 5))
    acc = jax.jit(lambda a, m: a.update(m))(acc, maps)
    np.testing.assert_allclose(np.asarray(acc.result()), maps.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        P.mean_map(iter([]))
    with pytest.raises(ValueError, match="B, H, W"):
        P.mean_map([maps[0]])


def _colour_classifier(variables, patches, position_ids):
    return patches.mean(axis=(1, 2)) @ variables["w"] + variables["b"][position_ids]


def test_general_map_is_the_normalised_mean_of_unnormalised_maps():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((6, 24, 24, 3)), jnp.float32)
    positions = pn.grid_positions(24, 8, 4)
    variables = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(16, 2)) * 0.1, jnp.float32)}
    raw = np.asarray(P.confidence_pixel_maps(_colour_classifier, images, 8, positions, "margin",
                                             variables, normalise=False))
    mean = raw.mean(axis=0)  # numpy reference: mean over all six images, normalised once
    expected = (mean - mean.min()) / (mean.max() - mean.min())
    got = P.general_confidence_map(_colour_classifier, [images[:4], images[4:]], 8, positions,
                                   "margin", variables)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one batch"):
        P.general_confidence_map(_colour_classifier, [], 8, positions, "margin", variables)
