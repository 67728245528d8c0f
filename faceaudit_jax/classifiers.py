"""Binary attribute classifiers trained on (biased) subsets: draw, train, fingerprint, predict.

The building block of the bias experiments (FaceX's main job, its tables,
``train.py``): ``make_subsets`` draws the biased training set, a same-size
balanced baseline and a balanced test set from a data source's split;
``train_classifier`` trains (resumes, reloads) one single-logit classifier
with ``train_lib.fit`` under a run directory guarded by ``model_fingerprint``;
``predict_logits`` reads the explained logit of any ``models.sources.Classifier``.

It sits above ``data/``, ``models/`` and ``train_lib`` (it combines all
three), which is why it is not in ``models/``: the architectures there do not
depend on training or sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from faceaudit_jax import distributed, keys, losses, train_lib, workdir as workdir_lib
from faceaudit_jax.data import pipeline, sampling, sources
from faceaudit_jax.mitigation import flac
from faceaudit_jax.models import build_model
from faceaudit_jax.models import sources as model_sources

# A classifier trained here, or one loaded by ``model_sources.load_classifier``.
TrainedClassifier = model_sources.Classifier


def build_source(data_cfg, resolution: Optional[int] = None):
    """``data.sources.build_source`` (optionally at another resolution)."""
    source = sources.build_source(data_cfg)
    return source if resolution is None else source.with_resolution(int(resolution))


def confounder_list(bias_cfg) -> list[str]:
    """``bias.confounders`` as a list (a single name is accepted)."""
    conf = bias_cfg.confounders
    return [conf] if isinstance(conf, str) else list(conf)


def pool(source, offset: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [size], attrs int8 [size, 40]) of the images ``offset .. offset + size - 1``."""
    indices = np.arange(offset, offset + size, dtype=np.int64)
    return indices, source.attributes(indices)["attrs"]


def test_pool_size(config) -> int:
    """Synthetic test pool: a quarter of the training pool, at least 4x the test set."""
    return max(int(config.data.pool_size) // 4, 4 * int(config.test.size))


class SplitPools:
    """Attribute pools of a data config's splits, computed once: the bias tables' draws.

    Synthetic data: the renderer with (``independent=False``, CelebA-like) or
    without attribute links; training pools start at index 0, test pools at
    ``data.test_offset``, so training and test identities are disjoint. Real
    data: the train / test split of ``sources.build_split`` (``independent``
    and the pool size do not apply).
    """

    def __init__(self, data_cfg):
        self.data_cfg = data_cfg
        self._pools: dict = {}

    @property
    def synthetic(self) -> bool:
        return str(self.data_cfg.source) == "synthetic"

    def source(self, independent: bool, split: str = "train"):
        """The source whose indices the pools of this split hold."""
        if not self.synthetic:
            return self._real_split(split)[0]
        data = ml_collections.ConfigDict(self.data_cfg.to_dict())
        data.independent = bool(independent)
        return sources.build_source(data)

    def _real_split(self, split: str):
        key = ("real", split)
        if key not in self._pools:
            self._pools[key] = sources.build_split(self.data_cfg, split)
        return self._pools[key]

    def pool(self, independent: bool, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices int64 [N], attrs int8 [N, 40]) of a training or test pool."""
        if not self.synthetic:
            source, rows = self._real_split(split)
            return rows, source.attributes(rows)["attrs"]
        key = (bool(independent), split, int(size))
        if key not in self._pools:
            offset = 0 if split == "train" else int(self.data_cfg.test_offset)
            if split == "train" and int(size) > int(self.data_cfg.test_offset):
                raise ValueError(f"training pool size {size} overlaps the test range starting at "
                                 f"data.test_offset={self.data_cfg.test_offset}")
            start = time.perf_counter()
            self._pools[key] = pool(self.source(independent), offset, int(size))
            tqdm.write(f"[pool] {split} {'independent' if independent else 'correlated'}: "
                       f"{int(size):,} images' attributes in {time.perf_counter() - start:.1f} s")
        return self._pools[key]

    def confounder_values(self, target: str, confounders, train_indices: np.ndarray,
                          fixed: Optional[int] = None) -> tuple[int, ...]:
        """Which value of each confounder a biased subset pairs with target = 1.

        ``fixed`` (0 or 1) for every confounder; None follows the sign of the
        link in the training pool (``sources.bias_direction``: the data set's
        own, CelebA's for the independent renderer). Checks first that both
        splits annotate the target and confounders.
        """
        train_source = self.source(False, "train")
        for split in ("train", "test"):  # a real data set may not annotate them: say so now
            sources.require_attributes(self.source(False, split), [target, *confounders])
        if fixed is not None:
            return sampling.check_confounder_values((fixed,) * len(confounders), list(confounders))
        bias = ml_collections.ConfigDict({"target": target, "confounders": tuple(confounders)})
        return sources.bias_direction(bias, train_source, train_indices)


def training_size(requested: int, attrs: np.ndarray, target: str, confounders, corr: float,
                  values: tuple, *, synthetic: bool, baseline: bool, where: str) -> int:
    """How many training images to draw: ``requested`` (train.size), or what the split can give.

    A real folder is what it is: ``requested`` = 0, or a size above the
    largest biased subset at ``corr`` that ``attrs`` [N, 40] holds (with
    ``baseline``, also above the largest balanced one, which has the same
    size), takes that largest size and prints which limit applied. A
    synthetic pool is a config choice (``data.pool_size``): only 0 is resolved
    there; a size the pool cannot give is left to ``biased_subset``'s error.
    """
    requested, confounders = int(requested), list(confounders)
    if synthetic and requested:
        return requested
    limits = {"biased": sampling.largest_biased_size(attrs, target, confounders, float(corr),
                                                    confounder_values=values)}
    if baseline:
        limits["balanced"] = sampling.largest_balanced_size(attrs, target, confounders)
    kind = min(limits, key=limits.get)
    largest = limits[kind]
    if requested and requested <= largest:
        return requested
    cells = " x ".join([target] + confounders)
    if largest < 2:
        raise ValueError(f"{where} cannot give a {kind} subset over {cells} (a cell is empty)"
                         + ("; set train.baseline=False to train the biased model alone"
                            if kind == "balanced" else ""))
    why = (f"the largest {kind} subset over {cells}"
           + (f" at bias.corr={float(corr)}" if kind == "biased" else "") + f" that {where} holds")
    note = (f"; train.baseline=False would allow {limits['biased']}"
            if kind == "balanced" and limits["biased"] > largest else "")
    print(f"[subsets] train.size={requested} -> {largest}: {why}{note}", flush=True)
    return largest


def make_subsets(config, source=None) -> dict:
    """Image indices of the biased training set, the balanced baseline and the test set.

    The pools come from ``sources.build_split`` (synthetic: disjoint index
    ranges; real data: ``data.test_root``, the published split or a seeded
    identity-disjoint split), and every cell is checked here, before any
    training. Returns {"biased", "balanced", "test": indices, "train_source",
    "test_source": the sources they index, "confounder_values": the value of
    each confounder that goes with target = 1, "train_size": the size drawn
    (``training_size``)}. ``source`` (optional) replaces the training source
    (e.g. at another resolution).
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
        size = training_size(config.train.size, train_attrs, target, confs, float(config.bias.corr),
                             values, synthetic=synthetic, baseline=config.train.get("baseline", True),
                             where=sources.describe(train_source))
        biased = sampling.biased_subset(train_attrs, target, confs, float(config.bias.corr),
                                        size, seed, confounder_values=values)
        # The baseline's set only when it is trained: a real data set's rare cell (men
        # wearing lipstick) often cannot fill a balanced set of the biased set's size.
        balanced = (sampling.balanced_subset(train_attrs, target, confs, size,
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
            "confounder_values": values, "train_size": int(size)}


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


def _weighted_batch_fn(source, indices, weights, batch_size: int, seed: int, transform):
    """``pipeline.step_batch_fn`` with each image's sample weight in ``batch["weight"]``."""
    weights = np.asarray(weights, np.float32)
    positions = np.arange(indices.size)

    # The step's shuffle depends only on the set size and seed, so rows of
    # ``positions`` pick the same images as step_batch_fn, with their weights.
    def batch_fn(step):
        rows = pipeline.step_indices(positions, batch_size, seed, step)
        batch = transform(source.batch(indices[rows]))
        batch["weight"] = jnp.asarray(weights[rows])
        return batch

    return batch_fn


def _objective(config, indices: np.ndarray, source, sample_weights, protected):
    """(loss_fn, batch_fn, augment_fn) of ``train_classifier``'s three objectives:
    plain BCE, BCE weighted per image, FLAC against a protected-attribute network."""
    settings = config.train.get("flac", None)
    if protected is not None and settings is None:
        raise ValueError("a protected-attribute network was given but config.train.flac is "
                         "missing; expected {'alpha', 'ce_weight', 'd'} (mitigation.flac)")
    batch_size, seed = int(config.train.batch_size), int(config.seed)
    transform = pipeline.attribute_label_fn(config.bias.target)
    if sample_weights is not None:
        return (losses.sigmoid_bce_weighted_batch_loss,
                _weighted_batch_fn(source, indices, sample_weights, batch_size, seed, transform), None)
    num_steps = pipeline.steps_per_epoch(indices.size, batch_size) * int(config.train.num_epochs)
    batch_fn = pipeline.step_batch_fn(source, indices, batch_size, seed, transform, num_steps=num_steps)
    if protected is None:
        return losses.sigmoid_bce_batch_loss, batch_fn, None
    loss_fn = flac.FlacLoss(alpha=float(settings.alpha), ce_weight=float(settings.ce_weight),
                            d=float(settings.d))
    return loss_fn, batch_fn, flac.protected_features_augment(protected.model, protected.variables)


def train_classifier(config, workdir: str, indices: np.ndarray, source, name: str,
                     sample_weights: Optional[np.ndarray] = None,
                     protected: Optional[TrainedClassifier] = None) -> TrainedClassifier:
    """Train (or resume, or load when finished) one classifier under ``workdir/name``.

    Reads ``seed``, ``model.name``, ``train.*`` and ``bias.target`` (the
    label). The run directory's fingerprint (``model_fingerprint``) is checked
    first: a directory trained with other settings stops the run with the
    differing fields named, unless ``config.overwrite`` (then it is emptied
    and retrained). ``sample_weights`` float32 [N] (one per ``indices`` entry)
    weight the BCE per image (group-balanced reweighting). ``protected``, a
    frozen classifier of the protected attribute (a ``ResNetClassifier``),
    switches the objective to FLAC (``mitigation.flac``) with the weights of
    ``config.train.flac`` ({alpha, ce_weight, d}); the protected network's
    weights are part of the fingerprint. The two mitigations do not combine.
    """
    if sample_weights is not None and protected is not None:
        raise ValueError(f"{name}: sample_weights and a protected network were both given; "
                         "expected one mitigation (group reweighting or FLAC)")
    run_dir = Path(workdir) / name
    fingerprint = model_fingerprint(config, indices, sample_weights, source)
    if protected is not None:
        fingerprint["train.flac.protected_sha256"] = train_lib.tree_checksum(protected.variables)
    # Process 0 alone checks and records the run dir; a mismatch stops every process.
    distributed.on_primary(_record_run_dir, config, run_dir, fingerprint, int(source.resolution))
    model = build_model(config.model.name, 1)
    num_steps = (pipeline.steps_per_epoch(indices.size, int(config.train.batch_size))
                 * int(config.train.num_epochs))
    tx = train_lib.make_optimizer(config.train, num_steps)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(int(config.seed)),
                                         int(source.resolution), tx)
    loss_fn, batch_fn, augment_fn = _objective(config, indices, source, sample_weights, protected)
    state = train_lib.fit(
        model, state, batch_fn, num_steps, str(run_dir), loss_fn=loss_fn, augment_fn=augment_fn,
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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logit(model, variables, images, index: int):
    return model.apply(variables, images, train=False)[0][:, index]


def predict_logits(clf: TrainedClassifier, source, indices, batch_size: int) -> np.ndarray:
    """The explained logit (``clf.output_index``) of every image in ``indices``, in order: [N].

    The module and the output index are static jit arguments and the weights a
    traced one, so models of the same architecture (facex_tables' 20) share
    one compiled forward pass.
    """
    k = int(clf.output_index)
    out = []
    for batch, valid in pipeline.iterate_batches(source, indices, batch_size):
        out.append(np.asarray(_logit(clf.model, clf.variables, batch["image"], k))[valid])
    return np.concatenate(out)


def print_group_report(name: str, report: dict) -> None:
    """One line of a ``metrics.fairness.bias_group_report``: accuracy, aligned, conflicting, gap."""
    print(f"[{name}] accuracy {report['accuracy']:.3f} | bias-aligned "
          f"{report['aligned_accuracy']:.3f} | bias-conflicting "
          f"{report['conflicting_accuracy']:.3f} | gap {report['gap']:.3f}", flush=True)
