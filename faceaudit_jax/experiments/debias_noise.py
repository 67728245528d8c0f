"""Patch attribution and noise debiasing (De Coninck, Leroux and Simoens): orchestration.

Per confounder in ``config.confounders``: draw the De Coninck biased training set,
a same-size set balanced over gender x confounder and a balanced test set
(`data.sampling.deconinck_study_sets`); train a patch region classifier on the confounder and turn
its sliding-window confidences into "specific" and "general" attribution maps
(`models.patch_net`, `explain.patches`); train gender classifiers on the biased
set, the balanced set and the biased set under the four attribution-guided
augmentations (`mitigation.noise`, run names in `mitigation.debias_runs`),
``classifier.repeats`` times; score them per gender x confounder cell
(`metrics.fairness`). Every model trains through `train_lib.fit` (in-step
augmentation, Orbax checkpoints) and is kept as verified final variables.

Outputs under ``workdir``: ``results.json`` and what `summary.debias_noise.report`
makes of it (table1.md, summary.md, figures); ``runs/<C>/`` (one JSON per
finished training: a killed job resumes where it stopped); ``models/`` (variables
and the attribution cache; ignored by git). Every saved model and result carries
a fingerprint of the settings that made it (`mitigation.debias_config`, which also
checks the config); a mismatch retrains or re-scores instead of mixing runs.
Departures from the paper: docs/deviations_debias_noise.md.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from faceaudit_jax import keys, losses, train_lib
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.data import pipeline, sampling, sources
from faceaudit_jax.explain import patches as patches_lib
from faceaudit_jax.metrics import fairness
from faceaudit_jax.mitigation import noise
from faceaudit_jax.mitigation.debias_config import (RunFingerprints, models_fingerprint,
                                                    validate_config)
from faceaudit_jax.mitigation.debias_runs import (BASELINES, METHODS, augment_code, method_spec,
                                                  parse_run_name, planned_runs, repeat_parts,
                                                  repeat_stem)
from faceaudit_jax.models import patch_net as pn
from faceaudit_jax.summary import debias_noise as summary_lib
from faceaudit_jax.workdir import write_json

_name_seed = keys.name_hash  # the run's numpy seeds: crc32 of the names joined with '/'
run_key = keys.run_key
_PATCH_INPUTS = ("patches", "position_ids")


def classifier_model(cfg) -> pn.PooledSmallConvNet:
    return pn.PooledSmallConvNet(num_classes=2, widths=tuple(cfg.widths),
                                 conv_dropout=float(cfg.conv_dropout),
                                 head_dropout=float(cfg.head_dropout),
                                 input_pool=int(cfg.input_pool))


def patch_model(cfg) -> pn.PatchNet:
    return pn.PatchNet(num_classes=2, num_positions=int(cfg.grid) ** 2,
                       patch_size=int(cfg.patch_size), backbone=str(cfg.backbone),
                       widths=tuple(cfg.widths))


def _example_inputs(config, which: str) -> tuple:
    """Inputs the models are initialised on (batch of 1)."""
    if which == "classifier":
        size = int(config.data.resolution)
        return (jnp.zeros((1, size, size, 3), jnp.float32),)
    k = int(config.patch_net.patch_size)
    return jnp.zeros((1, k, k, 3), jnp.float32), jnp.zeros((1,), jnp.int32)


# One optimizer object per schedule: the train state carries it as a static field,
# so a new object would compile the train step again.
_classifier_optimizer = functools.lru_cache(pn.confounded_classifier_optimizer)
_patch_optimizer = functools.lru_cache(pn.patch_net_optimizer)


def _scratch(path: Path, fp: str) -> str:
    """The training folder of the model saved at ``path`` (removed once it is saved); named by
    the settings hash, so a killed training resumes only under the same settings."""
    return str(path.parent / f"{path.name}.training-{fp}")


def _log(message: str) -> None:
    print(f"[debias_noise {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _epochs_for(config, method: str) -> int:
    if method in METHODS and method_spec(method)[1] == "mask":
        return int(config.classifier.epochs_mask)
    return int(config.classifier.epochs)


def _render_sets(config, confounder: str, pools: dict, subsets: dict) -> dict[str, dict]:
    """Images (uint8), gender and confounder labels of the biased, balanced and test sets."""
    t0 = time.time()
    out = {}
    for name, idx in subsets.items():
        source = pools["test_source" if name == "test" else "source"]
        attrs = source.attributes(idx)["attrs"]
        out[name] = {"images": pipeline.render_uint8(source, idx,
                                                     int(config.data.render_batch_size)),
                     "gender": sampling.attribute_column(attrs, config.target),
                     "present": sampling.attribute_column(attrs, confounder)}
    _log(f"{confounder}: rendered {sum(v['images'].shape[0] for v in out.values())} images "
         f"in {time.time() - t0:.0f} s")
    return out


def _patch_net(config, confounder: str, data: dict, path: Path, fp: str):
    """The confounder's patch region classifier: (variables, train history), loaded or trained
    on the balanced set (gender carries no information about its label there)."""
    pc, model, inputs = config.patch_net, patch_model(config.patch_net), _example_inputs(config, "patch")
    pvars, meta = train_lib.load_keyed_variables(str(path), train_lib.variables_template(model, inputs), fp)
    if pvars is not None:
        return pvars, meta.get("train_history")
    t0 = time.time()
    images, labels = data["balanced"]["images"], data["balanced"]["present"]
    per_epoch = pipeline.steps_per_epoch(images.shape[0], int(pc.batch_size))
    state = train_lib.train_state_from_variables(
        train_lib.init_model_variables(model, run_key(config.seed, "patch_net_init"), inputs),
        _patch_optimizer(per_epoch, float(pc.learning_rate), float(pc.weight_decay),
                         int(pc.decay_every_epochs), float(pc.decay_factor), int(pc.epochs)),
        run_key(config.seed, confounder, "patch_net"))
    batch_fn = pipeline.array_batch_fn(images, int(pc.batch_size),
                                       _name_seed(config.seed, confounder, "patch_order"),
                                       label=labels)
    state, history = train_lib.fit_epochs(
        model, state, batch_fn, int(pc.epochs), per_epoch, _scratch(path, fp),
        loss_fn=losses.SoftmaxClassificationLoss(float(pc.label_smoothing)),
        augment_fn=pn.PatchSampler(int(config.data.resolution), int(pc.patch_size), int(pc.grid)),
        input_key=_PATCH_INPUTS)
    pvars = train_lib.state_variables(state)
    train_lib.save_keyed_variables(str(path), pvars, fp, {"train_history": history,
                                                          "train_seconds": round(time.time() - t0, 1)})
    _log(f"{confounder}: patch net trained in {time.time() - t0:.0f} s, last epoch loss "
         f"{history[-1]['loss']:.3f} patch accuracy {history[-1]['accuracy']:.3f}")
    return pvars, history


def _patch_result(config, confounder: str, test: dict, pvars, fp: str, history) -> dict:
    """Calibration of the patch net on test images (every window a prediction of the
    image's confounder label)."""
    pc = config.patch_net
    cal_n = min(int(config.calibration.num_images), test["images"].shape[0])
    # A deterministic random spread of test images (the test set is sorted by index).
    cal_idx = np.sort(np.random.default_rng(_name_seed(config.seed, confounder, "cal"))
                      .choice(test["images"].shape[0], cal_n, replace=False))
    cal = patches_lib.patch_calibration(
        pn.make_patch_apply_fn(patch_model(pc)), pvars, test["images"][cal_idx],
        test["present"][cal_idx], int(pc.patch_size),
        pn.grid_positions(int(config.data.resolution), int(pc.patch_size), int(pc.grid)),
        int(config.calibration.num_bins), int(pc.map_batch_size), int(pc.chunk_size))
    rel = cal["reliability"]
    _log(f"{confounder}: patch net test patch accuracy {cal['patch_accuracy']:.3f}, "
         f"ECE {rel.ece:.4f}")
    return {"fingerprint": fp, "patch_accuracy": cal["patch_accuracy"], "ece": rel.ece,
            "num_predictions": cal["num_predictions"], "num_images": cal_n,
            "position_accuracy": cal["position_accuracy"],
            "reliability": {"bin_edges": rel.bin_edges, "accuracy": rel.accuracy,
                            "mean_confidence": rel.mean_confidence, "counts": rel.counts},
            "train_history": history}


def _attribution(config, biased: dict, subset: np.ndarray, pvars, fp: str,
                 path: Path) -> tuple[np.ndarray, dict]:
    """Specific maps of the biased set and the cache (general map, figure example)."""
    pc, t0 = config.patch_net, time.time()
    raw = patches_lib.raw_attribution_maps(
        pn.make_patch_apply_fn(patch_model(pc)), pvars, biased["images"], int(pc.patch_size),
        pn.grid_positions(int(config.data.resolution), int(pc.patch_size), int(pc.grid)),
        str(pc.confidence), int(pc.map_batch_size), int(pc.chunk_size))
    specific, general = patches_lib.specific_and_general_maps(raw)
    ex = int(np.flatnonzero(biased["present"] == 1)[0])  # the figure's example image
    cache = {"fingerprint": np.asarray(fp), "general_map": general,
             "specific_map": specific[ex], "image": biased["images"][ex],
             "example_index": np.asarray(subset[ex])}
    np.savez(path, **cache)
    _log(f"{subset.size} attribution maps in {time.time() - t0:.0f} s")
    return specific, cache


def _train_gender_classifier(config, confounder: str, name: str, repeat: int, data: dict,
                             maps: dict, folder: str) -> tuple[dict, dict]:
    """Train one gender classifier of run `name` (baseline or augmentation), then
    re-estimate its batch-norm statistics: (variables, {train_history, train_seconds}).
    Within a repeat every run shares the initialisation and batch order, so the
    table's columns differ only in training data / augmentation."""
    cc, (method, q), extra, t0 = config.classifier, parse_run_name(name), repeat_parts(repeat), time.time()
    train = data["balanced" if method == "balanced" else "biased"]
    selection = None if method in BASELINES else noise.quantile_selections(
        maps[method_spec(method)[0]], q)
    model, bs = classifier_model(cc), int(cc.batch_size)
    per_epoch = pipeline.steps_per_epoch(train["images"].shape[0], bs)

    def batches(order: str):
        return noise.selection_batch_fn(train["images"], train["gender"], augment_code(method),
                                        selection, bs, _name_seed(config.seed, confounder, order, *extra))

    state = train_lib.train_state_from_variables(
        train_lib.init_model_variables(model, run_key(config.seed, "classifier_init", *extra),
                                       _example_inputs(config, "classifier")),
        _classifier_optimizer(per_epoch, float(cc.learning_rate), float(cc.decay_per_epoch),
                              float(cc.weight_decay)),
        run_key(config.seed, confounder, name, "train", *extra))
    augment = noise.SelectionAugment(float(config.debias.mask_fill), float(config.debias.noise_std))
    state, history = train_lib.fit_epochs(
        model, state, batches("classifier_order"), _epochs_for(config, method), per_epoch,
        folder, loss_fn=losses.SoftmaxClassificationLoss(), augment_fn=augment)
    variables = train_lib.recalibrate_batch_stats(
        model, train_lib.state_variables(state), batches("bn_order"),
        int(cc.bn_recalibration_passes) * per_epoch,
        run_key(config.seed, confounder, name, "bn", *extra), augment_fn=augment)
    return variables, {"train_history": history, "train_seconds": round(time.time() - t0, 1)}


def _evaluate_run(config, confounder: str, job: tuple, data: dict, maps: dict,
                  fps: RunFingerprints, model_dir: Path) -> dict:
    """The result record of one training (job = (run name, repeat)): its model is
    loaded if saved with the same settings, else trained and saved."""
    (name, repeat), t0, cc = job, time.time(), config.classifier
    method, q = parse_run_name(name)
    model, path = classifier_model(cc), model_dir / repeat_stem(name, repeat)
    template = train_lib.variables_template(model, _example_inputs(config, "classifier"))
    variables, meta = train_lib.load_keyed_variables(str(path), template, fps.train(*job))
    reloaded = variables is not None
    if not reloaded:
        variables, meta = _train_gender_classifier(config, confounder, name, repeat, data, maps,
                                                   _scratch(path, fps.train(*job)))
        train_lib.save_keyed_variables(str(path), variables, fps.train(*job), meta)
    test, bs = data["test"], int(config.test.batch_size)
    logits = train_lib.predict(model, variables, (pipeline.uint8_to_float(test["images"][i:i + bs])
                                                  for i in range(0, test["images"].shape[0], bs)))
    predicted = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    metrics = fairness.subgroup_metrics(predicted == test["gender"], test["gender"],
                                        test["present"])
    epochs = _epochs_for(config, method)
    per_epoch = pipeline.steps_per_epoch(data["biased"]["images"].shape[0], int(cc.batch_size))
    _log(f"{confounder} / {repeat_stem(*job)}: accuracy {metrics['accuracy']:.3f} men "
         f"{metrics['men']:.3f} women {metrics['women']:.3f} gap {metrics['gap']:.3f} "
         f"({time.time() - t0:.0f} s)")
    return {"fingerprint": fps.result(*job), "confounder": confounder, "method": method,
            "quantile": q, "repeat": repeat,
            "train_set": "balanced" if method == "balanced" else "biased", "epochs": epochs,
            "steps": epochs * per_epoch, "reloaded_model": reloaded,
            "train_seconds": meta.get("train_seconds"),
            "train_history": meta.get("train_history"), **metrics}


def _train_pending(config, confounder: str, pending: list, done: dict, paths: dict,
                   subsets: dict, pools: dict, fps: RunFingerprints, patch_result, cache):
    """Render the sets, train (or load) the patch net and its maps, then every pending
    run; fills ``done``, returns (patch result, attribution cache)."""
    _log(f"{confounder}: pending runs: {', '.join(repeat_stem(*job) for job in pending) or 'none'}")
    data = _render_sets(config, confounder, pools, subsets)
    pvars, history = _patch_net(config, confounder, data, paths["models"] / "patch_net", fps.patch)
    if patch_result is None:
        patch_result = _patch_result(config, confounder, data["test"], pvars, fps.patch_result,
                                     history)
        write_json(paths["runs"] / "patch_net.json", patch_result)
    specific = None
    if cache is None or any(n not in BASELINES and method_spec(parse_run_name(n)[0])[0] ==
                            "specific" for n, _ in pending):
        specific, cache = _attribution(config, data["biased"], subsets["biased"], pvars,
                                       fps.attribution, paths["models"] / "attribution.npz")
    maps = {"general": cache["general_map"], "specific": specific}
    for job in pending:
        done[job] = _evaluate_run(config, confounder, job, data, maps, fps, paths["models"])
        write_json(paths["runs"] / f"{repeat_stem(*job)}.json", done[job])
    return patch_result, cache


def run_confounder(config, confounder: str, workdir: Path, pools: dict) -> dict[str, Any]:
    """Everything for one confounder; finished runs (their JSON) are only read back."""
    paths = {"runs": workdir / "runs" / confounder, "models": workdir / "models" / confounder}
    for folder in paths.values():
        folder.mkdir(parents=True, exist_ok=True)
    ts = config.train_set
    subsets = sampling.deconinck_study_sets(
        pools["train"], pools["test"], confounder, config.seed, target=config.target,
        n_target=ts.n_target, n_other_with=ts.n_other_with, n_other_without=ts.n_other_without,
        test_size=config.test.size, train_rows=pools["train_rows"], test_rows=pools["test_rows"])
    fps = RunFingerprints(config, confounder, subsets)
    names, repeats = planned_runs(config, confounder), int(config.classifier.get("repeats", 1))
    # Repeat-major: a job stopped part-way holds whole repeats of the table.
    jobs = [(name, r) for r in range(repeats) for name in names]
    done = {job: workdir_lib.read_json_if(paths["runs"] / f"{repeat_stem(*job)}.json", fps.result(*job))
            for job in jobs}
    done = {job: record for job, record in done.items() if record is not None}
    patch_result = workdir_lib.read_json_if(paths["runs"] / "patch_net.json", fps.patch_result)
    cache = workdir_lib.read_npz_if(paths["models"] / "attribution.npz", fps.attribution)
    pending = [job for job in jobs if job not in done]
    if pending or patch_result is None or cache is None:
        patch_result, cache = _train_pending(config, confounder, pending, done, paths, subsets,
                                             pools, fps, patch_result, cache)
    else:
        _log(f"{confounder}: all {len(jobs)} runs done, nothing to train")
    runs = {n: fairness.aggregate_repeats([done[(n, r)] for r in range(repeats)]) for n in names}
    return {"runs": runs, "patch_net": patch_result, "examples": cache,
            "subsets": {k: int(v.size) for k, v in subsets.items()}}


def _pools(config) -> dict[str, Any]:
    """The training and test sources with their rows' attributes."""
    pool_size = int(config.data.pool_size)
    # Synthetic: index ranges 0.. and test_offset.. of pool_size each; real data: its splits.
    source, train_rows = sources.build_split(config.data, "train", pool_size=pool_size)
    test_source, test_rows = sources.build_split(config.data, "test", pool_size=pool_size)
    for where in (source, test_source):
        sources.require_attributes(where, [config.target, *config.confounders])
    return {"source": source, "test_source": test_source,
            "train_rows": train_rows, "test_rows": test_rows,
            "train": source.attributes(train_rows)["attrs"],
            "test": test_source.attributes(test_rows)["attrs"]}


def run(config, workdir) -> dict[str, Any]:
    """The whole experiment; returns the results dict also written to results.json."""
    validate_config(config)
    workdir, t_start = Path(workdir), time.time()
    workdir_lib.check_fingerprint(workdir / "models", models_fingerprint(config),
                                  overwrite=workdir_lib.overwrite_requested(config))
    gitignore = workdir / "models" / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n!.gitignore\n")
    pools = _pools(config)
    per_confounder = {c: run_confounder(config, c, workdir, pools) for c in config.confounders}
    results = {c: {"runs": v["runs"], "patch_net": v["patch_net"]}
               for c, v in per_confounder.items()}
    setup = summary_lib.setup_record(config, {c: v["subsets"] for c, v in per_confounder.items()})
    out = summary_lib.results_record(setup, results)
    figures = summary_lib.write_report(summary_lib.report(
        {**out, "examples": {c: v["examples"] for c, v in per_confounder.items()}},
        workdir_lib.readme_link_prefix(workdir)), workdir)
    out.update(figures=figures, paper=summary_lib.paper_numbers(),
               seconds_this_invocation=round(time.time() - t_start, 1),
               train_seconds_total=summary_lib.train_seconds_total(results))
    write_json(workdir / "results.json", out)
    _log(f"done in {time.time() - t_start:.0f} s; results in {workdir}")
    return out
