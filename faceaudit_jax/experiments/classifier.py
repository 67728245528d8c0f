"""Train a binary attribute classifier on a (biased) subset and test it per bias group.

The building block of the bias experiments: FaceX's audit, its tables, and
``train.py``. A run trains the biased model (target y, confounders a at the
configured co-occurrence) and, with ``config.train.baseline``, a model on a
same-size subset balanced over y x a; both are evaluated on a test subset
balanced over y x a, drawn from disjoint identities, and reported as accuracy
on bias-aligned and bias-conflicting images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import distributed, keys, losses, train_lib, workdir as workdir_lib
from faceaudit_jax.data import pipeline, sampling, sources
from faceaudit_jax.experiments.registry import write_json
from faceaudit_jax.metrics import fairness
from faceaudit_jax.models import build_model
from faceaudit_jax.models import sources as model_sources

# A classifier this module trained, or one loaded by ``model_sources.load_classifier``.
TrainedClassifier = model_sources.Classifier


def build_source(data_cfg, resolution: Optional[int] = None):
    """``data.sources.build_source`` (optionally at another resolution)."""
    source = sources.build_source(data_cfg)
    return source if resolution is None else source.with_resolution(int(resolution))


def confounder_list(bias_cfg) -> list[str]:
    conf = bias_cfg.confounders
    return [conf] if isinstance(conf, str) else list(conf)


def pool(source, offset: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, attrs) of a pool of ``size`` images starting at index ``offset``."""
    indices = np.arange(offset, offset + size, dtype=np.int64)
    return indices, source.attributes(indices)["attrs"]


def test_pool_size(config) -> int:
    """Synthetic test pool: a quarter of the training pool, at least 4x the test set."""
    return max(int(config.data.pool_size) // 4, 4 * int(config.test.size))


def make_subsets(config, source=None) -> dict:
    """Image indices of the biased training set, the balanced baseline and the test set.

    The pools come from ``sources.build_split`` (synthetic: disjoint index
    ranges; real data: ``data.test_root``, the published split or a seeded
    identity-disjoint split), and every cell is checked here, before any
    training. Returns {"biased", "balanced", "test": indices, "train_source",
    "test_source": the sources they index, "confounder_values": the value of
    each confounder that goes with target = 1}. ``source`` (optional) replaces
    the training source (e.g. at another resolution).
    """
    target, confs = config.bias.target, confounder_list(config.bias)
    synthetic = str(config.data.source) == "synthetic"
    train_source, train_idx = sources.build_split(config.data, "train")
    test_source, test_idx = sources.build_split(
        config.data, "test", pool_size=test_pool_size(config) if synthetic else None)
    if source is not None:
        train_source = source
        test_source = source if synthetic else test_source.with_resolution(source.resolution)
    for where in (train_source, test_source):
        sources.require_attributes(where, [target] + confs, "bias attribute")
    train_attrs = train_source.attributes(train_idx)["attrs"]
    test_attrs = test_source.attributes(test_idx)["attrs"]
    values = sources.bias_direction(config.bias, train_source, train_idx)
    seed = int(config.seed)
    where = f"{sources.describe(train_source)}, bias {target} x {'+'.join(confs)}"
    try:
        biased = sampling.biased_subset(train_attrs, target, confs, float(config.bias.corr),
                                        int(config.train.size), seed, confounder_values=values)
        # The baseline's set only when it is trained: a real data set's rare cell (men
        # wearing lipstick) often cannot fill a balanced set of the biased set's size.
        balanced = (sampling.balanced_subset(train_attrs, target, confs, int(config.train.size),
                                              keys.run_seed(seed, "balanced"))
                    if config.train.get("baseline", True) else np.zeros(0, np.int64))
    except ValueError as err:
        raise ValueError(f"training set ({where}): {err}") from None
    try:
        test = sampling.balanced_subset(test_attrs, target, confs, int(config.test.size),
                                       keys.run_seed(seed, "test"))
    except ValueError as err:
        raise ValueError(f"test set ({sources.describe(test_source)}): {err}") from None
    return {"biased": train_idx[biased], "balanced": train_idx[balanced], "test": test_idx[test],
            "train_source": train_source, "test_source": test_source,
            "confounder_values": values}


def _bce_loss(logits, batch):
    return losses.sigmoid_bce(logits[:, 0], batch["label"], batch["label_mask"])


def _weighted_bce_loss(logits, batch):
    """Group-balanced reweighting: the per-image weight rides along in the batch."""
    return losses.sigmoid_bce(logits[:, 0], batch["label"], batch["label_mask"],
                              class_weights=batch["weight"])


# Data fields that only bound which images can be drawn: the drawn indices are
# fingerprinted themselves. Bookkeeping fields of train do not change the weights.
_UNFINGERPRINTED = ("data.pool_size", "data.test_offset", "data.test_pool_size",
                    "train.ckpt_every", "train.log_every", "train.baseline")


def model_fingerprint(config, indices: np.ndarray, sample_weights: Optional[np.ndarray],
                      source) -> dict:
    """The fields that determine a trained classifier, flat ("train.lr": 0.001, ...).

    seed, model, train, data and bias.target from the config; the source's own
    settings (a dataclass source's fields, which may differ from config.data,
    e.g. facex_tables' per-model ``independent``); digests of the training
    image indices and sample weights.
    """
    fields = workdir_lib.config_fields(config, ["seed", "model", "train", "data", "bias.target"])
    fields = {k: v for k, v in fields.items() if k not in _UNFINGERPRINTED}
    if dataclasses.is_dataclass(source):
        fields.update(workdir_lib.config_fields({"source": dataclasses.asdict(source)}, ["source"]))
    else:
        fields["source.type"] = type(source).__qualname__
    fields["train.images_sha256"] = workdir_lib.array_digest(np.asarray(indices, np.int64))
    if sample_weights is not None:
        fields["train.sample_weights_sha256"] = workdir_lib.array_digest(
            np.asarray(sample_weights, np.float32))
    return fields


def train_classifier(config, workdir: str, indices: np.ndarray, source, name: str,
                     sample_weights: Optional[np.ndarray] = None) -> TrainedClassifier:
    """Train (or resume, or load when finished) one classifier under ``workdir/name``.

    The run directory's fingerprint (``model_fingerprint``) is checked first: a
    directory trained with other settings stops the run with the differing
    fields named, unless ``config.overwrite`` (then it is emptied and retrained).
    """
    run_dir = Path(workdir) / name
    # Process 0 alone checks and records the run dir; a mismatch stops every process.
    distributed.on_primary(_record_run_dir, config, run_dir,
                           model_fingerprint(config, indices, sample_weights, source),
                           int(source.resolution))
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
        batch_fn = pipeline.step_batch_fn(source, indices, batch_size, int(config.seed), transform,
                                          num_steps=num_steps)
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
    # Every process of a job trained the same model (same keys and batches; Orbax's
    # save is collective); process 0's copy makes them bit-identical on any hardware.
    variables = distributed.broadcast_from_primary(train_lib.state_variables(state))
    return TrainedClassifier(model, variables, name, str(run_dir), arch=str(config.model.name))


def _record_run_dir(config, run_dir: Path, fingerprint: dict, resolution: int) -> None:
    workdir_lib.check_fingerprint(run_dir, fingerprint,
                                  overwrite=workdir_lib.overwrite_requested(config))
    run_dir.mkdir(parents=True, exist_ok=True)
    # model.json makes the run dir loadable by model.source=checkpoint (explain.py configs/audit.py).
    model_sources.record_classifier(run_dir, arch=str(config.model.name), outputs=[config.bias.target],
                                    resolution=resolution, data_source=str(config.data.source))


def predict_logits(clf: TrainedClassifier, source, indices, batch_size: int) -> np.ndarray:
    """The explained logit (``clf.output_index``) of every image in ``indices``: [N]."""
    k = int(clf.output_index)
    apply = jax.jit(lambda v, x: clf.model.apply(v, x, train=False)[0][:, k])
    out = []
    for batch, valid in pipeline.iterate_batches(source, indices, batch_size):
        out.append(np.asarray(apply(clf.variables, batch["image"]))[valid])
    return np.concatenate(out)


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
    subsets = make_subsets(config)
    source, test_source = subsets["train_source"], subsets["test_source"]
    confs = confounder_list(config.bias)
    values = subsets["confounder_values"]
    test_attrs = test_source.attributes(subsets["test"])["attrs"]
    results = {"target": config.bias.target, "confounders": confs, "corr": float(config.bias.corr),
               "confounder_values": list(values)}
    models = {}
    names = ["biased"] + (["balanced"] if config.train.get("baseline", True) else [])
    for name in names:
        clf = train_classifier(config, workdir, subsets[name], source, name)
        logits = predict_logits(clf, test_source, subsets["test"], int(config.test.batch_size))
        results[name] = fairness.bias_group_report(logits, test_attrs, config.bias.target, confs, values)
        print_report(name, results[name])
        models[name] = clf
    distributed.on_primary(write_json, Path(workdir) / "classifier_results.json", results)
    # "source" is what the test indices index (the images FaceX explains).
    return {"results": results, "models": models, "subsets": subsets, "source": test_source,
            "train_source": source}


run = train
