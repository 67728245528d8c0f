"""Noise-debiasing experiment: smoke run end to end, resume, pieces against references."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import regions
from faceaudit_jax.data import synthetic
from faceaudit_jax.experiments import debias_noise as dn
from faceaudit_jax.experiments import registry
from faceaudit_jax.mitigation import noise

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
    return {c: dn.planned_runs(config, c) for c in config.confounders}


def _stems(config, confounder):
    return [dn.repeat_stem(name, r) for r in range(config.classifier.repeats)
            for name in dn.planned_runs(config, confounder)]


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
            assert (workdir / "models" / confounder / f"{name}.msgpack").stat().st_size > 0
        assert (workdir / "models" / confounder / "attribution.npz").exists()
    summary = (workdir / "summary.md").read_text()
    assert summary.startswith("### Patch attribution and noise debiasing\n")
    for confounder in config.confounders:
        assert f"| {confounder.replace('_', ' ')} |" in summary
    assert "0.28 -> 0.05 -> 0.09" in summary
    assert "mean ± standard deviation over 2 trainings" in summary
    blond_row = next(line for line in summary.splitlines() if line.startswith("| Blond Hair |"))
    assert blond_row.count(" ± ") == 6  # every column of the gap table
    # Repeats are different trainings (initialisation, batch order, keys), not copies.
    models = workdir / "models" / "Blond_Hair"
    assert (models / "original.msgpack").read_bytes() != \
        (models / "original.rep1.msgpack").read_bytes()
    for name in figures + ["table1.md"]:
        assert f"({name})" in summary  # workdir outside the repository: plain relative links
    table, sweep = (workdir / "table1.md").read_text().split("Quantile sweep")
    assert table.count("\n| ") == 1 + len(config.confounders) * 6  # header + rows
    assert sweep.count("\n| ") == 1 + len(config.sweep.quantiles)


def test_planned_runs_cover_table_and_sweep():
    config = get_config("smoke")
    runs = dn.planned_runs(config, "Blond_Hair")
    assert runs[:2] == ["original", "balanced"]
    assert set(runs) == {"original", "balanced", "general_noise_q0.7", "general_mask_q0.7",
                         "specific_noise_q0.7", "specific_mask_q0.7", "general_noise_q0.95"}
    # The sweep's q = 0.7 is the main table's run, not a second one.
    assert len(runs) == len(set(runs)) == 7
    assert len(dn.planned_runs(config, "Wearing_Hat")) == 6
    for name in runs:
        method, q = dn.parse_run_name(name)
        assert dn.run_name(method, q) == name
    # Quantiles round-trip exactly through the file names.
    for q in (0.6, 0.975, 1.0, 0.123456789):
        assert dn.parse_run_name(dn.run_name("specific_mask", q)) == ("specific_mask", q)
    with pytest.raises(ValueError, match="takes no quantile"):
        dn.run_name("original", 0.7)
    with pytest.raises(ValueError, match="unknown debiasing method"):
        dn.parse_run_name("blur_q0.7")


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
                                     f"{dn.repeat_stem(name, rep)}.json").read_text())
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
    main = results["results"]["Blond_Hair"]["runs"][dn.run_name("general_noise", 0.7)]
    assert next(r for r in sweep if r["quantile"] == 0.7)["gap"] == main["gap"]
    comp = results["comparison"]["per_method"]["general_noise"]
    for confounder in config.confounders:
        runs = results["results"][confounder]["runs"]
        noise_runs, original = runs[dn.run_name("general_noise", 0.7)], runs["original"]
        assert comp["gap_change"][confounder] == pytest.approx(
            noise_runs["gap"] - original["gap"])
        assert comp["repeats_gap_reduced"][confounder] == sum(
            n["gap"] < o["gap"] for n, o in zip(noise_runs["repeats"], original["repeats"]))
    assert comp["num_paired"] == 2 * len(config.confounders)
    assert results["setup"]["patch_net"]["label"] == "confounder"
    assert returned["table1"] == rows


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


def test_rerun_resumes_without_training(smoke_run):
    config, workdir, first = smoke_run
    run_dir = workdir / "runs" / "Wearing_Hat"
    # A killed sweep: one finished model whose result JSON was never written.
    (run_dir / "balanced.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (workdir / "models").rglob("*.msgpack")}
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


def test_subsets_follow_the_paper_recipe():
    config = get_config("smoke")
    attrs = synthetic.sample_attributes(0, np.arange(20_000), independent=False)["attrs"]
    test_attrs = synthetic.sample_attributes(
        0, np.arange(config.data.test_offset, config.data.test_offset + 20_000))["attrs"]
    subsets = dn.select_subsets(config, "Eyeglasses", attrs, test_attrs)
    male, glasses = regions.attribute_id("Male"), regions.attribute_id("Eyeglasses")
    biased = attrs[subsets["biased"]]
    men = biased[:, male] == 1
    assert men.sum() == config.train_set.n_target
    assert np.all(biased[men, glasses] == 0)
    assert np.sum(biased[~men, glasses] == 1) == config.train_set.n_other_with
    assert np.sum(biased[~men, glasses] == 0) == config.train_set.n_other_without
    balanced = attrs[subsets["balanced"]]
    assert balanced.shape[0] == biased.shape[0]
    cells = np.bincount(2 * balanced[:, male] + balanced[:, glasses], minlength=4)
    assert np.all(cells == biased.shape[0] // 4)
    test = subsets["test"]
    assert test.min() >= config.data.test_offset and test.size == config.test.size
    t = test_attrs[test - config.data.test_offset]
    assert np.all(np.bincount(2 * t[:, male] + t[:, glasses], minlength=4) == test.size // 4)
    # Deterministic in the seed.
    again = dn.select_subsets(config, "Eyeglasses", attrs, test_attrs)
    assert all(np.array_equal(subsets[k], again[k]) for k in subsets)


def test_subgroup_metrics_against_numpy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 200)
    confounder = rng.integers(0, 2, 200)
    correct = rng.random(200) < 0.7
    m = dn.subgroup_metrics(correct, target, confounder)
    men = np.mean([c for c, t in zip(correct, target) if t == 1])
    women = np.mean([c for c, t in zip(correct, target) if t == 0])
    assert m["men"] == pytest.approx(men) and m["women"] == pytest.approx(women)
    assert m["gap"] == pytest.approx(abs(men - women))
    n_men, n_women = np.sum(target == 1), np.sum(target == 0)
    assert m["gap_se"] == pytest.approx(np.sqrt(men * (1 - men) / n_men
                                                + women * (1 - women) / n_women))
    assert m["accuracy"] == pytest.approx(correct.mean())
    for name, (t, a) in {"women_without": (0, 0), "women_with": (0, 1),
                         "men_without": (1, 0), "men_with": (1, 1)}.items():
        sel = (target == t) & (confounder == a)
        assert m["cells"][name] == pytest.approx(correct[sel].mean())
        assert m["cell_counts"][name] == sel.sum()
    values = list(m["cells"].values())
    assert m["cell_gap"] == pytest.approx(max(values) - min(values))
    assert m["cells"][m["worst_cell"]] == min(values)
    with pytest.raises(ValueError, match="both men and women"):
        dn.subgroup_metrics(correct, np.ones(200, int), confounder)
    with pytest.raises(ValueError, match="must all be"):
        dn.subgroup_metrics(correct[:10], target, confounder)


_augment_fn = jax.jit(dn.make_selection_augment_fn(fill=0.5, std=0.5))  # compiled once


@pytest.mark.parametrize("method", dn.METHODS)
def test_selection_augmentation_equals_the_library(method):
    key = jax.random.key(3)
    images = jax.random.uniform(jax.random.key(1), (3, 12, 10, 3))
    specific = np.asarray(jax.random.uniform(jax.random.key(2), (3, 12, 10)))
    general = specific[0]
    scope, mode = dn.method_spec(method)
    q = 0.7
    augment_fn = _augment_fn
    if scope == "general":
        selection = np.broadcast_to(dn.quantile_selections(general, q), specific.shape)
    else:
        selection = dn.quantile_selections(specific, q, batch_size=2)  # padded last batch
    spec = {"selection": jnp.asarray(selection), "mode": jnp.int32(dn.augment_code(method))}
    ours = augment_fn(key, images, spec)
    reference = noise.augment(key, images, general if scope == "general" else specific, q,
                              mode, scope, fill=0.5, std=0.5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-6)
    # Exactly the top 30% of each map is selected: the highest values of the map.
    expected = round(0.3 * 12 * 10)
    assert np.all(selection.sum(axis=(1, 2)) == expected)
    maps = np.broadcast_to(general, specific.shape) if scope == "general" else specific
    for m, sel in zip(maps, selection):
        assert m[sel].min() >= m[~sel].max()
    changed = np.any(np.asarray(ours) != np.asarray(images), axis=-1)
    assert not np.any(changed & ~selection)
    if mode == "mask":
        assert np.array_equal(changed, selection)  # random images are never exactly grey
    unchanged = augment_fn(key, images, {"selection": spec["selection"],
                                         "mode": jnp.int32(dn.AUGMENT_NONE)})
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(images))


def test_batches_reject_bad_selections():
    images = np.zeros((8, 16, 16, 3), np.uint8)
    labels = np.zeros(8, np.int32)
    with pytest.raises(ValueError, match="needs a pixel selection"):
        dn.train_classifier(None, None, images, labels, dn.AUGMENT_NOISE, None, batch_size=4,
                            epochs=1, seed=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[H, W\] or \[N, H, W\]"):
        dn.train_classifier(None, None, images, labels, dn.AUGMENT_MASK,
                            np.zeros((8, 16), bool), batch_size=4, epochs=1, seed=0,
                            key=jax.random.key(0))
    with pytest.raises(ValueError, match="must be bool"):
        dn.train_classifier(None, None, images, labels, dn.AUGMENT_MASK,
                            np.zeros((16, 16), np.float32), batch_size=4, epochs=1, seed=0,
                            key=jax.random.key(0))
    with pytest.raises(ValueError, match="mode=7"):
        dn.train_classifier(None, None, images, labels, 7, None, batch_size=4, epochs=1,
                            seed=0, key=jax.random.key(0))


def test_batches_follow_the_step_order():
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    selection = np.zeros((8, 16, 16), bool)
    selection[:, :4] = True
    batches = dn._AugmentedBatches(images, np.arange(8), dn.AUGMENT_MASK, selection, 4, seed=5)
    from faceaudit_jax.data import pipeline
    for step in range(4):
        x, y, spec = batches(step)
        idx = pipeline.step_indices(np.arange(8), 4, 5, step)
        np.testing.assert_array_equal(np.asarray(y), idx)
        np.testing.assert_allclose(np.asarray(x), images[idx] / 255.0, atol=1e-7)
        assert spec["selection"].shape == (4, 16, 16) and int(spec["mode"]) == dn.AUGMENT_MASK


def test_every_augmentation_shares_one_compiled_step():
    from faceaudit_jax.models import patch_net as pn
    model = dn.PooledSmallConvNet(widths=(2, 2, 2), input_pool=2)
    optimizer = pn.confounded_classifier_optimizer(2, 1e-2)
    state0 = dn._with_array_step(pn.create_train_state(
        jax.random.key(0), model, (jnp.zeros((1, 16, 16, 3)),), optimizer))
    step = pn.make_classifier_train_step(dn.make_selection_augment_fn())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 8).astype(np.int32)
    maps = rng.random((8, 16, 16)).astype(np.float32)
    runs = [(dn.AUGMENT_NONE, None, 0.7), (dn.AUGMENT_NOISE, maps[0], 0.7),
            (dn.AUGMENT_MASK, maps, 0.7), (dn.AUGMENT_NOISE, maps[0], 0.95)]
    for mode, m, q in runs:
        selection = None if m is None else dn.quantile_selections(m, q)
        state, history = dn.train_classifier(step, state0, images, labels, mode, selection,
                                             batch_size=4, epochs=2, seed=0,
                                             key=jax.random.key(1))
        assert len(history) == 2 and int(state.step) == 4
    assert step._cache_size() == 1


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
        dn.validate_config(config)


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
        dn.validate_config(get_config(variant))
    with pytest.raises(ValueError, match="unknown config variant"):
        get_config("huge")


def test_pooled_classifier_and_batch_stat_recalibration():
    """PooledSmallConvNet = SmallConvNet on 2 x 2 block means; and with the whole data set
    in one batch, re-estimated running statistics equal the batch statistics, so
    eval-mode logits equal train-mode ones (no dropout)."""
    from faceaudit_jax.models import patch_net as pn
    model = dn.PooledSmallConvNet(widths=(3, 4, 5), conv_dropout=0.0, head_dropout=0.0,
                                  input_pool=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    x = dn.to_float(images)
    # Random weights from the variables' shapes (eval_shape: no initialiser to compile),
    # running statistics at their initial values (mean 0, variance 1).
    shapes = jax.eval_shape(model.init, jax.random.key(1), x)
    variables = {
        "params": jax.tree_util.tree_map(
            lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), jnp.float32), shapes["params"]),
        "batch_stats": jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape) if len(s.shape) else s, shapes["batch_stats"])}
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else v,
        variables["batch_stats"])
    evaluate = jax.jit(model.apply)
    train_mode = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])[0])

    pooled = x.reshape(8, 8, 2, 8, 2, 3).mean(axis=(2, 4))
    reference = jax.jit(pn.SmallConvNet(widths=(3, 4, 5), conv_dropout=0.0,
                                        head_dropout=0.0).apply)(
        {"params": variables["params"]["net"], "batch_stats": variables["batch_stats"]["net"]},
        pooled)
    before = evaluate(variables, x)
    np.testing.assert_allclose(np.asarray(before), np.asarray(reference), rtol=1e-5, atol=1e-5)

    assert not np.allclose(np.asarray(before), np.asarray(train_mode(variables)), atol=1e-3)
    stats_step = dn.make_batch_stats_step(model, dn.make_selection_augment_fn())
    labels = np.zeros(8, np.int32)
    recalibrated = dn.recalibrate_batch_stats(
        stats_step, variables, images, labels, dn.AUGMENT_NONE, None, batch_size=8,
        passes=150, seed=0, key=jax.random.key(3))
    np.testing.assert_allclose(np.asarray(evaluate(recalibrated, x)),
                               np.asarray(train_mode(variables)), rtol=1e-3, atol=1e-3)
    assert recalibrated["params"] is variables["params"]
    # passes = 0 leaves the variables alone.
    assert dn.recalibrate_batch_stats(stats_step, variables, images, labels, dn.AUGMENT_NONE,
                                      None, batch_size=8, passes=0, seed=0,
                                      key=jax.random.key(3)) is variables


def test_aggregate_repeats_against_numpy():
    rng = np.random.default_rng(3)
    correct = rng.random((3, 40)) < 0.7
    target = np.tile(np.repeat([0, 1], 20), 1)
    confounder = np.tile([0, 1], 20)
    records = [{**dn.subgroup_metrics(c, target, confounder), "method": "original",
                "repeat": i, "train_seconds": 2.0, "fingerprint": str(i)}
               for i, c in enumerate(correct)]
    agg = dn.aggregate_repeats(records)
    gaps = [abs(c[target == 1].mean() - c[target == 0].mean()) for c in correct]
    assert agg["gap"] == pytest.approx(np.mean(gaps))
    assert agg["gap_std"] == pytest.approx(np.std(gaps, ddof=1))
    assert agg["accuracy"] == pytest.approx(correct.mean())
    assert agg["accuracy_std"] == pytest.approx(np.std(correct.mean(axis=1), ddof=1))
    assert agg["cells"]["men_with"] == pytest.approx(
        correct[:, (target == 1) & (confounder == 1)].mean())
    assert agg["worst_cell"] == min(agg["cells"], key=agg["cells"].get)
    assert agg["num_repeats"] == 3 and agg["train_seconds"] == 6.0
    assert "fingerprint" not in agg
    one = dn.aggregate_repeats(records[:1])
    assert one["gap"] == records[0]["gap"] and one["gap_std"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        dn.aggregate_repeats([])
    assert dn.repeat_stem("general_noise_q0.7", 0) == "general_noise_q0.7"
    assert dn.repeat_stem("general_noise_q0.7", 2) == "general_noise_q0.7.rep2"


def test_paired_gap_change():
    def runs(original, other):
        return {"original": {"repeats": [{"gap": g} for g in original]},
                "x": {"repeats": [{"gap": g} for g in other]}}
    change = dn.paired_gap_change(runs([0.3, 0.32, 0.28], [0.1, 0.13, 0.1]), "x")
    diffs = np.array([-0.2, -0.19, -0.18])
    assert change["mean"] == pytest.approx(diffs.mean())
    assert change["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert change["resolved"]
    # Same mean change, but the repeats disagree in sign: not resolved.
    noisy = dn.paired_gap_change(runs([0.3, 0.3, 0.3], [0.0, 0.5, -0.07 + 0.3 - 0.2]), "x")
    assert not noisy["resolved"]
    single = dn.paired_gap_change(runs([0.3], [0.1]), "x")
    assert single["se"] is None and not single["resolved"]
