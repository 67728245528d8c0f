"""Multi-attribute classifiers (AFFACT-u / AFFACT-b): their data and their training.

The building block of the binary-attribute-CAM experiment
(``experiments.attribute_cams``): ``build_source`` and ``split_indices`` give
a source with landmarks (synthetic faces or CelebA) and its train / test
indices, ``attribute_names`` the network's outputs, ``training_positive_share``
the training p_m; ``train_models`` trains (resumes, reloads) AFFACT-u (plain
Euclidean loss, or BCE) and AFFACT-b (class-balanced Euclidean loss, eq. 5-6)
on the same batches through ``train_lib.fit``, each under a run directory
guarded by its fingerprint.

Like ``classifiers`` (the single-logit classifiers of the bias experiments),
it sits above ``data/``, ``models/`` and ``train_lib`` (it combines all three).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import losses, regions, train_lib
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.data import celeba, pipeline, sources
from faceaudit_jax.metrics import fairness
from faceaudit_jax.models import build_model
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.workdir import check_fingerprint, overwrite_requested

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
    """A model trained here: its Flax module, variables, update count and run directory."""
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
    """{model name: loss kind} in ``MODELS`` order; a bad ``train.unbalanced_loss`` raises."""
    kind = str(config.train.unbalanced_loss)
    if kind not in UNBALANCED_LOSSES:
        raise ValueError(f"train.unbalanced_loss={kind!r}; expected one of {UNBALANCED_LOSSES}")
    return {"affact_u": kind, "affact_b": "balanced"}
