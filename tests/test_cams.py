"""CAM formulas, targets and compute_cams against independent references.

The references below are transcriptions of the published formulas in the
reference library's layout ([B, C, h, w], numpy, float64), so a wrong axis or
a transposed layout in the JAX code shows up as a mismatch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.explain import cams, upsampling

# ---------------------------------------------------------------- references


def _nchw(x):
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def ref_grad_cam(acts, grads):
    a, g = _nchw(acts), _nchw(grads)
    weights = g.mean(axis=(2, 3))
    return np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)


def ref_grad_cam_plusplus(acts, grads):
    a, g = _nchw(acts), _nchw(grads)
    out = np.zeros((a.shape[0], a.shape[2], a.shape[3]))
    for b in range(a.shape[0]):
        for c in range(a.shape[1]):
            total = a[b, c].sum()
            alpha = np.zeros_like(g[b, c])
            nz = g[b, c] != 0
            gij = g[b, c][nz]
            alpha[nz] = gij ** 2 / (2 * gij ** 2 + total * gij ** 3 + 1e-6)
            w = (np.maximum(g[b, c], 0) * alpha).sum()
            out[b] += w * a[b, c]
    return np.maximum(out, 0)


def ref_hires_cam(acts, grads):
    a, g = _nchw(acts), _nchw(grads)
    return np.maximum((a * g).sum(axis=1), 0)


def ref_element_wise(acts, grads):
    a, g = _nchw(acts), _nchw(grads)
    return np.maximum(np.maximum(a * g, 0).sum(axis=1), 0)


REFERENCES = {
    "grad_cam": ref_grad_cam,
    "grad_cam_plusplus": ref_grad_cam_plusplus,
    "hires_cam": ref_hires_cam,
    "element_wise_grad_cam": ref_element_wise,
}


def ref_bilinear(x, out_h, out_w):
    """Half-pixel-centre bilinear resize of [B, h, w] with edge clamping (cv2.resize)."""
    b, h, w = x.shape

    def axis_weights(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - frac
        m[np.arange(n_out), hi] += frac
        return m

    ry, rx = axis_weights(h, out_h), axis_weights(w, out_w)
    return np.einsum("yi,bij,xj->byx", ry, x, rx)


def ref_minmax(x):
    out = np.zeros_like(x)
    for i, m in enumerate(x):
        span = m.max() - m.min()
        if span > 0:
            out[i] = (m - m.min()) / span
    return out


# ---------------------------------------------------------------- formulas


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_formula_matches_reference(name):
    rng = np.random.default_rng(0)
    acts = np.abs(rng.normal(size=(3, 5, 4, 6))).astype(np.float32)  # post-ReLU features
    grads = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
    grads[0, 1, 2, :] = 0.0  # exercise the g == 0 branch of Grad-CAM++
    got = np.asarray(cams.CAM_METHODS[name](jnp.asarray(acts), jnp.asarray(grads)))
    want = REFERENCES[name](acts, grads)
    assert got.shape == (3, 5, 4)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert (got >= 0).all()


def test_grad_cam_plusplus_signed_activations():
    # Negative activation sums flip the g^3 term's sign: still matches the reference.
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    grads = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    got = np.asarray(cams.grad_cam_plusplus(acts, grads))
    np.testing.assert_allclose(got, ref_grad_cam_plusplus(acts, grads), rtol=1e-4, atol=1e-4)


def test_formula_shape_errors():
    with pytest.raises(ValueError, match="shape of acts"):
        cams.grad_cam(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match=r"\[B, h, w, C\]"):
        cams.hires_cam(jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)))


# ---------------------------------------------------------------- targets


def test_binary_target_predicted_is_abs_with_sign_gradient():
    z = jnp.array([2.0, -1.5, 0.3, -0.01])
    predicted = cams.binary_target(z, "predicted")
    positive = cams.binary_target(z, "positive")
    np.testing.assert_allclose(predicted, np.abs(np.asarray(z)))
    np.testing.assert_allclose(positive, z)
    # |z| equals z where z > 0 and -z where z < 0, gradients included.
    grad_pred = jax.grad(lambda v: cams.binary_target(v, "predicted").sum())(z)
    grad_pos = jax.grad(lambda v: cams.binary_target(v, "positive").sum())(z)
    np.testing.assert_allclose(grad_pred, [1.0, -1.0, 1.0, -1.0])
    np.testing.assert_allclose(grad_pos, np.ones(4))
    # [B, 1] logits give the same scores.
    np.testing.assert_allclose(cams.binary_target(z[:, None], "predicted"), predicted)


def test_binary_target_bad_mode_and_shape():
    with pytest.raises(ValueError, match="unknown binary target mode 'abs'"):
        cams.binary_target(jnp.zeros(3), "abs")
    with pytest.raises(ValueError, match="unknown binary target mode"):
        cams.make_binary_target("both")
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        cams.binary_target(jnp.zeros((3, 2)), "positive")


def test_class_and_cosine_targets():
    logits = jnp.array([[1.0, 5.0, 2.0], [4.0, 0.0, -1.0]])
    np.testing.assert_allclose(cams.class_target(2)(logits), [2.0, -1.0])
    np.testing.assert_allclose(cams.class_target(np.array([1, 0]))(logits), [5.0, 4.0])
    np.testing.assert_allclose(cams.predicted_class_target(logits), [5.0, 4.0])
    ref = np.array([1.0, 0.0, 0.0])
    emb = jnp.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(cams.cosine_target(ref)(emb), [1.0, np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(cams.cosine_target(ref, dissimilarity=True)(emb),
                               [0.0, 1 - np.sqrt(0.5)], atol=1e-6)


# ---------------------------------------------------------------- compute_cams

POOL = 4


def _pool_features(images):
    b, h, w, c = images.shape
    return images.reshape(b, h // POOL, POOL, w // POOL, POOL, c).mean(axis=(2, 4))


# A POOL x POOL block mean reads pixels POOL*j .. POOL*j + POOL-1: its cells are
# centred where half-pixel resizing puts them.
_pool_features.cell_grid = upsampling.patch_grid(POOL)


def _linear_head(weight, bias):
    def head(fmap):
        return fmap.mean(axis=(1, 2)) @ weight + bias
    return head


def test_compute_cams_closed_form():
    rng = np.random.default_rng(2)
    images = rng.random((3, 16, 12, 3)).astype(np.float32)
    weight = rng.normal(size=(3, 2)).astype(np.float32)
    bias = np.array([0.1, -0.2], np.float32)
    head = _linear_head(jnp.asarray(weight), jnp.asarray(bias))
    fmap = _pool_features(images.astype(np.float64))  # [3, 4, 3, 3]
    h, w = fmap.shape[1:3]
    # dS/dA[b, y, x, c] = W[c, k] / (h w) is constant over space, so every
    # formula has a closed form here.
    k = 1
    g = weight[:, k] / (h * w)
    closed = {
        "grad_cam": np.maximum(fmap @ g, 0),
        "hires_cam": np.maximum(fmap @ g, 0),
        "element_wise_grad_cam": np.maximum(fmap * g, 0).sum(-1),
    }
    for name, raw in closed.items():
        maps, logits = cams.compute_cams(_pool_features, head, images, cams.class_target(k),
                                         method=name, upsample=False, return_logits=True)
        np.testing.assert_allclose(maps, ref_minmax(raw), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(logits, fmap.mean((1, 2)) @ weight + bias, rtol=1e-5)
        upsampled = cams.compute_cams(_pool_features, head, images, cams.class_target(k),
                                      method=name)
        assert upsampled.shape == (3, 16, 12)
        np.testing.assert_allclose(upsampled, ref_minmax(ref_bilinear(raw, 16, 12)),
                                   rtol=1e-4, atol=1e-5)


def test_compute_cams_predicted_binary_target_flips_for_negative_logits():
    rng = np.random.default_rng(3)
    images = rng.random((4, 8, 8, 3)).astype(np.float32)
    weight = jnp.asarray(rng.normal(size=(3, 1)).astype(np.float32))
    # Biases chosen so that images get logits of both signs.
    head = _linear_head(weight, jnp.zeros(1))
    z = np.asarray(head(_pool_features(jnp.asarray(images))))[:, 0]
    shift = -np.median(z)
    head = _linear_head(weight, jnp.asarray([shift], jnp.float32))
    z = z + shift
    assert (z > 0).any() and (z < 0).any()
    pred = cams.compute_cams(_pool_features, head, images, cams.make_binary_target("predicted"),
                             method="hires_cam")
    pos = cams.compute_cams(_pool_features, head, images, cams.make_binary_target("positive"),
                            method="hires_cam")
    neg = cams.compute_cams(_pool_features, head, images, cams.make_binary_target("negative"),
                            method="hires_cam")
    np.testing.assert_allclose(pred[z > 0], pos[z > 0], atol=1e-6)
    np.testing.assert_allclose(pred[z < 0], neg[z < 0], atol=1e-6)


def test_normalisation_range_and_all_zero_maps():
    rng = np.random.default_rng(4)
    images = rng.random((3, 8, 8, 3)).astype(np.float32)
    images[1] = 0.0  # all-zero features -> no activation
    head = _linear_head(jnp.ones((3, 1)), jnp.zeros(1))
    maps = np.asarray(cams.compute_cams(_pool_features, head, images,
                                        cams.make_binary_target("positive")))
    assert np.isfinite(maps).all()
    np.testing.assert_array_equal(maps[1], 0.0)
    for i in (0, 2):
        assert maps[i].min() == 0.0 and maps[i].max() == pytest.approx(1.0)
    # Negative-only raw maps are ReLU'd to zero: still 0, never NaN.
    neg = np.asarray(cams.compute_cams(_pool_features, head, images,
                                       cams.make_binary_target("negative")))
    np.testing.assert_array_equal(neg, 0.0)
    const = cams.normalize_maps(jnp.full((2, 5, 5), 0.7))
    np.testing.assert_array_equal(const, 0.0)


def test_gradient_only_through_head():
    """The jaxpr holds exactly one convolution: no backward pass through the backbone."""
    kernel = jnp.asarray(np.random.default_rng(5).normal(size=(3, 3, 3, 4)), jnp.float32)

    def features(x):
        y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y)

    head = _linear_head(jnp.ones((4, 1)), jnp.zeros(1))
    target = cams.make_binary_target("predicted")
    jaxpr = jax.make_jaxpr(
        lambda x: cams._cams_and_logits_impl(x, features, head, target, cams.grad_cam, True))(
            jnp.zeros((2, 8, 8, 3)))
    assert str(jaxpr).count("conv_general_dilated") == 1


def test_compiles_once_per_shape():
    traces = []

    def features(x):
        traces.append(x.shape)  # Python side effect: runs only while tracing
        return _pool_features(x)

    head = _linear_head(jnp.ones((3, 2)), jnp.zeros(2))
    target = cams.class_target(0)
    cam_fn = cams.make_cam_fn(features, head, target, "grad_cam_plusplus")
    rng = np.random.default_rng(6)
    for _ in range(3):
        cam_fn(jnp.asarray(rng.random((2, 8, 8, 3)), jnp.float32))
    assert len(traces) == 1
    for _ in range(3):
        cams.compute_cams(features, head, rng.random((2, 8, 8, 3)).astype(np.float32), target,
                          method="grad_cam_plusplus")
    assert len(traces) == 1  # same functions, same shape: the cached executable is reused
    cam_fn(jnp.zeros((5, 8, 8, 3)))
    assert len(traces) == 2  # a new shape compiles once more
    # The CAM function also works inside a caller's own jit.
    inside = jax.jit(lambda x: cam_fn(x) * 2.0)(jnp.ones((2, 8, 8, 3)))
    np.testing.assert_allclose(inside, 2.0 * np.asarray(cam_fn(jnp.ones((2, 8, 8, 3)))))


def test_custom_method_callable_and_registered():
    def gradient_sum(acts, grads):
        return jax.nn.relu(grads.sum(-1))

    rng = np.random.default_rng(7)
    images = rng.random((2, 8, 8, 3)).astype(np.float32)
    head = _linear_head(jnp.asarray(rng.normal(size=(3, 1)), jnp.float32), jnp.zeros(1))
    target = cams.make_binary_target("positive")
    direct = cams.compute_cams(_pool_features, head, images, target, method=gradient_sum,
                               upsample=False)
    cams.register_cam_method("test_gradient_sum", gradient_sum, overwrite=True)
    try:
        named = cams.compute_cams(_pool_features, head, images, target,
                                  method="test_gradient_sum", upsample=False)
        np.testing.assert_allclose(direct, named)
        with pytest.raises(ValueError, match="already registered"):
            cams.register_cam_method("test_gradient_sum", lambda a, g: a.sum(-1))
    finally:
        cams.CAM_METHODS.pop("test_gradient_sum")


def test_bad_inputs():
    head = _linear_head(jnp.ones((3, 1)), jnp.zeros(1))
    target = cams.make_binary_target("predicted")
    images = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="unknown CAM method 'gradcam'"):
        cams.compute_cams(_pool_features, head, images, target, method="gradcam")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        cams.compute_cams(_pool_features, head, images[0], target)
    with pytest.raises(ValueError, match="empty batch"):
        cams.compute_cams(_pool_features, head, images[:0], target)
    bad = images.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value nan at index \(1, 2, 3, 0\)"):
        cams.compute_cams(_pool_features, head, bad, target)
    cam_fn = cams.make_cam_fn(_pool_features, head, target)
    with pytest.raises(ValueError, match=r"non-finite value inf at index \(0, 0, 0, 0\)"):
        cam_fn(jnp.asarray(bad).at[0, 0, 0, 0].set(jnp.inf))


@pytest.mark.parametrize("small, size", [((4, 4), (128, 128)), ((7, 5), (224, 97)), ((3, 3), (3, 3)),
                                         ((6, 6), (4, 4))])
def test_upsample_normalize_equals_normalize_of_upsample(small, size):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, *small)).astype(np.float32)
    maps[1] = 0.7                       # constant map -> all zeros
    maps[2] = 0.0                       # no activation -> all zeros
    maps[3] = np.maximum(maps[3], 0.0)  # ReLU'd, as CAMs are
    fused = np.asarray(cams.upsample_normalize_maps(jnp.asarray(maps), size))
    two_step = np.asarray(cams.normalize_maps(cams.upsample_maps(jnp.asarray(maps), size)))
    np.testing.assert_allclose(fused, two_step, atol=1e-6)
    assert fused.shape == (5, *size)
    assert not fused[1].any() and not fused[2].any()
    assert fused.min() > -1e-6 and fused.max() < 1 + 1e-6


def test_bilinear_matrix_is_jax_resize_of_the_identity():
    for n_in, n_out in ((4, 128), (7, 224), (5, 23), (3, 3)):
        weights = cams.bilinear_matrix(n_in, n_out)
        reference = np.asarray(jax.image.resize(jnp.eye(n_in), (n_out, n_in), "bilinear"))
        np.testing.assert_allclose(weights, reference, atol=1e-6)
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="enlarges only"):
        cams.bilinear_matrix(8, 4)
