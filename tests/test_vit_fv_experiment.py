"""Tests for experiments/vit_fv.py: the smoke run end to end, and its pure helpers.

The end-to-end run trains a tiny ViT for a few steps; its numbers mean
nothing, so the checks are about structure and internal consistency:
per-pair SM values against eq. 1 / eq. 2 recomputed in numpy from the stored
distances, table statistics against numpy reductions of the per-pair values,
selection against a numpy argmax, and the perturbation curves' first point
against the protocol's own decisions (every analysed pair is a true decision
at the threshold, so recall and TNR start at exactly 1).
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import losses
from faceaudit_jax.experiments import vit_fv
from faceaudit_jax.explain import fv_heatmaps as fv

ROOT = Path(__file__).resolve().parents[1]


def _config(variant="smoke"):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vit_fv_config", ROOT / "configs" / "vit_fv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vit_fv_smoke")
    config = _config("smoke")
    results = vit_fv.run(config, str(workdir))
    return config, workdir, results


def test_smoke_run_writes_every_output(smoke_run):
    _, workdir, _ = smoke_run
    for name in ("results.json", "per_pair.json", "table1.md", "summary.md",
                 "perturbation_curves.png", "examples_positive.png", "examples_negative.png"):
        assert (workdir / name).stat().st_size > 0, name
    gitignore = (workdir / "models" / ".gitignore").read_text().splitlines()
    assert "*" in gitignore
    assert (workdir / "models" / "vit_embedder" / "checkpoints").is_dir()
    summary = (workdir / "summary.md").read_text()
    assert summary.startswith("### ViT face-verification heatmaps\n")
    for needle in ("| OIM |", "| UM |", "| N-IUM |", "perturbation_curves.png", "OIM"):
        assert needle in summary
    # results.json is valid JSON (NaN written as null)
    json.loads((workdir / "results.json").read_text())


def test_smoke_results_structure(smoke_run):
    config, _, results = smoke_run
    main = results["main_method"]
    assert main == "nograd_lrp"
    assert set(results["table1"]) == set(config.explain.methods)
    for table in results["table1"].values():
        pos, neg = table["positive"], table["negative"]
        assert set(pos["sm_plus"]) == {"oim", "um"}
        assert set(neg["sm_minus"]) == {"oim", "um", "n_ium"}
        for entry, techniques in ((pos, ("oim", "um")), (neg, ("oim", "um", "n_ium"))):
            total = sum(entry["wins"][t] for t in techniques) + entry["undecided"]
            assert total == pytest.approx(1.0)
            for t in techniques:
                assert 0.0 <= entry["ra"][t] <= 1.0
    verification = results["verification"]
    assert 0.0 <= verification["kfold"]["mean_accuracy"] <= 1.0
    assert len(verification["kfold"]["fold_accuracies"]) == config.test.num_folds
    assert verification["threshold_sq_distance"] == pytest.approx(
        2.0 - 2.0 * verification["threshold_cosine"])
    n_pos = results["table1"][main]["positive"]["n"]
    n_neg = results["table1"][main]["negative"]["n"]
    assert 1 <= n_pos <= config.explain.num_positive
    assert 1 <= n_neg <= config.explain.num_negative
    assert n_pos <= verification["num_true_positive"]
    assert n_neg <= verification["num_true_negative"]


def test_smoke_curves_start_at_the_protocol_decisions(smoke_run):
    config, _, results = smoke_run
    curves = results["curves"]
    for side in ("positive", "negative"):
        fractions = np.asarray(curves[side]["fractions"])
        assert fractions.shape == (config.curves.num_steps + 1,)
        assert fractions[0] == 0.0 and fractions[-1] == 1.0
        assert set(vit_fv.CURVE_METHODS) <= set(curves[side])
        for name in vit_fv.CURVE_METHODS:
            values = np.asarray(curves[side][name]["values"])
            assert values.shape == fractions.shape
            assert np.all((values >= 0) & (values <= 1))
            # unperturbed true decisions: recall = TNR = 1 at share 0
            assert values[0] == 1.0, (side, name)
            auc = np.sum(np.diff(fractions) * (values[1:] + values[:-1]) / 2)
            assert curves[side][name]["auc"] == pytest.approx(auc)
    # both images fully black are identical: every mismatched pair is then accepted
    for name in vit_fv.CURVE_METHODS:
        assert curves["negative"][name]["values"][-1] == 0.0


def test_smoke_per_pair_values_follow_eq1_eq2_and_the_table(smoke_run):
    _, workdir, results = smoke_run
    per_pair = json.loads((workdir / "per_pair.json").read_text())
    nan = lambda v: np.asarray([np.nan if x is None else x for x in np.ravel(v)],
                               np.float64).reshape(np.shape(v))
    d = np.asarray(per_pair["d"], np.float64)
    d_pg, d_pp, d_npg = (np.asarray(per_pair[k], np.float64) for k in ("d_pg", "d_pp", "d_npg"))
    ra = np.asarray(per_pair["ra"], np.float64)
    positive = np.asarray(per_pair["positive"], bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        expect_plus = ((d_pg - d) / d + (d_pp - d) / d) / (2 * ra)
        expect_minus = ((d - d_npg) / d) / ra
    expect_plus[ra == 0] = np.nan
    expect_minus[ra == 0] = np.nan
    np.testing.assert_allclose(nan(per_pair["sm_plus"]), expect_plus, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(nan(per_pair["sm_minus"]), expect_minus, rtol=2e-3, atol=1e-4)

    table = results["table1"][results["main_method"]]
    for side, rows, metric, techniques in (("positive", positive, "sm_plus", ("oim", "um")),
                                           ("negative", ~positive, "sm_minus",
                                            ("oim", "um", "n_ium"))):
        values = nan(per_pair[metric])[:, rows]
        for t in techniques:
            k = fv.TECHNIQUES.index(t)
            finite = values[k][np.isfinite(values[k])]
            if finite.size:
                assert table[side][metric][t]["mean"] == pytest.approx(finite.mean(), rel=1e-5)
                assert table[side][metric][t]["median"] == pytest.approx(np.median(finite),
                                                                         rel=1e-5)
        # selection = argmax over the candidates (first on ties)
        allowed = [fv.TECHNIQUES.index(t) for t in techniques]
        scores = np.where(np.isfinite(values[allowed]), values[allowed], -np.inf)
        expected = np.asarray(allowed)[np.argmax(scores, axis=0)]
        expected[~np.isfinite(values[allowed]).any(axis=0)] = -1
        np.testing.assert_array_equal(np.asarray(per_pair["selected"])[rows], expected)


# ----------------------------------------------------------------------------- helpers


def test_split_indices_disjoint_and_bad_offsets():
    config = _config("smoke")
    train, test = vit_fv.split_indices(config)
    ipi = config.data.images_per_identity
    assert train.size == config.train.num_identities * ipi
    assert test.size == config.test.num_identities * ipi
    assert not set(train // ipi) & set(test // ipi)
    config.data.test_offset = 5  # overlaps training and is not a multiple of 10
    with pytest.raises(ValueError, match="test_offset"):
        vit_fv.split_indices(config)
    config = _config("smoke")
    config.test.num_identities = 5
    with pytest.raises(ValueError, match="identity-disjoint folds"):
        vit_fv.split_indices(config)


def test_select_pairs_takes_only_true_decisions():
    same = np.asarray([True, True, False, False, True, False])
    predicted = np.asarray([True, False, False, True, True, False])
    tp = vit_fv.select_pairs(same, predicted, "tp", 10, seed=0)
    tn = vit_fv.select_pairs(same, predicted, "tn", 1, seed=0)
    assert sorted(tp.tolist()) == [0, 4]
    assert tn.size == 1 and tn[0] in (2, 5)
    with pytest.raises(ValueError, match="TN"):
        vit_fv.select_pairs(same, np.ones(6, bool), "tn", 3, seed=0)
    with pytest.raises(ValueError, match="decision"):
        vit_fv.select_pairs(same, predicted, "fp", 3, seed=0)


def test_heatmap_ranking_orders_heat_first_then_fallback():
    heat = np.zeros((1, 2, 3), np.float32)
    heat[0, 0, 1], heat[0, 1, 2] = 0.5, 2.0
    fallback = np.asarray([[[0.9, 0.1, 0.3], [0.2, 0.8, 0.0]]], np.float32)
    ranking = vit_fv.heatmap_ranking(heat, fallback)
    order = np.argsort(-ranking.ravel(), kind="stable")
    # heat 2.0 (flat 5), heat 0.5 (flat 1), then fallback 0.9, 0.8, 0.3, 0.2
    assert order.tolist() == [5, 1, 0, 4, 2, 3]


def test_sm_table_against_hand_computed_values():
    nan = np.nan
    result = {
        # [3, P] in TECHNIQUES order; pairs 0-2 positive, 3-4 negative
        "sm_plus": np.asarray([[4.0, 2.0, nan, 0.0, 0.0],
                               [1.0, 3.0, nan, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0, 0.0]]),
        "sm_minus": np.asarray([[0.0, 0.0, 0.0, 1.0, 2.0],
                                [0.0, 0.0, 0.0, 3.0, nan],
                                [0.0, 0.0, 0.0, 0.5, 1.0]]),
        "ra": np.asarray([[0.1, 0.2, 0.0, 0.1, 0.3],
                          [0.5, 0.6, 0.0, 0.4, 0.0],
                          [0.4, 0.4, 0.0, 0.3, 0.2]]),
        "selected": np.asarray([0, 1, -1, 1, 0]),
    }
    positive = np.asarray([True, True, True, False, False])
    table = vit_fv.sm_table(result, positive)
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
    finding = vit_fv.oim_finding(table)
    assert finding["positive"]["oim_wins_by_mean"] is True
    assert finding["negative"]["best_by_mean"] == "um"
    assert finding["negative"]["oim_wins_by_mean"] is False


def test_batch_fn_is_deterministic_and_flips():
    images = np.arange(8 * 2 * 3 * 3, dtype=np.uint8).reshape(8, 2, 3, 3)
    labels = np.arange(8)
    batch_fn = vit_fv.make_batch_fn(images, labels, 4, seed=3, flip=True)
    first, again = batch_fn(5), batch_fn(5)
    np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(again["image"]))
    got = np.asarray(first["image"]) * 255.0
    ids = np.asarray(first["identity"])
    for img, i in zip(got, ids):
        original, mirrored = images[i].astype(np.float32), images[i, :, ::-1].astype(np.float32)
        assert np.allclose(img, original) or np.allclose(img, mirrored)
    plain = vit_fv.make_batch_fn(images, labels, 4, seed=3, flip=False)(5)
    np.testing.assert_allclose(np.asarray(plain["image"]) * 255.0,
                               images[np.asarray(plain["identity"])], atol=1e-4)


def test_fingerprint_mismatch_is_refused(tmp_path):
    from faceaudit_jax.experiments import registry
    registry.check_fingerprint(tmp_path, {"a": 1})
    registry.check_fingerprint(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match="other settings"):
        registry.check_fingerprint(tmp_path, {"a": 2})


def test_config_variants():
    for variant in ("", "smoke", "paper"):
        config = _config(variant)
        assert config.experiment == "vit_fv"
        assert config.explain.main_method in config.explain.methods
    with pytest.raises(ValueError, match="variant"):
        _config("huge")


def test_bad_explain_settings_fail_before_any_work(tmp_path):
    config = _config("smoke")
    config.explain.fill = float("inf")
    with pytest.raises(ValueError, match="explain.fill"):
        vit_fv.run(config, str(tmp_path))
    config = _config("smoke")
    config.explain.methods = ("rollout", "saliency")
    with pytest.raises(ValueError, match="explain.methods"):
        vit_fv.run(config, str(tmp_path))
    config = _config("smoke")
    config.explain.main_method = "grad_rollout"
    with pytest.raises(ValueError, match="main_method"):
        vit_fv.run(config, str(tmp_path))
    assert not (tmp_path / "models").exists()


def test_reports_regenerate_identically_from_results_json(smoke_run):
    _, workdir, _ = smoke_run
    before = {name: (workdir / name).read_text() for name in ("summary.md", "table1.md")}
    vit_fv.rewrite_reports(workdir)
    for name, text in before.items():
        assert (workdir / name).read_text() == text, name
    with pytest.raises(FileNotFoundError, match="results.json"):
        vit_fv.rewrite_reports(workdir / "nowhere")


def test_checkpoint_source_loads_the_trained_vit(smoke_run, tmp_path):
    config, workdir, results = smoke_run
    reloaded = vit_fv.train(config, str(workdir))  # finished run: reloads, no training
    ckpt = _config("smoke")
    ckpt.model.source, ckpt.model.path = "checkpoint", str(workdir)
    trained, info = vit_fv.obtain_embedder(ckpt, str(tmp_path))
    assert trained.embedder.config == reloaded.embedder.config
    for got, want in zip(jax.tree_util.tree_leaves(trained.params),
                         jax.tree_util.tree_leaves(reloaded.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(trained.centres, reloaded.centres)
    assert info["train_identities"] == results["setup"]["train_identities"]
    assert results["setup"]["source"] == "synthetic faces"
    assert "identities of synthetic faces" in (workdir / "summary.md").read_text()


def test_bad_model_source_fails_before_any_work(tmp_path):
    config = _config("smoke")
    config.model.source, config.model.path = "checkpoint", str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="model.path"):
        vit_fv.run(config, str(tmp_path / "w"))
    config.model.source = "callable"
    with pytest.raises(ValueError, match="model.source='callable'"):
        vit_fv.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "models").exists()
