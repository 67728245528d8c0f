"""Binary attribute CAMs: AFFACT-u vs AFFACT-b ("biased binary attribute
classifiers ignore the majority classes"), on synthetic faces or CelebA.

``run(config, workdir)``: build the data (synthetic faces with CelebA-like
imbalance, or CelebA from ``data.root``; test faces from disjoint identities,
only frontal ones explained), train AFFACT-u (plain Euclidean loss, or BCE)
and AFFACT-b (class-balanced Euclidean loss, eq. 5-6) on the same batches
through ``train_lib.fit``, explain both in one streaming pass
(``explain.attribute_audit``), reduce (``summary.attribute_summary``) and
write ``results.json``, the Markdown tables (``report``), the figures
(``viz.attribute_figures``) and ``summary.md``. ``write_markdown(workdir)``
re-lays out the Markdown from results.json alone.

Outputs, masks ("parse" regions or the paper's rectangles) and how this run
differs from the paper: docs/deviations_attribute_cams.md.

Positive iff z >= 0 everywhere (predictions, the |z| target's sign and the
split of the CAM sums), as in ``explain.cams.binary_target``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import losses, regions, train_lib
from faceaudit_jax.data import celeba, pipeline, sources
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.explain import attribute_masks as masks_lib
from faceaudit_jax.explain.attribute_audit import cam_pairs, explain_test_set
from faceaudit_jax.metrics import fairness
from faceaudit_jax.models import build_model
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.summary import attribute_summary as summary_lib
from faceaudit_jax.summary.attribute_summary import METHOD_LABELS, MODELS
from faceaudit_jax.viz import attribute_figures
from faceaudit_jax.workdir import check_fingerprint, overwrite_requested, write_json

UNBALANCED_LOSSES = losses.MULTI_ATTRIBUTE_UNBALANCED_LOSSES
DATA_SOURCES = ("synthetic", "celeba")


# ----------------------------------------------------------------------------- data


def build_source(data_cfg):
    """``data.sources.build_source`` for the kinds with landmarks (``DATA_SOURCES``): the
    frontal filter needs them."""
    if data_cfg.source not in DATA_SOURCES:
        raise ValueError(f"data.source={data_cfg.source!r}; expected one of {DATA_SOURCES} (the "
                         "frontal filter needs 5-point landmarks)")
    if data_cfg.get("test_root", ""):
        raise ValueError(f"data.test_root={data_cfg.test_root!r}: this experiment trains and tests "
                         "on one data set's published split; leave data.test_root empty")
    source = sources.build_source(data_cfg)
    if source.name == "celeba" and source.reader.landmarks is None:
        raise FileNotFoundError(
            f"missing file: {os.path.join(source.root, celeba.CELEBA_LANDMARK_FILE)} (the frontal "
            "filter needs the landmarks)")
    return source


def attribute_names(data_cfg, train_attrs: np.ndarray) -> tuple[str, ...]:
    """The network's outputs, in CelebA order.

    ``data_cfg.attributes`` empty: every attribute with a known target in the
    training set (synthetic faces: the 35 the renderer draws; CelebA: all 40);
    else the tuple of names given. ``train_attrs`` is int8 [N, 40].
    """
    spec = data_cfg.attributes
    if isinstance(spec, str):
        raise ValueError(
            f"data.attributes={spec!r}; expected a tuple of attribute names, or () for every "
            "attribute with known training targets")
    names = tuple(spec)
    if names:
        regions.attribute_ids(names)  # validates every name
        return names
    known = (np.asarray(train_attrs) >= 0).any(axis=0)
    if not known.any():
        raise ValueError("the training set has no known attribute targets (all -1)")
    return tuple(n for n, k in zip(regions.ATTRIBUTES, known) if k)


def split_indices(config, source) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, test indices before the frontal filter)."""
    train_size, test_size = int(config.train.size), int(config.test.size)
    if source.name != "synthetic":
        _, train = sources.build_split(config.data, "train")
        _, test = sources.build_split(config.data, "test")
        return (train[:train_size] if train_size > 0 else train,
                test[:test_size] if test_size > 0 else test)
    if train_size < 1 or test_size < 1:
        raise ValueError(
            f"train.size={train_size} and test.size={test_size}; synthetic data needs both >= 1")
    offset = int(config.data.test_offset)
    if offset < train_size:
        raise ValueError(
            f"data.test_offset={offset} overlaps the training indices 0..{train_size - 1}; "
            "expected test_offset >= train.size")
    return (np.arange(train_size, dtype=np.int64),
            np.arange(offset, offset + test_size, dtype=np.int64))


def training_positive_share(train_attrs: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """p_m [A] of the training set (NaN for an attribute without known targets)."""
    return fairness.positive_share(np.asarray(train_attrs)[:, regions.attribute_ids(names)],
                                   names)

# ----------------------------------------------------------------------------- training


def label_transform(names: Sequence[str], weights: tuple[np.ndarray, np.ndarray]
                    ) -> Callable[[dict], dict]:
    """Batch -> {image, label [B, A], label_mask [B, A], weight_positive [A], weight_negative [A]}."""
    add_labels = pipeline.multi_attribute_label_fn(names)
    w_pos, w_neg = (jnp.asarray(w, jnp.float32) for w in weights)

    def transform(batch):
        batch = add_labels(batch)
        return {"image": batch["image"], "label": batch["label"],
                "label_mask": batch["label_mask"], "weight_positive": w_pos,
                "weight_negative": w_neg}

    return transform


@dataclasses.dataclass
class TrainedModel:
    name: str
    model: Any
    variables: dict
    num_steps: int
    workdir: str


def _fingerprint(config, names: Sequence[str], loss: str) -> dict:
    """What a checkpoint depends on (JSON-normalised); a mismatch means another model."""
    train = {k: v for k, v in config.train.to_dict().items()
             if k not in ("ckpt_every", "log_every")}
    fingerprint = {
        "model": str(config.model.name), "attributes": list(names), "loss": loss,
        "source": str(config.data.source), "resolution": int(config.data.resolution),
        "data_seed": int(config.data.seed), "independent": bool(config.data.independent),
        "images_per_identity": int(config.data.images_per_identity),
        "seed": int(config.seed), "train": train,
    }
    return json.loads(json.dumps(fingerprint))








def _num_steps(config, train_idx: np.ndarray) -> int:
    num_steps = (pipeline.steps_per_epoch(train_idx.size, int(config.train.batch_size))
                 * int(config.train.num_epochs))
    if num_steps < 1:
        raise ValueError(f"train.num_epochs={config.train.num_epochs}; expected >= 1")
    return num_steps


def train_model(config, workdir: str, name: str, source, train_idx: np.ndarray,
                names: Sequence[str], loss: str, p_train: np.ndarray,
                tx: Optional[Any] = None) -> TrainedModel:
    """Train (or resume, or reload when finished) one multi-attribute model.

    ``tx``: the optax transformation; pass the same object for several models
    of one architecture and they share one compiled train step (the optimiser
    is part of the train state's static structure).
    """
    models_dir = Path(workdir) / "models"
    workdir_lib.ignore_models_folder(models_dir)
    run_dir = models_dir / name
    check_fingerprint(run_dir, _fingerprint(config, names, loss),
                      overwrite=overwrite_requested(config))
    model = build_model(str(config.model.name), len(names))
    num_steps = _num_steps(config, train_idx)
    if tx is None:
        tx = train_lib.make_optimizer(config.train, num_steps)
    # The same key and batch order for both models: they differ only by the loss.
    state = train_lib.create_train_state(
        model, jax.random.PRNGKey(int(config.seed)), int(config.data.resolution), tx)
    weights = losses.multi_attribute_class_weights(loss, p_train)
    batch_fn = pipeline.step_batch_fn(source, train_idx, int(config.train.batch_size),
                                      int(config.seed), label_transform(names, weights))
    state = train_lib.fit(
        model, state, batch_fn, num_steps, str(run_dir),
        loss_fn=losses.multi_attribute_loss_fn(loss),
        ckpt_every=int(config.train.ckpt_every), log_every=int(config.train.log_every),
        desc=f"train {name}")
    # model.json: the run dir is then a model.source=checkpoint for this and other experiments.
    model_sources.record_classifier(run_dir, arch=str(config.model.name), outputs=names,
                                    resolution=int(config.data.resolution),
                                    data_source=str(config.data.source))
    return TrainedModel(name, model, train_lib.state_variables(state), num_steps, str(run_dir))


def train_models(config, workdir: str, source, train_idx: np.ndarray, names: Sequence[str],
                 p_train: np.ndarray) -> list[TrainedModel]:
    """AFFACT-u and AFFACT-b (``MODELS`` order), sharing one optimiser recipe object."""
    tx = train_lib.make_optimizer(config.train, _num_steps(config, train_idx))
    return [train_model(config, workdir, name, source, train_idx, names, loss, p_train, tx)
            for name, loss in model_losses(config).items()]


def model_losses(config) -> dict[str, str]:
    kind = str(config.train.unbalanced_loss)
    if kind not in UNBALANCED_LOSSES:
        raise ValueError(f"train.unbalanced_loss={kind!r}; expected one of {UNBALANCED_LOSSES}")
    return {"affact_u": kind, "affact_b": "balanced"}


# ----------------------------------------------------------------------------- report


def report(results: dict, link_prefix: str = "") -> dict[str, str]:
    """{file name: Markdown} for table1.md, table2.md, table_targets.md and summary.md.

    Pure: ``results`` is the run's results dict, or the same read back from
    results.json (NaN written as null; both print as "n/a").
    """
    setup = results["setup"]
    method_label = setup["main_method_label"]
    # The summary's key rows: the figure attributes (those of the Figure 4 table).
    key_attributes = setup.get("figure_attributes") or list(
        dict.fromkeys(row["attribute"] for row in results["targets"]))
    return {
        "table1.md": summary_lib.table1_markdown(results["table1"], method_label),
        "table2.md": summary_lib.table2_markdown(results["table2"], setup["methods"]),
        "table_targets.md": summary_lib.target_markdown(results["targets"], method_label),
        "summary.md": (
            summary_lib.summary_markdown(setup, results["table1"], results["finding"],
                                         key_attributes, link_prefix)
            if results["finding"] is not None else
            summary_lib.loaded_model_summary_markdown(setup, results["table1"], key_attributes,
                                                      link_prefix)),
    }


markdown_outputs = report  # the earlier name


def _write_report(results: dict, out: Path) -> str:
    for filename, text in report(results, workdir_lib.readme_link_prefix(out)).items():
        (out / filename).write_text(text)
    return (out / "summary.md").read_text()


def write_markdown(workdir: str) -> str:
    """Rewrite the Markdown tables and summary.md from ``workdir/results.json``.

    For rewording the reports without re-running anything (the finding's
    verdict is recomputed and stored too); returns the new summary.
    """
    out = Path(workdir)
    path = out / "results.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist; run the experiment first")
    results = json.loads(path.read_text())
    if results["finding"] is not None:
        results["finding"]["verdict"] = summary_lib.finding_verdict(results["finding"])
    write_json(path, results)
    return _write_report(results, out)


# ----------------------------------------------------------------------------- the job


def _source_label(config) -> str:
    if config.data.source == "celeba":
        return "CelebA training images"
    kind = "independent-attribute" if config.data.independent else "CelebA-like correlated"
    return f"{kind} synthetic faces"


def train(config, workdir: str) -> dict[str, TrainedModel]:
    """Train (or reload) AFFACT-u and AFFACT-b; returns {name: TrainedModel}."""
    if model_sources.model_source(config.model) != "train":
        raise ValueError(f"model.source={config.model.source!r}: there is nothing to train; "
                         "explain.py explains the loaded model")
    source = build_source(config.data)
    train_idx, _ = split_indices(config, source)
    train_attrs = source.attributes(train_idx)["attrs"]
    names = attribute_names(config.data, train_attrs)
    p_train = training_positive_share(train_attrs, names)
    return {m.name: m for m in train_models(config, workdir, source, train_idx, names, p_train)}


def _check_attribute_fields(config, names: Sequence[str]) -> None:
    for field in ("table2_attributes", "figure_attributes"):
        missing = [a for a in config.explain[field] if a not in names]
        if missing:
            raise ValueError(
                f"explain.{field} names {missing}, which the networks do not predict; expected "
                f"some of: {', '.join(names)}")


def _explain_and_reduce(models, source, test_idx, names, pairs, defined, config):
    """(evaluations, reports, frontal counts, distinct RuntimeWarnings as text)."""
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", RuntimeWarning)
        evaluations, counts = explain_test_set(models, source, test_idx, names, pairs, config)
        reports = {name: summary_lib.model_report(evaluations[name], names, pairs, defined)
                   for name in evaluations}
    for record in records:
        message = f"{record.category.__name__}: {record.message}"
        if message not in caught:
            caught.append(message)
    return evaluations, reports, counts, caught


def _setup(config, names, pairs, defined, train_idx, test_idx, counts, models, seconds) -> dict:
    main_method = str(config.explain.main_method)
    trained = isinstance(models[0], TrainedModel)
    training = {
        "batch_size": int(config.train.batch_size), "num_epochs": int(config.train.num_epochs),
        "num_steps": models[0].num_steps, "unbalanced_loss": model_losses(config)["affact_u"],
        "balanced_loss": "balanced_euclidean (eq. 5), weights eq. 6 from the training p_m",
    } if trained else {"model_source": model_sources.describe(models[0], config.model)}
    return {
        "source": str(config.data.source), "source_label": _source_label(config),
        "independent": bool(config.data.independent), "resolution": int(config.data.resolution),
        "model": str(config.model.name) if trained else models[0].arch,
        "attributes": list(names), "num_attributes": len(names),
        "train_size": int(train_idx.size), **training,
        "methods": list(config.explain.methods), "main_method": main_method,
        "main_method_label": METHOD_LABELS.get(main_method, main_method),
        "pairs": [f"{m}/{t}" for m, t in pairs], "mask_source": str(config.explain.mask_source),
        "table2_attributes": list(config.explain.table2_attributes),
        "figure_attributes": list(config.explain.figure_attributes),
        "mask_defined": {n: bool(d) for n, d in zip(names, defined)},
        "test": {**counts, "rendered": int(test_idx.size),
                 "frontal_max_ratio": float(config.test.frontal_max_ratio)},
        "seconds": seconds,
    }


def _figures(out: Path, config, evaluations, reports, pairs, rows1, names) -> list[str]:
    main_method, methods = str(config.explain.main_method), tuple(config.explain.methods)
    figure_attributes = tuple(config.explain.figure_attributes)
    return [
        attribute_figures.figure2(out / "figure2_mean_cams.png", evaluations, reports, pairs,
                                  main_method, figure_attributes, names),
        attribute_figures.figure3(out / "figure3_cam_methods.png", evaluations, reports, pairs,
                                  methods, tuple(config.explain.table2_attributes), names),
        attribute_figures.figure4(out / "figure4_targets.png", evaluations, reports, pairs,
                                  main_method, figure_attributes, names),
        attribute_figures.figure_energy(out / "figure_energy.png", rows1,
                                        METHOD_LABELS.get(main_method, main_method)),
    ]


def _tables(config, p_train, reports, names, defined) -> dict:
    main_method = str(config.explain.main_method)
    key = f"{main_method}/predicted"
    return {
        "table1": summary_lib.table1_rows(p_train, reports, key, names, defined),
        "table2": summary_lib.table2_rows(reports, tuple(config.explain.methods),
                                          tuple(config.explain.table2_attributes), names),
        "targets": summary_lib.target_rows(reports, main_method,
                                           tuple(config.explain.figure_attributes), names),
        "finding": summary_lib.majority_class_finding(
            p_train, reports["affact_u"], reports["affact_b"], key, defined, names,
            float(config.explain.min_imbalance)) if set(reports) == set(MODELS) else None,
    }


def load_model(config):
    """(classifier, the attribute of each output) for model.source checkpoint / torchvision.

    Every check (file, architecture vs ``model.name``, outputs vs
    ``model.outputs``, attribute names) runs here, before any data is read.
    """
    clf = model_sources.load_classifier(config.model, name="audited")
    names = model_sources.multi_attribute_outputs(config.model, clf)
    regions.attribute_ids(names)  # an unknown attribute name raises, naming it
    return clf, names


def _models(config, workdir, source, train_idx, names, p_train, loaded):
    """(models to explain, {name: what results.json says about how it was made})."""
    if loaded is not None:
        return [loaded], {loaded.name: {"source": model_sources.model_source(config.model)}}
    models = train_models(config, workdir, source, train_idx, names, p_train)
    return models, {name: {"loss": loss} for name, loss in model_losses(config).items()}


def run(config, workdir: str) -> dict:
    """Train both models (or load one: model.source), explain on frontal test faces, write all."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded, loaded_names = (None, None)
    if model_sources.model_source(config.model) != "train":
        loaded, loaded_names = load_model(config)
    source = build_source(config.data)
    train_idx, test_idx = split_indices(config, source)
    train_attrs = source.attributes(train_idx)["attrs"]
    names = loaded_names or attribute_names(config.data, train_attrs)
    pairs = cam_pairs(tuple(config.explain.methods), str(config.explain.main_method))
    _check_attribute_fields(config, names)
    defined = masks_lib.mask_defined(names, str(config.explain.mask_source))
    model_losses(config)  # a bad train.unbalanced_loss fails before training

    p_train = training_positive_share(train_attrs, names)
    models, made = _models(config, workdir, source, train_idx, names, p_train, loaded)
    trained_at = time.perf_counter()
    evaluations, reports, counts, caught = _explain_and_reduce(
        models, source, test_idx, names, pairs, defined, config)
    seconds = {"train": round(trained_at - started, 1),
               "explain": round(time.perf_counter() - trained_at, 1)}

    tables = _tables(config, p_train, reports, names, defined)
    results = {
        "experiment": "attribute_cams",
        "setup": _setup(config, names, pairs, defined, train_idx, test_idx, counts, models,
                        seconds),
        "p_train": {n: float(p) for n, p in zip(names, p_train)},
        "models": {name: {**made[name], **summary_lib.model_json(reports[name], names)} for name in made},
        **tables,
        "figures": _figures(out, config, evaluations, reports, pairs, tables["table1"], names),
        "warnings": caught,
    }
    write_json(out / "results.json", results)
    summary = _write_report(results, out)
    for name, model in results["models"].items():
        print(f"[{summary_lib.model_label(name)}] mean accuracy {model['mean_accuracy']:.3f}, "
              f"mean balanced accuracy {model['mean_balanced_accuracy']:.3f}", flush=True)
    print(summary, flush=True)
    return results
