"""Binary attribute CAMs: AFFACT-u vs AFFACT-b ("biased binary attribute
classifiers ignore the majority classes"), on synthetic faces or CelebA.

``run(config, workdir)``: build the data (synthetic faces with CelebA-like
imbalance, or CelebA from ``data.root``; test faces from disjoint identities,
only frontal ones explained), train AFFACT-u (plain Euclidean loss, or BCE)
and AFFACT-b (class-balanced Euclidean loss, eq. 5-6) on the same batches
(both: ``multi_attribute``), explain both in one streaming pass
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

import json
import time
import warnings
from typing import Sequence
from pathlib import Path

from faceaudit_jax import regions
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.explain import attribute_masks as masks_lib
from faceaudit_jax.explain.attribute_audit import cam_pairs, explain_test_set
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.multi_attribute import (
    TrainedModel, attribute_names, build_source, model_losses, split_indices,
    train_models, training_positive_share)
from faceaudit_jax.summary import attribute_summary as summary_lib
from faceaudit_jax.summary.attribute_summary import METHOD_LABELS, MODELS
from faceaudit_jax.viz import attribute_figures
from faceaudit_jax.workdir import write_json


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
