"""End-to-end smoke run of the CorrRISE experiment: output structure and sanity."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from faceaudit_jax.experiments import corrrise, registry

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


def test_outputs_written(smoke_run):
    workdir, _ = smoke_run
    for name in ("results.json", "table1.md", "summary.md", "figure_saliency.png",
                 "figure_curves.png", "config.json", "models/.gitignore"):
        assert (workdir / name).is_file(), name
    assert (workdir / "models" / ".gitignore").read_text().strip().endswith("*")


def test_results_structure(smoke_run):
    workdir, results = smoke_run
    stored = json.loads((workdir / "results.json").read_text())
    assert set(stored["table"]) == set(corrrise.METHODS)
    steps = tiny_config().explain.num_steps
    for method in corrrise.METHODS:
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


def test_summary_contents(smoke_run):
    workdir, results = smoke_run
    text = (workdir / "summary.md").read_text()
    assert text.startswith("### CorrRISE")
    for label in ("Grad-CAM (similarity)", "Grad-CAM++", "RISE", "Occlusion", "CorrRISE",
                  "23.29 / 85.70", "50.65 / 65.00", "figure_saliency.png",
                  "figure_curves.png"):
        assert label in text, label
    assert f"{results['sanity_check']['mean_spearman']:.3f}" in text


def test_occluded_scenario_outputs(smoke_run):
    workdir, results = smoke_run
    occ = results["occluded"]
    if occ is None:
        pytest.skip("this smoke draw has no occluded probe with a plain partner")
    assert set(occ["table"]) == set(corrrise.METHODS)
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
    a, b = corrrise.occluded_pairs(attrs, identity, count=10)
    np.testing.assert_array_equal(a, [0, 5])
    np.testing.assert_array_equal(b, [1, 4])
    a, _ = corrrise.occluded_pairs(attrs, identity, count=1)
    np.testing.assert_array_equal(a, [0])


def test_negative_mass_share_against_hand_values():
    s = np.array([[[-1.0, -3.0], [0.5, 0.0]], [[0.2, 0.1], [0.3, 0.4]]])
    mask = np.array([[[True, False], [True, True]]] * 2)
    share = corrrise.negative_mass_share(s, mask)
    assert share[0] == pytest.approx(0.25)       # 1 of the 4 units of S- mass is inside
    assert np.isnan(share[1])                   # no S- at all


def test_map_rank_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 5))
    y = x + rng.normal(size=(3, 5, 5))
    y[2] = 1.0  # constant map -> 0, not NaN
    got = corrrise.map_rank_correlation(x, y)
    for i in range(2):
        assert got[i] == pytest.approx(scipy.stats.spearmanr(x[i].ravel(), y[i].ravel())[0])
    assert got[2] == 0.0


def test_config_variants():
    assert get_config().data.resolution == 112
    assert get_config().model.name == "small_resnet"
    with pytest.raises(ValueError, match="variant"):
        get_config("huge")


def test_bad_split_raises():
    c = tiny_config()
    c.data.test_offset = 3  # not a multiple of images_per_identity, overlaps training
    with pytest.raises(ValueError, match="test_offset"):
        corrrise.split_indices(c)
    c = tiny_config()
    c.test.num_identities = 5
    with pytest.raises(ValueError, match="num_identities"):
        corrrise.split_indices(c)
