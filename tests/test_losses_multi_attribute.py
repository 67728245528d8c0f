"""The multi-attribute batch losses appended to ``losses.py``, against a numpy loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import losses


def test_class_weights_follow_eq6_and_loss_matches_a_numpy_loop():
    p = np.array([0.2, 0.8, 0.5, np.nan])
    w_pos, w_neg = losses.multi_attribute_class_weights("balanced", p)
    np.testing.assert_allclose(w_pos, [4.0, 1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(w_neg, [1.0, 4.0, 1.0, 1.0], rtol=1e-6)
    for kind in losses.MULTI_ATTRIBUTE_UNBALANCED_LOSSES:
        ones = losses.multi_attribute_class_weights(kind, p)
        assert all(np.array_equal(w, np.ones(4)) for w in ones)
    with pytest.raises(ValueError, match="unknown loss kind"):
        losses.multi_attribute_class_weights("focal", p)

    rng = np.random.default_rng(0)
    attrs = rng.integers(-1, 2, size=(5, 4)).astype(np.int8)  # 1 / 0 / -1 unknown
    logits = rng.normal(size=(5, 4)).astype(np.float32)

    def batch_with(weights):
        return {"label": jnp.asarray(attrs == 1, jnp.float32), "label_mask": jnp.asarray(attrs >= 0),
                "weight_positive": jnp.asarray(weights[0]), "weight_negative": jnp.asarray(weights[1])}

    transformed = batch_with((w_pos, w_neg))
    loss = float(losses.multi_attribute_loss_fn("balanced")(jnp.asarray(logits), transformed))
    expected = 0.0
    for n in range(5):
        for m in range(4):
            if attrs[n, m] < 0:
                continue
            t = 1.0 if attrs[n, m] == 1 else -1.0
            expected += (w_pos[m] if t > 0 else w_neg[m]) * (logits[n, m] - t) ** 2
    assert loss == pytest.approx(expected / 5, rel=1e-5)
    # Unit weights: AFFACT-u's plain Euclidean loss.
    plain = batch_with(losses.multi_attribute_class_weights("euclidean", p))
    assert float(losses.multi_attribute_loss_fn("euclidean")(jnp.asarray(logits), plain)) == pytest.approx(
        float(losses.euclidean(jnp.asarray(logits), 2.0 * plain["label"] - 1.0,
                               plain["label_mask"])), rel=1e-6)


def test_bce_kind_is_sigmoid_bce_over_known_entries():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    label = (rng.random((4, 3)) > 0.5).astype(np.float32)
    mask = rng.random((4, 3)) > 0.3
    batch = {"label": jnp.asarray(label), "label_mask": jnp.asarray(mask)}
    loss = float(losses.multi_attribute_loss_fn("bce")(jnp.asarray(logits), batch))
    per_entry = np.logaddexp(0, logits) - label * logits  # -log sigmoid(+-z)
    assert loss == pytest.approx(per_entry[mask].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss kind"):
        losses.multi_attribute_loss_fn("hinge")
