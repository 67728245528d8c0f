"""FaceX audit of an existing classifier: no training, just explain and report.

``run(config, workdir)`` loads the model ``config.model`` names (a train.py run
directory or a torchvision state_dict, ``models.sources``), reads the test
images of ``config.data`` (``data.sources.build_split``), balances them over
``target`` x ``confounders``, explains the model there with ``summary.audit``
and writes ``report.md``, ``results.json`` (``ior``: region -> IoR,
``ranking``, and under ``extra`` the model, accuracies and the ranking position
of each confounder) and the figures straight into ``workdir``.

Every check (model file vs ``model.arch`` / outputs, data root and layout,
target and confounders annotated, parse maps or a parser, no empty test
cell) runs in ``prepare`` before any image is explained.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Optional

import ml_collections
import numpy as np

from faceaudit_jax import classifiers, distributed, parsing, regions
from faceaudit_jax.data import sampling
from faceaudit_jax.data import sources as data_sources
from faceaudit_jax.metrics import fairness
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.summary import audit as audit_lib
from faceaudit_jax.viz import figures


@dataclasses.dataclass
class AuditPlan:
    """Everything an audit needs, checked: the model, the test images, the explained source."""

    clf: model_sources.Classifier
    source: object          # test images at the data resolution
    explain_source: object  # the same images at explain.resolution
    indices: np.ndarray     # the audited test images (indices into source)
    target: str
    confounders: list
    confounder_values: Optional[tuple]  # per confounder, the value that goes with target = 1; None: unknown
    parser: object          # explain.parser's network, or None: the data set's own masks


def confounders_of(config) -> list[str]:
    conf = config.get("confounders", ()) or ()
    return [conf] if isinstance(conf, str) else [str(c) for c in conf]


def select_test_images(attrs: np.ndarray, target: str, confounders, size: int, seed: int,
                       where: str) -> np.ndarray:
    """Positions in ``attrs`` of the audited images: balanced over target x confounders.

    ``size`` is capped at, and 0 means, the largest balanced subset. Raises
    ValueError naming ``where`` (the data folder) when a cell is empty.
    """
    names = [target] + list(confounders)
    values = attrs[:, regions.attribute_ids(names)]
    known = np.all(values >= 0, axis=1)
    counts = {combo: int((known & np.all(values == np.array(combo), axis=1)).sum())
              for combo in np.ndindex(*([2] * len(names)))}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        cells = ", ".join("(" + ", ".join(f"{n}={v}" for n, v in zip(names, c)) + ")" for c in empty)
        raise ValueError(f"{where}: the test set has no image in cell(s) {cells}; an audit balanced "
                         f"over {' x '.join(names)} needs every cell (set confounders=() to balance "
                         "the target alone, or use a larger test set)")
    largest = min(counts.values()) * len(counts)
    if size > largest:
        # A real folder is what it is: audit every balanced image it has rather than refuse.
        print(f"[audit] {where}: test.size={size} capped at {largest}, the largest subset "
              f"balanced over {' x '.join(names)}", flush=True)
        size = largest
    return sampling.balanced_subset(attrs, target, list(confounders), size, seed)


def prepare(config) -> AuditPlan:
    """Load the model and the test images and check them all, before any explaining."""
    target = str(config.target)
    regions.attribute_id(target)
    confs = confounders_of(config)
    regions.attribute_ids(confs)
    if target in confs:
        raise ValueError(f"target {target!r} is also listed in confounders")
    clf = model_sources.load_classifier(config.model, name="audited")
    source, pool = data_sources.build_split(config.data, "test")
    data_sources.require_attributes(source, [target] + confs)
    parser = parsing.parser_from_config(config.explain)
    if parser is None:
        data_sources.require_parse(source, "FaceX's region IoR (explain.parser='')")
    recorded = model_sources.trained_resolution(clf)
    if recorded and recorded != int(source.resolution):
        warnings.warn(f"{clf.workdir} was trained at {recorded} px; data.resolution="
                      f"{source.resolution} feeds it images of another size (set "
                      f"--config.data.resolution={recorded} to audit it as trained)")
    attrs = source.attributes(pool)["attrs"]
    chosen = select_test_images(attrs, target, confs, int(config.test.size), int(config.seed),
                                f"test set ({data_sources.describe(source)})")
    indices = np.asarray(pool)[chosen]
    values = None
    if confs:
        bias = ml_collections.ConfigDict({"target": target, "confounders": tuple(confs),
                                          "confounder_values": config.get("confounder_values", None)})
        try:
            values = data_sources.bias_direction(bias, source, pool)
        except ValueError:
            if config.get("confounder_values", None) is not None:
                raise
            # A test set without a target x confounder link (e.g. a balanced folder) gives
            # no direction: per-cell accuracies are still reported, aligned/conflicting not.
            values = None
    return AuditPlan(clf, source, audit_lib.at_explain_resolution(source, config.explain), indices, target, confs, values,
                     parser)


def run(config, workdir: str) -> dict:
    """Audit the configured model; writes report.md, results.json and figures into ``workdir``."""
    t0 = time.perf_counter()
    plan = prepare(config)
    work = Path(workdir)
    batch_size = int(config.test.batch_size)
    print(f"[audit] {plan.clf.arch} from {plan.clf.workdir} (output {plan.clf.output_index}), "
          f"{plan.indices.size} test images of {config.data.source}", flush=True)
    test_attrs = plan.source.attributes(plan.indices)["attrs"]
    logits = classifiers.predict_logits(plan.clf, plan.source, plan.indices, batch_size)
    if plan.confounders:
        known = plan.confounder_values is not None
        values = plan.confounder_values if known else (1,) * len(plan.confounders)
        accuracy = fairness.bias_group_report(logits, test_attrs, plan.target, plan.confounders, values)
        if known:
            classifiers.print_group_report("audited", accuracy)
        else:  # the placeholder direction's aligned/conflicting split means nothing: drop it
            for key in ("aligned_accuracy", "conflicting_accuracy", "gap"):
                accuracy.pop(key)
            print(f"[audited] accuracy {accuracy['accuracy']:.3f}; per cell: " + ", ".join(
                f"{k} {v:.3f}" for k, v in accuracy.items() if "=" in k), flush=True)
    else:
        truth = test_attrs[:, regions.attribute_id(plan.target)] == 1
        accuracy = {"accuracy": float(((logits > 0) == truth).mean()), "num_images": int(truth.size)}
        print(f"[audited] accuracy {accuracy['accuracy']:.3f}", flush=True)
    result = audit_lib.audit(plan.clf, plan.explain_source, plan.indices, plan.target, config.explain,
                         batch_size, desc="explain", parser=plan.parser)
    rps = audit_lib.confounder_rp(result.ior, plan.confounders)
    # Process 0 writes the report; every process gets its payload.
    payload = distributed.on_primary(
        figures.write_audit_report, work, result, plan.explain_source, plan.indices,
        title=f"FaceX IoR: {plan.target} classifier (audited)",
        patch_size=int(config.explain.patch_size), extra={
            "model": model_sources.describe(plan.clf, config.model),
            "data": {"source": str(config.data.source), "root": str(config.data.get("root", "")),
                     "test_root": str(config.data.get("test_root", "")),
                     "resolution": int(plan.source.resolution),
                     "explained_resolution": int(plan.explain_source.resolution)},
            "target": plan.target, "confounders": plan.confounders, "confounder_rp": rps,
            "confounder_values": None if plan.confounder_values is None else list(plan.confounder_values),
            "group_accuracy": accuracy, "seconds": time.perf_counter() - t0})
    top5 = ", ".join(f"{r['rank']}. {r['region']} ({r['ior']:.3f})" for r in payload["ranking"][:5])
    print(f"[audit] FaceX ranking: {top5}", flush=True)
    if plan.confounders:
        print(f"[audit] ranking position of {', '.join(plan.confounders)}: {rps}", flush=True)
    print(f"[audit] report: {work / 'report.md'}", flush=True)
    return payload
