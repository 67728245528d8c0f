"""End-to-end smoke run of the CorrRISE experiment: output structure and sanity."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from faceaudit_jax.data import fixtures
from faceaudit_jax.data import verification as verification_data
from faceaudit_jax.experiments import corrrise, registry
from faceaudit_jax.explain import pair_saliency
from faceaudit_jax.metrics import verification

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "corrrise.py"


def get_config(variant=""):
    spec = importlib.util.spec_from_file_location("corrrise_config", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def tiny_config():
    c = get_config("smoke")
    # Smaller still than :smoke so the whole job fits the test budget.
    c.explain.occlusion_patch = 64
    c.explain.occlusion_stride = 64
    c.explain.num_pairs = 2
    c.sanity.num_pairs = 1
    return c


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("corrrise")
    results = registry.run_experiment(tiny_config(), str(workdir))
    return workdir, results


@pytest.mark.slow
def test_outputs_written(smoke_run):
    workdir, _ = smoke_run
    for name in ("results.json", "table1.md", "summary.md", "figure_saliency.png",
                 "figure_curves.png", "config.json", "models/.gitignore"):
        assert (workdir / name).is_file(), name
    assert (workdir / "models" / ".gitignore").read_text().strip().endswith("*")


@pytest.mark.slow
def test_results_structure(smoke_run):
    workdir, results = smoke_run
    stored = json.loads((workdir / "results.json").read_text())
    assert set(stored["table"]) == set(pair_saliency.METHODS)
    steps = tiny_config().explain.num_steps
    for method in pair_saliency.METHODS:
        row = stored["table"][method]
        assert 0.0 <= row["deletion_auc"] <= 100.0
        assert 0.0 <= row["insertion_auc"] <= 100.0
        curve = np.asarray(row["deletion_curve"])
        assert curve.shape == (steps + 1,)
        # AUC is the trapezoid area of the stored curve, in %.
        fractions = np.asarray(row["fractions"])
        auc = 100 * np.sum(np.diff(fractions) * (curve[1:] + curve[:-1]) / 2)
        assert row["deletion_auc"] == pytest.approx(auc, abs=1e-6)
        assert fractions[0] == 0.0 and fractions[-1] == pytest.approx(1.0)
    v = stored["verification"]
    assert 0.0 <= v["mean_accuracy"] <= 1.0
    assert len(v["fold_accuracies"]) == 10
    sc = stored["sanity_check"]
    assert -1.0 <= sc["mean_spearman"] <= 1.0
    assert sc["num_maps"] == 2  # both images of one pair
    assert results["setup"]["resolution"] == 64


@pytest.mark.slow
def test_summary_contents(smoke_run):
    workdir, results = smoke_run
    text = (workdir / "summary.md").read_text()
    assert text.startswith("### CorrRISE")
    for label in ("Grad-CAM (similarity)", "Grad-CAM++", "RISE", "Occlusion", "CorrRISE",
                  "23.29 / 85.70", "50.65 / 65.00", "figure_saliency.png",
                  "figure_curves.png"):
        assert label in text, label
    assert f"{results['sanity_check']['mean_spearman']:.3f}" in text


@pytest.mark.slow
def test_occluded_scenario_outputs(smoke_run):
    workdir, results = smoke_run
    occ = results["occluded"]
    if occ is None:
        pytest.skip("this smoke draw has no occluded probe with a plain partner")
    assert set(occ["table"]) == set(pair_saliency.METHODS)
    assert 1 <= occ["num_pairs"] <= tiny_config().occluded.num_pairs
    assert 0.0 <= occ["occluder_area_share"] <= 1.0
    for name in ("figure_saliency_occluded.png", "figure_curves_occluded.png"):
        assert (workdir / name).is_file()
    assert "Occluded probes" in (workdir / "summary.md").read_text()


def test_occluded_pairs_pick_an_occluded_probe_and_a_plain_partner():
    from faceaudit_jax import regions
    attrs = np.zeros((6, 40), np.int8)
    glasses, hat = regions.attribute_id("Eyeglasses"), regions.attribute_id("Wearing_Hat")
    identity = np.array([0, 0, 1, 1, 2, 2])
    attrs[0, glasses] = 1          # person 0: occluded probe 0, plain partner 1
    attrs[2, hat] = 1              # person 1: both occluded -> no pair
    attrs[3, glasses] = 1
    attrs[5, hat] = 1              # person 2: occluded probe 5, plain partner 4
    a, b = verification_data.occluded_pairs(attrs, identity, count=10)
    np.testing.assert_array_equal(a, [0, 5])
    np.testing.assert_array_equal(b, [1, 4])
    a, _ = verification_data.occluded_pairs(attrs, identity, count=1)
    np.testing.assert_array_equal(a, [0])


def test_negative_mass_share_against_hand_values():
    s = np.array([[[-1.0, -3.0], [0.5, 0.0]], [[0.2, 0.1], [0.3, 0.4]]])
    mask = np.array([[[True, False], [True, True]]] * 2)
    share = pair_saliency.negative_mass_share(s, mask)
    assert share[0] == pytest.approx(0.25)       # 1 of the 4 units of S- mass is inside
    assert np.isnan(share[1])                   # no S- at all


def test_map_rank_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 5))
    y = x + rng.normal(size=(3, 5, 5))
    y[2] = 1.0  # constant map -> 0, not NaN
    got = pair_saliency.map_rank_correlation(x, y)
    for i in range(2):
        assert got[i] == pytest.approx(scipy.stats.spearmanr(x[i].ravel(), y[i].ravel())[0])
    assert got[2] == 0.0


def test_config_variants():
    assert get_config().data.resolution == 112
    assert get_config().model.name == "small_resnet"
    assert get_config("celeba,smoke").data.source == "celeba"
    assert get_config("celeba,smoke").data.resolution == 64
    with pytest.raises(ValueError, match="variant"):
        get_config("huge")


# ----------------------------------------------------------------------------- report


def _fixed_results(data="lfw (/data/lfw), lfw pairs file"):
    fractions = np.linspace(0.0, 1.0, 5)
    table = {m: {"deletion_auc": 40.0 + i, "insertion_auc": 60.0 - i, "fractions": fractions,
                 "deletion_curve": np.array([1.0, 0.75, 0.5, 0.25, 0.0]),
                 "insertion_curve": np.array([0.0, 0.5, 1.0, 1.0, 1.0])}
             for i, m in enumerate(("rise", "occlusion", "corrrise"))}
    return {"setup": {"model_source": "callable", "model": "mypkg.faces:embed", "data": data,
                      "resolution": 112, "num_explained_pairs": 4, "num_steps": 4, "num_masks": 16,
                      "num_patches": 3, "patch_size": 16, "rise_masks": 16},
            "verification": {"mean_accuracy": 0.9, "std_accuracy": 0.05, "threshold": 0.3,
                             "num_pairs": 600},
            "table": table, "sanity_check": None, "occluded": None}


def test_report_on_a_fixed_results_dict():
    pages = corrrise.report(_fixed_results(), prefix="r/")
    table = pages["table1.md"]
    rows = [l for l in table.splitlines() if l.startswith("| ") and "method" not in l]
    assert [r.split(" | ")[0] for r in rows] == ["| RISE (similarity)", "| Occlusion (xFace-style)",
                                                 "| CorrRISE"]
    # Algorithm 2's sum over steps 1..n: deletion 100 * (0.75 + 0.5 + 0.25 + 0) / 4 = 37.50.
    assert rows[-1].split(" | ")[1] == "37.50"
    assert rows[-1].split(" | ")[2] == "87.50"
    summary = pages["summary.md"]
    assert "lfw (/data/lfw), lfw pairs file" in summary and "synthetic" not in summary
    assert "`mypkg.faces:embed`" in summary and "Sanity check" not in summary
    assert "Lowest deletion: RISE (similarity); highest insertion: RISE (similarity)" in summary
    assert "(r/figure_saliency.png)" in summary


# ----------------------------------------------------------------------------- model sources

_PROJECTION = {}


def random_projection_embed(images):
    """A real numpy embedder for the tests: a fixed random projection of the pixels to 16 dims."""
    images = np.asarray(images, np.float32)
    size = int(np.prod(images.shape[1:]))
    if size not in _PROJECTION:
        _PROJECTION[size] = np.random.default_rng(7).normal(size=(size, 16)).astype(np.float32)
    return images.reshape(images.shape[0], -1) @ _PROJECTION[size]


def wrong_shape_embed(images):
    return np.zeros((np.asarray(images).shape[0] + 1, 4), np.float32)


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrrise_folder")
    faces = fixtures.render_faces(16, 64, images_per_identity=4)
    fixtures.write_layout("folder", root, faces, num_folds=2, pairs_per_fold=3)
    return root, faces


def callable_config(root, function=f"{__name__}:random_projection_embed"):
    c = tiny_config()
    c.data.source, c.data.root, c.data.resolution, c.data.pairs = "folder", str(root), 64, "folder"
    c.model.source, c.model.function = "callable", function
    c.explain.num_pairs = 2
    return c


@pytest.mark.slow
def test_callable_embedder_on_a_folder_with_a_pairs_file(pairs_folder, tmp_path):
    root, faces = pairs_folder
    results = registry.run_experiment(callable_config(root), str(tmp_path))
    assert set(results["table"]) == {"rise", "occlusion", "corrrise"}
    assert results["sanity_check"] is None and results["occluded"] is None
    assert results["setup"]["data"].startswith("folder") and results["setup"]["pairs_file"]
    # The protocol ran on the file's pairs: recompute it from the images and the projection.
    pairs = np.asarray(faces["pairs"])
    emb = random_projection_embed(faces["image"].astype(np.float32) / 255.0)
    scores = verification.pair_scores(emb[pairs[:, 0]], emb[pairs[:, 1]])
    fold = np.arange(len(pairs)) // 6
    expected = verification.kfold_verification_accuracy(scores, pairs[:, 2].astype(bool),
                                                         num_folds=2, folds=fold)
    assert results["verification"]["num_pairs"] == len(pairs) == 12
    assert results["verification"]["mean_accuracy"] == pytest.approx(expected["mean_accuracy"])
    assert results["verification"]["threshold"] == pytest.approx(expected["mean_threshold"], abs=1e-5)
    summary = (tmp_path / "summary.md").read_text()
    assert "folder" in summary and "synthetic" not in summary


@pytest.mark.parametrize("function, match", [
    ("no_colon", "module:function"),
    ("faceaudit_jax.no_such_module:embed", "cannot import"),
    (f"{__name__}:no_such_function", "has no"),
])
def test_bad_function_raises_before_any_work(pairs_folder, tmp_path, function, match):
    root, _ = pairs_folder
    with pytest.raises(ValueError, match=match):
        corrrise.run(callable_config(root, function), str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_embedder_of_the_wrong_output_shape_raises(pairs_folder, tmp_path):
    root, _ = pairs_folder
    with pytest.raises(ValueError, match=r"returned shape \(3, 4\) for 2 images"):
        corrrise.run(callable_config(root, f"{__name__}:wrong_shape_embed"), str(tmp_path))


def test_missing_checkpoint_and_unknown_source_raise(tmp_path):
    c = tiny_config()
    c.model.source, c.model.path = "checkpoint", str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="model.path"):
        corrrise.run(c, str(tmp_path / "w"))
    c.model.source = "torchvision"
    with pytest.raises(ValueError, match="model.source='torchvision'"):
        corrrise.run(c, str(tmp_path / "w"))


@pytest.mark.slow
def test_checkpoint_source_reloads_the_trained_embedder(smoke_run, tmp_path):
    """model.source=checkpoint on the smoke run's workdir: the model ``run`` would use gives the
    same verification. (Through ``load_model`` and ``protocol``, the two steps of ``run`` that
    depend on the source: the explanations after them take any PairModel and are covered by
    the smoke run (a Flax embedder) and the callable-embedder run (a black box), so they are
    not compiled a third time.) The bad-split checks of ``split_indices`` are in
    tests/test_data_verification.py."""
    workdir, trained = smoke_run
    c = tiny_config()
    c.model.source, c.model.path = "checkpoint", str(workdir)
    pairs = verification_data.test_pairs(c)
    model, random_model, info = corrrise.load_model(c, str(tmp_path), pairs.images)
    assert random_model is not None  # the sanity check's re-initialised model
    verdict = corrrise.protocol(c, pairs, model)
    assert verdict["kfold"]["mean_accuracy"] == trained["verification"]["mean_accuracy"]
    assert verdict["threshold"] == trained["verification"]["threshold"]
    setup = corrrise._setup(c, pairs, info, 1)
    assert setup["model_path"] == str(workdir)
    assert f"face embedder of {workdir} at 64 px" in corrrise._model_sentence(setup)
