"""``summary.attribute_summary``: the majority-class finding by hand, and its verdicts."""

import numpy as np
import pytest

from faceaudit_jax.summary import attribute_summary as summary_lib


def _reports(u_pos, u_neg, b_pos, b_neg, uniform=0.1):
    def report(pos, neg):
        n = len(pos)
        return {"energy": {"grad_cam/predicted": {"positive": np.asarray(pos, float),
                                                  "negative": np.asarray(neg, float)}},
                "uniform_energy": {"positive": np.full(n, uniform), "negative": np.full(n, uniform)},
                "fnr": np.full(n, 0.5), "fpr": np.full(n, 0.25)}
    return {"affact_u": report(u_pos, u_neg), "affact_b": report(b_pos, b_neg)}


def test_majority_class_finding_by_hand():
    from scipy import stats

    names = ["Bald", "Gray_Hair", "Wearing_Hat", "Goatee", "Mustache", "No_Beard", "Smiling",
             "Eyeglasses"]
    p = np.array([0.05, 0.04, 0.05, 0.06, 0.04, 0.9, 0.5, 0.1])
    defined = np.array([True, True, True, True, True, True, True, False])

    def finding_of(reports, min_imbalance):
        return summary_lib.majority_class_finding(p, reports["affact_u"], reports["affact_b"],
                                                  "grad_cam/predicted", defined, names,
                                                  min_imbalance)

    # Five rare attributes (majority negative), No_Beard (majority positive),
    # Smiling balanced, Eyeglasses without a mask: six attributes compared.
    u_major = [0.20, 0.10, 0.15, 0.30, 0.25, 0.10]
    b_major = [0.50, 0.20, 0.16, 0.40, 0.35, 0.30]
    reports = _reports(u_pos=[np.nan] * 5 + [u_major[5], 0.9, 0.9],
                       u_neg=u_major[:5] + [0.7, 0.9, 0.0],
                       b_pos=[0.4, np.nan, 0.3, 0.3, 0.3, b_major[5], 0.0, 0.9],
                       b_neg=b_major[:5] + [0.6, 0.0, 0.9])
    finding = finding_of(reports, 0.35)
    assert [r["attribute"] for r in finding["rows"]] == names[:6]
    assert [r["majority"] for r in finding["rows"]] == ["negative"] * 5 + ["positive"]
    majority = finding["majority"]
    assert majority["mean_u"] == pytest.approx(np.mean(u_major))
    assert majority["mean_b"] == pytest.approx(np.mean(b_major))
    assert majority["mean_lift_b"] == pytest.approx(np.mean(b_major) / 0.1)
    assert majority["num_b_higher"] == 6
    assert majority["wilcoxon_p_b_greater"] == pytest.approx(
        stats.wilcoxon(b_major, u_major, alternative="greater").pvalue)
    assert majority["wilcoxon_p_b_greater"] == pytest.approx(1 / 64)  # exact: all 6 pairs b > u
    # Minority side: only No_Beard has predictions on both models' minority side.
    assert finding["minority"]["attributes"] == ["No_Beard"]
    assert finding["minority"]["mean_u"] == pytest.approx(0.7)
    assert finding["minority_error_u"] == pytest.approx((5 * 0.5 + 0.25) / 6)  # FNR x5, FPR
    assert finding["testable"] and finding["shows"] is True
    # Reversed roles: the balanced model's majority CAMs are weaker -> it does not show.
    swapped = {"affact_u": reports["affact_b"], "affact_b": reports["affact_u"]}
    reverse = finding_of(swapped, 0.35)
    assert reverse["testable"] and reverse["shows"] is False
    # Too few attributes for the test: inconclusive, never "shows".
    few = finding_of(reports, 0.455)
    assert few["majority"]["num_attributes"] == 2  # Gray_Hair, Mustache
    assert not few["testable"] and few["shows"] is False
    none = finding_of(reports, 0.49)
    assert none["majority"]["num_attributes"] == 0 and none["shows"] is False
