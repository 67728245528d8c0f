"""Patch attribution and noise debiasing (De Coninck, Leroux and Simoens): orchestration.

Per confounder in ``config.confounders`` (the paper's Blond_Hair, Eyeglasses,
Smiling, Wearing_Hat): draw the De Coninck biased training set, a same-size
set balanced over gender x confounder and a balanced test set
(`data.sampling`); train a patch region classifier on the confounder
(`models.patch_net`) and turn its sliding-window confidences into "specific"
and "general" attribution maps (`explain.patches`); train gender classifiers
on the biased set, the balanced set and the biased set under the four
attribution-guided augmentations (`mitigation.noise`, run names in
`mitigation.debias_runs`); evaluate them per gender x confounder cell
(`metrics.fairness.subgroup_metrics`), ``classifier.repeats`` times; and the
quantile sweep of ``sweep.method`` on ``sweep.confounder`` (Figure 8).

Outputs under ``workdir``: ``results.json``, and what
`debias_noise_report.write_report` lays out (table1.md, summary.md, figures);
``reliability_<Confounder>.png``; ``runs/<C>/`` (one JSON per finished
training: a killed job resumes where it stopped); ``models/`` (patch-net and
classifier variables as verified Orbax checkpoints, the attribution cache;
ignored by git). Every saved
model and result carries a fingerprint of the settings that made it; a
mismatch retrains or re-evaluates instead of mixing runs. Departures from the
paper for a 2-core CPU: docs/deviations_debias_noise.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
import optax

from faceaudit_jax import keys, regions, train_lib
from faceaudit_jax.data import pipeline, sampling, sources
from faceaudit_jax.experiments import debias_noise_report as report_lib
from faceaudit_jax.experiments import registry
from faceaudit_jax.explain import patches as patches_lib
from faceaudit_jax.metrics import calibration, fairness
from faceaudit_jax.mitigation import noise
from faceaudit_jax.mitigation.debias_runs import (BASELINES, METHODS, augment_code,
                                                  check_quantile, method_spec, parse_run_name,
                                                  repeat_parts, repeat_stem, run_name)
from faceaudit_jax.models import patch_net as pn
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.workdir import write_json

_name_seed = keys.name_hash  # the run's numpy seeds: crc32 of the names joined with '/'
run_key = keys.run_key


def planned_runs(config, confounder: str) -> list[str]:
    """Run ids for one confounder: the baselines, every method at the main
    quantile, and the sweep's quantiles where this is the sweep's confounder."""
    names = list(BASELINES) + [run_name(m, config.debias.quantile) for m in config.debias.methods]
    if confounder == config.sweep.confounder:
        for q in config.sweep.quantiles:
            name = run_name(config.sweep.method, q)
            if name not in names:
                names.append(name)
    return names


def validate_config(config) -> None:
    """Clear errors for settings that would fail deep inside the run."""
    target = config.target
    regions.attribute_id(target)
    if isinstance(config.confounders, str):
        raise ValueError(f"confounders={config.confounders!r}; expected a tuple of attribute "
                         "names, e.g. ('Blond_Hair',)")
    confounders = tuple(config.confounders)
    if not confounders:
        raise ValueError("confounders is empty; expected at least one attribute name")
    regions.attribute_ids(confounders)
    if target in confounders:
        raise ValueError(f"target {target!r} is also listed as a confounder")
    if len(set(confounders)) != len(confounders):
        raise ValueError(f"confounders {confounders} repeat an attribute")
    for method in config.debias.methods:
        method_spec(method)
    check_quantile(config.debias.quantile)
    method_spec(config.sweep.method)
    for q in config.sweep.quantiles:
        check_quantile(q)
    if config.sweep.confounder not in confounders:
        raise ValueError(f"sweep.confounder={config.sweep.confounder!r} is not one of the "
                         f"confounders {confounders}")
    sources.check_data_config(config.data)
    resolution = int(config.data.resolution)
    pn.grid_positions(resolution, int(config.patch_net.patch_size), int(config.patch_net.grid))
    pool = int(config.classifier.input_pool)
    if pool < 1 or resolution % pool:
        raise ValueError(f"classifier.input_pool={pool}; expected a positive divisor of the "
                         f"resolution {resolution}")
    if config.patch_net.confidence not in patches_lib.CONFIDENCE_KINDS:
        raise ValueError(f"patch_net.confidence={config.patch_net.confidence!r}; expected one "
                         f"of {patches_lib.CONFIDENCE_KINDS}")
    repeats = config.classifier.get("repeats", 1)  # raw value: report_lib.num_repeats would cast it
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"classifier.repeats={repeats!r}; expected an int >= 1 (trainings "
                         "per Table 1 cell)")
    if int(config.test.size) < 4:
        raise ValueError(f"test.size={config.test.size}; expected at least 4 (one per "
                         "gender x confounder cell)")


def fingerprint(*parts: Any) -> str:
    """Short hash of JSON-serialisable settings (ConfigDicts via to_dict)."""
    def plain(x):
        if hasattr(x, "to_dict"):
            return plain(x.to_dict())
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def select_subsets(config, confounder: str, train_attrs: np.ndarray,
                   test_attrs: np.ndarray, train_rows: Optional[np.ndarray] = None,
                   test_rows: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Image indices of the three sets for one confounder.

    Args:
      train_attrs: int8 [N, 40], the attributes of the training pool's rows
        ``train_rows`` (default: synthetic indices 0..N-1).
      test_attrs: int8 [M, 40], those of the test pool's rows ``test_rows``
        (default: synthetic indices test_offset..test_offset+M-1).

    Returns:
      {"biased", "balanced", "test"}: int64 rows of the training source
      (biased, balanced) and of the test source (test), each sorted.
    """
    if train_rows is None:
        train_rows = np.arange(len(train_attrs), dtype=np.int64)
    if test_rows is None:
        test_rows = np.arange(len(test_attrs), dtype=np.int64) + int(config.data.test_offset)
    ts = config.train_set
    biased = sampling.deconinck_subset(
        train_attrs, confounder, _name_seed(config.seed, confounder, "biased"),
        target=config.target, n_target=int(ts.n_target), n_other_with=int(ts.n_other_with),
        n_other_without=int(ts.n_other_without))
    balanced = sampling.balanced_subset(train_attrs, config.target, [confounder], biased.size,
                                        _name_seed(config.seed, confounder, "balanced"))
    test = sampling.balanced_subset(test_attrs, config.target, [confounder],
                                    int(config.test.size),
                                    _name_seed(config.seed, confounder, "test"))
    return {"biased": train_rows[biased], "balanced": train_rows[balanced],
            "test": test_rows[test]}


def attribute_column(attrs: np.ndarray, name: str) -> np.ndarray:
    """1 where attribute `name` is present, else 0: int32 [N]."""
    return (np.asarray(attrs)[:, regions.attribute_id(name)] == 1).astype(np.int32)


def classifier_model(cfg) -> pn.PooledSmallConvNet:
    return pn.PooledSmallConvNet(num_classes=2, widths=tuple(cfg.widths),
                                 conv_dropout=float(cfg.conv_dropout),
                                 head_dropout=float(cfg.head_dropout),
                                 input_pool=int(cfg.input_pool))


def patch_model(cfg, num_positions: int) -> pn.PatchNet:
    return pn.PatchNet(num_classes=2, num_positions=int(num_positions),
                       patch_size=int(cfg.patch_size), backbone=str(cfg.backbone),
                       widths=tuple(cfg.widths))


def save_variables(folder: Path, variables: Any, fp: str, meta: Optional[dict] = None) -> None:
    """The variables as a verified Orbax checkpoint (`train_lib.save_variables`) plus a
    JSON sidecar ``<folder>.json`` (fingerprint and `meta`, e.g. the training history)."""
    train_lib.save_variables(str(folder), variables)
    write_json(folder.parent / f"{folder.name}.json", {"fingerprint": fp, **(meta or {})})


def load_variables(folder: Path, template: Any, fp: str) -> tuple[Optional[Any], dict]:
    """(variables, sidecar meta) if saved with the same settings (fingerprint `fp`),
    else (None, {}). `template`: the variables' structure (arrays or shapes)."""
    meta_path = folder.parent / f"{folder.name}.json"
    if not meta_path.exists():
        return None, {}
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fp:
        return None, {}
    variables = train_lib.load_variables(str(folder), template)
    return (None, {}) if variables is None else (variables, meta)


class _Toolkit:
    """Models, jitted functions and initial variables shared by every confounder and run.

    Built once per job, so each jitted function compiles once and every gender
    classifier of a repeat starts from that repeat's initialisation (runs differ
    only in their training data / augmentation), as does every patch net.
    Initial variables are computed on first use (a compile); reloading saved models
    only needs their shapes (`jax.eval_shape`, no compile).
    """

    def __init__(self, config):
        self.config = config
        cc, pc = config.classifier, config.patch_net
        resolution = int(config.data.resolution)
        self.classifier = classifier_model(cc)
        self.predict = pn.make_predict_fn(self.classifier)
        self.k = int(pc.patch_size)
        self.positions = pn.grid_positions(resolution, self.k, int(pc.grid))
        self.patch_net = patch_model(pc, self.positions.shape[0])
        self.patch_apply = pn.make_patch_apply_fn(self.patch_net)
        self.patch_step = pn.make_patch_train_step(self.positions, self.k,
                                                   float(pc.label_smoothing))
        self._classifier_inputs = (jnp.zeros((1, resolution, resolution, 3), jnp.float32),)
        self._patch_inputs = (jnp.zeros((1, self.k, self.k, 3), jnp.float32),
                              jnp.zeros((1,), jnp.int32))
        self._augment_fn = noise.make_selection_augment_fn(fill=float(config.debias.mask_fill),
                                                           std=float(config.debias.noise_std))
        self._optimizers: dict[tuple, optax.GradientTransformation] = {}
        self._classifier_inits: dict[int, dict] = {}

    def classifier_init(self, repeat: int = 0) -> dict:
        """Initial variables of the gender classifiers of one repeat (cached)."""
        if repeat not in self._classifier_inits:
            self._classifier_inits[repeat] = pn.state_variables(pn.create_train_state(
                run_key(self.config.seed, "classifier_init", *repeat_parts(repeat)),
                self.classifier, self._classifier_inputs, optax.identity()))
        return self._classifier_inits[repeat]

    @functools.cached_property
    def patch_init(self) -> dict:
        return pn.state_variables(pn.create_train_state(
            run_key(self.config.seed, "patch_net_init"), self.patch_net, self._patch_inputs,
            optax.identity()))

    @functools.cached_property
    def classifier_template(self) -> dict:
        return pn.variables_template(self.classifier, self._classifier_inputs)

    @functools.cached_property
    def patch_template(self) -> dict:
        return pn.variables_template(self.patch_net, self._patch_inputs)

    @functools.cached_property
    def classifier_step(self) -> Callable:
        """The train step of every gender classifier (the augmentation is an input)."""
        return pn.make_classifier_train_step(self._augment_fn)

    @functools.cached_property
    def stats_step(self) -> Callable:
        """The batch-norm re-estimation step of every gender classifier."""
        return pn.make_batch_stats_step(self.classifier, self._augment_fn)

    def classifier_optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """One optimizer object per schedule: the train state carries it as a static
        field, so a new object would recompile the train step."""
        key = ("classifier", int(steps_per_epoch))
        if key not in self._optimizers:
            cc = self.config.classifier
            self._optimizers[key] = pn.confounded_classifier_optimizer(
                int(steps_per_epoch), float(cc.learning_rate), float(cc.decay_per_epoch),
                float(cc.weight_decay))
        return self._optimizers[key]

    def patch_optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        key = ("patch_net", int(steps_per_epoch))
        if key not in self._optimizers:
            pc = self.config.patch_net
            self._optimizers[key] = pn.patch_net_optimizer(
                int(steps_per_epoch), float(pc.learning_rate), float(pc.weight_decay),
                int(pc.decay_every_epochs), float(pc.decay_factor), int(pc.epochs))
        return self._optimizers[key]

    def classifier_state(self, optimizer, repeat: int = 0) -> pn.TrainState:
        init = self.classifier_init(repeat)
        return pn.with_array_step(pn.TrainState.create(
            apply_fn=self.classifier.apply, params=init["params"], tx=optimizer,
            batch_stats=init.get("batch_stats", {})))



def _log(message: str) -> None:
    print(f"[debias_noise {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _epochs_for(config, method: str) -> int:
    if method in METHODS and method_spec(method)[1] == "mask":
        return int(config.classifier.epochs_mask)
    return int(config.classifier.epochs)


PATCH_TRAIN_FIELDS = ("patch_size", "grid", "backbone", "widths", "epochs", "batch_size",
                      "learning_rate", "weight_decay", "decay_every_epochs", "decay_factor",
                      "label_smoothing")
CLASSIFIER_TRAIN_FIELDS = ("widths", "conv_dropout", "head_dropout", "input_pool", "batch_size",
                           "learning_rate", "weight_decay", "decay_per_epoch", "epochs",
                           "epochs_mask", "bn_recalibration_passes")


class _Fingerprints:
    """The settings hashes of one confounder's models and results (see `fingerprint`)."""

    def __init__(self, config, confounder: str, subsets: dict[str, np.ndarray]):
        pc, cc = config.patch_net, config.classifier
        self.config = config
        self.data = fingerprint(sources.fingerprint_fields(config.data), config.train_set,
                                config.target, confounder, config.seed,
                                {k: v.tolist() for k, v in subsets.items()})
        self.patch = fingerprint(self.data, {f: pc[f] for f in PATCH_TRAIN_FIELDS})
        self.attribution = fingerprint(self.patch, pc.confidence)
        self.test = fingerprint(config.test, subsets["test"].tolist())
        self.classifier = fingerprint({f: cc[f] for f in CLASSIFIER_TRAIN_FIELDS})
        self.patch_result = fingerprint(self.patch, self.test, config.calibration)

    def train(self, name: str, repeat: int) -> str:
        method, q = parse_run_name(name)
        parts = [self.data, self.classifier, method, q, *repeat_parts(repeat)]
        if method in METHODS:
            parts += [self.attribution, self.config.debias.noise_std, self.config.debias.mask_fill]
        return fingerprint(*parts)

    def result(self, name: str, repeat: int) -> str:
        return fingerprint(self.train(name, repeat), self.test)


def _read_if(path: Path, fp: str) -> Optional[dict]:
    """The JSON at `path` if it exists and was made with fingerprint `fp`, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("fingerprint") == fp else None


def _read_cache(path: Path, fp: str) -> Optional[dict]:
    """The attribution cache (npz) if made with fingerprint `fp`, else None."""
    if not path.exists():
        return None
    with np.load(path) as loaded:
        if str(loaded["fingerprint"]) != fp:
            return None
        return {k: loaded[k] for k in loaded.files}


def _render_sets(config, confounder: str, pools: dict, subsets: dict) -> dict[str, dict]:
    """Images (uint8), gender and confounder labels of the biased, balanced and test sets."""
    t0 = time.time()
    out = {}
    for name, idx in subsets.items():
        source = pools["test_source" if name == "test" else "source"]
        attrs = source.attributes(idx)["attrs"]
        out[name] = {"images": pipeline.render_uint8(source, idx,
                                                     int(config.data.render_batch_size)),
                     "gender": attribute_column(attrs, config.target),
                     "present": attribute_column(attrs, confounder)}
    _log(f"{confounder}: rendered {sum(v['images'].shape[0] for v in out.values())} images "
         f"in {time.time() - t0:.0f} s")
    return out


def _patch_net(config, confounder: str, data: dict, tools, path: Path, fp: str):
    """The confounder's patch region classifier: (variables, train history), loaded or trained
    on the balanced set (gender carries no information about its label there)."""
    pc = config.patch_net
    pvars, meta = load_variables(path, tools.patch_template, fp)
    if pvars is not None:
        return pvars, meta.get("train_history")
    t0 = time.time()
    images, labels = data["balanced"]["images"], data["balanced"]["present"]
    optimizer = tools.patch_optimizer(pipeline.steps_per_epoch(images.shape[0],
                                                               int(pc.batch_size)))
    pstate, history = pn.train_patch_net(
        tools.patch_step, tools.patch_init, tools.patch_net, optimizer, images, labels,
        batch_size=int(pc.batch_size), epochs=int(pc.epochs),
        key=run_key(config.seed, confounder, "patch_net"),
        seed=_name_seed(config.seed, confounder, "patch_order"))
    pvars = pn.state_variables(pstate)
    save_variables(path, pvars, fp, {"train_history": history,
                                     "train_seconds": round(time.time() - t0, 1)})
    _log(f"{confounder}: patch net trained in {time.time() - t0:.0f} s, last epoch loss "
         f"{history[-1]['loss']:.3f} patch accuracy {history[-1]['accuracy']:.3f}")
    return pvars, history


def _patch_result(config, confounder: str, test: dict, tools, pvars, fp: str,
                  history, workdir: Path) -> dict:
    """Calibration of the patch net on test images (every window a prediction of the
    image's confounder label), with its reliability diagram."""
    pc = config.patch_net
    cal_n = min(int(config.calibration.num_images), test["images"].shape[0])
    # A deterministic random spread of test images (the test set is sorted by index).
    cal_idx = np.sort(np.random.default_rng(_name_seed(config.seed, confounder, "cal"))
                      .choice(test["images"].shape[0], cal_n, replace=False))
    cal = patches_lib.patch_calibration(
        tools.patch_apply, pvars, test["images"][cal_idx], test["present"][cal_idx], tools.k,
        tools.positions, int(config.calibration.num_bins), int(pc.map_batch_size),
        int(pc.chunk_size))
    rel = cal["reliability"]
    calibration.plot_reliability_diagram(
        rel, str(workdir / f"reliability_{confounder}.png"),
        title=f"Patch net, {confounder.replace('_', ' ')} ({cal_n} test images)")
    _log(f"{confounder}: patch net test patch accuracy {cal['patch_accuracy']:.3f}, "
         f"ECE {rel.ece:.4f}")
    return {"fingerprint": fp, "patch_accuracy": cal["patch_accuracy"], "ece": rel.ece,
            "num_predictions": cal["num_predictions"], "num_images": cal_n,
            "position_accuracy": cal["position_accuracy"],
            "reliability": {"bin_edges": rel.bin_edges, "accuracy": rel.accuracy,
                            "mean_confidence": rel.mean_confidence, "counts": rel.counts},
            "train_history": history}


def _attribution(config, biased: dict, subset: np.ndarray, tools, pvars, fp: str,
                 path: Path) -> tuple[np.ndarray, dict]:
    """Specific maps of the biased set and the cache (general map, figure example)."""
    pc = config.patch_net
    t0 = time.time()
    raw = patches_lib.raw_attribution_maps(
        tools.patch_apply, pvars, biased["images"], tools.k, tools.positions,
        str(pc.confidence), int(pc.map_batch_size), int(pc.chunk_size))
    specific, general = patches_lib.specific_and_general_maps(raw)
    # The figure's example: the first training image with the confounder.
    ex = int(np.flatnonzero(biased["present"] == 1)[0])
    cache = {"fingerprint": np.asarray(fp), "general_map": general,
             "specific_map": specific[ex], "image": biased["images"][ex],
             "example_index": np.asarray(subset[ex])}
    np.savez(path, **cache)
    _log(f"{subset.size} attribution maps in {time.time() - t0:.0f} s")
    return specific, cache


def _train_gender_classifier(config, confounder: str, name: str, repeat: int, data: dict,
                             maps: dict, tools) -> tuple[dict, dict]:
    """Train one gender classifier of run `name` (baseline or augmentation), then
    re-estimate its batch-norm statistics: (variables, {train_history, train_seconds})."""
    cc = config.classifier
    method, q = parse_run_name(name)
    train = data["balanced" if method == "balanced" else "biased"]
    extra = repeat_parts(repeat)
    t0 = time.time()
    per_epoch = pipeline.steps_per_epoch(data["biased"]["images"].shape[0], int(cc.batch_size))
    # Within a repeat every run shares the initialisation and batch order,
    # so the table's columns differ only in training data / augmentation.
    state = tools.classifier_state(tools.classifier_optimizer(per_epoch), repeat)
    selection = None
    if method not in BASELINES:
        selection = noise.quantile_selections(maps[method_spec(method)[0]], q)
    state, history = pn.train_classifier(
        tools.classifier_step, state, train["images"], train["gender"], augment_code(method),
        selection, batch_size=int(cc.batch_size), epochs=_epochs_for(config, method),
        seed=_name_seed(config.seed, confounder, "classifier_order", *extra),
        key=run_key(config.seed, confounder, name, "train", *extra))
    variables = pn.recalibrate_batch_stats(
        tools.stats_step, pn.state_variables(state), train["images"], train["gender"],
        augment_code(method), selection, batch_size=int(cc.batch_size),
        passes=int(cc.bn_recalibration_passes),
        seed=_name_seed(config.seed, confounder, "bn_order", *extra),
        key=run_key(config.seed, confounder, name, "bn", *extra))
    return variables, {"train_history": history, "train_seconds": round(time.time() - t0, 1)}


def _evaluate_run(config, confounder: str, job: tuple, data: dict, maps: dict, tools,
                  fps: _Fingerprints, model_dir: Path) -> dict:
    """The result record of one training (job = (run name, repeat)): its model is
    loaded if saved with the same settings, else trained and saved."""
    name, repeat = job
    method, q = parse_run_name(name)
    t0 = time.time()
    model_path = model_dir / repeat_stem(name, repeat)
    variables, meta = load_variables(model_path, tools.classifier_template, fps.train(*job))
    reloaded = variables is not None
    if not reloaded:
        variables, meta = _train_gender_classifier(config, confounder, name, repeat, data,
                                                   maps, tools)
        save_variables(model_path, variables, fps.train(*job), meta)
    test = data["test"]
    predicted = pn.predict_labels(tools.predict, variables, test["images"],
                                  int(config.test.batch_size))
    metrics = fairness.subgroup_metrics(predicted == test["gender"], test["gender"],
                                        test["present"])
    epochs = _epochs_for(config, method)
    per_epoch = pipeline.steps_per_epoch(data["biased"]["images"].shape[0],
                                         int(config.classifier.batch_size))
    _log(f"{confounder} / {repeat_stem(*job)}: accuracy {metrics['accuracy']:.3f} men "
         f"{metrics['men']:.3f} women {metrics['women']:.3f} gap {metrics['gap']:.3f} "
         f"({time.time() - t0:.0f} s)")
    return {"fingerprint": fps.result(*job), "confounder": confounder, "method": method,
            "quantile": q, "repeat": repeat,
            "train_set": "balanced" if method == "balanced" else "biased", "epochs": epochs,
            "steps": epochs * per_epoch, "reloaded_model": reloaded,
            "train_seconds": meta.get("train_seconds"),
            "train_history": meta.get("train_history"), **metrics}


def run_confounder(config, confounder: str, workdir: Path, pools: dict,
                   tools: _Toolkit) -> dict[str, Any]:
    """Everything for one confounder; finished runs (their JSON) are only read back."""
    run_dir, model_dir = workdir / "runs" / confounder, workdir / "models" / confounder
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    subsets = select_subsets(config, confounder, pools["train"], pools["test"],
                             pools["train_rows"], pools["test_rows"])
    fps = _Fingerprints(config, confounder, subsets)
    names = planned_runs(config, confounder)
    repeats = report_lib.num_repeats(config)
    # Repeat-major: a job stopped part-way holds whole repeats of the table.
    jobs = [(name, r) for r in range(repeats) for name in names]
    done = {job: _read_if(run_dir / f"{repeat_stem(*job)}.json", fps.result(*job))
            for job in jobs}
    done = {job: record for job, record in done.items() if record is not None}
    patch_result = _read_if(run_dir / "patch_net.json", fps.patch_result)
    cache = _read_cache(model_dir / "attribution.npz", fps.attribution)
    pending = [job for job in jobs if job not in done]
    out = {"subsets": {k: int(v.size) for k, v in subsets.items()}}
    if pending or patch_result is None or cache is None:
        _log(f"{confounder}: pending runs: "
             f"{', '.join(repeat_stem(*job) for job in pending) or 'none'}")
        data = _render_sets(config, confounder, pools, subsets)
        pvars, history = _patch_net(config, confounder, data, tools,
                                    model_dir / "patch_net", fps.patch)
        if patch_result is None:
            patch_result = _patch_result(config, confounder, data["test"], tools, pvars,
                                         fps.patch_result, history, workdir)
            write_json(run_dir / "patch_net.json", patch_result)
        needs_specific = any(n not in BASELINES and method_spec(parse_run_name(n)[0])[0] ==
                             "specific" for n, _ in pending)
        specific = None
        if cache is None or needs_specific:
            specific, cache = _attribution(config, data["biased"], subsets["biased"], tools,
                                           pvars, fps.attribution,
                                           model_dir / "attribution.npz")
        maps = {"general": cache["general_map"], "specific": specific}
        for job in pending:
            done[job] = _evaluate_run(config, confounder, job, data, maps, tools, fps,
                                      model_dir)
            write_json(run_dir / f"{repeat_stem(*job)}.json", done[job])
    else:
        _log(f"{confounder}: all {len(jobs)} runs done, nothing to train")
    runs = {n: fairness.aggregate_repeats([done[(n, r)] for r in range(repeats)])
            for n in names}
    return {"runs": runs, "patch_net": patch_result, "examples": cache, **out}


def _setup(config, per_confounder: dict) -> dict[str, Any]:
    """What was run, for results.json and the summary."""
    ts, pc, cc = config.train_set, config.patch_net, config.classifier
    per_epoch = int(ts.n_target + ts.n_other_with + ts.n_other_without) // int(cc.batch_size)
    return {
        "target": config.target, "confounders": list(config.confounders),
        "pool": "independent" if config.data.independent else "correlated",
        "resolution": int(config.data.resolution),
        "train_set": {"men_without": int(ts.n_target), "women_with": int(ts.n_other_with),
                      "women_without": int(ts.n_other_without)},
        "test_size": int(config.test.size),
        "patch_net": {"patch_size": int(pc.patch_size), "grid": int(pc.grid),
                      "label": "confounder", "confidence": pc.confidence,
                      "backbone": pc.backbone, "epochs": int(pc.epochs)},
        "classifier_steps": {"plain": int(cc.epochs) * per_epoch,
                             "mask": int(cc.epochs_mask) * per_epoch},
        "quantile": float(config.debias.quantile),
        "subsets": {c: v["subsets"] for c, v in per_confounder.items()},
    }


def _redraw_reliability(config, results: dict, workdir: Path) -> dict[str, str]:
    """The patch nets' reliability diagrams, redrawn from the saved bins if a rerun
    lost one; {figure key: file name}."""
    figures = {}
    for confounder in config.confounders:
        path = workdir / f"reliability_{confounder}.png"
        if not path.exists():
            rel = results[confounder]["patch_net"]["reliability"]
            data = calibration.ReliabilityData(
                np.asarray(rel["bin_edges"]), np.asarray(rel["accuracy"], np.float64),
                np.asarray(rel["mean_confidence"], np.float64), np.asarray(rel["counts"]),
                float(results[confounder]["patch_net"]["ece"]))
            calibration.plot_reliability_diagram(
                data, str(path), title=f"Patch net, {confounder.replace('_', ' ')}")
        figures[f"reliability_{confounder}"] = path.name
    return figures


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


def models_fingerprint(config) -> dict:
    """The fields that decide every trained model of a workdir, in the one scheme of
    faceaudit_jax.workdir: a rerun with other values stops before any work, naming them
    (``--config.overwrite=True`` retrains). Confounders, repeats, sweep quantiles and the
    test set are left out: changing them only adds or re-scores runs, each cached under
    its own settings hash (``_Fingerprints``)."""
    fields = workdir_lib.config_fields(config, ["seed", "target", "train_set", "patch_net",
                                                "classifier", "debias.noise_std",
                                                "debias.mask_fill"])
    fields.pop("classifier.repeats", None)
    fields.update(workdir_lib.config_fields({"data": sources.fingerprint_fields(config.data)},
                                            ["data"]))
    return fields


def run(config, workdir) -> dict[str, Any]:
    """The whole experiment; returns the results dict also written to results.json."""
    validate_config(config)
    workdir = Path(workdir)
    workdir_lib.check_fingerprint(workdir / "models", models_fingerprint(config),
                                  overwrite=workdir_lib.overwrite_requested(config))
    gitignore = workdir / "models" / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n!.gitignore\n")
    t_start = time.time()
    pools = _pools(config)
    tools = _Toolkit(config)  # cheap: nothing compiles until a model is trained or run
    per_confounder = {c: run_confounder(config, c, workdir, pools, tools)
                      for c in config.confounders}
    results = {c: {"runs": v["runs"], "patch_net": v["patch_net"]}
               for c, v in per_confounder.items()}
    out = {"experiment": "debias_noise", "setup": _setup(config, per_confounder),
           **report_lib.tables(config, results), "results": results,
           "examples": {c: v["examples"] for c, v in per_confounder.items()}}
    figures = report_lib.write_report(config, out, workdir, registry.readme_link_prefix(workdir))
    figures.update(_redraw_reliability(config, results, workdir))
    del out["examples"]
    out = {"experiment": out["experiment"], "setup": out["setup"], "table1": out["table1"],
           "sweep": out["sweep"], "comparison": out["comparison"], "results": results,
           "figures": figures,
           "paper": {"blond_hair_gap": report_lib.PAPER_BLOND_HAIR_GAP,
                     "quantile": report_lib.PAPER_QUANTILE},
           "seconds_this_invocation": round(time.time() - t_start, 1),
           # Classifier training time summed over the runs (from when each was trained).
           "train_seconds_total": round(sum((r.get("train_seconds") or 0.0)
                                            for c in results
                                            for r in results[c]["runs"].values()), 1)}
    write_json(workdir / "results.json", out)
    _log(f"done in {time.time() - t_start:.0f} s; results in {workdir}")
    return out
