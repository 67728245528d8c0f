"""faceaudit_jax.classifiers: subsets drawn from a data config, training-size capping, the
fingerprinted run directories of real (tiny, 64 px) trainings, and predict_logits.

References: the hand-made attribute tables of the fixture folders (counts per
cell known by construction), Flax's own un-jitted forward pass.
"""

import json
import sys
import warnings
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from faceaudit_jax import classifiers, cli, workdir
from faceaudit_jax.data import fixtures
from faceaudit_jax.models import build_model, init_variables

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sources import MALE, LIPSTICK, data_cfg, load_config, make_faces, subset  # noqa: E402


@pytest.fixture(scope="module")
def folders_root(tmp_path_factory):
    """24 noise faces (12 men, 12 women; lipstick on the women but one, and on one man)."""
    root = tmp_path_factory.mktemp("layouts")
    faces = make_faces()
    fixtures.write_layout("fairface", root / "fairface", faces)
    fixtures.write_layout("folder", root / "folder", faces)
    fixtures.write_layout("folder", root / "folder_regions", faces, masks="regions", pairs=False,
                          image_format="jpg")
    return root, faces


def _folder_config(root, train_size, baseline=False, corr=0.9):
    return ml_collections.ConfigDict({
        "seed": 0, "data": data_cfg("folder", root / "folder", test_root=str(root / "folder_regions")),
        "bias": {"target": "Male", "confounders": ("Wearing_Lipstick",), "corr": corr,
                 "confounder_values": ml_collections.FieldReference(None, field_type=tuple)},
        "train": {"size": train_size, "baseline": baseline}, "test": {"size": 0}})


# ----------------------------------------------------------------------------- make_subsets


def test_subsets_follow_the_link_and_empty_test_cells_fail_before_training(folders_root, tmp_path):
    root, faces = folders_root
    config = _folder_config(root, 20)
    subsets = classifiers.make_subsets(config)
    assert subsets["confounder_values"] == (0,)  # the folder's link: women wear lipstick
    assert subsets["train_size"] == 20
    chosen = faces["attrs"][subsets["biased"]]
    # 10 men (1 with lipstick: the one conflicting man of the pool), 10 women (1 without).
    assert np.sum((chosen[:, MALE] == 1) & (chosen[:, LIPSTICK] == 1)) == 1
    assert np.sum((chosen[:, MALE] == 0) & (chosen[:, LIPSTICK] == 0)) == 1
    assert subsets["test"].size == 4  # largest balanced test set: one image per cell
    # Without the two conflicting faces (a woman without lipstick, a man with it) in the test
    # folder, the balanced test set cannot be drawn.
    lonely = subset(faces, slice(2, None))
    fixtures.write_layout("folder", tmp_path / "test", lonely, pairs=False)
    config.data.test_root = str(tmp_path / "test")
    with pytest.raises(ValueError, match=r"test set \(data.source='folder' at .*test\).*"
                                         r"cell \(Male=0, Wearing_Lipstick=0\)"):
        classifiers.make_subsets(config)
    config.data = data_cfg("fairface", root / "fairface")
    with pytest.raises(ValueError, match="Wearing_Lipstick.*does not annotate"):
        classifiers.make_subsets(config)


def test_train_size_is_capped_at_what_a_small_folder_holds(folders_root, capsys):
    root, faces = folders_root
    # 12 men, 12 women, one conflicting image of each: at corr 0.9 the whole folder
    # (11 aligned + 1 conflicting per class) is the largest biased subset.
    attrs = faces["attrs"]
    expected = max(s for s in range(2, 25) if _fits(attrs, s, 0.9))
    config = _folder_config(root, 4000)
    subsets = classifiers.make_subsets(config)
    assert subsets["train_size"] == expected == subsets["biased"].size == 24
    out = capsys.readouterr().out
    assert f"train.size=4000 -> {expected}" in out and "largest biased subset" in out
    # train.size = 0 asks for the largest outright; a size that fits is drawn as asked.
    assert classifiers.make_subsets(_folder_config(root, 0))["train_size"] == expected
    assert classifiers.make_subsets(_folder_config(root, 10))["biased"].size == 10
    # The balanced baseline has the biased set's size: 1 woman without lipstick caps it at 4.
    both = classifiers.make_subsets(_folder_config(root, 4000, baseline=True))
    assert both["biased"].size == both["balanced"].size == 4
    assert "train.baseline=False would allow" in capsys.readouterr().out


def _fits(attrs, size, corr):
    """Independent reference: can biased_subset's cell counts (per class y, round(corr * n_y)
    aligned, the rest conflicting) be filled from this table? Male x Wearing_Lipstick, value 0."""
    n_pos = int(round(size * 0.5))
    for y, n_y in ((1, n_pos), (0, size - n_pos)):
        aligned_value = 0 if y == 1 else 1
        n_aligned = int(round(corr * n_y))
        rows = attrs[:, MALE] == y
        if n_aligned > np.sum(rows & (attrs[:, LIPSTICK] == aligned_value)):
            return False
        if n_y - n_aligned > np.sum(rows & (attrs[:, LIPSTICK] == 1 - aligned_value)):
            return False
    return True


def test_synthetic_train_size_is_never_capped_and_main_job_pairs_lipstick_with_women():
    config = load_config("facex", "smoke")
    subsets = classifiers.make_subsets(config)
    assert subsets["confounder_values"] == (0,)
    assert subsets["train_size"] == config.train.size == subsets["biased"].size
    attrs = subsets["train_source"].attributes(subsets["biased"])["attrs"]
    women = attrs[:, MALE] == 0
    assert np.mean(attrs[women, LIPSTICK] == 1) == pytest.approx(0.99, abs=0.01)
    assert np.mean(attrs[~women, LIPSTICK] == 0) == pytest.approx(0.99, abs=0.01)
    config.data.pool_size = 300  # a synthetic pool is a config choice: too small is an error
    with pytest.raises(ValueError, match="training set .*pool has only"):
        classifiers.make_subsets(config)


# ----------------------------------------------------------------------------- predict_logits


class RandomImages:
    """A minimal source: random pixels, no renderer to compile."""

    def batch(self, indices):
        rng = np.random.default_rng(int(indices[0]))
        return {"image": rng.random((len(indices), 64, 64, 3), dtype=np.float32)}


def test_predict_logits_matches_the_forward_pass_and_compiles_once():
    source, indices = RandomImages(), np.arange(20)
    model = build_model("small_resnet", 1)
    clfs = [classifiers.TrainedClassifier(model, init_variables(model, jax.random.key(k), 64),
                                          f"m{k}", "") for k in (0, 1)]
    before = classifiers._logit._cache_size()
    got = [classifiers.predict_logits(c, source, indices, 16) for c in clfs]
    assert classifiers._logit._cache_size() - before <= 1   # two models, one compilation
    # Reference: Flax's forward pass on all 20 images at once (no batching, no padding).
    images = np.concatenate([source.batch(indices[:16])["image"], source.batch(indices[16:])["image"]])
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0][:, 0])
    for c, g in zip(clfs, got):
        np.testing.assert_allclose(g, np.asarray(forward(c.variables, images)), rtol=1e-5, atol=1e-5)
    assert got[0].shape == (20,) and not np.allclose(got[0], got[1])


# ----------------------------------------------------------------------------- run directories


def _tiny_config(**train):
    config = cli.load_config("configs/facex.py:smoke")
    config.data.resolution = 64
    config.train.batch_size = 4
    config.train.num_epochs = 1
    config.train.ckpt_every = 1
    config.train.log_every = 1
    config.train.update(train)
    return config
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One classifier trained for 2 updates on 8 images: (config, workdir, indices, source)."""
    config = _tiny_config()
    source = classifiers.build_source(config.data)
    indices = np.arange(8)
    work = tmp_path_factory.mktemp("clf")
    classifiers.train_classifier(config, str(work), indices, source, "biased")
    return config, work, indices, source


def _copy_run(tiny_run, tmp_path):
    import shutil
    config, work, indices, source = tiny_run
    shutil.copytree(work, tmp_path / "w")
    return str(tmp_path / "w"), indices, source


@pytest.mark.parametrize("field, value, shown", [
    ("train.lr", 0.01, "train.lr: 0.001 -> 0.01"),
    ("model.name", "resnet18", "model.name: 'small_resnet' -> 'resnet18'"),
])
def test_changed_config_stops_before_reusing_the_model(tiny_run, tmp_path, field, value, shown):
    work, indices, source = _copy_run(tiny_run, tmp_path)
    config = _tiny_config()
    section, key = field.split(".")
    config[section][key] = value
    metrics = (tmp_path / "w" / "biased" / "metrics.jsonl").read_text()
    with pytest.raises(workdir.FingerprintMismatch, match=f"1 field\\(s\\) differ: {shown}"):
        classifiers.train_classifier(config, work, indices, source, "biased")
    assert (tmp_path / "w" / "biased" / "metrics.jsonl").read_text() == metrics


def test_other_training_images_are_a_mismatch_too(tiny_run, tmp_path):
    work, indices, source = _copy_run(tiny_run, tmp_path)
    with pytest.raises(workdir.FingerprintMismatch, match="train.images_sha256"):
        classifiers.train_classifier(_tiny_config(), work, indices + 1, source, "biased")


def test_overwrite_retrains_with_the_new_settings(tiny_run, tmp_path):
    work, indices, source = _copy_run(tiny_run, tmp_path)
    first = (tmp_path / "w" / "biased" / "metrics.jsonl").read_text()
    config = _tiny_config(lr=0.01)
    config.overwrite = True
    with pytest.warns(UserWarning, match="train.lr: 0.001 -> 0.01"):
        classifiers.train_classifier(config, work, indices, source, "biased")
    run_dir = tmp_path / "w" / "biased"
    assert json.loads((run_dir / "fingerprint.json").read_text())["train.lr"] == 0.01
    records = workdir.read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # trained anew, not appended
    assert (run_dir / "metrics.jsonl").read_text() != first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings again: resumes silently, trains nothing
        classifiers.train_classifier(config, work, indices, source, "biased")


