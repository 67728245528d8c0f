"""Settings of the noise-debiasing study: the config check and the settings hashes that decide
whether a saved model or result is reused."""

from pathlib import Path

import numpy as np
import pytest

from faceaudit_jax import cli, workdir
from faceaudit_jax.mitigation import debias_config

ROOT = Path(__file__).resolve().parents[1]


def get_config(variant=""):
    return cli.load_config(f"{ROOT / 'configs' / 'debias_noise.py'}:{variant}")


@pytest.mark.parametrize("field, value, match", [
    ("debias.methods", ("general_noise", "blur"), "unknown debiasing method"),
    ("debias.quantile", 0.0, r"quantile q must lie in \(0, 1\]"),
    ("debias.quantile", 1.5, r"quantile q must lie in \(0, 1\]"),
    ("sweep.quantiles", (0.7, -0.1), r"quantile q must lie in \(0, 1\]"),
    ("sweep.confounder", "Smiling", "is not one of the confounders"),
    ("confounders", ("Male", "Smiling"), "also listed as a confounder"),
    ("confounders", ("Blond_Hair", "Blond_Hair"), "repeat an attribute"),
    ("confounders", ("Blond_Hare",), "Blond_Hare"),
    ("classifier.input_pool", 3, "positive divisor of the resolution"),
    ("patch_net.patch_size", 80, "larger than the image"),
    ("patch_net.grid", 60, "does not fit"),
    ("patch_net.confidence", "entropy", "patch_net.confidence"),
    ("data.source", "celeba", "needs data.root"),
    ("classifier.repeats", 0, r"classifier.repeats=0; expected an int >= 1"),
])
def test_bad_config_raises(field, value, match):
    config = get_config("smoke")
    section, _, name = field.rpartition(".")
    target = config[section] if section else config
    target[name] = value
    with pytest.raises(ValueError, match=match):
        debias_config.validate_config(config)


def test_config_variants():
    default = get_config()
    assert default.experiment == "debias_noise"
    assert tuple(default.confounders) == ("Blond_Hair", "Eyeglasses", "Smiling", "Wearing_Hat")
    # The paper's proportions at 1/5.
    ts = default.train_set
    assert (ts.n_target, ts.n_other_with, ts.n_other_without) == (600, 400, 200)
    assert default.debias.quantile == 0.7
    assert tuple(default.sweep.quantiles) == (0.6, 0.7, 0.8, 0.95)
    paper = get_config("paper")
    assert (paper.train_set.n_target, paper.patch_net.grid, paper.classifier.learning_rate,
            paper.classifier.epochs, paper.classifier.epochs_mask) == (3000, 49, 1e-5, 20, 10)
    for variant in ("", "smoke", "paper"):
        debias_config.validate_config(get_config(variant))
    with pytest.raises(ValueError, match="unknown config variant"):
        get_config("huge")


SUBSETS = {"biased": np.array([1, 5, 9]), "balanced": np.array([2, 3, 4]),
           "test": np.array([50_000_007, 50_000_011])}


def test_fingerprints_are_pinned():
    """Saved models and results are reused only under the same hash: these values (the scheme
    that made the existing workdirs) must not change, or every workdir retrains."""
    fps = debias_config.RunFingerprints(get_config("smoke"), "Blond_Hair", SUBSETS)
    assert {k: getattr(fps, k) for k in ("data", "patch", "attribution", "test", "classifier",
                                         "patch_result")} == {
        "data": "6543886454676906", "patch": "d95c51ac6b64fa28",
        "attribution": "9e71ac1399bcb14a", "test": "1cc26572f034350f",
        "classifier": "2dc4e9a29f3d9e0b", "patch_result": "250b4d2b42398aed"}
    assert [fps.train("original", 0), fps.result("original", 0),
            fps.train("general_noise_q0.7", 1), fps.result("specific_mask_q0.95", 0)] == [
        "7279b40ee107641c", "e99090111cd4fe91", "1e378c2925a6e369", "4238c5635e2b9701"]
    # The chain, recomputed from its definition.
    assert fps.result("original", 0) == workdir.settings_hash(fps.train("original", 0), fps.test)
    assert fps.attribution == workdir.settings_hash(fps.patch, "top_softmax")


def test_fingerprints_follow_the_settings_they_cover():
    config = get_config("smoke")
    base = debias_config.RunFingerprints(config, "Blond_Hair", SUBSETS)
    # Another noise strength retrains the methods, not the baselines.
    noisier_config = config.copy_and_resolve_references()
    noisier_config.debias.noise_std = 0.25
    noisier = debias_config.RunFingerprints(noisier_config, "Blond_Hair", SUBSETS)
    assert noisier.train("original", 0) == base.train("original", 0)
    assert noisier.train("general_noise_q0.7", 0) != base.train("general_noise_q0.7", 0)
    # Another test set: results are not reused.
    other_test = {**SUBSETS, "test": np.array([50_000_008, 50_000_011])}
    rescored = debias_config.RunFingerprints(get_config("smoke"), "Blond_Hair", other_test)
    assert rescored.test != base.test and rescored.result("original", 0) != base.result("original", 0)
    # Another confounder: nothing is shared.
    other = debias_config.RunFingerprints(get_config("smoke"), "Wearing_Hat", SUBSETS)
    assert other.data != base.data and other.patch != base.patch
    # Repeats are different trainings.
    assert base.train("original", 1) != base.train("original", 0)


def test_models_fingerprint_leaves_out_what_only_adds_or_rescores_runs():
    config = get_config("smoke")
    fields = debias_config.models_fingerprint(config)
    assert fields["classifier.learning_rate"] == config.classifier.learning_rate
    assert fields["patch_net.grid"] == config.patch_net.grid
    assert "classifier.repeats" not in fields
    assert not any(k.startswith(("test.", "sweep.", "confounders")) for k in fields)
