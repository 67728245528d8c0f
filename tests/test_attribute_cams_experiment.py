"""The binary-attribute-CAM experiment: smoke run end to end, and its pieces against references."""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import regions
from faceaudit_jax import multi_attribute
from faceaudit_jax.experiments import attribute_cams as ac
from faceaudit_jax.experiments import registry
from faceaudit_jax.explain import attribute_audit
from faceaudit_jax.explain.attribute_audit import cam_pairs
from faceaudit_jax.explain import attribute_cams as attribute_cams_lib
from faceaudit_jax.explain import attribute_masks as masks_lib
from faceaudit_jax.metrics import energy as energy_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def get_config(variant=""):
    spec = importlib.util.spec_from_file_location("attribute_cams_config",
                                                  ROOT / "configs" / "attribute_cams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("attribute_cams_smoke")
    config = get_config("smoke")
    results = registry.run_experiment(config, str(workdir))
    return config, workdir, results


@pytest.mark.slow
def test_smoke_writes_every_output(smoke_run):
    _, workdir, _ = smoke_run
    for name in ("results.json", "table1.md", "table2.md", "table_targets.md", "summary.md",
                 "config.json"):
        assert (workdir / name).stat().st_size > 0, name
    for name in ("figure2_mean_cams.png", "figure3_cam_methods.png", "figure4_targets.png",
                 "figure_energy.png"):
        assert (workdir / name).read_bytes()[:8] == PNG_MAGIC, name
    # Checkpoints live under models/, which its .gitignore keeps out of git.
    gitignore = (workdir / "models" / ".gitignore").read_text().splitlines()
    assert "*" in gitignore
    for model in ac.MODELS:
        assert (workdir / "models" / model / "checkpoints").is_dir()
        assert (workdir / "models" / model / "metrics.jsonl").stat().st_size > 0
    summary = (workdir / "summary.md").read_text()
    assert summary.startswith("### Binary attribute CAMs\n")
    assert ("finding shows" in summary) != ("finding does not show" in summary)
    assert "| Wearing Hat |" in summary
    assert "table1.md" in summary
    # The Markdown is a function of results.json alone: rewriting it changes nothing.
    tables = {name: (workdir / name).read_text() for name in ("table1.md", "table2.md",
                                                              "table_targets.md")}
    assert ac.write_markdown(str(workdir)) == summary
    assert all((workdir / name).read_text() == text for name, text in tables.items())


@pytest.mark.slow
def test_smoke_json_structure_and_consistency(smoke_run):
    config, workdir, returned = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) >= {"experiment", "setup", "p_train", "models", "table1", "table2",
                            "targets", "finding", "figures", "warnings"}
    setup = results["setup"]
    names = setup["attributes"]
    from faceaudit_jax.data import synthetic
    assert names == list(synthetic.DRAWN_ATTRIBUTES)
    test = setup["test"]
    assert test["rendered"] == test["total"] == config.test.size
    assert test["kept"] + test["excluded"] == test["total"]
    assert test["excluded"] == test["not_frontal"] + test["degenerate"]
    assert setup["num_steps"] == config.train.size // config.train.batch_size
    pairs = ["grad_cam/predicted", "grad_cam_plusplus/predicted", "hires_cam/predicted",
             "element_wise_grad_cam/predicted", "grad_cam/positive"]
    assert setup["pairs"] == pairs

    # p_m of the training set, recomputed from the renderer's attribute table.
    attrs = synthetic.sample_attributes(0, np.arange(config.train.size),
                                        independent=False)["attrs"]
    for name in names:
        column = attrs[:, regions.attribute_id(name)]
        assert results["p_train"][name] == pytest.approx((column == 1).mean())

    for model in ac.MODELS:
        per_attribute = results["models"][model]["attributes"]
        assert list(per_attribute) == names
        for name, entry in per_attribute.items():
            assert entry["num_positive"] + entry["num_negative"] == test["kept"]
            assert entry["predicted_positive"] + entry["predicted_negative"] == test["kept"]
            assert set(entry["energy"]) == set(pairs)
            for pair, sides in entry["energy"].items():
                for side in ("positive", "negative"):
                    value = sides[side]
                    count = entry[f"predicted_{side}"]
                    if name in ("Male", "Young") or count == 0:
                        assert value is None, (model, name, pair, side)
                    else:
                        assert 0.0 <= value <= 1.0
            # z and |z| are the same target on positively predicted faces.
            pos_z = entry["energy"]["grad_cam/positive"]["positive"]
            pos_abs = entry["energy"]["grad_cam/predicted"]["positive"]
            assert (pos_z is None) == (pos_abs is None)
            if pos_z is not None:
                assert pos_z == pytest.approx(pos_abs, abs=1e-6)
            if entry["num_positive"]:
                assert entry["p_test"] == pytest.approx(entry["num_positive"] / test["kept"])
    # The returned dict is what was written (NaN written as null).
    assert returned["setup"]["test"] == results["setup"]["test"]


@pytest.mark.slow
def test_smoke_tables_and_finding(smoke_run):
    config, workdir, _ = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    names = results["setup"]["attributes"]
    # Table 1: every attribute once, most imbalanced first.
    table1 = results["table1"]
    assert sorted(row["attribute"] for row in table1) == sorted(names)
    imbalance = [row["imbalance"] for row in table1]
    assert all(a >= b for a, b in zip(imbalance, imbalance[1:]))
    for row in table1:
        u = results["models"]["affact_u"]["attributes"][row["attribute"]]
        assert row["affact_u"]["fnr"] == u["fnr"] or (row["affact_u"]["fnr"] is None
                                                      and u["fnr"] is None)
    assert {(r["attribute"], r["model"]) for r in results["table2"]} == {
        (a, m) for a in config.explain.table2_attributes for m in ac.MODELS}
    finding = results["finding"]
    assert isinstance(finding["shows"], bool)
    for row in finding["rows"]:
        assert abs(row["p_train"] - 0.5) >= config.explain.min_imbalance
    table1_md = (workdir / "table1.md").read_text()
    assert table1_md.count("\n| ") == len(names) + 1  # header + one row per attribute


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(smoke_run, tmp_path):
    config, workdir, _ = smoke_run
    changed = get_config("smoke")
    changed.train.num_epochs = 2
    source = multi_attribute.build_source(changed.data)
    train_idx, _ = multi_attribute.split_indices(changed, source)
    names = multi_attribute.attribute_names(changed.data, source.attributes(train_idx)["attrs"])
    with pytest.raises(ValueError, match="num_epochs"):
        multi_attribute.train_model(changed, str(workdir), "affact_u", source, train_idx, names,
                                    "euclidean", np.full(len(names), 0.5))


@pytest.mark.slow
def test_explain_step_matches_public_cam_and_energy_functions(smoke_run):
    """The fused step = attribute_cams + proportional_energy + numpy sums, per pair.

    Uses the smoke run's AFFACT-u, reloaded from its checkpoint (no training).
    """
    config, workdir, _ = smoke_run
    source = multi_attribute.build_source(config.data)
    train_idx, test_idx = multi_attribute.split_indices(config, source)
    train_attrs = source.attributes(train_idx)["attrs"]
    names = multi_attribute.attribute_names(config.data, train_attrs)
    metrics = workdir / "models" / "affact_u" / "metrics.jsonl"
    logged = metrics.read_text()
    trained = multi_attribute.train_model(
        config, str(workdir), "affact_u", source, train_idx, names, "euclidean",
        multi_attribute.training_positive_share(train_attrs, names))
    assert metrics.read_text() == logged  # reloaded, not retrained
    model, variables = trained.model, trained.variables

    batch = source.batch(test_idx[:config.test.batch_size])  # the run's (compiled) shape
    images, parse = batch["image"][:4], batch["parse"][:4]
    valid = np.array([True, False, True, True])
    pairs = (("grad_cam", "predicted"), ("grad_cam", "positive"))
    step = attribute_audit.make_explain_step(model, names, pairs, "parse")
    size = images.shape[1]
    sums = attribute_audit.init_explain_sums(len(pairs), len(names), size, size)
    sums, logits, energy, area = step(variables, sums, images, parse, jnp.asarray(valid))

    features_fn = lambda x: model.apply(variables, x, train=False, method="features")  # noqa
    head_fn = lambda f: model.apply(variables, f, method="head")  # noqa
    masks = np.asarray(masks_lib.attribute_masks(parse, names, "parse"))
    np.testing.assert_allclose(area, masks.mean(axis=(-2, -1)), atol=1e-6)
    for k, (method, mode) in enumerate(pairs):
        maps, ref_logits = attribute_cams_lib.attribute_cams(features_fn, head_fn, images, method,
                                                             mode)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(energy[k], energy_lib.proportional_energy(maps, masks),
                                   atol=1e-5)
        maps = np.asarray(maps)
        positive = (np.asarray(ref_logits) >= 0) & valid[:, None]
        negative = (np.asarray(ref_logits) < 0) & valid[:, None]
        expected_pos = np.einsum("ba,bahw->ahw", positive.astype(np.float32), maps)
        expected_neg = np.einsum("ba,bahw->ahw", negative.astype(np.float32), maps)
        np.testing.assert_allclose(sums.cams[k].positive_sum, expected_pos, atol=1e-4)
        np.testing.assert_allclose(sums.cams[k].negative_sum, expected_neg, atol=1e-4)
        np.testing.assert_array_equal(sums.cams[k].positive_count, positive.sum(0))
        np.testing.assert_array_equal(sums.cams[k].negative_count, negative.sum(0))
    assert int(sums.count) == valid.sum()
    np.testing.assert_allclose(sums.image_sum, np.asarray(images)[valid].sum(0), atol=1e-4)
    np.testing.assert_allclose(sums.mask_sum, masks[valid].sum(0), atol=1e-6)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown config variant"):
        get_config("bogus")
    with pytest.raises(ValueError, match="main_method"):
        cam_pairs(("hires_cam",), "grad_cam")
    with pytest.raises(ValueError, match="unknown CAM method|unknown"):
        cam_pairs(("not_a_cam",), "not_a_cam")


def _fixed_results():
    """One loaded model (no AFFACT-u/b finding), one attribute whose majority class is negative."""
    row = {"fnr": 0.5, "fpr": None, "energy_positive": 0.3, "energy_negative": 0.2,
           "uniform_positive": 0.1, "uniform_negative": None}
    return {
        "setup": {"main_method_label": "Grad-CAM", "figure_attributes": ["Eyeglasses"],
                  "methods": ["grad_cam"], "test": {"kept": 9, "excluded": 1, "total": 10},
                  "model_source": {"arch": "resnet18", "path": "/m/clf", "source": "checkpoint"},
                  "num_attributes": 1, "train_size": 40, "source_label": "CelebA training images",
                  "mask_source": "rectangles"},
        "table1": [{"attribute": "Eyeglasses", "p_train": 0.1, "imbalance": 0.4, "audited": row}],
        "table2": [{"attribute": "Eyeglasses", "model": "audited",
                    "grad_cam": {"energy_positive": 0.3, "energy_negative": 0.2}}],
        "targets": [{"attribute": "Eyeglasses", "model": "audited", "num_negative": 7,
                     "predicted_target": 0.2, "positive_target": 0.05}],
        "finding": None,
    }


def test_report_on_a_fixed_results_dict():
    pages = ac.report(_fixed_results(), link_prefix="r/")
    assert set(pages) == {"table1.md", "table2.md", "table_targets.md", "summary.md"}
    # p_m = 0.1: the negative class is the majority, so E- is bold; a missing rate prints n/a.
    assert "| Eyeglasses | 0.100 | 0.500 | n/a | 0.300 | **0.200** | 0.100 | n/a |" in pages["table1.md"]
    assert "| Eyeglasses | audited | 0.300 | 0.200 |" in pages["table2.md"]
    assert "| Eyeglasses | audited | 7 | 0.200 | 0.050 |" in pages["table_targets.md"]
    summary = pages["summary.md"]
    assert "loaded from /m/clf (model.source=checkpoint" in summary
    assert "on 9 frontal test faces (1 of 10 excluded" in summary
    assert "| Eyeglasses | 0.100 | 0.50 | n/a | 0.300 | **0.200** |" in summary
    assert "[table1.md](r/table1.md)" in summary and "AFFACT-u vs AFFACT-b comparison is not made" in summary


def _per_attribute(results, model):
    return results["models"][model]["attributes"]


def _assert_same_numbers(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            _assert_same_numbers(a[key], b[key])
    elif a is None or b is None:
        assert a is None and b is None
    else:
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_checkpoint_source_explains_a_trained_run_dir_to_the_same_numbers(smoke_run, tmp_path):
    """model.source=checkpoint on the smoke run's AFFACT-b: no training, the same energies."""
    _, workdir, _ = smoke_run
    config = get_config("smoke")
    config.model.source, config.model.path = "checkpoint", str(workdir / "models" / "affact_b")
    registry.run_experiment(config, str(tmp_path))
    trained = json.loads((workdir / "results.json").read_text())  # NaN written as null
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["models"]) == ["audited"] and results["finding"] is None
    assert results["setup"]["model_source"]["source"] == "checkpoint"
    _assert_same_numbers(_per_attribute(trained, "affact_b"), _per_attribute(results, "audited"))
    assert not (tmp_path / "models").exists()  # nothing trained
    summary = (tmp_path / "summary.md").read_text()
    assert "model.source=checkpoint" in summary and "| Wearing Hat |" in summary
    assert ac.write_markdown(str(tmp_path)) == summary


@pytest.mark.slow
def test_model_source_errors_come_before_any_work(smoke_run, tmp_path):
    _, workdir, _ = smoke_run
    run_dir = str(workdir / "models" / "affact_u")
    cases = [
        (dict(source="checkpoint", path=str(tmp_path / "missing")), "does not exist"),
        (dict(source="checkpoint", path=run_dir, name="resnet18"),
         "holds a small_resnet model; model.name='resnet18'"),
        (dict(source="checkpoint", path=run_dir, outputs=("Bald",)), "model.outputs"),
        (dict(source="hub"), "model.source='hub'"),
    ]
    for fields, message in cases:
        config = get_config("smoke")
        config.data.source = "imagenet"  # would fail later: the model is checked first
        for key, value in fields.items():
            config.model[key] = value
        with pytest.raises(ValueError, match=message):
            ac.run(config, str(tmp_path / "out"))
        assert not (tmp_path / "out" / "results.json").exists()
    config.model.source = "checkpoint"
    with pytest.raises(ValueError, match="nothing to train"):
        ac.train(config, str(tmp_path / "out"))


@pytest.mark.slow
def test_torchvision_source_with_named_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_torch_import import _torchvision_like

    torch.manual_seed(0)
    path = tmp_path / "clf.pt"
    torch.save(_torchvision_like("basic", (2, 2, 2, 2), num_classes=3).state_dict(), path)
    config = get_config("smoke")
    config.model.source, config.model.path, config.model.name = "torchvision", str(path), "resnet18"
    config.model.outputs = ("Wearing_Hat", "Eyeglasses")
    with pytest.raises(ValueError, match=r"clf.pt has 3 fc output\(s\); model.outputs names 2"):
        ac.run(config, str(tmp_path / "out"))
    config.model.outputs = ()
    with pytest.raises(ValueError, match="model.outputs is empty"):
        ac.run(config, str(tmp_path / "out"))
    config.model.outputs = ("Wearing_Hat", "Eyeglasses", "No_Beard")
    config.explain.table2_attributes = ("Wearing_Hat", "Eyeglasses")
    results = registry.run_experiment(config, str(tmp_path / "out"))
    assert results["setup"]["attributes"] == ["Wearing_Hat", "Eyeglasses", "No_Beard"]
    assert results["setup"]["model"] == "resnet18"
    for entry in _per_attribute(results, "audited").values():
        assert entry["predicted_positive"] + entry["predicted_negative"] == \
            results["setup"]["test"]["kept"]
