"""Losses against numpy references and the papers' closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import losses


def _np_bce(z, y):
    p = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- BCE


def test_sigmoid_bce_single_logit_shapes_match_numpy(rng):
    z = rng.normal(size=(7,)).astype(np.float32) * 3
    y = rng.integers(0, 2, size=7).astype(np.float32)
    expected = _np_bce(z, y).mean()
    np.testing.assert_allclose(losses.sigmoid_bce(z, y), expected, rtol=1e-5)
    # [B, 1] logits with [B] labels (a single-logit classifier's output)
    np.testing.assert_allclose(losses.sigmoid_bce(z[:, None], y), expected, rtol=1e-5)


def test_sigmoid_bce_multilabel_with_mask_ignores_masked_entries(rng):
    z = rng.normal(size=(5, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=(5, 4)).astype(np.float32)
    mask = rng.random((5, 4)) > 0.4
    expected = _np_bce(z, y)[mask].mean()
    np.testing.assert_allclose(losses.sigmoid_bce(z, y, mask), expected, rtol=1e-5)
    # changing a masked logit does not change the loss
    z2 = np.where(mask, z, 100.0).astype(np.float32)
    np.testing.assert_allclose(losses.sigmoid_bce(z2, y, mask), expected, rtol=1e-5)


def test_sigmoid_bce_all_masked_is_zero_not_nan():
    z = jnp.ones((3, 2))
    out = losses.sigmoid_bce(z, jnp.zeros((3, 2)), jnp.zeros((3, 2), bool))
    assert float(out) == 0.0


def test_sigmoid_bce_stable_for_large_logits():
    z = jnp.array([100.0, -100.0, 100.0, -100.0])
    y = jnp.array([1.0, 0.0, 0.0, 1.0])
    out = losses.sigmoid_bce(z, y)
    np.testing.assert_allclose(out, (0 + 0 + 100 + 100) / 4, rtol=1e-6)
    grads = jax.grad(losses.sigmoid_bce)(z, y)
    assert np.all(np.isfinite(grads))


def test_sigmoid_bce_sample_weights(rng):
    z = rng.normal(size=(6, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=(6, 3)).astype(np.float32)
    w = rng.random(6).astype(np.float32) * 3
    expected = (_np_bce(z, y) * w[:, None]).mean()  # torch BCEWithLogits(weight=w) convention
    np.testing.assert_allclose(losses.sigmoid_bce(z, y, class_weights=w[:, None]), expected, rtol=1e-5)
    # single-logit, per-sample weights [B]
    expected1 = (_np_bce(z[:, 0], y[:, 0]) * w).mean()
    np.testing.assert_allclose(losses.sigmoid_bce(z[:, :1], y[:, 0], class_weights=w), expected1, rtol=1e-5)
    with pytest.raises(ValueError, match="class_weights shape"):
        losses.sigmoid_bce(z, y, class_weights=w)  # [B] against [B, A] with A != B is ambiguous


def test_sigmoid_bce_bad_inputs():
    with pytest.raises(ValueError, match="must match"):
        losses.sigmoid_bce(jnp.zeros((4, 2)), jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        losses.sigmoid_bce(jnp.zeros(3), jnp.array([0.0, 1.0, -1.0]))
    # -1 is fine where it is masked out
    losses.sigmoid_bce(jnp.zeros(3), jnp.array([0.0, 1.0, -1.0]), jnp.array([True, True, False]))


def test_attribute_targets_masks_unknown():
    attrs = np.array([[1, 0, -1], [-1, 1, 1]], np.int8)
    labels, mask = losses.attribute_targets(attrs)
    np.testing.assert_array_equal(labels, [[1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(mask, [[True, True, False], [False, True, True]])
    assert labels.dtype == jnp.float32 and mask.dtype == jnp.bool_
    z = np.array([[2.0, -1.0, 5.0], [-7.0, 0.5, 0.1]], np.float32)
    expected = _np_bce(z, labels)[np.asarray(mask)].mean()
    np.testing.assert_allclose(losses.sigmoid_bce(z, labels, mask), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="attrs"):
        losses.attribute_targets(np.array([[2, 0]], np.int8))


def test_sigmoid_bce_under_jit(rng):
    z = rng.normal(size=(4, 3)).astype(np.float32)
    attrs = np.array([[1, 0, -1], [0, 0, 1], [-1, -1, -1], [1, 1, 0]], np.int8)

    @jax.jit
    def f(z, attrs):
        labels, mask = losses.attribute_targets(attrs)
        return losses.sigmoid_bce(z, labels, mask)

    labels, mask = (np.asarray(a) for a in losses.attribute_targets(attrs))
    np.testing.assert_allclose(f(z, attrs), _np_bce(z, labels)[mask].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- balanced Euclidean


@pytest.mark.parametrize(
    "p, w_pos, w_neg", [(0.2, 4.0, 1.0), (0.8, 1.0, 4.0), (0.5, 1.0, 1.0), (0.1, 9.0, 1.0), (0.75, 1.0, 3.0)]
)
def test_balanced_weights_eq6(p, w_pos, w_neg):
    wp, wn = losses.balanced_weights(jnp.array([p]))
    np.testing.assert_allclose(wp, [w_pos], rtol=1e-5)
    np.testing.assert_allclose(wn, [w_neg], rtol=1e-5)


def test_balanced_weights_edges_and_errors():
    wp, wn = losses.balanced_weights(jnp.array([0.0, 1.0]))
    assert np.all(np.isfinite(wp)) and np.all(np.isfinite(wn))
    with pytest.raises(ValueError, match="p_pos"):
        losses.balanced_weights(jnp.array([0.3, 1.2]))


def _np_balanced_euclidean(z, t, w_pos, w_neg, mask):
    n, m = z.shape
    total = 0.0
    for i in range(n):
        for j in range(m):
            if mask[i, j]:
                w = w_pos[j] if t[i, j] > 0 else w_neg[j]
                total += w * (z[i, j] - t[i, j]) ** 2
    return total / n


def test_balanced_euclidean_matches_loop(rng):
    z = rng.normal(size=(6, 5)).astype(np.float32)
    t = np.where(rng.random((6, 5)) > 0.3, 1.0, -1.0).astype(np.float32)
    p = np.array([0.1, 0.3, 0.5, 0.7, 0.95], np.float32)
    w_pos, w_neg = (np.asarray(w) for w in losses.balanced_weights(p))
    mask = rng.random((6, 5)) > 0.2
    expected = _np_balanced_euclidean(z, t, w_pos, w_neg, mask)
    np.testing.assert_allclose(losses.balanced_euclidean(z, t, (w_pos, w_neg), mask), expected, rtol=1e-5)
    ones = np.ones(5, np.float32)
    np.testing.assert_allclose(losses.euclidean(z, t), _np_balanced_euclidean(z, t, ones, ones, np.ones_like(mask)),
                               rtol=1e-5)
    # masked entries are ignored, even with labels outside {-1, +1} (unknown)
    t_unknown = np.where(mask, t, 0.0).astype(np.float32)
    np.testing.assert_allclose(losses.balanced_euclidean(z, t_unknown, (w_pos, w_neg), mask), expected, rtol=1e-5)


def test_balanced_euclidean_rejects_01_labels():
    with pytest.raises(ValueError, match="labels_pm1"):
        losses.euclidean(jnp.zeros((2, 2)), jnp.array([[0.0, 1.0], [1.0, 1.0]]))


# ----------------------------------------------------------------------------- label smoothing


def test_label_smoothed_cross_entropy_matches_numpy(rng):
    z = rng.normal(size=(5, 4)).astype(np.float64)
    y = rng.integers(0, 4, size=5)
    s = 0.1
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    targets = np.full((5, 4), s / 4)
    targets[np.arange(5), y] += 1 - s
    expected = -(targets * log_p).sum(1).mean()
    np.testing.assert_allclose(losses.label_smoothed_cross_entropy(z, y, s), expected, rtol=1e-5)
    plain = -log_p[np.arange(5), y].mean()
    np.testing.assert_allclose(losses.label_smoothed_cross_entropy(z, y, 0.0), plain, rtol=1e-5)
    with pytest.raises(ValueError, match="smoothing"):
        losses.label_smoothed_cross_entropy(z, y, 1.0)
    with pytest.raises(ValueError, match="class ids"):
        losses.label_smoothed_cross_entropy(z, np.array([0, 1, 2, 3, 4]))


# ----------------------------------------------------------------------------- margin losses


def _np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cosface_logits_match_numpy(rng):
    e = rng.normal(size=(4, 8))
    w = rng.normal(size=(5, 8))
    y = np.array([0, 3, 4, 1])
    cos = _np_normalize(e) @ _np_normalize(w).T
    expected = 30.0 * (cos - 0.2 * np.eye(5)[y])
    np.testing.assert_allclose(losses.cosface_logits(e, w, y, scale=30.0, margin=0.2), expected, rtol=1e-4,
                               atol=1e-4)


def test_arcface_logits_match_arccos_formula(rng):
    e = rng.normal(size=(4, 8))
    w = rng.normal(size=(5, 8))
    y = np.array([2, 0, 1, 4])
    cos = np.clip(_np_normalize(e) @ _np_normalize(w).T, -1, 1)
    theta = np.arccos(cos)
    m = 0.5
    target = np.where(theta + m < np.pi, np.cos(theta + m), cos - np.sin(m) * m)
    expected = 64.0 * np.where(np.eye(5, dtype=bool)[y], target, cos)
    np.testing.assert_allclose(losses.arcface_logits(e, w, y), expected, rtol=1e-4, atol=1e-3)


def test_margin_softmax_loss_is_cross_entropy_of_margin_logits(rng):
    e = rng.normal(size=(3, 6)).astype(np.float32)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    y = np.array([1, 0, 3])
    for kind, fn in (("cosface", losses.cosface_logits), ("arcface", losses.arcface_logits)):
        logits = np.asarray(fn(e, w, y), np.float64)
        log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        expected = -log_p[np.arange(3), y].mean()
        np.testing.assert_allclose(losses.margin_softmax_loss(e, w, y, kind=kind), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="kind"):
        losses.margin_softmax_loss(e, w, y, kind="sphereface")


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_margin_losses_finite_at_zero_norm(kind):
    e = jnp.zeros((2, 4)).at[1].set(jnp.array([1.0, 0.0, 0.0, 0.0]))
    w = jnp.zeros((3, 4)).at[0].set(jnp.array([1.0, 0.0, 0.0, 0.0]))  # classes 1, 2 zero-norm
    y = jnp.array([0, 0])  # sample 1 exactly on its class centre: cos = 1
    loss, grads = jax.value_and_grad(
        lambda e, w: losses.margin_softmax_loss(e, w, y, kind=kind), argnums=(0, 1)
    )(e, w)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_margin_logits_bad_shapes():
    with pytest.raises(ValueError, match="class_weights"):
        losses.cosface_logits(jnp.ones((2, 4)), jnp.ones((3, 5)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="class ids"):
        losses.cosface_logits(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.array([0, 3]))


def test_cosface_loss_on_cosines_matches_cosface_logits(rng):
    e = rng.normal(size=(6, 8)).astype(np.float32)
    w = rng.normal(size=(5, 8)).astype(np.float32)
    y = np.array([0, 1, 4, 2, 2, 3])
    cosines = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    logits = 16.0 * (cosines - 0.3 * np.eye(5)[y])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    reference = -np.mean(log_probs[np.arange(6), y])
    assert float(losses.cosface_loss_on_cosines(cosines, y, 16.0, 0.3)) == pytest.approx(reference, rel=1e-5)
    np.testing.assert_allclose(losses.cosface_logits_from_cosines(cosines, y, 16.0, 0.3),
                               losses.cosface_logits(e, w, y, scale=16.0, margin=0.3), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cosines"):
        losses.cosface_loss_on_cosines(cosines[0], y)


def test_single_logit_batch_losses_read_labels_mask_and_weights(rng):
    z = rng.normal(size=(8, 1)).astype(np.float32) * 2
    y = rng.integers(0, 2, size=8).astype(np.float32)
    mask = np.array([True] * 6 + [False] * 2)
    w = rng.random(8).astype(np.float32) * 3
    batch = {"label": y, "label_mask": mask, "weight": w}
    per = _np_bce(z[:, 0], y)
    np.testing.assert_allclose(losses.sigmoid_bce_batch_loss(z, batch), per[:6].mean(), rtol=1e-5)
    # sum over the known images of w * l, divided by their count (not by the weights' sum)
    np.testing.assert_allclose(losses.sigmoid_bce_weighted_batch_loss(z, batch),
                               (w[:6] * per[:6]).sum() / 6, rtol=1e-5)


def test_softmax_classification_loss_closed_form():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    batch = {"label": jnp.array([0, 0])}
    logp = np.asarray(jax.nn.log_softmax(logits))
    eps = 0.1
    target = np.array([[1 - eps / 2, eps / 2]] * 2)
    loss, metrics = losses.SoftmaxClassificationLoss(eps)(logits, batch)
    assert float(loss) == pytest.approx(-(target * logp).sum(-1).mean(), rel=1e-6)
    assert float(metrics["accuracy"]) == 0.5  # argmax 0 and 1 against labels 0 and 0
    assert hash(losses.SoftmaxClassificationLoss(eps)) == hash(losses.SoftmaxClassificationLoss(eps))
