"""summary/verification.py: the Table 1 analogue against hand-computed values."""

import numpy as np
import pytest

from faceaudit_jax.summary import verification as S

NAN = np.nan
# [3, P] in TECHNIQUES order (OIM, UM, N-IUM); pairs 0-2 positive, 3-4 negative.
RESULT = {
    "sm_plus": np.asarray([[4.0, 2.0, NAN, 0.0, 0.0],
                           [1.0, 3.0, NAN, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0]]),
    "sm_minus": np.asarray([[0.0, 0.0, 0.0, 1.0, 2.0],
                            [0.0, 0.0, 0.0, 3.0, NAN],
                            [0.0, 0.0, 0.0, 0.5, 1.0]]),
    "ra": np.asarray([[0.1, 0.2, 0.0, 0.1, 0.3],
                      [0.5, 0.6, 0.0, 0.4, 0.0],
                      [0.4, 0.4, 0.0, 0.3, 0.2]]),
    "selected": np.asarray([0, 1, -1, 1, 0]),
}
POSITIVE = np.asarray([True, True, True, False, False])


def test_sm_table_against_hand_computed_values():
    table = S.sm_table(RESULT, POSITIVE)
    pos, neg = table["positive"], table["negative"]
    assert pos["n"] == 3 and neg["n"] == 2
    assert pos["sm_plus"]["oim"] == {"mean": 3.0, "median": 3.0, "defined": 2, "undefined": 1}
    assert pos["sm_plus"]["um"]["mean"] == 2.0
    assert pos["wins"] == pytest.approx({"oim": 1 / 3, "um": 1 / 3})
    assert pos["undecided"] == pytest.approx(1 / 3)
    assert pos["ra"]["oim"] == pytest.approx(0.1)
    assert neg["sm_minus"]["oim"]["mean"] == 1.5
    assert neg["sm_minus"]["um"] == {"mean": 3.0, "median": 3.0, "defined": 1, "undefined": 1}
    assert neg["sm_minus"]["n_ium"]["median"] == 0.75
    assert neg["wins"] == pytest.approx({"oim": 0.5, "um": 0.5, "n_ium": 0.0})


def test_oim_finding_and_ties_go_to_the_earlier_technique():
    finding = S.oim_finding(S.sm_table(RESULT, POSITIVE))
    assert finding["positive"]["oim_wins_by_mean"] is True
    assert finding["positive"]["best_by_wins"] == "oim"  # 1/3 each: OIM comes first
    assert finding["negative"]["best_by_mean"] == "um"
    assert finding["negative"]["oim_wins_by_mean"] is False
    empty = S.sm_table(RESULT, np.ones(5, bool))["negative"]  # no negative pairs
    assert empty["n"] == 0 and np.isnan(empty["wins"]["oim"])


def test_finite_stats_and_undefined_note():
    assert S.finite_stats([1.0, NAN, 3.0, np.inf]) == {"mean": 2.0, "median": 2.0, "defined": 2,
                                                         "undefined": 2}
    stats = S.finite_stats([NAN])
    assert np.isnan(stats["mean"]) and stats["undefined"] == 1
    note = S.undefined_note(S.sm_table(RESULT, POSITIVE))
    assert note == "1 OIM SM+, 1 UM SM+, 1 UM SM-"
