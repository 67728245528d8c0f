"""FNR / FPR per attribute and per-group accuracy against hand counts."""

import warnings

import jax
import numpy as np
import pytest

from faceaudit_jax.metrics import fairness


def _rates_loop(predicted, targets):
    """Independent reference: count the four cases entry by entry."""
    n, a = targets.shape
    fnr, fpr = np.full(a, np.nan), np.full(a, np.nan)
    for m in range(a):
        tp = fn = fp = tn = 0
        for i in range(n):
            t, p = targets[i, m], predicted[i, m]
            if t == 1:
                tp, fn = tp + p, fn + (not p)
            elif t == 0:
                fp, tn = fp + p, tn + (not p)
        if tp + fn:
            fnr[m] = fn / (tp + fn)
        if fp + tn:
            fpr[m] = fp / (fp + tn)
    return fnr, fpr


def test_error_rates_against_hand_counts_with_unknown_targets():
    targets = np.array([[1, 0], [1, 0], [1, 1], [0, -1], [0, 1], [-1, 0]], np.int8)
    logits = np.array([[2.0, -1.0], [-0.5, 0.3], [0.1, 1.0], [0.4, 5.0], [-3.0, -2.0],
                       [9.0, -9.0]], np.float32)
    rates = fairness.attribute_error_rates(logits, targets)
    # attribute 0: positives rows 0-2 -> one miss (row 1): FNR 1/3;
    #              negatives rows 3-4 -> one false alarm (row 3): FPR 1/2; row 5 unknown.
    # attribute 1: positives rows 2, 4 -> one miss (row 4): FNR 1/2;
    #              negatives rows 0, 1, 5 -> one false alarm (row 1): FPR 1/3; row 3 unknown.
    np.testing.assert_allclose(rates.fnr, [1 / 3, 1 / 2])
    np.testing.assert_allclose(rates.fpr, [1 / 2, 1 / 3])
    np.testing.assert_array_equal(rates.num_positive, [3, 2])
    np.testing.assert_array_equal(rates.num_negative, [2, 3])
    np.testing.assert_allclose(rates.positive_share, [3 / 5, 2 / 5])
    np.testing.assert_allclose(rates.accuracy, [3 / 5, 3 / 5])
    # bool predictions and logits agree; z == 0 counts as positive.
    same = fairness.attribute_error_rates(logits >= 0, targets)
    np.testing.assert_allclose(same.fnr, rates.fnr)
    with pytest.warns(RuntimeWarning, match="no negative samples"):
        zero = fairness.attribute_error_rates(np.zeros((1, 1)), np.ones((1, 1), np.int8))
    assert zero.fnr[0] == 0.0


def test_error_rates_match_loop_on_random_data_and_stream_over_batches():
    rng = np.random.default_rng(0)
    targets = rng.choice([-1, 0, 1], size=(200, 7), p=[0.1, 0.6, 0.3]).astype(np.int8)
    logits = rng.normal(size=(200, 7)).astype(np.float32)
    rates = fairness.attribute_error_rates(logits, targets)
    fnr, fpr = _rates_loop(logits >= 0, targets)
    np.testing.assert_allclose(rates.fnr, fnr)
    np.testing.assert_allclose(rates.fpr, fpr)
    counts = jax.jit(fairness.confusion_counts)(logits[:80], targets[:80]) + \
        fairness.confusion_counts(logits[80:], targets[80:])
    streamed = fairness.error_rates_from_counts(counts)
    np.testing.assert_allclose(streamed.fnr, fnr)
    np.testing.assert_allclose(streamed.fpr, fpr)


def test_attribute_without_positives_gets_nan_fnr_with_warning_others_unaffected():
    targets = np.array([[0, 1, 1], [0, 0, 1], [-1, 1, 1]], np.int8)  # attr 0 no positive,
    predicted = np.array([[True, True, False], [False, False, True], [True, True, True]])
    names = ["Bald", "Smiling", "Young"]  # attr 2 no negative
    with pytest.warns(RuntimeWarning) as record:
        rates = fairness.attribute_error_rates(predicted, targets, names=names)
    messages = " | ".join(str(w.message) for w in record)
    assert "no positive samples for attribute(s) Bald" in messages
    assert "no negative samples for attribute(s) Young" in messages
    assert np.isnan(rates.fnr[0]) and rates.fpr[0] == pytest.approx(0.5)
    assert np.isnan(rates.fpr[2]) and rates.fnr[2] == pytest.approx(1 / 3)
    assert rates.fnr[1] == 0.0 and rates.fpr[1] == 0.0


def test_positive_share_and_imbalance_order():
    targets = np.array([[1, 1, 0, -1], [0, 1, 0, -1], [0, 1, 1, -1], [0, 0, 0, -1]], np.int8)
    with pytest.warns(RuntimeWarning, match="no known targets for attribute"):
        p = fairness.positive_share(targets)
    np.testing.assert_allclose(p[:3], [0.25, 0.75, 0.25])
    assert np.isnan(p[3])
    p_m = np.array([0.5, 0.02, 0.7, 0.98, 0.45])
    np.testing.assert_allclose(fairness.imbalance(p_m), [0.0, 0.48, 0.2, 0.48, 0.05])
    # Stable ties (attributes 1 and 3), most imbalanced first.
    np.testing.assert_array_equal(fairness.imbalance_order(p_m), [1, 3, 2, 4, 0])
    np.testing.assert_array_equal(fairness.imbalance_order(p_m, most_imbalanced_first=False),
                                  [0, 4, 2, 1, 3])
    np.testing.assert_array_equal(fairness.imbalance_order([0.5, np.nan, 0.9]), [2, 0, 1])


def test_group_ids_cells_and_unknown():
    target = np.array([0, 0, 1, 1, -1, 1], np.int8)
    confounder = np.array([0, 1, 0, 1, 1, -1], np.int8)
    np.testing.assert_array_equal(fairness.group_ids(target, confounder), [0, 1, 2, 3, -1, -1])
    np.testing.assert_array_equal(
        fairness.group_ids(np.array([1, 2]), np.array([2, 3]), num_confounder_values=3), [5, -1])
    with pytest.raises(ValueError, match="same shape"):
        fairness.group_ids(np.zeros(3), np.zeros(2))


def test_group_accuracy_against_loop_gap_and_empty_group():
    rng = np.random.default_rng(1)
    groups = rng.integers(-1, 3, size=300)  # -1: unknown, left out; group 3 never occurs
    correct = rng.random(300) < np.array([0.9, 0.7, 0.5])[np.maximum(groups, 0)]
    with pytest.warns(RuntimeWarning, match=r"no samples in group\(s\) dark"):
        result = fairness.group_accuracy(correct, groups, 4,
                                         group_names=["light", "medium", "tan", "dark"])
    for g in range(3):
        assert result.accuracy[g] == pytest.approx(correct[groups == g].mean())
        assert result.count[g] == (groups == g).sum()
    assert np.isnan(result.accuracy[3]) and result.count[3] == 0
    expected_gap = max(result.accuracy[:3]) - min(result.accuracy[:3])
    assert result.gap == pytest.approx(expected_gap)
    assert result.best == int(np.argmax(result.accuracy[:3]))
    assert result.worst == int(np.argmin(result.accuracy[:3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        streamed = fairness.group_accuracy_from_counts(
            fairness.group_counts(correct[:100], groups[:100], 3)
            + jax.jit(fairness.group_counts, static_argnums=2)(correct[100:], groups[100:], 3))
    np.testing.assert_allclose(streamed.accuracy, result.accuracy[:3])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="targets must be integers"):
        fairness.confusion_counts(np.zeros((2, 2)), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="same shape"):
        fairness.confusion_counts(np.zeros((2, 3)), np.zeros((2, 2), np.int8))
    with pytest.raises(ValueError, match="num_groups"):
        fairness.group_counts(np.ones(3, bool), np.zeros(3, np.int32), 0)
    with pytest.raises(ValueError, match="groups must be integers"):
        fairness.group_counts(np.ones(3, bool), np.zeros(3, np.float32), 2)


# ----------------------------------------------------------------------------- target x confounder (noise-debiasing Table 1)


def test_subgroup_metrics_against_numpy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 200)
    confounder = rng.integers(0, 2, 200)
    correct = rng.random(200) < 0.7
    m = fairness.subgroup_metrics(correct, target, confounder)
    men = np.mean([c for c, t in zip(correct, target) if t == 1])
    women = np.mean([c for c, t in zip(correct, target) if t == 0])
    assert m["men"] == pytest.approx(men) and m["women"] == pytest.approx(women)
    assert m["gap"] == pytest.approx(abs(men - women))
    n_men, n_women = np.sum(target == 1), np.sum(target == 0)
    assert m["gap_se"] == pytest.approx(np.sqrt(men * (1 - men) / n_men
                                                + women * (1 - women) / n_women))
    assert m["accuracy"] == pytest.approx(correct.mean())
    for name, (t, a) in {"women_without": (0, 0), "women_with": (0, 1),
                         "men_without": (1, 0), "men_with": (1, 1)}.items():
        sel = (target == t) & (confounder == a)
        assert m["cells"][name] == pytest.approx(correct[sel].mean())
        assert m["cell_counts"][name] == sel.sum()
    values = list(m["cells"].values())
    assert m["cell_gap"] == pytest.approx(max(values) - min(values))
    assert m["cells"][m["worst_cell"]] == min(values)
    with pytest.raises(ValueError, match="both men and women"):
        fairness.subgroup_metrics(correct, np.ones(200, int), confounder)
    with pytest.raises(ValueError, match="must all be"):
        fairness.subgroup_metrics(correct[:10], target, confounder)


def test_aggregate_repeats_against_numpy():
    rng = np.random.default_rng(3)
    correct = rng.random((3, 40)) < 0.7
    target = np.tile(np.repeat([0, 1], 20), 1)
    confounder = np.tile([0, 1], 20)
    records = [{**fairness.subgroup_metrics(c, target, confounder), "method": "original",
                "repeat": i, "train_seconds": 2.0, "fingerprint": str(i)}
               for i, c in enumerate(correct)]
    agg = fairness.aggregate_repeats(records)
    gaps = [abs(c[target == 1].mean() - c[target == 0].mean()) for c in correct]
    assert agg["gap"] == pytest.approx(np.mean(gaps))
    assert agg["gap_std"] == pytest.approx(np.std(gaps, ddof=1))
    assert agg["accuracy"] == pytest.approx(correct.mean())
    assert agg["accuracy_std"] == pytest.approx(np.std(correct.mean(axis=1), ddof=1))
    assert agg["cells"]["men_with"] == pytest.approx(
        correct[:, (target == 1) & (confounder == 1)].mean())
    assert agg["worst_cell"] == min(agg["cells"], key=agg["cells"].get)
    assert agg["num_repeats"] == 3 and agg["train_seconds"] == 6.0
    assert "fingerprint" not in agg
    one = fairness.aggregate_repeats(records[:1])
    assert one["gap"] == records[0]["gap"] and one["gap_std"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        fairness.aggregate_repeats([])


def test_paired_gap_change():
    def runs(original, other):
        return {"original": {"repeats": [{"gap": g} for g in original]},
                "x": {"repeats": [{"gap": g} for g in other]}}
    change = fairness.paired_gap_change(runs([0.3, 0.32, 0.28], [0.1, 0.13, 0.1]), "x")
    diffs = np.array([-0.2, -0.19, -0.18])
    assert change["mean"] == pytest.approx(diffs.mean())
    assert change["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert change["resolved"]
    # Same mean change, but the repeats disagree in sign: not resolved.
    noisy = fairness.paired_gap_change(runs([0.3, 0.3, 0.3], [0.0, 0.5, -0.07 + 0.3 - 0.2]), "x")
    assert not noisy["resolved"]
    single = fairness.paired_gap_change(runs([0.3], [0.1]), "x")
    assert single["se"] is None and not single["resolved"]


def test_bias_group_report_counts_by_hand():
    from faceaudit_jax import regions
    from faceaudit_jax.metrics.fairness import bias_group_report

    attrs = np.zeros((6, regions.NUM_ATTRIBUTES), np.int8)
    male, lip = regions.attribute_id("Male"), regions.attribute_id("Wearing_Lipstick")
    attrs[:3, male] = 1                    # men: rows 0-2
    attrs[[2, 3, 4], lip] = 1              # lipstick: man 2 (conflicting), women 3, 4 (aligned)
    logits = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])   # right, wrong, right, right, wrong, right
    # With Male=1 going with lipstick 0: aligned rows 0, 1, 3, 4; conflicting rows 2, 5.
    report = bias_group_report(logits, attrs, "Male", ["Wearing_Lipstick"], (0,))
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["aligned_accuracy"] == pytest.approx(2 / 4)
    assert report["conflicting_accuracy"] == pytest.approx(2 / 2)
    assert report["gap"] == pytest.approx(-0.5)
    assert report["Male=1,Wearing_Lipstick=0"] == pytest.approx(0.5)
    assert report["Male=0,Wearing_Lipstick=1"] == pytest.approx(0.5)
    assert report["num_images"] == 6
