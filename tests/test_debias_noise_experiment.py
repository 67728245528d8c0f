"""Noise-debiasing experiment: one smoke run end to end (slow: resume, outputs) and the report on
a fixed results dict. The library pieces are tested where they live: test_debias_runs.py (run grid),
test_debias_config.py (config check, fingerprints), test_sampling.py (the study's sets)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from faceaudit_jax import train_lib
from faceaudit_jax.experiments import debias_noise as dn
from faceaudit_jax.experiments import registry
from faceaudit_jax.metrics import fairness
from faceaudit_jax.mitigation.debias_runs import planned_runs, repeat_stem, run_name
from faceaudit_jax.summary import debias_noise as report_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def get_config(variant=""):
    spec = importlib.util.spec_from_file_location("debias_noise_config",
                                                  ROOT / "configs" / "debias_noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("debias_noise_smoke")
    config = get_config("smoke")
    results = registry.run_experiment(config, str(workdir))
    return config, workdir, results


def _runs(config):
    return {c: planned_runs(config, c) for c in config.confounders}


def _stems(config, confounder):
    return [repeat_stem(name, r) for r in range(config.classifier.repeats)
            for name in planned_runs(config, confounder)]


@pytest.mark.slow
def test_smoke_writes_every_output(smoke_run):
    config, workdir, _ = smoke_run
    for name in ("results.json", "table1.md", "summary.md", "config.json"):
        assert (workdir / name).stat().st_size > 0, name
    figures = ["figure7_gaps.png", "figure8_quantiles.png", "figure_maps.png"]
    figures += [f"reliability_{c}.png" for c in config.confounders]
    for name in figures:
        assert (workdir / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "*" in (workdir / "models" / ".gitignore").read_text().splitlines()
    assert config.classifier.repeats == 2
    for confounder in config.confounders:
        for name in _stems(config, confounder) + ["patch_net"]:
            assert (workdir / "runs" / confounder / f"{name}.json").stat().st_size > 0
            # Orbax checkpoint (one step, 0) plus the fingerprint sidecar.
            assert (workdir / "models" / confounder / name / "0").is_dir()
            assert (workdir / "models" / confounder / f"{name}.json").stat().st_size > 0
        assert (workdir / "models" / confounder / "attribution.npz").exists()
    summary = (workdir / "summary.md").read_text()
    assert summary.startswith("### Patch attribution and noise debiasing\n")
    for confounder in config.confounders:
        assert f"| {confounder.replace('_', ' ')} |" in summary
    assert "0.26 -> 0.05 -> 0.09" in summary
    assert "mean ± standard deviation over 2 trainings" in summary
    blond_row = next(line for line in summary.splitlines() if line.startswith("| Blond Hair |"))
    assert blond_row.count(" ± ") == 6  # every column of the gap table
    # Repeats are different trainings (initialisation, batch order, keys), not copies.
    models = workdir / "models" / "Blond_Hair"
    template = train_lib.variables_template(dn.classifier_model(config.classifier),
                                            dn._example_inputs(config, "classifier"))
    first, second = (train_lib.load_variables(str(models / stem), template)
                     for stem in ("original", "original.rep1"))
    assert not np.array_equal(np.asarray(first["params"]["net"]["head"]["kernel"]),
                              np.asarray(second["params"]["net"]["head"]["kernel"]))
    for name in figures + ["table1.md"]:
        assert f"({name})" in summary  # workdir outside the repository: plain relative links
    table, sweep = (workdir / "table1.md").read_text().split("Quantile sweep")
    assert table.count("\n| ") == 1 + len(config.confounders) * 6  # header + rows
    assert sweep.count("\n| ") == 1 + len(config.sweep.quantiles)


@pytest.mark.slow
def test_smoke_results_are_consistent(smoke_run):
    config, workdir, returned = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    assert set(results) >= {"setup", "table1", "sweep", "comparison", "results", "figures"}
    test_size = config.test.size
    for confounder, names in _runs(config).items():
        runs = results["results"][confounder]["runs"]
        assert sorted(runs) == sorted(names)
        for name, agg in runs.items():
            trainings = [json.loads((workdir / "runs" / confounder /
                                     f"{repeat_stem(name, rep)}.json").read_text())
                         for rep in range(config.classifier.repeats)]
            assert [t["repeat"] for t in trainings] == [0, 1]
            for r in trainings:
                # The test set is balanced over gender x confounder.
                assert set(r["cell_counts"].values()) == {test_size // 4}
                cells = r["cells"]
                assert r["men"] == pytest.approx((cells["men_with"] + cells["men_without"]) / 2)
                assert r["women"] == pytest.approx(
                    (cells["women_with"] + cells["women_without"]) / 2)
                assert r["accuracy"] == pytest.approx(np.mean(list(cells.values())))
                assert r["gap"] == pytest.approx(abs(r["men"] - r["women"]))
                assert r["train_set"] == ("balanced" if name == "balanced" else "biased")
                per_epoch = (config.train_set.n_target + config.train_set.n_other_with
                             + config.train_set.n_other_without) // config.classifier.batch_size
                assert r["steps"] == r["epochs"] * per_epoch
            # The cell is the mean over its trainings, the s.d. their spread.
            gaps = [t["gap"] for t in trainings]
            assert agg["num_repeats"] == 2
            assert agg["gap"] == pytest.approx(np.mean(gaps))
            assert agg["gap_std"] == pytest.approx(np.std(gaps, ddof=1))
            assert agg["accuracy"] == pytest.approx(np.mean([t["accuracy"] for t in trainings]))
            assert agg["cells"]["men_with"] == pytest.approx(
                np.mean([t["cells"]["men_with"] for t in trainings]))
            assert agg["repeats"] == [{k: t[k] for k in ("accuracy", "men", "women", "gap")}
                                      for t in trainings]
        patch = results["results"][confounder]["patch_net"]
        rel = patch["reliability"]
        assert sum(rel["counts"]) == patch["num_predictions"] == \
            config.calibration.num_images * config.patch_net.grid ** 2
        assert 0.0 <= patch["ece"] <= 1.0 and 0.0 <= patch["patch_accuracy"] <= 1.0
    rows = results["table1"]
    assert len(rows) == 6 * len(config.confounders)
    for row in rows:
        assert row["gap"] == results["results"][row["confounder"]]["runs"][row["run"]]["gap"]
    sweep = results["sweep"]
    assert [r["quantile"] for r in sweep] == sorted(config.sweep.quantiles)
    main = results["results"]["Blond_Hair"]["runs"][run_name("general_noise", 0.7)]
    assert next(r for r in sweep if r["quantile"] == 0.7)["gap"] == main["gap"]
    comp = results["comparison"]["per_method"]["general_noise"]
    for confounder in config.confounders:
        runs = results["results"][confounder]["runs"]
        noise_runs, original = runs[run_name("general_noise", 0.7)], runs["original"]
        assert comp["gap_change"][confounder] == pytest.approx(
            noise_runs["gap"] - original["gap"])
        assert comp["repeats_gap_reduced"][confounder] == sum(
            n["gap"] < o["gap"] for n, o in zip(noise_runs["repeats"], original["repeats"]))
    assert comp["num_paired"] == 2 * len(config.confounders)
    assert results["setup"]["patch_net"]["label"] == "confounder"
    assert returned["table1"] == rows


@pytest.mark.slow
def test_attribution_cache_is_a_normalised_map(smoke_run):
    config, workdir, _ = smoke_run
    with np.load(workdir / "models" / "Blond_Hair" / "attribution.npz") as cache:
        general = cache["general_map"]
        specific = cache["specific_map"]
        image = cache["image"]
    size = config.data.resolution
    assert general.shape == specific.shape == (size, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    for m in (general, specific):
        assert m.min() == pytest.approx(0.0) and m.max() == pytest.approx(1.0)


@pytest.mark.slow
def test_rerun_resumes_without_training(smoke_run):
    config, workdir, first = smoke_run
    run_dir = workdir / "runs" / "Wearing_Hat"
    # A killed sweep: one finished model whose result JSON was never written.
    (run_dir / "balanced.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (workdir / "models").rglob("*")
              if p.is_file()}
    kept = run_dir / "original.json"
    kept_stamp = kept.stat().st_mtime_ns
    second = registry.run_experiment(config, str(workdir))
    # No model was retrained or rewritten; the missing result came from the saved model.
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert kept.stat().st_mtime_ns == kept_stamp
    redone = json.loads((run_dir / "balanced.json").read_text())
    assert redone["reloaded_model"] is True
    for key in ("accuracy", "men", "women", "gap"):
        assert redone[key] == first["results"]["Wearing_Hat"]["runs"]["balanced"]["repeats"][0][key]
    assert second["table1"] == first["table1"]


@pytest.mark.slow
def test_rerun_with_other_model_settings_stops_naming_the_field(smoke_run):
    from faceaudit_jax.workdir import FingerprintMismatch
    config, workdir, _ = smoke_run
    changed = config.copy_and_resolve_references()
    changed.classifier.learning_rate = 0.5
    before = sorted(p.name for p in (workdir / "models").iterdir())
    with pytest.raises(FingerprintMismatch, match=r"classifier.learning_rate: 0.01 -> 0.5"):
        registry.run_experiment(changed, str(workdir))
    assert sorted(p.name for p in (workdir / "models").iterdir()) == before  # nothing touched


def _fixed_results(config):
    """A results dict with known gaps: original 0.4, balanced 0.1, every method 0.2."""
    def record(gap, repeats=2):
        men, women = 0.5 + gap / 2, 0.5 - gap / 2
        return {"accuracy": 0.5, "men": men, "women": women, "gap": gap, "gap_std": 0.01,
                "train_seconds": 1.5,
                "accuracy_std": 0.0, "gap_se": 0.05, "num_repeats": repeats,
                "cells": {c: 0.5 for c in fairness.SUBGROUP_CELLS},
                "repeats": [{"accuracy": 0.5, "men": men, "women": women, "gap": gap + d}
                            for d in (-0.01, 0.01)]}
    reliability = {"bin_edges": [0.0, 0.5, 1.0], "accuracy": [0.4, 0.6],
                   "mean_confidence": [0.3, 0.7], "counts": [5, 7]}
    results = {}
    for confounder in config.confounders:
        runs = {name: record(0.2) for name in planned_runs(config, confounder)}
        runs["original"], runs["balanced"] = record(0.4), record(0.1)
        results[confounder] = {"runs": runs, "patch_net": {
            "patch_accuracy": 0.5, "ece": 0.1, "num_images": 3, "reliability": reliability}}
    return results


def test_report_on_fixed_results():
    config = get_config("smoke")
    results = _fixed_results(config)
    sizes = {c: {"biased": 32, "balanced": 32, "test": 8} for c in config.confounders}
    setup = report_lib.setup_record(config, sizes)
    assert setup["subsets"] == sizes and setup["repeats"] == 2
    # The smoke train set: 16 + 12 + 4 images in batches of 16, 2 updates per epoch.
    assert setup["classifier_steps"] == {"plain": 2 * config.classifier.epochs,
                                         "mask": 2 * config.classifier.epochs_mask}
    out = {**report_lib.results_record(setup, results),
           "examples": {c: {"image": np.zeros((8, 8, 3), np.uint8),
                            "general_map": np.linspace(0, 1, 64).reshape(8, 8),
                            "specific_map": np.linspace(1, 0, 64).reshape(8, 8)}
                        for c in config.confounders}}
    assert list(out)[:6] == ["experiment", "setup", "table1", "sweep", "comparison", "results"]
    # Every run record carries 1.5 s: the total is 1.5 x the number of runs.
    num_runs = sum(len(results[c]["runs"]) for c in config.confounders)
    assert report_lib.train_seconds_total(results) == pytest.approx(1.5 * num_runs)
    made = report_lib.report(out, link_prefix="x/")
    comp = out["comparison"]
    for method in config.debias.methods:
        m = comp["per_method"][method]
        assert m["gap_change"]["Blond_Hair"] == pytest.approx(-0.2)
        assert m["num_gap_reduced"] == len(config.confounders)
        assert m["num_resolved_reduced"] == len(config.confounders)
    assert comp["blond_hair"]["ours"] == {"original": 0.4, "balanced": 0.1,
                                          "general_noise": 0.2}
    assert [r["quantile"] for r in out["sweep"]] == [0.7, 0.95]
    summary = made["summary.md"]
    assert "gap 0.40 ± 0.01 (original) -> 0.10 ± 0.01 (balanced) -> 0.20 ± 0.01" in summary
    assert "both narrowings are resolved" in summary
    # Patch accuracy 0.5 < 0.55: the summary warns that the maps locate nothing.
    assert "The patch net did not learn Blond Hair, Wearing Hat" in summary
    assert "[table1.md](x/table1.md)" in summary
    assert "16 men without the confounder and 12 + 4 women" in summary  # setup, not config
    table = made["table1.md"]
    assert table.count("| Blond Hair |") == 6
    assert "| Blond Hair | Original (biased) | 0.500 | 0.700 | 0.300 | 0.400 ± 0.010 |" in table
    assert "| 0.7 | 0.500 | 0.600 | 0.400 | 0.200 ± 0.010 |" in table  # the sweep at q = 0.7
    assert sorted(made["figures"]) == ["figure7_gaps.png", "figure8_quantiles.png",
                                       "figure_maps.png", "reliability_Blond_Hair.png",
                                       "reliability_Wearing_Hat.png"]
    # The results as read back from results.json (no examples): no maps figure, same texts.
    again = report_lib.report({k: v for k, v in out.items() if k != "examples"}, link_prefix="x/")
    assert "figure_maps.png" not in again["figures"] and again["summary.md"] == summary


@pytest.mark.slow
def test_celeba_layout_folder_runs_end_to_end(tmp_path):
    """The `celeba` variant on a CelebA-layout folder written by the test (issue: every
    experiment's CLI on real layouts): every planned run is trained and scored on the
    folder's images, and the reports are written."""
    from faceaudit_jax.data import fixtures
    root = tmp_path / "celeba"
    fixtures.write_layout("celeba", str(root), fixtures.render_faces(400, 64, seed=3))
    config = get_config("celeba,smoke")
    config.data.root = str(root)
    config.confounders = ("Blond_Hair",)
    workdir = tmp_path / "run"
    registry.run_experiment(config, str(workdir))
    stored = json.loads((workdir / "results.json").read_text())
    assert stored["setup"]["confounders"] == ["Blond_Hair"]
    runs = stored["results"]["Blond_Hair"]["runs"]
    # one record per run name, its repeats folded in (names like "original.rep1")
    assert set(runs) == {str(n).split(".rep")[0] for n in planned_runs(config, "Blond_Hair")}
    for record in runs.values():
        assert 0.0 <= record["accuracy"] <= 1.0
        assert record["train_set"] in ("biased", "balanced")
    for name in ("table1.md", "summary.md", "figure7_gaps.png"):
        assert (workdir / name).exists(), name
