"""FaceX (Sarridis et al.): summary explanations of a face-attribute classifier.

``run`` is the project's main job: train (or load) a classifier with an
injected shortcut, explain it with CAMs over a balanced test set, reduce the
maps to region IoR (eq. 3-4) and top patches (eq. 6-7) with streaming
accumulators, and write the report. ``train`` (train.py) stops after training
and testing; ``experiments.audit`` explains an existing model with the same
``summary.audit`` evaluator and report writer (``viz.figures.write_audit_report``).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from faceaudit_jax import classifiers, distributed, parsing
from faceaudit_jax.workdir import readme_link_prefix, write_json
from faceaudit_jax.metrics import fairness
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.summary import audit as audit_lib
from faceaudit_jax.viz import figures


def write_audit_report(out_dir, name: str, result: audit_lib.AuditResult, source,
                       indices: np.ndarray, config, extra: dict) -> dict:
    """The audit's figures, report.md and results.json in ``out_dir`` (``viz.figures.write_audit_report``)."""
    return figures.write_audit_report(
        out_dir, result, source, indices, title=f"FaceX IoR: {config.bias.target} classifier ({name})",
        patch_size=int(config.explain.patch_size), extra=extra)


def train_and_test(config, workdir: str) -> dict:
    """Biased model (and balanced baseline): train, test per bias group, write classifier_results.json.

    Returns {"results": the per-model group reports, "models": name -> classifier,
    "subsets": ``classifiers.make_subsets``, "source": the test source (the images
    FaceX explains), "train_source", "train_seconds": name -> seconds spent obtaining
    the model (training, or a few seconds where a finished run dir is reloaded)}.
    """
    if model_sources.model_source(config.model) != "train":
        raise ValueError(f"model.source={config.model.source!r}: train.py trains a model "
                         "(model.source='train'); audit an existing one with explain.py "
                         "--config configs/audit.py")
    subsets = classifiers.make_subsets(config)
    source, test_source = subsets["train_source"], subsets["test_source"]
    confs = classifiers.confounder_list(config.bias)
    values = subsets["confounder_values"]
    test_attrs = test_source.attributes(subsets["test"])["attrs"]
    results = {"target": config.bias.target, "confounders": confs, "corr": float(config.bias.corr),
               "confounder_values": list(values)}
    if subsets["train_size"] != int(config.train.size):  # capped at what a real folder holds
        results["train_size"] = subsets["train_size"]
    models, train_seconds = {}, {}
    for name in ["biased"] + (["balanced"] if config.train.get("baseline", True) else []):
        t0 = time.perf_counter()
        clf = classifiers.train_classifier(config, workdir, subsets[name], source, name)
        train_seconds[name] = round(time.perf_counter() - t0, 1)
        logits = classifiers.predict_logits(clf, test_source, subsets["test"], int(config.test.batch_size))
        results[name] = fairness.bias_group_report(logits, test_attrs, config.bias.target, confs, values)
        classifiers.print_group_report(name, results[name])
        models[name] = clf
    distributed.on_primary(write_json, Path(workdir) / "classifier_results.json", results)
    return {"results": results, "models": models, "subsets": subsets, "source": test_source,
            "train_source": source, "train_seconds": train_seconds}


def train(config, workdir: str) -> dict:
    """train.py for the main job: the biased classifier (and baseline), tested, not explained.

    Each model's run directory (``workdir/biased``, ``workdir/balanced``) is what
    ``configs/audit.py`` takes as ``model.path`` (``model.source=checkpoint``).
    """
    if config.get("experiment", "facex") != "facex":
        raise ValueError(f"experiment {config.experiment!r} has no separate training step; "
                         "use explain.py to run it whole")
    return train_and_test(config, workdir)


def run(config, workdir: str) -> dict:
    """The main job: biased (and baseline) classifier, FaceX audit, report."""
    work = Path(workdir)
    t0 = time.perf_counter()
    audit_lib.check_explain_settings(config.explain, int(config.data.resolution),
                                     config.model.name)
    # train_and_test refuses model.source != "train" with a pointer to configs/audit.py.
    trained = train_and_test(config, workdir)
    source, subsets = trained["source"], trained["subsets"]
    confs = classifiers.confounder_list(config.bias)
    xsource = audit_lib.at_explain_resolution(source, config.explain)
    summary = {"classifier": trained["results"], "train_seconds": trained["train_seconds"]}
    parser = parsing.parser_from_config(config.explain)
    for name, clf in trained["models"].items():
        result = audit_lib.audit(clf, xsource, subsets["test"], config.bias.target, config.explain,
                       int(config.test.batch_size), desc=f"explain {name}", parser=parser)
        train_acc = trained["results"][name]["accuracy"]
        if result.accuracy < train_acc - 0.05:
            warnings.warn(
                f"{name}: accuracy at the explained resolution {xsource.resolution} is "
                f"{result.accuracy:.3f}, below {train_acc:.3f} at the training resolution "
                f"{source.resolution}; its maps explain a model that no longer works as trained")
        rps = audit_lib.confounder_rp(result.ior, confs)
        # Process 0 writes the report; every process gets its payload.
        payload = distributed.on_primary(write_audit_report, work / f"report_{name}", name, result, xsource, subsets["test"], config, {
            "model": name, "target": config.bias.target, "confounders": confs,
            "confounder_rp": rps, "group_accuracy": trained["results"][name]})
        summary[name] = {"confounder_rp": rps, "ranking": payload["ranking"][:5],
                         "accuracy_at_explained_resolution": result.accuracy}
        top5 = ", ".join(f"{r['rank']}. {r['region']} ({r['ior']:.3f})" for r in payload["ranking"][:5])
        print(f"[{name}] FaceX ranking: {top5}", flush=True)
        print(f"[{name}] ranking position of {', '.join(confs)}: {rps} "
              f"(report: {work / f'report_{name}' / 'report.md'})", flush=True)
    distributed.on_primary(_write_summary, config, work, summary, time.perf_counter() - t0)
    return summary


def _write_summary(config, work: Path, summary: dict, elapsed: float) -> None:
    write_json(work / "summary.json", summary)
    (work / "summary.md").write_text(summary_markdown(config, summary, elapsed=elapsed,
                                                      link_prefix=readme_link_prefix(work)))


def summary_markdown(config, summary: dict, elapsed: float, link_prefix: str = "") -> str:
    """The README fragment for the main job: group accuracies and the FaceX ranking.

    ``link_prefix`` goes before the heatmap's path inside the workdir (see
    ``workdir_lib.readme_link_prefix``): "" links relative to the workdir.
    """
    confs = ", ".join(classifiers.confounder_list(config.bias))
    baseline = "balanced" in summary
    num_test = summary["classifier"]["biased"]["num_images"]
    data = ("synthetic faces" if config.data.source == "synthetic"
            else f"{config.data.source} images from data.root")
    lines = [
        "### Main job: FaceX audit of a shortcut (`configs/facex.py`)",
        "",
        f"{config.bias.target} classifier (`{config.model.name}`, {data}, {config.data.resolution} px, "
        f"{summary['classifier'].get('train_size', config.train.size)} training images x {config.train.num_epochs} epochs) with a "
        f"{config.bias.corr} {config.bias.target} x {confs} link"
        + (f", vs the same architecture on a same-size subset balanced over "
           f"{config.bias.target} x {confs}" if baseline else "")
        + f"; test set balanced over the cells of {config.bias.target} x {confs} "
        f"({num_test} images, disjoint identities). "
        f"This run (training, testing, explaining, reports): {elapsed / 60:.1f} min wall on "
        f"{os.cpu_count()} CPU cores ({jax.default_backend()}), of which obtaining the models took "
        + ", ".join(f"{s / 60:.1f} min ({n})" for n, s in summary.get("train_seconds", {}).items())
        + " (a model already trained in the workdir with the same settings is reloaded, "
        "not retrained).",
        "",
        "| model | accuracy | bias-aligned | bias-conflicting | gap | RP of confounder | top-3 regions |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in ("biased", "balanced"):
        if name not in summary:
            continue
        g = summary["classifier"][name]
        top3 = ", ".join(r["region"] for r in summary[name]["ranking"][:3])
        rps = ", ".join(str(r) for r in summary[name]["confounder_rp"])
        lines.append(f"| {name} | {g['accuracy']:.3f} | {g['aligned_accuracy']:.3f} | "
                     f"{g['conflicting_accuracy']:.3f} | {g['gap']:.3f} | {rps} | {top3} |")
    lines += ["", f"![prototype heatmap of the biased model]({link_prefix}report_biased/prototype_heatmap.png)"]
    return "\n".join(lines) + "\n"
