"""Tests for experiments/vit_fv.py: one end-to-end run on a fixture folder, and ``report``.

The end-to-end run (marked slow) trains a tiny ViT for a few steps on the
training identities of a generic-layout folder and explains the pairs of its
``pairs.csv``; its numbers mean nothing, so the checks are about meaning and
internal consistency: the protocol recomputed from the file's pairs and the
checkpoint's embeddings, per-pair SM values against eq. 1 / eq. 2 recomputed
in numpy from the stored distances, table statistics against numpy
reductions of the per-pair values, selection against a numpy argmax, and the
curves' first point against the protocol's own decisions (every analysed
pair is a true decision at the threshold, so recall and TNR start at 1).
``report`` is checked on a fixed results dict, without training.
"""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from faceaudit_jax.data import fixtures
from faceaudit_jax.experiments import registry, vit_fv
from faceaudit_jax.explain import fv_heatmaps as fv
from faceaudit_jax.explain.pair_saliency import CURVE_METHODS
from faceaudit_jax.metrics import verification
from faceaudit_jax.models import vit, vit_embedder

ROOT = Path(__file__).resolve().parents[1]


def _config(variant="smoke"):
    spec = importlib.util.spec_from_file_location("vit_fv_config", ROOT / "configs" / "vit_fv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _folder_config(root):
    """:smoke on a generic folder: 8 training identities of its seeded split, its pairs.csv."""
    c = _config("smoke")
    c.data.source, c.data.root, c.data.pairs = "folder", str(root), "folder"
    c.train.num_identities, c.train.batch_size, c.train.num_epochs = 8, 16, 2
    return c


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_fv_folder")
    faces = fixtures.render_faces(80, 64, images_per_identity=4)  # 20 people x 4 images
    fixtures.write_layout("folder", root, faces, num_folds=2, pairs_per_fold=6)
    workdir = tmp_path_factory.mktemp("vit_fv_run")
    config = _folder_config(root)
    results = registry.run_experiment(config, str(workdir))
    return config, workdir, results, faces


@pytest.mark.slow
def test_folder_run_writes_every_output(folder_run):
    _, workdir, results, _ = folder_run
    for name in ("results.json", "per_pair.json", "table1.md", "summary.md", "config.json",
                 "perturbation_curves.png", "examples_positive.png", "examples_negative.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert "*" in (workdir / "models" / ".gitignore").read_text().splitlines()
    assert (workdir / "models" / "vit_embedder" / "checkpoints").is_dir()
    summary = (workdir / "summary.md").read_text()
    assert summary.startswith("### ViT face-verification heatmaps\n")
    assert "folder pairs file" in summary and "synthetic" not in summary
    assert results["setup"]["test_identities"] is None
    assert json.loads((workdir / "results.json").read_text())["main_method"] == "nograd_lrp"


@pytest.mark.slow
def test_folder_run_protocol_is_the_pairs_file(folder_run, tmp_path):
    config, workdir, results, faces = folder_run
    ckpt = _folder_config(config.data.root)
    ckpt.model.source, ckpt.model.path = "checkpoint", str(workdir)
    trained, info = vit_fv.obtain_embedder(ckpt, str(tmp_path))
    assert info["train_identities"] == results["setup"]["train_identities"] == 8
    embed = vit_embedder.ViTEmbed(vit.ViTApply(trained.embedder))
    emb = vit_embedder.embed_images(embed, trained.params, faces["image"], 32)
    pairs = np.asarray(faces["pairs"])
    scores = verification.pair_scores(emb[pairs[:, 0]], emb[pairs[:, 1]])
    expected = verification.kfold_verification_accuracy(scores, pairs[:, 2].astype(bool),
                                                        folds=np.arange(len(pairs)) // 12)
    v = results["verification"]
    assert v["num_pairs"] == len(pairs) == 24 and v["num_folds"] == 2
    assert v["kfold"]["mean_accuracy"] == pytest.approx(expected["mean_accuracy"])
    assert v["threshold_cosine"] == pytest.approx(expected["mean_threshold"], abs=1e-4)
    # A finished run reloads its checkpoint (no training) with the same weights.
    reloaded = vit_fv.train(config, str(workdir))
    for got, want in zip(jax.tree_util.tree_leaves(trained.params),
                         jax.tree_util.tree_leaves(reloaded.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(trained.centres, reloaded.centres)


@pytest.mark.slow
def test_folder_run_tables_and_selected_pairs(folder_run):
    config, _, results, _ = folder_run
    main = results["main_method"]
    assert set(results["table1"]) == set(config.explain.methods)
    for table in results["table1"].values():
        for side, techniques in (("positive", ("oim", "um")), ("negative", ("oim", "um", "n_ium"))):
            entry = table[side]
            metric = "sm_plus" if side == "positive" else "sm_minus"
            assert set(entry[metric]) == set(techniques)
            assert sum(entry["wins"][t] for t in techniques) + entry["undecided"] == pytest.approx(1.0)
            assert all(0.0 <= entry["ra"][t] <= 1.0 for t in techniques)
    v = results["verification"]
    n_pos, n_neg = (results["table1"][main][s]["n"] for s in ("positive", "negative"))
    assert 1 <= n_pos <= min(config.explain.num_positive, v["num_true_positive"])
    assert 1 <= n_neg <= min(config.explain.num_negative, v["num_true_negative"])
    assert v["threshold_sq_distance"] == pytest.approx(2.0 - 2.0 * v["threshold_cosine"])


@pytest.mark.slow
def test_folder_run_curves_start_at_the_protocol_decisions(folder_run):
    config, _, results, _ = folder_run
    curves = results["curves"]
    for side in ("positive", "negative"):
        fractions = np.asarray(curves[side]["fractions"])
        assert fractions.shape == (config.curves.num_steps + 1,)
        assert fractions[0] == 0.0 and fractions[-1] == 1.0
        for name in CURVE_METHODS:
            values = np.asarray(curves[side][name]["values"])
            assert values[0] == 1.0, (side, name)  # unperturbed true decisions
            auc = np.sum(np.diff(fractions) * (values[1:] + values[:-1]) / 2)
            assert curves[side][name]["auc"] == pytest.approx(auc)
    for name in CURVE_METHODS:  # both images black: every mismatched pair is accepted
        assert curves["negative"][name]["values"][-1] == 0.0


@pytest.mark.slow
def test_folder_run_per_pair_values_follow_eq1_eq2_and_the_table(folder_run):
    _, workdir, results, faces = folder_run
    per_pair = json.loads((workdir / "per_pair.json").read_text())
    nan = lambda v: np.asarray([np.nan if x is None else x for x in np.ravel(v)],
                               np.float64).reshape(np.shape(v))
    d, d_pg, d_pp, d_npg, ra = (np.asarray(per_pair[k], np.float64)
                                for k in ("d", "d_pg", "d_pp", "d_npg", "ra"))
    positive = np.asarray(per_pair["positive"], bool)
    # Pairs-file runs name the file's rows; a selected positive pair is a matched row.
    same = np.asarray(faces["pairs"])[per_pair["pairs_file_row"], 2].astype(bool)
    np.testing.assert_array_equal(same, positive)
    with np.errstate(divide="ignore", invalid="ignore"):
        expect_plus = ((d_pg - d) / d + (d_pp - d) / d) / (2 * ra)
        expect_minus = ((d - d_npg) / d) / ra
    expect_plus[ra == 0] = expect_minus[ra == 0] = np.nan
    np.testing.assert_allclose(nan(per_pair["sm_plus"]), expect_plus, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(nan(per_pair["sm_minus"]), expect_minus, rtol=2e-3, atol=1e-4)
    table = results["table1"][results["main_method"]]
    for side, rows, metric, techniques in (("positive", positive, "sm_plus", ("oim", "um")),
                                           ("negative", ~positive, "sm_minus", ("oim", "um", "n_ium"))):
        values = nan(per_pair[metric])[:, rows]
        for t in techniques:
            finite = values[fv.TECHNIQUES.index(t)]
            finite = finite[np.isfinite(finite)]
            if finite.size:
                assert table[side][metric][t]["mean"] == pytest.approx(finite.mean(), rel=1e-5)
                assert table[side][metric][t]["median"] == pytest.approx(np.median(finite), rel=1e-5)
        allowed = [fv.TECHNIQUES.index(t) for t in techniques]
        scores = np.where(np.isfinite(values[allowed]), values[allowed], -np.inf)
        expected = np.asarray(allowed)[np.argmax(scores, axis=0)]
        expected[~np.isfinite(values[allowed]).any(axis=0)] = -1
        np.testing.assert_array_equal(np.asarray(per_pair["selected"])[rows], expected)


@pytest.mark.slow
def test_reports_regenerate_identically_from_results_json(folder_run):
    _, workdir, _, _ = folder_run
    before = {name: (workdir / name).read_text() for name in ("summary.md", "table1.md")}
    vit_fv.rewrite_reports(workdir)
    for name, text in before.items():
        assert (workdir / name).read_text() == text, name
    with pytest.raises(FileNotFoundError, match="results.json"):
        vit_fv.rewrite_reports(workdir / "nowhere")


# ----------------------------------------------------------------------------- report


def _stats(mean, median, undefined=0):
    return {"mean": mean, "median": median, "defined": 4 - undefined, "undefined": undefined}


def _fixed_results():
    table = {
        "positive": {"n": 4, "metric": "sm_plus", "undecided": 0.0,
                     "sm_plus": {"oim": _stats(12.5, 3.0), "um": _stats(4.0, 3.5)},
                     "wins": {"oim": 0.25, "um": 0.75}, "ra": {"oim": 0.0123, "um": 0.2}},
        "negative": {"n": 4, "metric": "sm_minus", "undecided": 0.25,
                     "sm_minus": {"oim": _stats(None, None, 4), "um": _stats(1.5, 1.25),
                                  "n_ium": _stats(2.0, 1.0, 1)},
                     "wins": {"oim": 0.0, "um": 0.5, "n_ium": 0.25},
                     "ra": {"oim": 0.0, "um": 0.3, "n_ium": 0.25}}}
    curve = {"fractions": [0.0, 0.5, 1.0],
             **{m: {"values": [1.0, 0.5, 0.0], "auc": 0.5 + i / 100} for i, m in enumerate(CURVE_METHODS)}}
    return {
        "setup": {"source": "lfw (/data/lfw), lfw pairs file", "model_source": "checkpoint",
                  "model_path": "runs/vit", "test_identities": None, "main_method_label": "No-Grad ViT-LRP",
                  "model": {"name": "vit_tiny_face_p16", "image_size": 112, "grid": [7, 7], "num_layers": 12},
                  "explain_target": "pair", "curves": {"num_positive": 2, "num_negative": 3}},
        "verification": {"num_pairs": 6000, "num_folds": 10, "kfold": {"mean_accuracy": 0.9, "std_accuracy": 0.01}},
        "main_method": "nograd_lrp", "table1": {"nograd_lrp": table, "rollout": table},
        "curves": {"positive": curve, "negative": curve},
    }


def test_report_on_a_fixed_results_dict():
    pages = vit_fv.report(_fixed_results(), prefix="r/")
    table1, summary = pages["table1.md"], pages["summary.md"]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table1.splitlines()
            if line.startswith("| OIM") or line.startswith("| UM") or line.startswith("| N-IUM")}
    assert rows["OIM"][1:5] == ["12.50", "3.00", "25%", "0.012"]  # mean, median, share, RA
    assert rows["OIM"][5:7] == ["n/a", "n/a"]                      # no defined SM- (JSON null)
    assert rows["N-IUM"][1:5] == ["—"] * 4                         # no SM+ for N-IUM
    assert rows["OIM"][-2:] == ["10.00", "1.84 |"]                 # the paper's means
    assert "4 OIM SM-, 1 N-IUM SM-" in table1
    assert "| attention rollout | 12.50 / 4.00 | 25% | n/a / 1.50 / 2.00 | 0% |" in table1
    assert "The ViT face embedder of runs/vit" in summary
    assert "90.0 ± 1.0% 10-fold verification accuracy on 6000 pairs of lfw (/data/lfw), lfw pairs file;" \
        in summary
    assert "OIM wins by mean SM+ (OIM 12.50, UM 4.00; paper: OIM 10.00, UM 4.80)" in summary
    assert "OIM does not win by mean SM-: N-IUM does" in summary
    assert "UM is selected for the most pairs (75%; OIM 25%)" in summary
    assert "ViT heatmap (selected mask) 0.500" in summary and "(r/perturbation_curves.png)" in summary


# ----------------------------------------------------------------------------- config and bad input


def test_config_variants():
    for variant in ("", "smoke", "paper", "celeba", "lfw"):
        config = _config(variant)
        assert config.experiment == "vit_fv"
        assert config.explain.main_method in config.explain.methods
    assert _config("lfw").data.pairs == "lfw" and _config("lfw").model.source == "checkpoint"
    with pytest.raises(ValueError, match="variant"):
        _config("huge")


@pytest.mark.parametrize("field, value, match", [
    ("explain.fill", float("inf"), "explain.fill"),
    ("explain.methods", ("rollout", "saliency"), "explain.methods"),
    ("explain.main_method", "grad_rollout", "main_method"),
    ("model.source", "callable", "model.source='callable'"),
])
def test_bad_settings_fail_before_any_work(tmp_path, field, value, match):
    config = _config("smoke")
    block, name = field.split(".")
    setattr(config[block], name, value)
    with pytest.raises(ValueError, match=match):
        vit_fv.run(config, str(tmp_path))
    assert not (tmp_path / "models").exists()


def test_bad_model_or_data_source_fails_before_any_work(tmp_path):
    config = _config("smoke")
    config.model.source, config.model.path = "checkpoint", str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="model.path"):
        vit_fv.run(config, str(tmp_path / "w"))
    config = _config("lfw")  # LFW has pairs but no training split: training on it is refused
    config.model.source, config.data.root = "train", str(tmp_path)
    with pytest.raises(ValueError, match="data.source='lfw'.*model.source='checkpoint'"):
        vit_fv.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
