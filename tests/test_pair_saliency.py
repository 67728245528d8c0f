"""explain/pair_saliency.py: the rankings of the ViT verification curves, and the CorrRISE
protocol's Deletion / Insertion table and model-randomisation check."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from faceaudit_jax.explain import occlusion, pair_saliency, rise


def test_heatmap_ranking_orders_heat_first_then_fallback():
    heat = np.zeros((1, 2, 3), np.float32)
    heat[0, 0, 1], heat[0, 1, 2] = 0.5, 2.0
    fallback = np.asarray([[[0.9, 0.1, 0.3], [0.2, 0.8, 0.0]]], np.float32)
    ranking = pair_saliency.heatmap_ranking(heat, fallback)
    order = np.argsort(-ranking.ravel(), kind="stable")
    # heat 2.0 (flat 5), heat 0.5 (flat 1), then fallback 0.9, 0.8, 0.3, 0.2
    assert order.tolist() == [5, 1, 0, 4, 2, 3]


def flat_embed(images):
    return images.reshape(images.shape[0], -1)


def test_decision_saliencies_signs_and_settings():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    images_a, images_b = np.concatenate([a, a]), np.concatenate([b, b])  # the same pair twice
    maps = rng.uniform(size=(2, 16, 16)).astype(np.float32)
    heat = np.zeros((2, 16, 16), np.float32)
    heat[:, :4, :4] = 1.0
    explained = {"heatmap": heat, "maps_p": maps, "maps_g": maps[::-1]}
    cfg = ml_collections.ConfigDict(dict(
        corrrise_masks=4, corrrise_patches=2, corrrise_patch_size=4, rise_masks=4, rise_grid=4,
        rise_keep_prob=0.3, occlusion_patch=8, occlusion_stride=8, chunk_size=4))
    key = jax.random.PRNGKey(1)
    out = pair_saliency.decision_saliencies(flat_embed, images_a, images_b, explained,
                                            np.array([True, False]), cfg, key, fill=0.5)
    assert set(out) == set(pair_saliency.CURVE_METHODS)
    for name in ("corrrise", "rise", "occlusion"):  # negative decisions rank by -S
        np.testing.assert_allclose(out[name][0][1], -out[name][0][0], atol=1e-6)
    # The settings reach the explainers under vit_fv's names (keep_prob, occluder fill).
    float_a = jnp.asarray(images_a, jnp.float32) / 255.0
    float_b = jnp.asarray(images_b, jnp.float32) / 255.0
    want, _ = rise.rise_batch(flat_embed, float_a, float_b, jax.random.split(key, 3)[1], num_masks=4,
                              grid_size=4, keep_prob=0.3, chunk_size=4)
    np.testing.assert_allclose(out["rise"][0][0], np.asarray(want)[0], rtol=1e-5, atol=1e-6)
    want, _ = occlusion.occlusion_batch(flat_embed, float_a, float_b, patch_size=8, stride=8,
                                        fill_value=0.5, chunk_size=4)
    np.testing.assert_allclose(out["occlusion"][0][0], np.asarray(want)[0], rtol=1e-5, atol=1e-6)
    assert (out["vit_heatmap"][0][:, :4, :4] > 1.0).all()  # heat first, then the attention map
    np.testing.assert_array_equal(out["vit_heatmap"][1][:, 4:, 4:], maps[::-1][:, 4:, 4:])
    np.testing.assert_array_equal(out["vit_attention"][0], maps)


# ----------------------------------------------------------------------------- the CorrRISE protocol's scores


def _black_box_pairs():
    rng = np.random.default_rng(3)
    images_a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images_b = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ecfg = ml_collections.ConfigDict(dict(
        rise_masks=4, rise_grid=4, occlusion_patch=8, occlusion_stride=8, num_masks=4,
        num_patches=2, patch_size=4, correlation="pearson", chunk_size=4, pairs_per_call=2,
        num_steps=4, curve_chunk=8))
    return pair_saliency.PairModel(None, None, flat_embed), images_a, images_b, ecfg


def test_deletion_insertion_table_scores_each_method_by_its_own_maps():
    model, images_a, images_b, ecfg = _black_box_pairs()
    key = jax.random.PRNGKey(0)
    table, curves, saliency = pair_saliency.deletion_insertion_table(
        model, images_a, images_b, 0.5, key, ecfg, "test")
    assert tuple(table) == tuple(curves) == tuple(saliency) == ("rise", "occlusion", "corrrise")
    for method, row in table.items():
        want_a, want_b = pair_saliency.explain_pairs(method, model, images_a, images_b, key, ecfg)
        np.testing.assert_array_equal(saliency[method][0], want_a)
        np.testing.assert_array_equal(saliency[method][1], want_b)
        # The AUCs (in %) are the trapezoid areas of the stored curves over the stored fractions.
        fractions = row["fractions"]
        assert fractions.shape == (ecfg.num_steps + 1,) and fractions[0] == 0.0
        for mode in ("deletion", "insertion"):
            curve = row[f"{mode}_curve"]
            area = np.sum(np.diff(fractions) * (curve[1:] + curve[:-1]) / 2)
            assert row[f"{mode}_auc"] == pytest.approx(100.0 * area, abs=1e-6)
            np.testing.assert_array_equal(curve, np.asarray(curves[method][mode][1]))


def test_model_randomisation_check_of_a_model_against_itself_is_one():
    model, images_a, images_b, ecfg = _black_box_pairs()
    key = jax.random.PRNGKey(2)
    maps = pair_saliency.explain_pairs("corrrise", model, images_a, images_b, key, ecfg)
    assert pair_saliency.model_randomisation_check(None, images_a, images_b, maps, key, ecfg,
                                                   1) is None
    # The same model and masks: identical maps, Spearman 1 for each of the 2 n maps.
    check = pair_saliency.model_randomisation_check(model, images_a, images_b, maps, key, ecfg, 1)
    assert check["num_maps"] == 2
    np.testing.assert_allclose(check["per_map"], [1.0, 1.0], atol=1e-3)
    assert check["mean_spearman"] == pytest.approx(1.0, abs=1e-3)
