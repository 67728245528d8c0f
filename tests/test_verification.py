"""Verification metrics against brute-force loops over thresholds and folds."""

import numpy as np
import pytest

from faceaudit_jax.metrics import verification as V


def brute_best_threshold(scores, is_same):
    """Every candidate threshold tried in a Python loop (the module's rule:
    midpoints of distinct sorted scores, the minimum, just above the maximum;
    accept iff score >= t; lowest threshold among the most accurate)."""
    u = np.unique(scores)
    candidates = [u[0]] + [(x + y) / 2 for x, y in zip(u[:-1], u[1:])] + [np.nextafter(u[-1], np.inf)]
    best = None
    for t in candidates:
        acc = np.mean([(s >= t) == same for s, same in zip(scores, is_same)])
        if best is None or acc > best[1]:
            best = (t, acc)
    return best


def make_scores(rng, n, ties=False):
    is_same = rng.uniform(size=n) < 0.5
    scores = np.where(is_same, rng.normal(0.6, 0.2, n), rng.normal(0.2, 0.2, n))
    if ties:
        scores = np.round(scores, 1)
    return scores, is_same


@pytest.mark.parametrize("ties", [False, True])
def test_best_threshold_matches_brute_force(ties):
    rng = np.random.default_rng(0 + ties)
    for n in (1, 2, 7, 50):
        scores, is_same = make_scores(rng, n, ties)
        thr, acc = V.best_threshold(scores, is_same)
        ref_thr, ref_acc = brute_best_threshold(scores, is_same)
        assert acc == pytest.approx(ref_acc)
        assert thr == pytest.approx(ref_thr)
        assert np.mean((scores >= thr) == is_same) == pytest.approx(acc)


@pytest.mark.parametrize("ties", [False, True])
def test_kfold_matches_brute_force_loop(ties):
    rng = np.random.default_rng(2 + ties)
    scores, is_same = make_scores(rng, 123, ties)
    result = V.kfold_verification_accuracy(scores, is_same, num_folds=10)
    folds = np.array_split(np.arange(123), 10)  # contiguous, first folds larger
    accs, thrs = [], []
    for held in folds:
        train = np.setdiff1d(np.arange(123), held)
        thr, _ = brute_best_threshold(scores[train], is_same[train])
        thrs.append(thr)
        accs.append(np.mean((scores[held] >= thr) == is_same[held]))
    np.testing.assert_allclose(result["fold_thresholds"], thrs)
    np.testing.assert_allclose(result["fold_accuracies"], accs)
    assert result["mean_accuracy"] == pytest.approx(np.mean(accs))
    assert result["std_accuracy"] == pytest.approx(np.std(accs))
    assert result["mean_threshold"] == pytest.approx(np.mean(thrs))


def test_kfold_separable_is_perfect_and_custom_folds():
    scores = np.r_[np.linspace(0.6, 0.9, 20), np.linspace(-0.2, 0.3, 20)]
    is_same = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    folds = np.tile(np.arange(4), 10)
    result = V.kfold_verification_accuracy(scores, is_same, folds=folds)
    assert result["mean_accuracy"] == 1.0 and result["std_accuracy"] == 0.0
    assert np.all((result["fold_thresholds"] > 0.3) & (result["fold_thresholds"] < 0.6))


def test_rates_and_roc():
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.4, 0.2])
    is_same = np.array([1, 1, 0, 1, 0, 0], bool)
    r = V.verification_rates(scores, is_same, 0.7)
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (3, 0, 2, 1)
    assert r["tpr"] == 1.0 and r["recall"] == 1.0 and r["fpr"] == pytest.approx(1 / 3)
    assert r["tnr"] == pytest.approx(2 / 3) and r["accuracy"] == pytest.approx(5 / 6)
    fpr, tpr, thr = V.roc_curve(scores, is_same)
    # Distinct thresholds inf, .9, .8, .7 (tie enters together), .4, .2.
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.4, 0.2])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 2 / 3, 1])
    # AUC = P(score_pos > score_neg) + 0.5 P(tie) by pairwise counting.
    pos, neg = scores[is_same], scores[~is_same]
    pairwise = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert V.roc_auc(scores, is_same) == pytest.approx(pairwise)
    assert np.isnan(V.verification_rates(scores[is_same], is_same[is_same], 0.5)["tnr"])


def test_cosine_scores_safe_for_zero_vectors():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
    np.testing.assert_allclose(V.pair_scores(a, b), [1.0, 0.0, -1.0])
    np.testing.assert_allclose(np.asarray(V.cosine_similarity(a, b)), [1.0, 0.0, -1.0], atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        V.best_threshold(np.zeros(3), np.zeros(4, bool))
    with pytest.raises(ValueError, match="NaN"):
        V.best_threshold(np.array([0.1, np.nan]), np.array([1, 0], bool))
    with pytest.raises(ValueError, match="num_folds=1"):
        V.kfold_verification_accuracy(np.zeros(5), np.zeros(5, bool), num_folds=1)
    with pytest.raises(ValueError, match="at least one pair per fold"):
        V.kfold_verification_accuracy(np.zeros(5), np.zeros(5, bool), num_folds=10)
    with pytest.raises(ValueError, match="matching and non-matching"):
        V.roc_curve(np.zeros(3), np.ones(3, bool))
    with pytest.raises(ValueError, match=r"\[P, D\]"):
        V.pair_scores(np.zeros((2, 3)), np.zeros((2, 4)))


def test_decisions_at_mean_threshold_against_per_fold_brute_force():
    rng = np.random.default_rng(5)
    scores, is_same = make_scores(rng, 60, ties=True)
    folds = np.arange(60) % 3
    out = V.decisions_at_mean_threshold(scores, is_same, folds)
    thresholds = [brute_best_threshold(scores[folds != k], is_same[folds != k])[0] for k in range(3)]
    assert out["threshold"] == pytest.approx(np.mean(thresholds))
    np.testing.assert_array_equal(out["predicted_same"], scores >= out["threshold"])
    assert out["rates"]["tp"] == int(np.sum(out["predicted_same"] & is_same))
    assert out["rates"]["tn"] == int(np.sum(~out["predicted_same"] & ~is_same))
    assert out["kfold"]["fold_accuracies"].shape == (3,)
