"""Ground-truth rankings from counterfactual logit changes."""

import numpy as np
import pytest
from scipy import stats

from faceaudit_jax import regions
from faceaudit_jax.summary import counterfactual as cf


def test_spearman_matches_scipy_with_ties_and_nan():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 4, size=9).astype(float)
        b = rng.normal(size=9)
        assert cf.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    a = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    b = np.array([2.0, 1.0, 3.0, 5.0, 4.0])
    keep = np.isfinite(a)
    assert cf.spearman(a, b) == pytest.approx(stats.spearmanr(a[keep], b[keep]).statistic)
    assert np.isnan(cf.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_a_model_that_reads_the_top_rows_depends_on_the_hat_only():
    # logit = mean brightness of the top 15% of rows: hats live there; lipstick,
    # necklaces and neckties never reach them, so their switches change nothing.
    def top_rows(images):
        images = np.asarray(images)
        return images[:, : int(0.15 * images.shape[1])].mean(axis=(1, 2, 3)) * 100.0

    attributes = ("Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie")
    effects = cf.counterfactual_effects(top_rows, 0, np.arange(8), 64, attributes, batch_size=8)
    assert effects["Wearing_Hat"]["num_images"] == 8
    assert effects["Wearing_Hat"]["mean_abs_change"] > 0.5
    for a in attributes[1:]:
        assert effects[a]["mean_abs_change"] == 0.0
    ior = np.full(regions.NUM_REGIONS, 0.1)
    ior[regions.region_id("hat")] = 0.9
    ior[regions.region_id("u_lip")] = 0.5
    out = cf.compare_rankings(ior, effects, confounders=("Wearing_Hat",))
    assert out["confounder_truth_rank"]["Wearing_Hat"] == 1
    assert out["confounder_ior_rank"]["Wearing_Hat"] == 1
    # truth: hat first, three ties; IoR: hat, lips, then two ties
    expected = stats.spearmanr([0.9, 0.5, 0.1, 0.1],
                               [effects[a]["mean_abs_change"] for a in attributes]).statistic
    assert out["spearman"] == pytest.approx(expected)


def test_attribute_ior_scores_take_the_best_region():
    ior = np.full(regions.NUM_REGIONS, np.nan)
    ior[regions.region_id("u_lip")], ior[regions.region_id("l_lip")] = 0.2, 0.6
    scores = cf.attribute_ior_scores(ior, ("Wearing_Lipstick", "Wearing_Hat"))
    assert scores[0] == 0.6 and np.isnan(scores[1])
    with pytest.raises(ValueError, match="tied to no region"):
        cf.attribute_ior_scores(ior, ("Male",))
