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


def test_region_effects_of_a_linear_model_match_a_numpy_sum_per_region():
    # logit = weighted pixel sum, so switching inside region r changes it by
    # sum over r's pixels of w * (counterfactual - factual): a closed form.
    from faceaudit_jax.data import synthetic

    weights = np.random.default_rng(0).normal(size=(64, 64, 3))

    def linear(images):
        return np.einsum("bhwc,hwc->b", np.asarray(images, np.float64), weights)

    indices = np.arange(6)
    got = cf.region_effects(linear, 0, indices, 64, "Eyeglasses", batch_size=4)
    factual, counter, applicable = synthetic.render_counterfactual(0, indices, "Eyeglasses", 64)
    fa, cfi = np.asarray(factual["image"], np.float64), np.asarray(counter["image"], np.float64)
    had = np.asarray(factual["attrs"])[:, regions.attribute_id("Eyeglasses")] == 1
    parse_with = np.where(had[:, None, None], np.asarray(factual["parse"]),
                          np.asarray(counter["parse"]))
    expected = np.zeros(regions.NUM_REGIONS)
    for r in range(regions.NUM_REGIONS):
        inside = (parse_with == r)[..., None]
        change = np.einsum("bhwc,hwc->b", np.where(inside, cfi - fa, 0.0), weights)
        expected[r] = np.abs(change)[np.asarray(applicable)].mean()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    # Glasses change eye_g (rims, arms) and the skin under the lens tint, never the
    # nose (drawn over the bridge), the mouth or the hat.
    assert got[regions.region_id("eye_g")] > 1.0 and got[regions.region_id("skin")] > 1.0
    for far in ("nose", "mouth", "hat"):
        assert got[regions.region_id(far)] == 0.0
    with pytest.raises(ValueError, match="non-empty 1-D"):
        cf.region_effects(linear, 0, np.zeros((0,), int), 64, "Eyeglasses")


def test_attribute_ior_scores_take_the_best_region():
    ior = np.full(regions.NUM_REGIONS, np.nan)
    ior[regions.region_id("u_lip")], ior[regions.region_id("l_lip")] = 0.2, 0.6
    scores = cf.attribute_ior_scores(ior, ("Wearing_Lipstick", "Wearing_Hat"))
    assert scores[0] == 0.6 and np.isnan(scores[1])
    with pytest.raises(ValueError, match="tied to no region"):
        cf.attribute_ior_scores(ior, ("Male",))
