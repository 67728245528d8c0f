"""summary.facex_tables: the tables' rows, summaries and Markdown on fixed records, and the
fingerprints that decide whether a saved model or audit is reused (pinned: a change would
orphan every saved run of results/facex)."""

import dataclasses
import json

import numpy as np
import pytest

from faceaudit_jax import cli, regions
from faceaudit_jax.summary import facex_tables as tables


def _spec(**fields):
    base = dict(name="biased_Male_Blond_Hair", target="Male", confounders=("Blond_Hair",),
                train_independent=True, train_indices=np.arange(0, 8000, 2, dtype=np.int64),
                train_attrs=np.zeros((4000, 40), np.int8), test_independent=True,
                test_indices=np.arange(50_000_000, 50_000_480, dtype=np.int64),
                test_attrs=np.zeros((480, 40), np.int8), confounder_values=(1,))
    base.update(fields)
    return tables.ModelSpec(**base)


def _record(order, name="m", rp=None, acc=(0.8, 0.9, 0.6)):
    """A record whose ranking puts the named regions first, in this order."""
    ior = np.full(regions.NUM_REGIONS, 0.1)
    for rank, region in enumerate(order):
        ior[regions.REGION_ID[region]] = 0.9 - 0.05 * rank
    ranked = sorted(regions.REGIONS, key=lambda r: -ior[regions.REGION_ID[r]])
    return {"name": name, "ior_vector": ior, "confounder_rp": rp or {},
            "ranking": [{"rank": i + 1, "region": r, "ior": float(ior[regions.REGION_ID[r]])}
                        for i, r in enumerate(ranked)],
            "group_accuracy": {"accuracy": acc[0], "aligned_accuracy": acc[1],
                               "conflicting_accuracy": acc[2], "gap": acc[1] - acc[2]}}


def test_parse_confounder_set():
    assert tables.parse_confounder_set(" Eyeglasses + Wearing_Hat") == ("Eyeglasses", "Wearing_Hat")
    with pytest.raises(ValueError, match="Eyeglases"):
        tables.parse_confounder_set("Eyeglases+Wearing_Hat")
    with pytest.raises(ValueError, match="repeats"):
        tables.parse_confounder_set("Smiling+Smiling")


def test_fingerprints_are_pinned_and_ignore_bookkeeping():
    config = cli.load_config("configs/facex_tables.py")
    spec = _spec()
    weighted = _spec(sample_weights=np.linspace(0.5, 2, 4000, dtype=np.float32), num_epochs=18)
    # Model fingerprints: the code that made results/facex's models (commit 8102cf9).
    # Audit fingerprints: since HiResCAM on stage 3 and RECORD_VERSION 2 (region_effects).
    assert tables.model_fingerprint(config, spec) == "ea0a22b03663b0f3"
    assert tables.audit_fingerprint(config, spec) == "25bb683521be84fa"
    assert tables.model_fingerprint(config, weighted) == "ef9d8fce6882dfd8"
    assert tables.audit_fingerprint(config, weighted) == "6e1682e6e49ff6fc"
    changed = config.copy_and_resolve_references()
    changed.train.ckpt_every, changed.data.pool_size = 7, 12
    assert tables.audit_fingerprint(changed, spec) == "25bb683521be84fa"
    changed.explain.method = "grad_cam"    # a new audit of the same model
    assert tables.model_fingerprint(changed, spec) == "ea0a22b03663b0f3"
    assert tables.audit_fingerprint(changed, spec) != "25bb683521be84fa"
    moved = _spec(train_indices=spec.train_indices + 1)
    assert tables.model_fingerprint(config, moved) != "ea0a22b03663b0f3"


def test_reweighted_spec_balances_the_groups_and_says_its_budget():
    attrs = np.zeros((10, regions.NUM_ATTRIBUTES), np.int8)
    attrs[:5, regions.attribute_id("Male")] = 1
    attrs[:4, regions.attribute_id("Blond_Hair")] = 1          # men: 4 aligned, 1 conflicting
    attrs[5, regions.attribute_id("Blond_Hair")] = 1           # women: 4 aligned, 1 conflicting
    spec = _spec(train_indices=np.arange(10), train_attrs=attrs)
    reweighted = tables.reweighted_spec(spec, 18)
    assert reweighted.name == "reweighted_Male_Blond_Hair_18ep" and reweighted.num_epochs == 18
    w = reweighted.sample_weights
    # Every (Male, Blond_Hair) group carries the same total weight.
    groups = [w[:4].sum(), w[4:5].sum(), w[5:6].sum(), w[6:].sum()]
    np.testing.assert_allclose(groups, groups[0], rtol=1e-6)
    assert tables.reweighted_spec(spec).name == "reweighted_Male_Blond_Hair"


def test_flac_spec_names_validates_and_fingerprints_its_protected_model():
    config = cli.load_config("configs/facex_tables.py")
    vanilla = _spec()
    protected = _spec(name="protected_Blond_Hair", target="Blond_Hair", confounders=(),
                      train_indices=np.arange(1, 8001, 2, dtype=np.int64), num_epochs=2)
    settings = {"alpha": 1000, "ce_weight": 1, "d": 0.5}
    spec = tables.flac_spec(vanilla, protected, settings, batch_size=128, num_epochs=12)
    assert spec.name == "flac_Male_Blond_Hair_12ep" and spec.batch_size == 128
    assert spec.flac == {"alpha": 1000.0, "ce_weight": 1.0, "d": 0.5}
    assert tables.mitigation_of(spec) == "flac" and tables.mitigation_of(vanilla) is None
    # The FLAC model is not the vanilla one, and it changes with its protected model,
    # its loss weights and its batch size.
    fp = tables.model_fingerprint(config, spec)
    assert fp != tables.model_fingerprint(config, vanilla)
    other_protected = dataclasses.replace(protected, num_epochs=3)
    assert tables.model_fingerprint(
        config, tables.flac_spec(vanilla, other_protected, settings, 128, 12)) != fp
    assert tables.model_fingerprint(
        config, tables.flac_spec(vanilla, protected, {**settings, "alpha": 20000}, 128, 12)) != fp
    assert tables.model_fingerprint(config, tables.flac_spec(vanilla, protected, settings, 64, 12)) != fp
    with pytest.raises(ValueError, match="'Eyeglasses'.*confounders"):
        tables.flac_spec(vanilla, dataclasses.replace(protected, target="Eyeglasses"), settings)
    with pytest.raises(ValueError, match=r"lack \['d'\]"):
        tables.flac_spec(vanilla, protected, {"alpha": 1, "ce_weight": 1})


def test_load_record_restores_nan(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"ior_vector": [0.5, None, 0.25]}))
    np.testing.assert_array_equal(tables.load_record(path)["ior_vector"], [0.5, np.nan, 0.25])


def test_table_rows_and_summaries_on_fixed_records():
    hair = _record(["u_lip", "hair", "l_lip"], "a", {"Blond_Hair": 2}, acc=(0.8, 0.95, 0.55))
    earrings = _record(["u_lip", "nose", "hair", "ear_r"], "b", {"Wearing_Earrings": 4},
                       acc=(0.9, 0.9, 0.9))
    rows = [tables.table1_row(hair, "Male", "Blond_Hair", 0.2),
            tables.table1_row(earrings, "Male", "Wearing_Earrings", 0.2)]
    assert rows[0]["top_regions"] == "u_lip, hair, l_lip" and rows[0]["regions"] == ["hair"]
    assert [r["shortcut_learned"] for r in rows] == [True, False]
    s = tables.table1_summary(rows, ("Male",), 0.99, 0.2, [hair["ior_vector"], earrings["ior_vector"]])
    assert (s["mean_rp"], s["worst_rp"], s["mean_rp_where_shortcut_learned"]) == (3.0, 4, 2.0)
    assert s["worst_rp_where_shortcut_learned"] == 2     # the earrings row was not learned
    assert "right_minus_left" in s
    md = tables.table1_markdown({"rows": rows, "summary": s})
    assert "| Male | Blond_Hair | 2 | u_lip, hair, l_lip | 0.800 | 0.950 | 0.550 | yes |" in md
    assert "Mean RP 3.00, worst RP 4 (0 of 2 unranked)" in md and "GT rank" not in md
    both = _record(["hair", "eye_g"], "c", {"Eyeglasses": None, "Blond_Hair": 1})
    row3 = tables.table3_row(both, "Male", ("Eyeglasses", "Blond_Hair"))
    assert (row3["rp1"], row3["rp2"]) == (1, None)
    assert tables.table3_summary([row3], 0.99)["mean_rp1"] == 1.0
    records = {"correlated": _record(["u_lip", "l_lip"]), "independent": _record(["hair"])}
    r_ind = np.zeros(regions.NUM_ATTRIBUTES)
    (row4,) = tables.table4_rows([("Wearing_Lipstick", -0.6)], r_ind, records)
    assert (row4["rp_correlated_model"], row4["rp_independent_model"]) == (1, 2)


def test_figure5_result_and_markdown():
    records = {"vanilla": _record(["hair", "nose"], "v", {"Blond_Hair": 1}),
               "reweighted": _record(["nose", "hair"], "r", {"Blond_Hair": 2}, acc=(0.55, 0.7, 0.4)),
               "flac": _record(["nose", "u_lip", "hair"], "f", {"Blond_Hair": 3}, acc=(0.7, 0.7, 0.7))}
    protected = {"model": "protected_Blond_Hair", "attribute": "Blond_Hair", "train_size": 4000,
                 "num_epochs": 2, "accuracy": 0.99, "num_images": 480}
    result = tables.figure5_result(
        records, "Male", "Blond_Hair", 0.99,
        {"reweighted": "figure5_reweighted.png", "flac": "figure5_flac.png"},
        [{"num_epochs": 2, "accuracy": 0.55}], 0.6, protected)
    assert result["mitigations"] == ["reweighted", "flac"]
    assert result["rp"] == {"vanilla": 1, "reweighted": 2, "flac": 3}
    assert result["mitigated_beats_chance"] == {"reweighted": False, "flac": True}
    assert result["ior_change"]["reweighted"]["hair"] == pytest.approx(0.85 - 0.9)
    assert result["ior_change"]["flac"]["hair"] == pytest.approx(0.8 - 0.9)
    md = tables.figure5_markdown(result, "results/x/")
    assert "![figure 5, flac](results/x/figure5_flac.png)" in md
    assert "![figure 5, reweighted](results/x/figure5_reweighted.png)" in md
    assert "2 epochs: accuracy 0.550): it does NOT clearly beat chance" in md
    assert "test accuracy 0.990): accuracy 0.700, it clearly beats chance" in md
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(lines) == 1 + 3 + 1 + len(regions.REGIONS)   # header, 3 models, header, regions
    assert "| hair | 0.900 | 0.850 | 0.800 | -0.050 | -0.100 |" in md
    assert "GT rank" not in md          # no counterfactual in these records
    # With a ground truth: the confounder's rank and |logit change| per model.
    for k, (rank, change) in {"vanilla": (1, 8.0), "reweighted": (2, 3.0), "flac": (6, 0.5)}.items():
        records[k]["counterfactual"] = {"effects": {"Blond_Hair": {"mean_abs_change": change}},
                                        "truth_rank": {"Blond_Hair": rank}}
    result = tables.figure5_result(records, "Male", "Blond_Hair", 0.99, {"flac": "f.png"}, [], 0.6)
    assert result["confounder_effect"]["flac"] == {"mean_abs_logit_change": 0.5, "truth_rank": 6}
    assert "| flac | 3 | 6 | 0.500 | 0.700 |" in tables.figure5_markdown(result)