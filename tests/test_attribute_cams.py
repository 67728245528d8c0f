"""Multi-attribute CAMs, the |z| target, mean CAMs per prediction, attribute masks."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import regions
from faceaudit_jax.explain import attribute_cams as ac
from faceaudit_jax.explain import attribute_masks as am
from faceaudit_jax.explain import cams
from faceaudit_jax.models import resnet

NUM_OUTPUTS = 4


def _centre_logits(features_fn, head_fn, images):
    """Shift the output bias so every attribute has both predicted classes."""
    logits = head_fn(features_fn(images))
    return -jnp.median(logits, axis=0) + 0.01 * jnp.arange(logits.shape[1])


@pytest.fixture(scope="module")
def tiny_cnn():
    """A hand-written two-conv CNN with a non-linear two-layer head.

    The non-linear head checks that the per-attribute VJP is not tied to a
    linear (pool + dense) head. Both closures are built once, so the jitted
    cores compile once per shape.
    """
    # numpy draws: eager jax.random would compile a sampler per shape (seconds on CPU).
    rng = np.random.default_rng(0)
    params = {
        "c1": jnp.asarray(rng.normal(size=(3, 3, 3, 8)) * 0.4, jnp.float32),
        "c2": jnp.asarray(rng.normal(size=(3, 3, 8, 6)) * 0.3, jnp.float32),
        "d1": jnp.asarray(rng.normal(size=(6, 10)) * 0.5, jnp.float32),
        "d2": jnp.asarray(rng.normal(size=(10, NUM_OUTPUTS)) * 0.5, jnp.float32),
    }
    images = jnp.asarray(rng.random((6, 16, 16, 3)), jnp.float32)
    trace_count = {"features": 0}

    def features_fn(x):
        trace_count["features"] += 1  # runs at trace time only
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.nn.relu(jax.lax.conv_general_dilated(x, params["c1"], (2, 2), "SAME",
                                                     dimension_numbers=dn))
        return jax.nn.relu(jax.lax.conv_general_dilated(y, params["c2"], (2, 2), "SAME",
                                                        dimension_numbers=dn))

    bias = jnp.zeros(NUM_OUTPUTS)

    def raw_head(fmap):
        pooled = jnp.mean(fmap, axis=(1, 2))
        return jnp.tanh(pooled @ params["d1"]) @ params["d2"] + bias

    bias = _centre_logits(features_fn, raw_head, images)

    def head_fn(fmap):
        pooled = jnp.mean(fmap, axis=(1, 2))
        return jnp.tanh(pooled @ params["d1"]) @ params["d2"] + bias

    return features_fn, head_fn, images, trace_count


@pytest.fixture(scope="module")
def small_resnet():
    """The package's small_resnet (GroupNorm), output bias centred for mixed signs."""
    model = resnet.build_model("small_resnet", NUM_OUTPUTS)
    variables = resnet.init_variables(model, jax.random.key(1), 32)
    images = jnp.asarray(np.random.default_rng(2).random((6, 32, 32, 3)), jnp.float32)
    features_fn, head_fn = resnet.classifier_fns(model, variables)
    shift = _centre_logits(features_fn, head_fn, images)
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    params["fc"] = dict(params["fc"], bias=params["fc"]["bias"] + shift)
    features_fn, head_fn = resnet.classifier_fns(model, dict(variables, params=params))
    return features_fn, head_fn, images


def _both_signs(logits):
    logits = np.asarray(logits)
    assert (logits > 0).any(axis=0).all() and (logits < 0).any(axis=0).all(), logits


# ---------------------------------------------------------------------------
# The |z| target
# ---------------------------------------------------------------------------

def test_predicted_target_gradient_is_z_where_positive_and_minus_z_where_negative(small_resnet):
    features_fn, head_fn, images = small_resnet
    fmap = features_fn(images)
    grads = {mode: ac.attribute_target_gradients(fmap, head_fn, mode)[0]
             for mode in ("predicted", "positive", "negative")}
    logits = np.asarray(head_fn(fmap))
    _both_signs(logits)
    g_pred, g_pos, g_neg = (np.asarray(grads[m]) for m in ("predicted", "positive", "negative"))
    assert g_pred.shape == (NUM_OUTPUTS, *fmap.shape)
    positive = (logits > 0).T  # [A, B]
    np.testing.assert_allclose(g_pred[positive], g_pos[positive], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g_pred[~positive], g_neg[~positive], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g_neg, -g_pos, rtol=1e-6, atol=1e-9)
    # The positive target's gradient of one image is the plain per-image dz/dfmap.
    a, b = 1, 0
    direct = jax.grad(lambda f: head_fn(f)[b, a])(fmap)[b]
    np.testing.assert_allclose(g_pos[a, b], direct, rtol=1e-5, atol=1e-7)


def test_predicted_target_cams_follow_the_predicted_class(small_resnet):
    features_fn, head_fn, images = small_resnet
    fmap = features_fn(images)  # the backbone once; the CAMs differ only in the head's VJP
    maps = {}
    for mode in ("predicted", "positive", "negative"):
        raw, logits = ac.attribute_cams_from_features(fmap, head_fn, "grad_cam", mode)
        maps[mode] = np.asarray(raw)
    assert maps["predicted"].shape == (6, NUM_OUTPUTS, *fmap.shape[1:3])
    positive = np.asarray(logits) > 0  # [B, A]
    np.testing.assert_allclose(maps["predicted"][positive], maps["positive"][positive],
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(maps["predicted"][~positive], maps["negative"][~positive],
                               rtol=1e-6, atol=1e-9)
    # On negatively predicted images the positive-only target explains another score.
    peak = maps["predicted"].max()
    differs = np.abs(maps["predicted"][~positive] - maps["positive"][~positive]).max(axis=(1, 2))
    assert (differs > 1e-3 * peak).any()


# ---------------------------------------------------------------------------
# Equal to compute_cams per attribute
# ---------------------------------------------------------------------------

_TARGETS = {(mode, a): (lambda z, a=a, mode=mode: cams.binary_target(z[:, a], mode))
            for mode in ("predicted", "positive") for a in range(NUM_OUTPUTS)}


@pytest.mark.parametrize("method", sorted(cams.CAM_METHODS))
def test_multi_attribute_cams_equal_per_attribute_compute_cams(tiny_cnn, method):
    features_fn, head_fn, images, _ = tiny_cnn
    mode = "predicted"
    maps, logits = ac.attribute_cams(features_fn, head_fn, images, method, mode)
    assert maps.shape == (6, NUM_OUTPUTS, 16, 16) and logits.shape == (6, NUM_OUTPUTS)
    _both_signs(logits)
    np.testing.assert_allclose(logits, head_fn(features_fn(images)), rtol=1e-6, atol=1e-6)
    # Every attribute for Grad-CAM; one per other method (each reference compiles).
    attrs = range(NUM_OUTPUTS) if method == "grad_cam" else (sorted(cams.CAM_METHODS).index(method),)
    for a in attrs:
        reference = cams.compute_cams(features_fn, head_fn, images, _TARGETS[(mode, a)], method)
        np.testing.assert_allclose(maps[:, a], reference, atol=2e-5)


def test_positive_mode_subset_by_name_and_chunking_agree(tiny_cnn):
    features_fn, head_fn, images, _ = tiny_cnn
    full, full_logits = ac.attribute_cams(features_fn, head_fn, images, "grad_cam", "positive")
    reference = cams.compute_cams(features_fn, head_fn, images, _TARGETS[("positive", 3)])
    np.testing.assert_allclose(full[:, 3], reference, atol=2e-5)
    # Names index the CelebA order; the order of `attributes` is kept.
    names = [regions.ATTRIBUTES[3], regions.ATTRIBUTES[1]]
    subset, subset_logits = ac.attribute_cams(features_fn, head_fn, images, "grad_cam",
                                              "positive", names)
    np.testing.assert_allclose(subset, full[:, [3, 1]], atol=1e-6)
    np.testing.assert_allclose(subset_logits, full_logits[:, [3, 1]])
    chunked, _ = ac.attribute_cams(features_fn, head_fn, images, "grad_cam", "positive",
                                   chunk_size=3)
    np.testing.assert_allclose(chunked, full, atol=1e-6)
    raw, _ = ac.attribute_cams(features_fn, head_fn, images, "grad_cam", "positive",
                               upsample=False, normalize=False)
    assert raw.shape == (6, NUM_OUTPUTS, 4, 4) and float(raw.min()) >= 0.0


def test_compiles_once_per_shape(tiny_cnn):
    features_fn, head_fn, images, trace_count = tiny_cnn
    def fresh_formula(acts, grads):  # a new static argument: nothing cached yet
        return cams.hires_cam(acts, grads)

    cam_fn = ac.make_attribute_cam_fn(features_fn, head_fn, fresh_formula, "predicted")
    before = trace_count["features"]
    first = cam_fn(images)
    cam_fn(images[::-1] * 0.5)  # new values, same shape
    cam_fn(np.asarray(images))  # numpy input, same shape
    jax.block_until_ready(first)
    assert trace_count["features"] - before == 1


def test_bad_inputs(tiny_cnn):
    features_fn, head_fn, images, _ = tiny_cnn
    with pytest.raises(ValueError, match="unknown binary target mode"):
        ac.make_attribute_cam_fn(features_fn, head_fn, mode="absolute")
    with pytest.raises(ValueError, match="unknown CAM method"):
        ac.make_attribute_cam_fn(features_fn, head_fn, method="score_cam")
    with pytest.raises(ValueError, match="out of range for a head with 4 outputs"):
        ac.attribute_cams(features_fn, head_fn, images, attributes=[7])
    with pytest.raises(ValueError, match="unknown attribute 'Smiles'"):
        ac.attribute_cams(features_fn, head_fn, images, attributes=["Smiles"])
    with pytest.raises(ValueError, match="empty batch"):
        ac.attribute_cams(features_fn, head_fn, images[:0])
    with pytest.raises(ValueError, match="NaN or inf"):
        ac.attribute_cams(features_fn, head_fn, images.at[0, 0, 0, 0].set(jnp.nan))


# ---------------------------------------------------------------------------
# Mean CAMs per predicted class
# ---------------------------------------------------------------------------

def _mean_loop(maps, logits, positive_side):
    b, a = logits.shape
    out = np.full((a, *maps.shape[2:]), np.nan)
    for j in range(a):
        rows = [i for i in range(b) if (logits[i, j] >= 0) == positive_side]
        if rows:
            out[j] = np.mean([maps[i, j] for i in rows], axis=0)
    return out


def test_mean_cams_by_prediction_matches_loop_and_streams():
    rng = np.random.default_rng(0)
    maps = rng.random((10, 3, 5, 4)).astype(np.float32)
    logits = rng.normal(size=(10, 3)).astype(np.float32)
    logits[:, 2] = np.abs(logits[:, 2])  # attribute 2: no negative prediction
    with pytest.warns(RuntimeWarning, match=r"no negatively predicted images.*Smiling"):
        means = ac.mean_cams_by_prediction(maps, logits, names=["Male", "Young", "Smiling"])
    np.testing.assert_allclose(means.positive, _mean_loop(maps, logits, True), rtol=1e-5)
    np.testing.assert_allclose(means.negative[:2], _mean_loop(maps, logits, False)[:2], rtol=1e-5)
    assert np.isnan(means.negative[2]).all()
    np.testing.assert_array_equal(means.num_positive + means.num_negative, [10, 10, 10])
    sums = ac.init_cam_sums(3, 5, 4)
    for start in range(0, 10, 4):  # stream in batches of 4, 4, 2
        sums = ac.accumulate_cam_sums(sums, maps[start:start + 4], logits[start:start + 4])
    with pytest.warns(RuntimeWarning):
        streamed = ac.finalize_cam_means(sums)
    np.testing.assert_allclose(streamed.positive, means.positive, rtol=1e-5)
    # valid=False images are left out.
    valid = np.ones(10, bool)
    valid[:5] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part = ac.mean_cams_by_prediction(maps, logits, valid=valid)
    np.testing.assert_allclose(part.positive[2], maps[5:, 2].mean(axis=0), rtol=1e-5)


# ---------------------------------------------------------------------------
# Attribute masks
# ---------------------------------------------------------------------------

def test_parse_masks_for_known_parse_maps():
    rid = regions.REGION_ID
    parse = np.zeros((2, 4, 5), np.int32)
    parse[0, 0, :] = rid["hair"]
    parse[0, 1, 1] = rid["l_eye"]
    parse[0, 1, 3] = rid["eye_g"]
    parse[0, 2, 0] = rid["l_ear"]
    parse[0, 2, 4] = rid["ear_r"]
    parse[0, 3, 1:4] = rid["u_lip"]
    parse[1] = rid["skin"]
    parse[1, 3, 2] = rid["mouth"]
    names = ["Eyeglasses", "Wearing_Earrings", "Smiling", "Black_Hair", "Male", "Wearing_Lipstick"]
    masks = np.asarray(am.attribute_masks(parse, names))
    assert masks.shape == (2, 6, 4, 5) and masks.dtype == bool
    np.testing.assert_array_equal(np.argwhere(masks[0, 0]), [[1, 1], [1, 3]])  # eye_g + l_eye
    np.testing.assert_array_equal(np.argwhere(masks[0, 1]), [[2, 0], [2, 4]])  # ear + earring
    np.testing.assert_array_equal(masks[0, 2], parse[0] == rid["u_lip"])
    np.testing.assert_array_equal(masks[1, 2], parse[1] == rid["mouth"])
    np.testing.assert_array_equal(masks[0, 3], parse[0] == rid["hair"])
    assert not masks[:, 4].any()  # Male: a global attribute, no region
    assert not masks[1, 5].any()
    # Against a loop over attributes and pixels through regions.regions_of.
    for a, name in enumerate(names):
        ids = {rid[r] for r in regions.regions_of(name, for_energy=True)}
        expected = np.vectorize(lambda v: v in ids)(parse)
        np.testing.assert_array_equal(masks[:, a], expected)
    # The narrower FaceX regions: Eyeglasses is only eye_g there.
    narrow = np.asarray(am.attribute_masks(parse, ["Eyeglasses"], for_energy=False))
    np.testing.assert_array_equal(np.argwhere(narrow[0, 0]), [[1, 3]])
    np.testing.assert_array_equal(am.mask_defined(names), [True, True, True, True, False, True])
    jitted = jax.jit(lambda p: am.parse_attribute_masks(p, names))(parse)
    np.testing.assert_array_equal(jitted, masks)


def test_rectangle_masks_follow_the_grid():
    names = ["Smiling", "Wearing_Earrings", "Black_Hair", "Male"]
    masks = am.rectangle_attribute_masks(224, 224, names)
    expected = np.zeros((4, 224, 224), bool)
    expected[0, 128:160, 64:160] = True  # mouth box, rows 4-5, cols 2-5 of a 32 px grid
    expected[1, 96:192, 32:96] = expected[1, 96:192, 128:192] = True  # two ear boxes
    expected[2, 32:224, 32:192] = True
    expected[2, 64:224, 64:160] = False  # hair: global minus the face column
    expected[3, 32:224, 32:192] = True  # global
    np.testing.assert_array_equal(masks, expected)
    batch = am.attribute_masks(np.zeros((3, 224, 224), np.int32), names, source="rectangles")
    assert batch.shape == (3, 4, 224, 224)
    np.testing.assert_array_equal(batch[2], expected)
    custom = {"Smiling": am.RectangleMask(((0.0, 0.5, 1.0, 1.0),))}
    half = am.rectangle_attribute_masks(4, 4, ["Smiling", "Male"], custom)
    np.testing.assert_array_equal(half[0], np.repeat([[0], [0], [1], [1]], 4, axis=1) > 0)
    assert not half[1].any()


def test_mask_bad_inputs():
    with pytest.raises(ValueError, match="region id 19"):
        am.attribute_masks(np.full((1, 2, 2), 19, np.int32))
    with pytest.raises(ValueError, match="unknown attribute 'Hat'"):
        am.attribute_masks(np.zeros((1, 2, 2), np.int32), ["Hat"])
    with pytest.raises(ValueError, match="wrap one name"):
        am.attribute_masks(np.zeros((1, 2, 2), np.int32), "Smiling")
    with pytest.raises(ValueError, match="unknown mask source"):
        am.attribute_masks(np.zeros((1, 2, 2), np.int32), source="boxes")
    with pytest.raises(ValueError, match="0 <= x0 < x1 <= 1"):
        am.rectangle_attribute_masks(8, 8, ["Smiling"],
                                     {"Smiling": am.RectangleMask(((0.5, 0.0, 0.2, 1.0),))})
