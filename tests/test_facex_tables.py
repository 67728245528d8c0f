"""FaceX tables experiment: the table logic on known IoR vectors, ``report`` on a fixed
result, and one end-to-end run on fixture folders (train, audit, JSON, resume).

The rows, summaries, Markdown and fingerprints themselves are tested in
test_facex_tables_summary.py; subsets, training and predict_logits in test_classifiers.py."""

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

from faceaudit_jax import classifiers, regions
from faceaudit_jax.data import fixtures
from faceaudit_jax.experiments import facex_tables as ft
from faceaudit_jax.summary import facex_tables as tables_lib
from faceaudit_jax.summary import audit as audit_lib

ROOT = Path(__file__).resolve().parents[1]


def load_config(variant="smoke"):
    spec = importlib.util.spec_from_file_location("facex_tables_config",
                                                  ROOT / "configs" / "facex_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def tiny_config():
    """The smoke variant shrunk to one model per part (5 models in all)."""
    c = load_config("smoke")
    c.data.pool_size = c.data.test_pool_size = c.table4.pool_size = 30_000
    c.train.size, c.train.batch_size = 32, 16
    c.test.size, c.test.batch_size = 32, 16
    c.train.ckpt_every = 2
    c.table1.targets = ("Male",)
    c.table1.confounders = ("Blond_Hair",)
    c.table3.confounder_sets = ("Smiling+Wearing_Earrings",)
    c.table4.top_k = 3
    return c


def col(name):
    return regions.attribute_id(name)


# ---------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------

def test_case_config_sets_bias_without_touching_the_original():
    c = load_config("smoke")
    case = ft.case_config(c, "Young", ("Wearing_Hat",), 0.9)
    assert case.bias.target == "Young" and tuple(case.bias.confounders) == ("Wearing_Hat",)
    assert "bias" not in c


def test_config_variants():
    assert load_config("").train.size == 4000
    assert load_config("paper").model.name == "resnet18"
    with pytest.raises(ValueError, match="unknown config variant"):
        load_config("huge")


# ---------------------------------------------------------------------------
# Table logic on known IoR vectors (no training)
# ---------------------------------------------------------------------------

def ior_with_order(order):
    """An IoR vector [19] ranking the named regions first, in this order."""
    ior = np.full(regions.NUM_REGIONS, 0.1)
    for rank, name in enumerate(order):
        ior[regions.REGION_ID[name]] = 0.9 - 0.05 * rank
    return ior


def test_tables_logic_on_known_ior(tmp_path, monkeypatch):
    c = tiny_config()
    c.table1.confounders = ("Blond_Hair", "Wearing_Earrings")
    c.table3.confounder_sets = ("Blond_Hair+Wearing_Earrings",)
    orders = {  # hair 2nd; earrings 4th; lips 1st and 3rd
        "Male": ["u_lip", "hair", "l_lip", "ear_r", "nose"],
    }
    gaps = {"biased_Male_Blond_Hair": 0.5, "biased_Male_Wearing_Earrings": 0.0}

    def fake_evaluate(ctx, spec, corr=0.0):
        ior = ior_with_order(orders[spec.target])
        return {"name": spec.name, "ior_vector": ior,
                "ranking": [{"rank": r, "region": n, "ior": v} for r, n, v in ior_lib_rank(ior)],
                "confounder_rp": dict(zip(spec.confounders,
                                          audit_lib.confounder_rp(ior, list(spec.confounders)))),
                "group_accuracy": {"accuracy": 0.8, "aligned_accuracy": 0.9,
                                   "conflicting_accuracy": 0.9 - gaps.get(spec.name, 0.0),
                                   "gap": gaps.get(spec.name, 0.0)}}

    from faceaudit_jax.summary.ior import rank_regions as ior_lib_rank
    monkeypatch.setattr(ft, "evaluate_model", fake_evaluate)
    ctx = ft.TablesContext(c, tmp_path)
    t1 = ft.table1(ctx)
    assert [r["rp"] for r in t1["rows"]] == [2, 4]
    assert t1["summary"]["mean_rp"] == pytest.approx(3.0) and t1["summary"]["worst_rp"] == 4
    assert t1["summary"]["mean_rp_where_shortcut_learned"] == pytest.approx(2.0)
    assert [r["shortcut_learned"] for r in t1["rows"]] == [True, False]
    t3 = ft.table3(ctx)
    assert (t3["rows"][0]["rp1"], t3["rows"][0]["rp2"]) == (2, 4)
    t4 = ft.table4(ctx)
    for row in t4["rows"]:  # same IoR for both models: the same RP, from the attribute's regions
        expected = min((i + 1 for i, n in enumerate(orders["Male"])
                        if n in regions.regions_of(row["attribute"])), default=None)
        if expected is None:  # a region outside the first five: rank among the 0.1 ties
            expected = 6
        assert row["rp_correlated_model"] == row["rp_independent_model"] == expected
    assert len(t4["rows"]) == 3
    with pytest.raises(ValueError, match="exactly 2"):
        c.table3.confounder_sets = ("Smiling",)
        ft.table3(ctx)


def test_figure5_trains_the_mitigated_model_until_it_beats_chance(tmp_path, monkeypatch):
    c = tiny_config()
    c.figure5.mitigated_epochs = (2, 4, 8)
    c.figure5.mitigated_min_accuracy = 0.6
    accuracy = {None: 0.99, 2: 0.5, 4: 0.7, 8: 0.8}   # by the spec's epochs (None: vanilla)
    seen = []

    def fake_evaluate(ctx, spec, corr=0.0):
        seen.append((spec.name, spec.num_epochs))
        ior = ior_with_order(["hair", "u_lip"])
        acc = accuracy[spec.num_epochs]
        return {"name": spec.name, "ior_vector": ior,
                "ranking": [{"rank": 1, "region": "hair", "ior": 0.9}],
                "confounder_rp": {"Blond_Hair": 1},
                "group_accuracy": {"accuracy": acc, "aligned_accuracy": acc,
                                   "conflicting_accuracy": acc, "gap": 0.0}}

    monkeypatch.setattr(ft, "evaluate_model", fake_evaluate)
    c.figure5.mitigations = ("reweighted",)
    result = ft.figure5(ft.TablesContext(c, tmp_path))
    assert [e for _, e in seen] == [None, 2, 4]          # stops once 0.7 >= 0.6
    assert seen[1][0].endswith("_2ep") and seen[2][0].endswith("_4ep")
    assert result["mitigated_beats_chance"] == {"reweighted": True}
    assert result["models"]["reweighted"].endswith("_4ep")
    assert "clearly beats chance" in tables_lib.figure5_markdown(result)
    # a schedule that never gets there says so
    c.figure5.mitigated_epochs = (2,)
    seen.clear()
    result = ft.figure5(ft.TablesContext(c, tmp_path))
    assert not result["mitigated_beats_chance"]["reweighted"]
    assert "does NOT clearly beat chance" in tables_lib.figure5_markdown(result)
    # FLAC: one model at its own budget, trained against the bias-capturing spec
    c.figure5.mitigations = ("flac",)
    c.figure5.flac.num_epochs = 8
    protected_seen = []

    def fake_flac_evaluate(ctx, spec, corr=0.0):
        record = fake_evaluate(ctx, spec, corr)
        if spec.protected is not None:
            protected_seen.append(spec.protected)
            record["protected"] = {"model": spec.protected.name, "attribute": "Blond_Hair",
                                   "train_size": 32, "num_epochs": 1, "accuracy": 0.98}
        return record

    monkeypatch.setattr(ft, "evaluate_model", fake_flac_evaluate)
    accuracy[8] = 0.75
    seen.clear()
    result = ft.figure5(ft.TablesContext(c, tmp_path))
    assert [name for name, _ in seen] == ["biased_Male_Blond_Hair", "flac_Male_Blond_Hair_8ep"]
    (protected,) = protected_seen
    assert protected.target == "Blond_Hair" and protected.confounders == ()
    col_b = protected.train_attrs[:, regions.attribute_id("Blond_Hair")]
    assert (col_b == 1).sum() == (col_b == 0).sum()      # balanced over the protected attribute
    assert result["mitigations"] == ["flac"] and result["mitigated_beats_chance"] == {"flac": True}
    assert result["protected"]["accuracy"] == 0.98
    assert (tmp_path / "figure5_flac.png").is_file()
    # A FLAC spec never trains without its protected classifier (it would train plain BCE).
    ctx = ft.TablesContext(c, tmp_path)
    flac_spec = tables_lib.flac_spec(ft.biased_spec(ctx, "Male", ("Blond_Hair",), 0.99), protected,
                                     c.figure5.flac.to_dict())
    with pytest.raises(ValueError, match="needs its trained protected classifier"):
        ft._train_model(ctx, flac_spec, 0.99)
    # Another co-occurrence than Table 1's: its own vanilla model, and mitigations named after it.
    c.figure5.corr, c.figure5.mitigations, c.figure5.mitigated_epochs = 0.95, ("reweighted",), (2,)
    seen.clear()
    ft.figure5(ft.TablesContext(c, tmp_path))
    assert [name for name, _ in seen] == ["biased_Male_Blond_Hair_corr0.95",
                                          "reweighted_Male_Blond_Hair_corr0.95_2ep"]
    c.figure5.mitigations = ("flac", "dro")
    with pytest.raises(ValueError, match="'dro'"):
        ft.figure5(ft.TablesContext(c, tmp_path))


def test_run_rejects_unknown_part(tmp_path):
    c = tiny_config()
    c.tables.parts = ("table2",)
    with pytest.raises(ValueError, match="table2"):
        ft.run(c, tmp_path)


def test_run_rejects_explanation_settings_before_training(tmp_path):
    # Both would fail only in the audit, after every model had trained.
    c = tiny_config()
    c.explain.patch_size = 24                       # does not tile 64 px images
    with pytest.raises(ValueError, match=r"explain.patch_size=24 .* 64 px"):
        ft.run(c, tmp_path)
    c = tiny_config()
    c.explain.stage = 5                             # small_resnet has stages 1..4
    with pytest.raises(ValueError, match=r"stage=5; expected a ResNet stage 1\.\.4"):
        ft.run(c, tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    # A model that is not built from the architecture table (loaded from a folder)
    # is not judged by a backbone it does not have; its split checks the stage.
    audit_lib.check_explain_settings(c.explain, 64, "my_exported_model")
    with pytest.raises(ValueError, match=r"stage=5"):
        audit_lib.check_explain_settings(c.explain, 64, "resnet18")


def test_regionless_confounder_is_rejected(tmp_path):
    c = tiny_config()
    c.table1.confounders = ("Young",)
    c.table1.targets = ("Male",)
    with pytest.raises(ValueError, match="no face region"):
        ft.table1(ft.TablesContext(c, tmp_path))


# ---------------------------------------------------------------------------
# End to end on fixture folders (3 models of 2 steps each)
# ---------------------------------------------------------------------------

CELLS = ("Male", "Blond_Hair", "Smiling", "Wearing_Earrings")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Tables 1, 3 and Figure 5 (the real-data parts) on two folders in the generic layout:
    rendered faces balanced over Male x Blond_Hair x Smiling x Wearing_Earrings, with masks."""
    root = tmp_path_factory.mktemp("folders")
    train = fixtures.render_faces(64, 64, balance=CELLS, offset=0)
    test = fixtures.render_faces(64, 64, balance=CELLS, offset=1_000_000)
    fixtures.write_layout("folder", root / "train", train, pairs=False)
    fixtures.write_layout("folder", root / "test", test, pairs=False)
    config = tiny_config()
    config.data.source, config.data.resolution = "folder", 64
    config.data.root, config.data.test_root = str(root / "train"), str(root / "test")
    config.tables.parts = ("table1", "table3", "figure5")
    # A subset of 4000 is more than the folder holds: capped at the largest it can give
    # (8 images per Male x Smiling x Wearing_Earrings cell: 16 at co-occurrence 0.99).
    config.train.size = 4000
    workdir = tmp_path_factory.mktemp("facex_tables")
    results = ft.run(config, str(workdir))
    return config, workdir, results, train


def _is_rp(value):
    return value is None or (type(value) is int and 1 <= value <= regions.NUM_REGIONS - 1)


@pytest.mark.slow
def test_smoke_writes_every_table(smoke_run):
    config, workdir, _, _ = smoke_run
    for part in config.tables.parts:
        assert (workdir / f"{part}.json").is_file() and (workdir / f"{part}.md").is_file()
    assert not (workdir / "table4.json").exists()
    for method in ("reweighted", "flac"):
        assert (workdir / f"figure5_{method}.png").stat().st_size > 10_000
    assert (workdir / "tables.md").read_text().count("## ") == 3
    audits = sorted(p.stem for p in (workdir / "audits").glob("*.json"))
    assert audits == sorted(["biased_Male_Blond_Hair", "biased_Male_Smiling+Wearing_Earrings",
                             "reweighted_Male_Blond_Hair_2ep", "flac_Male_Blond_Hair_2ep"])
    for name in audits:
        assert (workdir / "models" / name / "checkpoints").is_dir()
        assert (workdir / "audits" / f"{name}.png").is_file()
    # FLAC's bias-capturing network is trained, not audited.
    assert (workdir / "models" / "protected_Blond_Hair" / "checkpoints").is_dir()


@pytest.mark.slow
def test_smoke_json_structure_and_rp_types(smoke_run):
    _, workdir, _, train = smoke_run
    t1 = json.loads((workdir / "table1.json").read_text())
    (row,) = t1["rows"]
    assert row["target"] == "Male" and row["confounder"] == "Blond_Hair" and _is_rp(row["rp"])
    for key in ("accuracy", "aligned_accuracy", "conflicting_accuracy"):
        assert 0.0 <= row[key] <= 1.0
    assert t1["summary"]["mean_rp"] == (None if row["rp"] is None else float(row["rp"]))
    assert row["ground_truth_rank"] is None  # no counterfactual renders of files on disk
    t3 = json.loads((workdir / "table3.json").read_text())
    (row3,) = t3["rows"]
    assert _is_rp(row3["rp1"]) and _is_rp(row3["rp2"])
    assert sorted(v for v in row3["rp_per_confounder"].values() if v is not None) == \
        [v for v in (row3["rp1"], row3["rp2"]) if v is not None]
    f5 = json.loads((workdir / "figure5.json").read_text())
    assert set(f5["rp"]) == {"vanilla", "reweighted", "flac"}
    assert all(_is_rp(v) for v in f5["rp"].values())
    assert set(f5["ior_change"]) == {"reweighted", "flac"}
    for method in ("reweighted", "flac"):
        assert set(f5["ior_change"][method]) == set(regions.REGIONS)
        for n in regions.REGIONS:
            a, b, d = f5["ior"]["vanilla"][n], f5["ior"][method][n], f5["ior_change"][method][n]
            assert d is None if a is None or b is None else d == pytest.approx(b - a, abs=1e-9)
    assert f5["protected"]["attribute"] == "Blond_Hair" and 0 <= f5["protected"]["accuracy"] <= 1
    flac_record = json.loads((workdir / "audits" / "flac_Male_Blond_Hair_2ep.json").read_text())
    assert flac_record["mitigation"] == "flac" and flac_record["reweighted"] is False
    # Figure 5's vanilla model is Table 1's model (trained once).
    assert f5["models"]["vanilla"] == row["model"]
    record = json.loads((workdir / "audits" / "reweighted_Male_Blond_Hair_2ep.json").read_text())
    assert record["reweighted"] is True and len(record["ior_vector"]) == regions.NUM_REGIONS
    # Training sets capped at what the folder holds, drawn from the training folder's faces.
    sizes = {json.loads(p.read_text())["name"]: json.loads(p.read_text())["train_size"]
             for p in (workdir / "audits").glob("*.json")}
    assert sizes["biased_Male_Smiling+Wearing_Earrings"] == 16
    assert sizes["biased_Male_Blond_Hair"] == 32   # 16 images per Male x Blond_Hair cell
    assert record["test_size"] == 32 and train["attrs"].shape[0] == 64


@pytest.mark.slow
def test_smoke_resume_reuses_audits_and_detects_changed_settings(smoke_run, monkeypatch):
    config, workdir, results, _ = smoke_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(classifiers, "train_classifier", no_training)
    start = time.perf_counter()
    again = ft.run(config, str(workdir))
    assert time.perf_counter() - start < 30
    assert again["table1"]["rows"] == results["table1"]["rows"]
    assert again["table3"]["rows"] == results["table3"]["rows"]
    monkeypatch.undo()  # the model folder's own fingerprint check must stop the changed run
    changed = config.copy_and_resolve_references()
    changed.train.lr = 3e-4
    changed.tables.parts = ("table1",)
    with pytest.raises(ValueError, match="other settings"):
        ft.run(changed, str(workdir))



@pytest.mark.slow
def test_smoke_changed_explanation_reaudits_without_retraining(smoke_run):
    config, workdir, _, _ = smoke_run
    name = "biased_Male_Blond_Hair"
    metrics = (workdir / "models" / name / "metrics.jsonl").read_text()
    before = json.loads((workdir / "audits" / f"{name}.json").read_text())
    changed = config.copy_and_resolve_references()
    # Another CAM method than the config's: a new audit of the same model.
    changed.explain.method = "grad_cam" if config.explain.method != "grad_cam" else "hires_cam"
    changed.tables.parts = ("table1",)
    ft.run(changed, str(workdir))
    after = json.loads((workdir / "audits" / f"{name}.json").read_text())
    assert after["fingerprint"] != before["fingerprint"]
    assert after["model_fingerprint"] == before["model_fingerprint"]
    assert (workdir / "models" / name / "metrics.jsonl").read_text() == metrics  # not retrained
    assert after["group_accuracy"] == before["group_accuracy"]   # same model, same test set

def test_report_lays_out_a_fixed_result():
    config = load_config("smoke")
    table3 = {"rows": [{"target": "Male", "confounders": ["Eyeglasses", "Wearing_Hat"],
                        "rp_per_confounder": {"Eyeglasses": 2, "Wearing_Hat": None},
                        "rp1": 2, "rp2": None, "top_regions": "eye_g, hair, hat, nose",
                        "accuracy": 0.8, "aligned_accuracy": 0.95, "conflicting_accuracy": 0.5,
                        "model": "biased_Male_Eyeglasses+Wearing_Hat"}],
              "summary": {"mean_rp1": 2.0, "mean_rp2": None, "num_cases": 1, "corr": 0.99}}
    texts = ft.report(config, {"table3": table3}, link_prefix="results/x/")
    assert set(texts) == {"table3", "tables.md", "summary.md"}
    row = "| Male | Eyeglasses + Wearing_Hat | Eyeglasses: 2, Wearing_Hat: n/a | 2 | n/a |"
    assert row in texts["table3"]
    assert "Mean RP1 2.00, mean RP2 n/a." in texts["table3"]
    assert texts["tables.md"].startswith("# FaceX reproduction on synthetic faces")
    assert texts["summary.md"].startswith("### FaceX reproduction (`configs/facex_tables.py`)")
    assert "#### Table 3: two confounders at once" in texts["summary.md"]
