"""FLAC (mitigation.flac) against a per-pair numpy loop, on hand-made batches whose
selected pairs are known, and through one jitted training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import classifiers, cli, train_lib
from faceaudit_jax.mitigation import flac
from faceaudit_jax.models import build_model


def flac_reference(protected, features, labels, d=0.5):
    """The FLAC divergence written out pair by pair (float64)."""
    protected, features = np.asarray(protected, np.float64), np.asarray(features, np.float64)
    n = len(labels)

    def sim(x, i, j):
        return 1.0 / (1.0 + np.sqrt(np.sum((x[i] - x[j]) ** 2) + 1e-6) ** d)

    s_p = np.array([[sim(protected, i, j) for j in range(n)] for i in range(n)])
    s_f = np.array([[sim(features, i, j) for j in range(n)] for i in range(n)])
    th = (s_p.max() + s_p.min()) / 2
    mask = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            same = labels[i] == labels[j]
            mask[i, j] = (same and s_p[i, j] < th) or (not same and s_p[i, j] > th)
    if not mask.any():
        return 0.0, mask
    total, count = 0.0, 0
    for i in range(n):
        row = np.flatnonzero(mask[i])
        p_sum = sum(1.0 - s_p[i, j] for j in row) + 1e-7
        q_sum = sum(s_f[i, j] for j in row) + 1e-7
        for j in row:
            p, q = (1.0 - s_p[i, j]) / p_sum, s_f[i, j] / q_sum
            total += (p - q) * (np.log(p) - np.log(q))
            count += 1
    return total / count, mask


def test_flac_loss_matches_the_pairwise_loop():
    rng = np.random.default_rng(0)
    protected = rng.normal(size=(12, 5)).astype(np.float32)
    features = rng.normal(size=(12, 7)).astype(np.float32)
    labels = rng.integers(0, 2, 12).astype(np.float32)
    expected, mask = flac_reference(protected, features, labels)
    assert mask.sum() > 10                  # a batch that selects pairs
    got = flac.flac_loss(jnp.asarray(protected), jnp.asarray(features), jnp.asarray(labels))
    assert float(got) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_array_equal(np.asarray(flac.flac_pair_mask(protected, labels)), mask)
    assert float(got) > 0


def test_pairs_selected_are_the_bias_conflicting_ones():
    # Two protected clusters (blond, not blond) and labels (man, woman): one blond
    # woman and one non-blond man conflict with the blond men / non-blond women.
    protected = np.array([[0.0], [0.0], [0.0], [10.0], [10.0], [10.0]], np.float32)
    labels = np.array([1, 1, 0, 0, 0, 1], np.float32)   # rows 2 and 5 conflict
    mask = np.asarray(flac.flac_pair_mask(protected, labels))
    same, conflict = labels[:, None] == labels[None, :], protected[:, :1] != protected[:, 0][None, :]
    # Same class across protected clusters, or different classes within one.
    np.testing.assert_array_equal(mask, (same & conflict) | (~same & ~conflict))
    assert not mask[np.diag_indices(6)].any()


def test_loss_is_zero_without_selected_pairs_and_gradients_stay_finite():
    protected = jnp.zeros((4, 3))
    features = jnp.zeros((4, 8))                  # identical rows: distance 0
    labels = jnp.ones(4)
    assert float(flac.flac_loss(protected, features, labels)) == 0.0
    grads = jax.grad(lambda f: flac.flac_loss(jnp.eye(4, 3) * 5, f, jnp.array([0., 1, 0, 1])))(features)
    assert np.isfinite(np.asarray(grads)).all()


def test_feature_similarity_that_follows_the_protected_dissimilarity_scores_lower():
    # Features that pull same-class pairs across protected groups together (what FLAC asks)
    # give a smaller divergence than features that copy the protected attribute.
    protected = np.repeat(np.array([[0.0], [4.0]], np.float32), 4, axis=0)
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 0], np.float32)
    copies_bias = protected * 3
    follows_label = labels[:, None] * 3.0
    assert float(flac.flac_loss(protected, follows_label, labels)) < \
        float(flac.flac_loss(protected, copies_bias, labels))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="batch sizes differ"):
        flac.flac_loss(jnp.zeros((4, 2)), jnp.zeros((5, 2)), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"expected protected_features \[B, P\]"):
        flac.flac_loss(jnp.zeros((4,)), jnp.zeros((4, 2)), jnp.zeros(4))


def test_flac_training_step_reads_pooled_features_and_compiles_once():
    model = build_model("small_resnet", 1)
    protected_model = build_model("small_resnet", 1)
    key = jax.random.PRNGKey(0)
    tx = train_lib.make_optimizer(train_lib.default_optimizer_config(), 10)
    state = train_lib.create_train_state(model, key, 32, tx)
    protected_vars = train_lib.create_train_state(protected_model, jax.random.PRNGKey(1), 32, tx)
    augment = flac.protected_features_augment(protected_model, train_lib.state_variables(protected_vars))
    loss = flac.FlacLoss(alpha=1000.0, ce_weight=1.0)
    step = train_lib.make_train_step(model, loss, augment_fn=augment)
    rng = np.random.default_rng(0)
    traces = []
    for _ in range(2):
        batch = {"image": jnp.asarray(rng.random((8, 32, 32, 3)), jnp.float32),
                 "label": jnp.asarray(rng.integers(0, 2, 8), jnp.float32),
                 "label_mask": jnp.ones(8, bool)}
        state, metrics = step(state, batch)
        traces.append(step._cache_size())
    assert traces == [1, 1]
    assert set(metrics) >= {"loss", "bce", "flac"}
    expected = float(metrics["bce"]) + 1000.0 * float(metrics["flac"])
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    # The same weights compare equal, so the memoised step is shared.
    assert flac.FlacLoss(alpha=1000.0, ce_weight=1.0) == loss and hash(loss) == hash(
        flac.FlacLoss(alpha=1000.0, ce_weight=1.0))


def test_train_classifier_rejects_two_mitigations_and_a_flac_run_without_weights(tmp_path):
    config = cli.load_config("configs/facex_tables.py")
    with config.unlocked():
        config.bias = {"target": "Male"}
    protected = classifiers.TrainedClassifier(build_model("small_resnet", 1), {}, "p", str(tmp_path))
    with pytest.raises(ValueError, match="x: sample_weights and a protected network were both given"):
        classifiers.train_classifier(config, str(tmp_path), np.arange(4), None, "x",
                                     sample_weights=np.ones(4, np.float32), protected=protected)
    assert not (tmp_path / "x").exists()          # nothing written
    with pytest.raises(ValueError, match="config.train.flac is missing"):
        classifiers._objective(config, np.arange(4), None, None, protected)
