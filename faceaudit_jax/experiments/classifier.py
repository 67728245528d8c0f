"""Train a binary attribute classifier on a (biased) subset and test it per bias group.

The building block of the bias experiments: FaceX's audit, its tables, and
``train.py``. A run trains the biased model (target y, confounders a at the
configured co-occurrence) and, with ``config.train.baseline``, a model on a
same-size subset balanced over y x a; both are evaluated on a test subset
balanced over y x a, drawn from disjoint identities, and reported as accuracy
on bias-aligned and bias-conflicting images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import losses, regions, train_lib
from faceaudit_jax.data import pipeline, sampling
from faceaudit_jax.experiments.registry import write_json
from faceaudit_jax.models import build_model
from faceaudit_jax.models import sources as model_sources

# A classifier this module trained, or one loaded by ``model_sources.load_classifier``.
TrainedClassifier = model_sources.Classifier


def build_source(data_cfg, resolution: Optional[int] = None):
    if data_cfg.source != "synthetic":
        raise ValueError(f"data.source={data_cfg.source!r}; this experiment supports 'synthetic' "
                         "(real data sets: see README, 'Use your own data')")
    return pipeline.SyntheticSource(
        seed=int(data_cfg.seed), resolution=int(resolution or data_cfg.resolution),
        independent=bool(data_cfg.independent),
        images_per_identity=int(data_cfg.images_per_identity))


def confounder_list(bias_cfg) -> list[str]:
    conf = bias_cfg.confounders
    return [conf] if isinstance(conf, str) else list(conf)


def pool(source, offset: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, attrs) of a pool of ``size`` images starting at index ``offset``."""
    indices = np.arange(offset, offset + size, dtype=np.int64)
    return indices, source.attributes(indices)["attrs"]


def make_subsets(config, source) -> dict[str, np.ndarray]:
    """Image indices of the biased training set, the balanced baseline and the test set."""
    target, confs = config.bias.target, confounder_list(config.bias)
    train_idx, train_attrs = pool(source, 0, int(config.data.pool_size))
    test_idx, test_attrs = pool(source, int(config.data.test_offset),
                                max(int(config.data.pool_size) // 4, 4 * int(config.test.size)))
    seed = int(config.seed)
    subsets = {
        "biased": train_idx[sampling.biased_subset(
            train_attrs, target, confs, float(config.bias.corr), int(config.train.size), seed)],
        "balanced": train_idx[sampling.balanced_subset(
            train_attrs, target, confs, int(config.train.size), seed + 1)],
        "test": test_idx[sampling.balanced_subset(
            test_attrs, target, confs, int(config.test.size), seed + 2)],
    }
    return subsets


def _bce_loss(logits, batch):
    return losses.sigmoid_bce(logits[:, 0], batch["label"], batch["label_mask"])


def _weighted_bce_loss(logits, batch):
    """Group-balanced reweighting: the per-image weight rides along in the batch."""
    return losses.sigmoid_bce(logits[:, 0], batch["label"], batch["label_mask"],
                              class_weights=batch["weight"])


def train_classifier(config, workdir: str, indices: np.ndarray, source, name: str,
                     sample_weights: Optional[np.ndarray] = None) -> TrainedClassifier:
    """Train (or resume, or load when finished) one classifier under ``workdir/name``."""
    run_dir = Path(workdir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    # model.json makes the run dir loadable by model.source=checkpoint (explain.py configs/audit.py).
    model_sources.record_classifier(run_dir, arch=str(config.model.name), outputs=[config.bias.target],
                                    resolution=int(source.resolution),
                                    data_source=str(config.data.source))
    model = build_model(config.model.name, 1)
    batch_size = int(config.train.batch_size)
    per_epoch = pipeline.steps_per_epoch(indices.size, batch_size)
    num_steps = per_epoch * int(config.train.num_epochs)
    tx = train_lib.make_optimizer(config.train, num_steps)
    state = train_lib.create_train_state(
        model, jax.random.PRNGKey(int(config.seed)), int(source.resolution), tx)
    transform = pipeline.attribute_label_fn(config.bias.target)
    if sample_weights is None:
        loss_fn = _bce_loss
        batch_fn = pipeline.step_batch_fn(source, indices, batch_size, int(config.seed), transform)
    else:
        loss_fn = _weighted_bce_loss
        weights = np.asarray(sample_weights, np.float32)
        positions = np.arange(indices.size)

        # The step's shuffle depends only on the set size and seed, so rows of
        # ``positions`` pick the same images as step_batch_fn, with their weights.
        def batch_fn(step):
            rows = pipeline.step_indices(positions, batch_size, int(config.seed), step)
            batch = transform(source.batch(indices[rows]))
            batch["weight"] = jnp.asarray(weights[rows])
            return batch

    state = train_lib.fit(
        model, state, batch_fn, num_steps, str(run_dir), loss_fn=loss_fn,
        ckpt_every=int(config.train.ckpt_every), log_every=int(config.train.log_every),
        desc=f"train {name}")
    return TrainedClassifier(model, train_lib.state_variables(state), name, str(run_dir),
                             arch=str(config.model.name))


def predict_logits(clf: TrainedClassifier, source, indices, batch_size: int) -> np.ndarray:
    """The explained logit (``clf.output_index``) of every image in ``indices``: [N]."""
    k = int(clf.output_index)
    apply = jax.jit(lambda v, x: clf.model.apply(v, x, train=False)[0][:, k])
    out = []
    for batch, valid in pipeline.iterate_batches(source, indices, batch_size):
        out.append(np.asarray(apply(clf.variables, batch["image"]))[valid])
    return np.concatenate(out)


def group_report(logits: np.ndarray, attrs: np.ndarray, target: str,
                 confounders) -> dict[str, float]:
    """Accuracy overall, on bias-aligned and bias-conflicting images, and per cell."""
    y, aligned = sampling.group_labels(attrs, target, confounders)
    correct = (logits > 0).astype(np.int32) == y
    report = {
        "accuracy": float(correct.mean()),
        "aligned_accuracy": float(correct[aligned].mean()) if aligned.any() else math.nan,
        "conflicting_accuracy": float(correct[~aligned].mean()) if (~aligned).any() else math.nan,
        "num_images": int(y.size),
    }
    report["gap"] = report["aligned_accuracy"] - report["conflicting_accuracy"]
    conf_cols = regions.attribute_ids(confounders)
    for yv in (0, 1):
        for combo in np.unique(attrs[:, conf_cols], axis=0):
            sel = (y == yv) & np.all(attrs[:, conf_cols] == combo, axis=1)
            if sel.any():
                key = f"{target}={yv}," + ",".join(
                    f"{n}={int(v)}" for n, v in zip(confounders, combo))
                report[key] = float(correct[sel].mean())
    return report


def print_report(name: str, report: dict) -> None:
    print(f"[{name}] accuracy {report['accuracy']:.3f} | bias-aligned "
          f"{report['aligned_accuracy']:.3f} | bias-conflicting "
          f"{report['conflicting_accuracy']:.3f} | gap {report['gap']:.3f}", flush=True)


def train(config, workdir: str) -> dict:
    """Biased model (and balanced baseline): train, test per group, write results."""
    if model_sources.model_source(config.model) != "train":
        raise ValueError(f"model.source={config.model.source!r}: train.py trains a model "
                         "(model.source='train'); audit an existing one with explain.py "
                         "--config configs/audit.py")
    source = build_source(config.data)
    subsets = make_subsets(config, source)
    confs = confounder_list(config.bias)
    test_attrs = source.attributes(subsets["test"])["attrs"]
    results = {"target": config.bias.target, "confounders": confs, "corr": float(config.bias.corr)}
    models = {}
    names = ["biased"] + (["balanced"] if config.train.get("baseline", True) else [])
    for name in names:
        clf = train_classifier(config, workdir, subsets[name], source, name)
        logits = predict_logits(clf, source, subsets["test"], int(config.test.batch_size))
        results[name] = group_report(logits, test_attrs, config.bias.target, confs)
        print_report(name, results[name])
        models[name] = clf
    write_json(Path(workdir) / "classifier_results.json", results)
    return {"results": results, "models": models, "subsets": subsets, "source": source}


run = train
