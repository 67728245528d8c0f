"""Binary attribute CAMs: AFFACT-u vs AFFACT-b ("biased binary attribute
classifiers ignore the majority classes"), on synthetic faces or CelebA.

The job (``run(config, workdir)``):

1. Data. Synthetic faces with CelebA-like co-occurrences (``data.independent
   = False``: realistic imbalance, Bald 1.5% ... No_Beard 85%), or real
   CelebA from ``data.root`` (``data.source = "celeba"``). Training images
   are indices 0..N-1 (CelebA: the training partition); test images come
   from disjoint identities (CelebA: the test partition) and only frontal
   faces are explained (``data.frontal.frontal_filter``, ratio < 0.1, sec. 3.3).
2. Two networks, one logit per attribute (every attribute with known
   training targets: the 35 the renderer draws, or CelebA's 40; unknown
   targets, -1, are masked out of the loss), trained on the same
   batches in the same order from the same initialisation:
   AFFACT-u with the plain Euclidean loss sum_m (z_m - t_m)^2 on targets
   t in {+1, -1} (``train.unbalanced_loss = "euclidean"``; ``"bce"`` for
   sigmoid cross-entropy), AFFACT-b with the class-balanced Euclidean loss
   (eq. 5) whose weights (eq. 6) come from the training set's p_m.
3. One pass over the test faces explains both models. Per batch and model,
   one jitted call runs the backbone once and, for every (CAM method, target)
   pair, the head's gradient for all attributes (``explain.attribute_cams``),
   the proportional energy of every map inside its attribute mask
   (``explain.attribute_masks`` + ``metrics.energy``), and running sums of
   the maps per predicted class (``init_cam_sums`` / ``accumulate_cam_sums``).
   Pairs: the predicted-class target |z| (eq. 4) for every method, and the
   positive target z (eq. 8) for the main method (Figure 4).
4. Reductions and outputs, all under ``workdir``:

   - ``results.json``: setup, training-set p_m, per model and attribute the
     FNR/FPR (``metrics.fairness``), energies per method and target split by
     predicted class (``energy_by_prediction``), the energy a uniform map
     would get on the same samples (the mask's area share: the chance level
     of E), and the closing comparison;
   - ``table1.md`` (p_m, FNR/FPR, E+/E- for both models, attributes sorted by
     imbalance |p_m - 0.5|), ``table2.md`` (energy per CAM method for a few
     attributes), ``table_targets.md`` (positive vs predicted target on
     negatively predicted samples);
   - ``figure2_mean_cams.png`` (mean CAM per predicted class per attribute),
     ``figure3_cam_methods.png`` (the same per CAM method),
     ``figure4_targets.png`` (positive vs predicted target, negatively
     predicted samples), ``figure_energy.png`` (E+/E- of both models over
     the attributes sorted by p_m);
   - ``summary.md``: the README fragment (setup, key rows, and whether the
     paper's finding shows, with numbers: ``majority_class_finding`` compares
     the majority-class energies of the two models over the imbalanced
     attributes with a one-sided Wilcoxon signed-rank test, verdict "shows",
     "trend", "does_not_show" or "inconclusive"); ``write_markdown(workdir)``
     rewrites the Markdown from results.json without re-running;
   - ``models/affact_{u,b}/``: Orbax checkpoints and metrics.jsonl, kept out
     of git by ``models/.gitignore``.

Attribute masks. ``explain.mask_source = "parse"`` takes the union of the
attribute's parsed regions (``regions.ATTRIBUTE_MASK_REGIONS``, e.g.
Wearing_Earrings -> earrings and both ears), so the mask follows each face;
``"rectangles"`` uses the paper's fixed boxes on the aligned face
(``attribute_masks.PAPER_RECTANGLES``, made for AFFACT's 224 x 224
alignment; on centre-cropped CelebA images they are an approximation).
CelebA has no parse maps, so it requires "rectangles". Attributes without a
mask (Male, Young, ...) get no energy (NaN, "n/a" in the tables).

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
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import cm
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from faceaudit_jax.experiments import registry
from faceaudit_jax import distributed, losses, regions, train_lib
from faceaudit_jax.data import celeba, frontal, pipeline, sources
from faceaudit_jax.experiments.registry import write_json
from faceaudit_jax.explain import attribute_cams as attribute_cams_lib
from faceaudit_jax.explain import attribute_masks as masks_lib
from faceaudit_jax.explain import cams as cams_lib
from faceaudit_jax.metrics import energy as energy_lib
from faceaudit_jax.metrics import fairness
from faceaudit_jax.models import build_model
from faceaudit_jax.models import resnet as resnet_lib

MODELS: tuple[str, ...] = ("affact_u", "affact_b")
MODEL_LABELS = {"affact_u": "AFFACT-u", "affact_b": "AFFACT-b"}
METHOD_LABELS = {"grad_cam": "Grad-CAM", "grad_cam_plusplus": "Grad-CAM++",
                 "hires_cam": "HiResCAM", "element_wise_grad_cam": "Element-wise Grad-CAM"}
UNBALANCED_LOSSES = ("euclidean", "bce")
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


# ----------------------------------------------------------------------------- losses


def _weighted_euclidean_loss(logits, batch):
    """sum_m w_m(t) (z_m - t_m)^2 with t = 2 * label - 1 and the class weights in the batch.

    One module-level function for AFFACT-u (weights 1) and AFFACT-b (eq. 6
    weights), so both models share one compiled train step.
    """
    return losses.balanced_euclidean(logits, 2.0 * batch["label"] - 1.0,
                                     (batch["weight_positive"], batch["weight_negative"]),
                                     batch["label_mask"])


def _bce_loss(logits, batch):
    return losses.sigmoid_bce(logits, batch["label"], batch["label_mask"])


def class_weights(kind: str, p_train) -> tuple[np.ndarray, np.ndarray]:
    """(w(+1), w(-1)) [A] for a loss kind: ones for "euclidean"/"bce", eq. 6 for "balanced".

    Attributes without a training p_m (no known target) get weight 1.
    """
    p = np.asarray(p_train, np.float64)
    if kind in UNBALANCED_LOSSES:
        return np.ones(p.shape, np.float32), np.ones(p.shape, np.float32)
    if kind == "balanced":
        w_pos, w_neg = losses.balanced_weights(np.where(np.isfinite(p), p, 0.5))
        return np.asarray(w_pos, np.float32), np.asarray(w_neg, np.float32)
    raise ValueError(f"unknown loss kind {kind!r}; expected 'euclidean', 'bce' or 'balanced'")


def make_loss_fn(kind: str) -> Callable:
    """``loss_fn(logits [B, A], batch) -> scalar`` reading ``label`` / ``label_mask``.

    "euclidean" (AFFACT-u) and "balanced" (AFFACT-b): sum over attributes of
    w (z - t)^2 on t in {+1, -1}, mean over the batch, with the weights that
    ``label_transform`` puts in the batch; "bce": sigmoid cross-entropy
    averaged over the known entries.
    """
    if kind in ("euclidean", "balanced"):
        return _weighted_euclidean_loss
    if kind == "bce":
        return _bce_loss
    raise ValueError(f"unknown loss kind {kind!r}; expected 'euclidean', 'bce' or 'balanced'")


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


# ----------------------------------------------------------------------------- training


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






def train_model(config, workdir: str, name: str, source, train_idx: np.ndarray,
                names: Sequence[str], loss: str, p_train: np.ndarray,
                tx: Optional[Any] = None) -> TrainedModel:
    """Train (or resume, or reload when finished) one multi-attribute model.

    ``tx``: the optax transformation; pass the same object for several models
    of one architecture and they share one compiled train step (the optimiser
    is part of the train state's static structure).
    """
    models_dir = Path(workdir) / "models"
    registry.ignore_models_folder(models_dir)
    run_dir = models_dir / name
    registry.check_fingerprint(run_dir, _fingerprint(config, names, loss),
                               overwrite=registry.overwrite_requested(config))
    model = build_model(str(config.model.name), len(names))
    batch_size = int(config.train.batch_size)
    num_steps = pipeline.steps_per_epoch(train_idx.size, batch_size) * int(config.train.num_epochs)
    if num_steps < 1:
        raise ValueError(f"train.num_epochs={config.train.num_epochs}; expected >= 1")
    if tx is None:
        tx = train_lib.make_optimizer(config.train, num_steps)
    # The same key and batch order for both models: they differ only by the loss.
    state = train_lib.create_train_state(
        model, jax.random.PRNGKey(int(config.seed)), int(config.data.resolution), tx)
    batch_fn = pipeline.step_batch_fn(source, train_idx, batch_size, int(config.seed),
                                      label_transform(names, class_weights(loss, p_train)))
    state = train_lib.fit(
        model, state, batch_fn, num_steps, str(run_dir), loss_fn=make_loss_fn(loss),
        ckpt_every=int(config.train.ckpt_every), log_every=int(config.train.log_every),
        desc=f"train {name}")
    return TrainedModel(name, model, train_lib.state_variables(state), num_steps, str(run_dir))


def train_models(config, workdir: str, source, train_idx: np.ndarray, names: Sequence[str],
                 p_train: np.ndarray) -> list[TrainedModel]:
    """AFFACT-u and AFFACT-b (``MODELS`` order), sharing one optimiser recipe object."""
    num_steps = (pipeline.steps_per_epoch(train_idx.size, int(config.train.batch_size))
                 * int(config.train.num_epochs))
    if num_steps < 1:
        raise ValueError(f"train.num_epochs={config.train.num_epochs}; expected >= 1")
    tx = train_lib.make_optimizer(config.train, num_steps)
    return [train_model(config, workdir, name, source, train_idx, names, loss, p_train, tx)
            for name, loss in model_losses(config).items()]


def model_losses(config) -> dict[str, str]:
    kind = str(config.train.unbalanced_loss)
    if kind not in UNBALANCED_LOSSES:
        raise ValueError(f"train.unbalanced_loss={kind!r}; expected one of {UNBALANCED_LOSSES}")
    return {"affact_u": kind, "affact_b": "balanced"}


# ----------------------------------------------------------------------------- explaining


class ExplainSums(NamedTuple):
    """Running sums over the explained (valid) test images; a jit-friendly pytree."""

    cams: tuple  # one attribute_cams.CamSums per (method, target) pair, [A, H, W] each
    mask_sum: jax.Array  # float32 [A, H, W]: sum of the attribute masks
    image_sum: jax.Array  # float32 [H, W, 3]
    count: jax.Array  # int32 (): images summed


def cam_pairs(methods: Sequence[str], main_method: str) -> tuple[tuple[str, str], ...]:
    """(method, target) pairs: |z| for every method, plus z for the main one (Figure 4)."""
    methods = tuple(methods)
    if not methods:
        raise ValueError("explain.methods is empty; expected at least one CAM method")
    for method in methods:
        cams_lib.resolve_cam_method(method)  # validates the name
    if main_method not in methods:
        raise ValueError(
            f"explain.main_method={main_method!r} is not in explain.methods={methods}")
    return tuple((m, "predicted") for m in methods) + ((main_method, "positive"),)


def init_explain_sums(num_pairs: int, num_attributes: int, height: int, width: int) -> ExplainSums:
    cam_sums = attribute_cams_lib.init_cam_sums(num_attributes, height, width)
    return ExplainSums(
        cams=tuple(cam_sums for _ in range(num_pairs)),
        mask_sum=jnp.zeros((num_attributes, height, width), jnp.float32),
        image_sum=jnp.zeros((height, width, 3), jnp.float32),
        count=jnp.zeros((), jnp.int32))


def make_explain_step(model, names: Sequence[str], pairs: Sequence[tuple[str, str]],
                      mask_source: str) -> Callable:
    """Jitted ``step(variables, sums, images, parse, valid) -> (sums, logits, energy, area)``.

    ``model`` is a classifier with ``features`` / ``head`` methods
    (``models.resnet.ResNetClassifier``); its variables are an argument, so
    AFFACT-u and AFFACT-b share one compiled step. images [B, H, W, 3],
    parse int [B, H, W] (only its shape is read for
    ``mask_source="rectangles"``), valid bool [B] (padding and non-frontal
    rows False: they are left out of the sums). Returns logits [B, A],
    energy [P, B, A] (proportional energy, eq. 7, of the upsampled and
    min-max normalised CAM of each (method, target) pair inside the attribute
    mask) and area [B, A] (the mask's share of the image: the energy of a
    uniform map). The backbone runs once per call; each pair costs one head
    VJP per attribute (vmapped), the CAM formula and the resize.
    """
    names = tuple(names)
    pairs = tuple((cams_lib.resolve_cam_method(m), mode) for m, mode in pairs)
    # Each feature cell is placed at its receptive-field centre when resized.
    grid = resnet_lib.cell_grid(model) or "aligned"

    def step(variables, sums: ExplainSums, images, parse, valid):
        def head_fn(fmap):
            return model.apply(variables, fmap, method="head")

        fmap = model.apply(variables, images, train=False, method="features")
        height, width = images.shape[1:3]
        masks = masks_lib.attribute_masks(parse, names, mask_source)  # bool [B, A, H, W]
        energies, new_cams, logits = [], [], None
        for (formula, mode), cam_sums in zip(pairs, sums.cams):
            raw, logits = attribute_cams_lib.attribute_cams_from_features(fmap, head_fn, formula,
                                                                          mode)
            maps = attribute_cams_lib.postprocess_maps(raw, (height, width), grid=grid)
            energies.append(energy_lib.proportional_energy(maps, masks))
            new_cams.append(attribute_cams_lib.accumulate_cam_sums(cam_sums, maps, logits, valid))
        weight = valid.astype(jnp.float32)
        masks_f = masks.astype(jnp.float32)
        new_sums = ExplainSums(
            cams=tuple(new_cams),
            mask_sum=sums.mask_sum + jnp.einsum("b,bahw->ahw", weight, masks_f),
            image_sum=sums.image_sum + jnp.einsum("b,bhwc->hwc", weight, images),
            count=sums.count + jnp.sum(valid, dtype=jnp.int32))
        return new_sums, logits, jnp.stack(energies), jnp.mean(masks_f, axis=(-2, -1))

    return jax.jit(step)


@dataclasses.dataclass
class Evaluation:
    """One model's outputs on the explained (frontal) test faces."""

    logits: np.ndarray  # [N, A]
    targets: np.ndarray  # int8 [N, A], 1 / 0 / -1
    energy: np.ndarray  # [P, N, A]
    area: np.ndarray  # [N, A]
    sums: ExplainSums


def explain_test_set(models: Sequence[TrainedModel], source, test_idx: np.ndarray,
                     names: Sequence[str], pairs, config) -> tuple[dict[str, Evaluation], dict]:
    """One streaming pass over the test faces that explains every model.

    Returns ({model name: Evaluation}, frontal filter counts). In a
    multi-process job each process explains its block of ``test_idx``; the
    counts and CAM sums add over processes and the per-face arrays are
    all-gathered in process order (the order of ``test_idx``).
    """
    mask_source = str(config.explain.mask_source)
    if mask_source not in masks_lib.MASK_SOURCES:
        raise ValueError(
            f"explain.mask_source={mask_source!r}; expected one of {masks_lib.MASK_SOURCES}")
    if mask_source == "parse" and not source.has_parse:
        raise ValueError(f"{sources.describe(source)} has no parse maps; set "
                         "explain.mask_source='rectangles'")
    cols = np.asarray(regions.attribute_ids(names))
    if not models:
        raise ValueError("no models to explain; expected at least one TrainedModel")
    if len({m.model for m in models}) != 1:
        raise ValueError("the models to explain must share one architecture (one compiled step)")
    step = make_explain_step(models[0].model, names, pairs, mask_source)
    sums: dict[str, ExplainSums] = {}
    collected = {m.name: {"logits": [], "energy": [], "area": []} for m in models}
    targets, counts = [], {"total": 0, "kept": 0, "excluded": 0, "not_frontal": 0,
                           "degenerate": 0}
    batch_size = int(config.test.batch_size)
    max_ratio = float(config.test.frontal_max_ratio)
    start = time.perf_counter()
    local_idx, _ = distributed.process_shard(test_idx)
    num_batches = -(-local_idx.size // batch_size)
    for i, (batch, real) in enumerate(pipeline.iterate_batches(source, local_idx, batch_size)):
        keep_real, batch_counts = frontal.frontal_filter(np.asarray(batch["landmarks"])[real],
                                                         max_ratio)
        for key in counts:
            counts[key] += batch_counts[key]
        valid = np.zeros(batch_size, bool)
        valid[np.flatnonzero(real)[keep_real]] = True
        images = batch["image"]
        parse = batch["parse"] if "parse" in batch else jnp.zeros(images.shape[:3], jnp.int32)
        targets.append(np.asarray(batch["attrs"])[valid][:, cols])
        for model in models:
            if model.name not in sums:
                sums[model.name] = init_explain_sums(len(pairs), len(names), *images.shape[1:3])
            sums[model.name], logits, energy, area = step(
                model.variables, sums[model.name], images, parse, jnp.asarray(valid))
            out = collected[model.name]
            out["logits"].append(np.asarray(logits)[valid])
            out["energy"].append(np.asarray(energy)[:, valid])
            out["area"].append(np.asarray(area)[valid])
        print(f"explain: batch {i + 1}/{num_batches}, {counts['kept']} frontal faces so far "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    totals = distributed.global_sum(np.asarray(list(counts.values())))
    counts = {key: int(total) for key, total in zip(counts, totals)}
    if counts["kept"] == 0:
        raise ValueError(
            f"the frontal filter (ratio < {max_ratio}) kept none of the {counts['total']} test "
            "faces; raise test.size or test.frontal_max_ratio")
    target_array = distributed.allgather_rows(np.concatenate(targets))
    evaluations = {}
    for name, out in collected.items():
        logits, energy, area = distributed.allgather_rows((
            np.concatenate(out["logits"]), np.moveaxis(np.concatenate(out["energy"], axis=1), 1, 0),
            np.concatenate(out["area"])))
        evaluations[name] = Evaluation(logits=logits, targets=target_array,
                                       energy=np.moveaxis(energy, 0, 1), area=area,
                                       sums=distributed.global_sum(sums[name]))
    return evaluations, counts


# ----------------------------------------------------------------------------- reductions


def model_report(evaluation: Evaluation, names: Sequence[str], pairs, defined: np.ndarray
                 ) -> dict:
    """FNR/FPR, p_m (test), energies per (method, target) and predicted class, per attribute.

    Energies of attributes without a mask (``defined`` False) are NaN; sides
    without predictions are NaN with a RuntimeWarning (from the metrics).
    """
    names = list(names)
    rates = fairness.error_rates_from_counts(
        fairness.confusion_counts(evaluation.logits, evaluation.targets), names)
    predicted = evaluation.logits >= 0
    defined_names = [n for n, d in zip(names, defined) if d]

    def split(values):
        """energy_by_prediction over the attributes with a mask; NaN elsewhere."""
        out = {k: np.full(len(names), np.nan) for k in ("positive", "negative")}
        counts = {"num_positive": predicted.sum(0), "num_negative": (~predicted).sum(0)}
        if defined.any():
            result = energy_lib.energy_by_prediction(values[:, defined], predicted[:, defined],
                                                     names=defined_names)
            out["positive"][defined] = result.positive
            out["negative"][defined] = result.negative
        return {**out, **counts}

    energies = {f"{method}/{mode}": split(evaluation.energy[k])
                for k, (method, mode) in enumerate(pairs)}
    uniform = split(evaluation.area)
    return {
        "fnr": rates.fnr, "fpr": rates.fpr, "accuracy": rates.accuracy,
        "p_test": rates.positive_share, "num_positive": rates.num_positive,
        "num_negative": rates.num_negative,
        "predicted_positive": predicted.sum(0), "predicted_negative": (~predicted).sum(0),
        "energy": energies, "uniform_energy": uniform,
    }


MIN_ATTRIBUTES_FOR_TEST = 5  # a one-sided signed-rank test needs a handful of pairs


def majority_class_finding(p_train, reports: dict, key: str, defined, names: Sequence[str],
                           min_imbalance: float, alpha: float = 0.05) -> dict:
    """Majority- and minority-class energies of AFFACT-u vs AFFACT-b on imbalanced attributes.

    Majority class: positive when the training p_m > 0.5, else negative. Over
    the attributes with a mask and |p_m - 0.5| >= ``min_imbalance``, compares
    per attribute the mean energy (pair ``key``, e.g. "grad_cam/predicted")
    over the faces each model predicts in the majority class, and in the
    minority class (where both models predicted some). ``lift`` = energy /
    the energy a uniform map gets on the same faces (the mask's area share),
    so attributes with small and large masks weigh alike.

    ``shows`` (the paper's finding: the balanced model's majority-class CAMs
    carry more energy in the attribute region than the unbalanced model's):
    at least ``MIN_ATTRIBUTES_FOR_TEST`` attributes compared, the mean energy
    of AFFACT-b above AFFACT-u's, and a one-sided Wilcoxon signed-rank test of
    the per-attribute pairs (b > u) with p < ``alpha``.
    """
    from scipy import stats  # only the closing note needs it

    p = np.asarray(p_train, np.float64)
    selected = np.asarray(defined, bool) & np.isfinite(p) & (fairness.imbalance(p) >= min_imbalance)
    majority_positive = p > 0.5
    u, b = reports["affact_u"], reports["affact_b"]

    def side(report, majority: bool, what: str):
        values = report[what] if what == "uniform_energy" else report[what][key]
        pos, neg = values["positive"], values["negative"]
        pick_pos = majority_positive if majority else ~majority_positive
        return np.where(pick_pos, pos, neg)

    rows = []
    for a in np.flatnonzero(selected):
        row = {"attribute": names[a], "p_train": float(p[a]),
               "majority": "positive" if majority_positive[a] else "negative"}
        for m, report in (("u", u), ("b", b)):
            row[f"majority_energy_{m}"] = float(side(report, True, "energy")[a])
            row[f"minority_energy_{m}"] = float(side(report, False, "energy")[a])
            row[f"majority_uniform_{m}"] = float(side(report, True, "uniform_energy")[a])
            row[f"minority_uniform_{m}"] = float(side(report, False, "uniform_energy")[a])
            row[f"minority_error_{m}"] = float(
                np.where(majority_positive, report["fpr"], report["fnr"])[a])
        rows.append(row)

    def compare(kind: str) -> dict:
        eu = np.array([r[f"{kind}_energy_u"] for r in rows], np.float64)
        eb = np.array([r[f"{kind}_energy_b"] for r in rows], np.float64)
        cu = np.array([r[f"{kind}_uniform_u"] for r in rows], np.float64)
        cb = np.array([r[f"{kind}_uniform_b"] for r in rows], np.float64)
        both = np.isfinite(eu) & np.isfinite(eb) & (cu > 0) & (cb > 0)
        n = int(both.sum())
        result = {
            "num_attributes": n,
            "attributes": [r["attribute"] for r, ok in zip(rows, both) if ok],
            "mean_u": float(eu[both].mean()) if n else None,
            "mean_b": float(eb[both].mean()) if n else None,
            "mean_uniform_u": float(cu[both].mean()) if n else None,
            "mean_uniform_b": float(cb[both].mean()) if n else None,
            "mean_lift_u": float((eu[both] / cu[both]).mean()) if n else None,
            "mean_lift_b": float((eb[both] / cb[both]).mean()) if n else None,
            "num_b_higher": int((eb[both] > eu[both]).sum()),
            "wilcoxon_p_b_greater": None,
        }
        differences = eb[both] - eu[both]
        if n >= MIN_ATTRIBUTES_FOR_TEST and np.any(differences != 0):
            result["wilcoxon_p_b_greater"] = float(
                stats.wilcoxon(eb[both], eu[both], alternative="greater").pvalue)
        return result

    def mean_of(field):
        values = np.array([r[field] for r in rows], np.float64)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else None

    majority = compare("majority")
    minority = compare("minority")
    p_value = majority["wilcoxon_p_b_greater"]
    testable = majority["num_attributes"] >= MIN_ATTRIBUTES_FOR_TEST and p_value is not None
    shows = bool(testable and majority["mean_b"] > majority["mean_u"] and p_value < alpha)
    finding = {
        "pair": key, "min_imbalance": float(min_imbalance), "alpha": float(alpha),
        "rows": rows, "majority": majority, "minority": minority,
        "minority_error_u": mean_of("minority_error_u"),
        "minority_error_b": mean_of("minority_error_b"),
        "testable": bool(testable), "shows": shows,
    }
    finding["verdict"] = finding_verdict(finding)
    return finding


VERDICTS = ("shows", "trend", "does_not_show", "inconclusive")


def finding_verdict(finding: dict) -> str:
    """One of ``VERDICTS`` for a ``majority_class_finding`` result (or its JSON).

    "shows": significant (see ``majority_class_finding``); "trend": AFFACT-b's
    majority-class energy higher on average and for most attributes, but not
    significant; "does_not_show": otherwise; "inconclusive": too few
    attributes to test.
    """
    majority = finding["majority"]
    n = majority["num_attributes"]
    if finding["shows"]:
        return "shows"
    if not finding["testable"]:
        return "inconclusive"
    if majority["mean_b"] > majority["mean_u"] and majority["num_b_higher"] > n / 2:
        return "trend"
    return "does_not_show"


# ----------------------------------------------------------------------------- tables


def _fmt(value, fmt: str = ".3f") -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if not np.isfinite(value) else format(value, fmt)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table1_rows(p_train, reports: dict, key: str, names: Sequence[str], defined) -> list[dict]:
    """Table 1 analogue, attributes sorted by training imbalance (most imbalanced first)."""
    rows = []
    for a in fairness.imbalance_order(p_train):
        row = {"attribute": names[a], "p_train": float(p_train[a]),
               "imbalance": float(fairness.imbalance(p_train[a])), "mask_defined": bool(defined[a])}
        for model in MODELS:
            r = reports[model]
            row[model] = {
                "fnr": float(r["fnr"][a]), "fpr": float(r["fpr"][a]),
                "energy_positive": float(r["energy"][key]["positive"][a]),
                "energy_negative": float(r["energy"][key]["negative"][a]),
                "uniform_positive": float(r["uniform_energy"]["positive"][a]),
                "uniform_negative": float(r["uniform_energy"]["negative"][a]),
                "predicted_positive": int(r["predicted_positive"][a]),
                "predicted_negative": int(r["predicted_negative"][a]),
            }
        rows.append(row)
    return rows


def _energy_cell(value, majority: bool) -> str:
    text = _fmt(value)
    return f"**{text}**" if majority and text != "n/a" else text


def table1_markdown(rows: Sequence[dict], method_label: str) -> str:
    headers = ["Attribute", "p_m", "FNR u", "FPR u", "FNR b", "FPR b",
               "E+ u", "E- u", "E+ b", "E- b", "E+ unif", "E- unif"]
    body = []
    for row in rows:
        majority_positive = row["p_train"] > 0.5
        cells = [row["attribute"].replace("_", " "), _fmt(row["p_train"])]
        for model in MODELS:
            cells += [_fmt(row[model]["fnr"]), _fmt(row[model]["fpr"])]
        for model in MODELS:
            cells += [_energy_cell(row[model]["energy_positive"], majority_positive),
                      _energy_cell(row[model]["energy_negative"], not majority_positive)]
        u = row["affact_u"]
        cells += [_fmt(u["uniform_positive"]), _fmt(u["uniform_negative"])]
        body.append(cells)
    note = (f"Table 1 analogue: u = AFFACT-u, b = AFFACT-b; p_m = training share of positives; "
            f"FNR/FPR on the frontal test faces; E+ / E- = mean proportional energy (eq. 7) of "
            f"the {method_label} CAM (predicted-class target |z|) inside the attribute mask over "
            "the positively / negatively predicted faces; **bold** = the majority class; "
            "E unif = the energy a uniform map would get on AFFACT-u's positively / negatively "
            "predicted faces (the mask's area share, chance level). n/a: no prediction on that "
            "side, or no mask for the attribute. Sorted by |p_m - 0.5|.\n\n")
    return note + markdown_table(headers, body)


def table2_rows(reports: dict, methods: Sequence[str], attributes: Sequence[str],
                names: Sequence[str]) -> list[dict]:
    rows = []
    for attribute in attributes:
        a = list(names).index(attribute)
        for model in MODELS:
            r = reports[model]["energy"]
            rows.append({"attribute": attribute, "model": model, **{
                method: {"energy_positive": float(r[f"{method}/predicted"]["positive"][a]),
                         "energy_negative": float(r[f"{method}/predicted"]["negative"][a])}
                for method in methods}})
    return rows


def table2_markdown(rows: Sequence[dict], methods: Sequence[str]) -> str:
    headers = ["Attribute", "Model"] + [f"{METHOD_LABELS.get(m, m)} {s}" for m in methods
                                        for s in ("E+", "E-")]
    body = [[row["attribute"].replace("_", " "), MODEL_LABELS[row["model"]]]
            + [_fmt(row[m][k]) for m in methods for k in ("energy_positive", "energy_negative")]
            for row in rows]
    note = ("Table 2 analogue: mean proportional energy inside the attribute mask per CAM "
            "method (predicted-class target |z|), over the positively (E+) and negatively (E-) "
            "predicted frontal test faces. With a head of global average pooling and one dense "
            "layer the gradient is constant over the feature map, so HiResCAM equals "
            "Grad-CAM.\n\n")
    return note + markdown_table(headers, body)


def target_rows(reports: dict, main_method: str, attributes: Sequence[str],
                names: Sequence[str]) -> list[dict]:
    """Energy on negatively predicted faces: positive target z vs predicted target |z|."""
    rows = []
    for attribute in attributes:
        a = list(names).index(attribute)
        for model in MODELS:
            r = reports[model]
            rows.append({
                "attribute": attribute, "model": model,
                "num_negative": int(r["predicted_negative"][a]),
                "predicted_target": float(r["energy"][f"{main_method}/predicted"]["negative"][a]),
                "positive_target": float(r["energy"][f"{main_method}/positive"]["negative"][a]),
            })
    return rows


def target_markdown(rows: Sequence[dict], method_label: str) -> str:
    headers = ["Attribute", "Model", "negatively predicted", "E- target |z|", "E- target z"]
    body = [[r["attribute"].replace("_", " "), MODEL_LABELS[r["model"]], r["num_negative"],
             _fmt(r["predicted_target"]), _fmt(r["positive_target"])] for r in rows]
    note = (f"Figure 4 numbers: {method_label} energy inside the attribute mask on the "
            "negatively predicted faces, with the predicted-class target |z| (eq. 4: explains "
            "the negative decision) and the positive target z (eq. 8: what most tools show).\n\n")
    return note + markdown_table(headers, body)


def summary_markdown(setup: dict, rows1: Sequence[dict], finding: dict,
                     key_attributes: Sequence[str], link_prefix: str) -> str:
    """The README fragment: setup, key rows of Table 1, and the closing note with numbers."""
    by_name = {row["attribute"]: row for row in rows1}
    headers = ["Attribute", "p_m", "FNR u / b", "FPR u / b", "E+ u / b", "E- u / b"]
    body = []
    for name in key_attributes:
        if name not in by_name:
            continue
        row = by_name[name]
        u, b = row["affact_u"], row["affact_b"]
        maj_pos = row["p_train"] > 0.5
        body.append([
            name.replace("_", " "), _fmt(row["p_train"]),
            f"{_fmt(u['fnr'], '.2f')} / {_fmt(b['fnr'], '.2f')}",
            f"{_fmt(u['fpr'], '.2f')} / {_fmt(b['fpr'], '.2f')}",
            f"{_energy_cell(u['energy_positive'], maj_pos)} / "
            f"{_energy_cell(b['energy_positive'], maj_pos)}",
            f"{_energy_cell(u['energy_negative'], not maj_pos)} / "
            f"{_energy_cell(b['energy_negative'], not maj_pos)}",
        ])
    maj, mino = finding["majority"], finding["minority"]
    n = maj["num_attributes"]
    if n == 0:
        verdict = ("No attribute with a mask is imbalanced enough (|p_m - 0.5| >= "
                   f"{finding['min_imbalance']}) to test the paper's finding.")
    else:
        p_value = maj["wilcoxon_p_b_greater"]
        verdict = (
            f"Over the {n} attributes with |p_m - 0.5| >= {finding['min_imbalance']:.2f} and a "
            f"mask, the majority-class CAMs put a mean energy of {maj['mean_u']:.3f} (AFFACT-u) "
            f"vs {maj['mean_b']:.3f} (AFFACT-b) inside the attribute region, "
            f"{maj['mean_lift_u']:.2f}x vs {maj['mean_lift_b']:.2f}x what a uniform map gets "
            f"on the same faces; AFFACT-b is higher for {maj['num_b_higher']} of {n} attributes "
            f"(one-sided Wilcoxon signed-rank p = {_fmt(p_value)}). Minority class: "
            f"{_fmt(mino['mean_u'])} vs {_fmt(mino['mean_b'])} over the "
            f"{mino['num_attributes']} of these attributes that both models predict at least "
            f"once; mean minority-class error rate {_fmt(finding['minority_error_u'])} (u) vs "
            f"{_fmt(finding['minority_error_b'])} (b). ")
        verdict += {
            "shows": "**The paper's finding shows**: the unbalanced model's majority-class CAMs "
                     "carry less energy in the attribute region than the balanced model's.",
            "trend": "**The paper's finding shows only as a trend** here: the balanced model's "
                     "majority-class CAMs carry more energy in the attribute region on average "
                     "and for most attributes, but not significantly (p >= "
                     f"{finding['alpha']}).",
            "does_not_show": "**The paper's finding does not show** here: the balanced model's "
                             "majority-class CAMs do not carry more energy in the attribute "
                             "region than the unbalanced model's.",
            "inconclusive": f"**Inconclusive**: fewer than {MIN_ATTRIBUTES_FOR_TEST} attributes "
                            "to compare.",
        }[finding_verdict(finding)]
    loss_u = ("plain Euclidean loss on +-1 targets" if setup["unbalanced_loss"] == "euclidean"
              else "sigmoid cross-entropy")
    files = ", ".join(f"[{f}]({link_prefix}{f})" for f in (
        "table1.md", "table2.md", "table_targets.md", "figure2_mean_cams.png",
        "figure3_cam_methods.png", "figure4_targets.png", "figure_energy.png"))
    return (
        "### Binary attribute CAMs\n\n"
        f"AFFACT-u ({loss_u}) vs AFFACT-b (balanced Euclidean loss, eq. 5-6): two "
        f"{setup['model']} networks with one logit per attribute ({setup['num_attributes']} "
        f"attributes), trained on the same {setup['train_size']} {setup['source_label']} "
        f"({setup['num_steps']} updates each, {setup['resolution']} px), explained by "
        f"{setup['main_method_label']} with the predicted-class target |z| on "
        f"{setup['test']['kept']} frontal test faces ({setup['test']['excluded']} of "
        f"{setup['test']['total']} excluded by the frontal filter); E = proportional energy "
        f"(eq. 7) in the {setup['mask_source']} attribute mask, **bold** = majority class.\n\n"
        + markdown_table(headers, body) + "\n" + verdict + "\n\nFull tables and figures: "
        + files + ".\n")


# ----------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path, dpi: int = 110) -> str:
    fig.savefig(path, dpi=dpi)
    return path.name


def _gray(image: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(image, np.float32).mean(-1), 0.0, 1.0)


def _show_mean_cam(ax, background, cam, mask_mean, text: str) -> None:
    ax.imshow(background, cmap="gray", vmin=0, vmax=1)
    if cam is not None and np.all(np.isfinite(cam)):
        ax.imshow(cam, cmap="jet", vmin=0, vmax=1, alpha=0.5, interpolation="bilinear")
        if mask_mean is not None and mask_mean.max() > 0:
            level = 0.5 if mask_mean.max() > 0.5 else 0.5 * float(mask_mean.max())
            ax.contour(mask_mean, levels=[level], colors="white", linewidths=0.8)
    else:
        ax.text(0.5, 0.5, "no such\nprediction", ha="center", va="center", color="white",
                fontsize=7, transform=ax.transAxes)
    ax.text(0.03, 0.03, text, ha="left", va="bottom", color="white", fontsize=6.5,
            transform=ax.transAxes, bbox=dict(facecolor="black", alpha=0.55, pad=1.2, lw=0))
    ax.set_xticks([])
    ax.set_yticks([])


class _Cell(NamedTuple):
    cam: Optional[np.ndarray]  # [H, W] mean CAM, None/NaN: no such prediction
    mask: Optional[np.ndarray]  # [H, W] mean attribute mask (contour)
    text: str  # shown in the cell's corner


def _cam_grid(path: Path, background: np.ndarray, cells: Sequence[Sequence[_Cell]],
              row_labels: Sequence[str], col_labels: Sequence[str], title: str) -> str:
    """A grid of mean CAMs over the mean face: row labels left, column labels on top."""
    rows, cols = len(cells), len(cells[0])
    cell = 1.25
    top, left, right = 0.75, 0.9, 0.75  # inches
    width, height = left + cols * cell + right, top + rows * cell + 0.1
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            _show_mean_cam(ax, background, cells[r][c].cam, cells[r][c].mask, cells[r][c].text)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=7)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=7)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=0.1 / height, wspace=0.04, hspace=0.04)
    fig.suptitle(title, fontsize=8, y=1 - 0.12 / height, va="top")
    bar_ax = fig.add_axes([1 - 0.6 / width, 0.15, 0.12 / width, 0.7])
    bar = fig.colorbar(cm.ScalarMappable(norm=mcolors.Normalize(0, 1), cmap="jet"), cax=bar_ax)
    bar.set_label("mean normalised CAM", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return _save(fig, path)


def _cam_means(evaluation: Evaluation, pair_index: int, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty sides: shown as "no such prediction"
        return attribute_cams_lib.finalize_cam_means(evaluation.sums.cams[pair_index], names)


def _background(evaluation: Evaluation):
    """(mean test face in grey [H, W], mean attribute masks [A, H, W])."""
    sums = evaluation.sums
    count = max(int(sums.count), 1)
    return _gray(np.asarray(sums.image_sum) / count), np.asarray(sums.mask_sum) / count


def _label(name: str) -> str:
    return name.replace("_", " ")


def figure2(path: Path, evaluations, reports, pairs, main_method, attributes, names) -> str:
    """Mean CAM per predicted class and attribute, both models (the paper's Figure 2)."""
    key = f"{main_method}/predicted"
    background, mask_mean = _background(evaluations[MODELS[0]])
    means = {m: _cam_means(evaluations[m], pairs.index((main_method, "predicted")), names)
             for m in MODELS}
    cells = []
    for attribute in attributes:
        a = list(names).index(attribute)
        row = []
        for model in MODELS:
            energy = reports[model]["energy"][key]
            for side in ("positive", "negative"):
                count = getattr(means[model], f"num_{side}")[a]
                row.append(_Cell(getattr(means[model], side)[a], mask_mean[a],
                                 f"n={count} E={_fmt(energy[side][a], '.2f')}"))
        cells.append(row)
    cols = [f"{MODEL_LABELS[m]}, {'z >= 0' if s == 'positive' else 'z < 0'}"
            for m in MODELS for s in ("positive", "negative")]
    return _cam_grid(path, background, cells, [_label(a) for a in attributes], cols,
                     f"Mean {METHOD_LABELS.get(main_method, main_method)} (target |z|) per "
                     "predicted class; white line: attribute mask; E: mean energy in it")


def figure3(path: Path, evaluations, reports, pairs, methods, attributes, names) -> str:
    """Mean CAMs per CAM method (rows: model x method; columns: attribute x predicted class)."""
    background, mask_mean = _background(evaluations[MODELS[0]])
    cells, row_labels = [], []
    for model in MODELS:
        for method in methods:
            means = _cam_means(evaluations[model], pairs.index((method, "predicted")), names)
            energy = reports[model]["energy"][f"{method}/predicted"]
            row = []
            for attribute in attributes:
                a = list(names).index(attribute)
                for side in ("positive", "negative"):
                    row.append(_Cell(getattr(means, side)[a], mask_mean[a],
                                     f"E={_fmt(energy[side][a], '.2f')}"))
            cells.append(row)
            row_labels.append(f"{MODEL_LABELS[model]}\n{METHOD_LABELS.get(method, method)}")
    cols = [f"{_label(a)} {'+' if s == 'positive' else '-'}" for a in attributes
            for s in ("positive", "negative")]
    return _cam_grid(path, background, cells, row_labels, cols,
                     "Mean CAMs (target |z|) per CAM method over positively (+) and negatively "
                     "(-) predicted faces")


def figure4(path: Path, evaluations, reports, pairs, main_method, attributes, names) -> str:
    """Negatively predicted faces: positive target z vs predicted target |z| (Figure 4)."""
    background, mask_mean = _background(evaluations[MODELS[0]])
    cells = []
    for attribute in attributes:
        a = list(names).index(attribute)
        row = []
        for model in MODELS:
            for mode in ("positive", "predicted"):
                means = _cam_means(evaluations[model], pairs.index((main_method, mode)), names)
                energy = reports[model]["energy"][f"{main_method}/{mode}"]["negative"][a]
                row.append(_Cell(means.negative[a], mask_mean[a],
                                 f"n={means.num_negative[a]} E={_fmt(energy, '.2f')}"))
        cells.append(row)
    cols = [f"{MODEL_LABELS[m]}, target {'z' if mode == 'positive' else '|z|'}"
            for m in MODELS for mode in ("positive", "predicted")]
    return _cam_grid(path, background, cells, [_label(a) for a in attributes], cols,
                     f"Mean {METHOD_LABELS.get(main_method, main_method)} on negatively "
                     "predicted faces (z < 0): positive target z vs predicted target |z|")


def figure_energy(path: Path, rows1: Sequence[dict], method_label: str) -> str:
    """E+ and E- of both models per attribute (with a mask), sorted by p_m."""
    rows = sorted((r for r in rows1 if r["mask_defined"]), key=lambda r: r["p_train"])
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.32 * len(rows) + 1.5), 5.2))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, side in zip(axes, ("negative", "positive")):
        for offset, model, colour in ((-0.18, "affact_u", "tab:red"),
                                      (0.18, "affact_b", "tab:blue")):
            values = np.array([r[model][f"energy_{side}"] for r in rows], np.float64)
            ax.bar(x + offset, np.nan_to_num(values), width=0.36, color=colour,
                   label=MODEL_LABELS[model])
        uniform = np.array([r["affact_u"][f"uniform_{side}"] for r in rows], np.float64)
        ax.plot(x, uniform, "k_", markersize=9, label="uniform map")
        ax.set_ylabel(f"E ({side}ly predicted)", fontsize=8)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([f"{r['attribute'].replace('_', ' ')} ({r['p_train']:.2f})"
                             for r in rows], rotation=75, fontsize=6.5)
    fig.suptitle(f"Proportional energy of {method_label} (target |z|) in the attribute mask; "
                 "attributes sorted by p_m (in brackets)", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- the job




def _source_label(config) -> str:
    if config.data.source == "celeba":
        return "CelebA training images"
    kind = "independent-attribute" if config.data.independent else "CelebA-like correlated"
    return f"{kind} synthetic faces"


def markdown_outputs(results: dict, link_prefix: str = "") -> dict[str, str]:
    """{file name: Markdown} for table1.md, table2.md, table_targets.md and summary.md.

    ``results`` is the run's results dict, or the same read back from
    results.json (NaN written as null; both print as "n/a").
    """
    setup = results["setup"]
    method_label = setup["main_method_label"]
    # The summary's key rows: the figure attributes (those of the Figure 4 table).
    key_attributes = setup.get("figure_attributes") or list(
        dict.fromkeys(row["attribute"] for row in results["targets"]))
    return {
        "table1.md": table1_markdown(results["table1"], method_label),
        "table2.md": table2_markdown(results["table2"], setup["methods"]),
        "table_targets.md": target_markdown(results["targets"], method_label),
        "summary.md": summary_markdown(setup, results["table1"], results["finding"],
                                       key_attributes, link_prefix),
    }


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
    results["finding"]["verdict"] = finding_verdict(results["finding"])
    write_json(path, results)
    for filename, text in markdown_outputs(results, registry.readme_link_prefix(out)).items():
        (out / filename).write_text(text)
    return (out / "summary.md").read_text()


def train(config, workdir: str) -> dict[str, TrainedModel]:
    """Train (or reload) AFFACT-u and AFFACT-b; returns {name: TrainedModel}."""
    source = build_source(config.data)
    train_idx, _ = split_indices(config, source)
    train_attrs = source.attributes(train_idx)["attrs"]
    names = attribute_names(config.data, train_attrs)
    p_train = training_positive_share(train_attrs, names)
    return {m.name: m for m in train_models(config, workdir, source, train_idx, names, p_train)}


def run(config, workdir: str) -> dict:
    """Train both models, explain them on frontal test faces, write tables, figures, JSON."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = build_source(config.data)
    train_idx, test_idx = split_indices(config, source)
    train_attrs = source.attributes(train_idx)["attrs"]
    names = attribute_names(config.data, train_attrs)
    methods = tuple(config.explain.methods)
    main_method = str(config.explain.main_method)
    pairs = cam_pairs(methods, main_method)
    table2_attributes = tuple(config.explain.table2_attributes)
    figure_attributes = tuple(config.explain.figure_attributes)
    for field, attrs in (("table2_attributes", table2_attributes),
                         ("figure_attributes", figure_attributes)):
        missing = [a for a in attrs if a not in names]
        if missing:
            raise ValueError(
                f"explain.{field} names {missing}, which the networks do not predict; expected "
                f"some of: {', '.join(names)}")
    mask_source = str(config.explain.mask_source)
    defined = masks_lib.mask_defined(names, mask_source)
    losses_by_model = model_losses(config)

    p_train = training_positive_share(train_attrs, names)
    models = train_models(config, workdir, source, train_idx, names, p_train)
    trained_at = time.perf_counter()

    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", RuntimeWarning)
        evaluations, frontal_counts = explain_test_set(models, source, test_idx, names, pairs,
                                                       config)
        reports = {name: model_report(evaluations[name], names, pairs, defined)
                   for name in MODELS}
    for record in records:
        message = f"{record.category.__name__}: {record.message}"
        if message not in caught:
            caught.append(message)
    explained_at = time.perf_counter()

    key = f"{main_method}/predicted"
    method_label = METHOD_LABELS.get(main_method, main_method)
    rows1 = table1_rows(p_train, reports, key, names, defined)
    rows2 = table2_rows(reports, methods, table2_attributes, names)
    rows_targets = target_rows(reports, main_method, figure_attributes, names)
    finding = majority_class_finding(p_train, reports, key, defined, names,
                                     float(config.explain.min_imbalance))

    setup = {
        "source": str(config.data.source), "source_label": _source_label(config),
        "independent": bool(config.data.independent), "resolution": int(config.data.resolution),
        "model": str(config.model.name), "attributes": list(names),
        "num_attributes": len(names), "train_size": int(train_idx.size),
        "batch_size": int(config.train.batch_size), "num_epochs": int(config.train.num_epochs),
        "num_steps": models[0].num_steps, "unbalanced_loss": losses_by_model["affact_u"],
        "balanced_loss": "balanced_euclidean (eq. 5), weights eq. 6 from the training p_m",
        "methods": list(methods), "main_method": main_method, "main_method_label": method_label,
        "pairs": [f"{m}/{t}" for m, t in pairs], "mask_source": mask_source,
        "table2_attributes": list(table2_attributes),
        "figure_attributes": list(figure_attributes),
        "mask_defined": {n: bool(d) for n, d in zip(names, defined)},
        "test": {**frontal_counts, "rendered": int(test_idx.size),
                 "frontal_max_ratio": float(config.test.frontal_max_ratio)},
        "seconds": {"train": round(trained_at - started, 1),
                    "explain": round(explained_at - trained_at, 1)},
    }
    figures = [
        figure2(out / "figure2_mean_cams.png", evaluations, reports, pairs, main_method,
                figure_attributes, names),
        figure3(out / "figure3_cam_methods.png", evaluations, reports, pairs, methods,
                table2_attributes, names),
        figure4(out / "figure4_targets.png", evaluations, reports, pairs, main_method,
                figure_attributes, names),
        figure_energy(out / "figure_energy.png", rows1, method_label),
    ]

    def report_json(report: dict) -> dict:
        per_attribute = {}
        for a, name in enumerate(names):
            per_attribute[name] = {
                "p_test": report["p_test"][a], "fnr": report["fnr"][a], "fpr": report["fpr"][a],
                "accuracy": report["accuracy"][a], "num_positive": report["num_positive"][a],
                "num_negative": report["num_negative"][a],
                "predicted_positive": report["predicted_positive"][a],
                "predicted_negative": report["predicted_negative"][a],
                "energy": {pair: {"positive": e["positive"][a], "negative": e["negative"][a]}
                           for pair, e in report["energy"].items()},
                "uniform_energy": {"positive": report["uniform_energy"]["positive"][a],
                                   "negative": report["uniform_energy"]["negative"][a]},
            }
        balanced_accuracy = 1.0 - 0.5 * (report["fnr"] + report["fpr"])
        return {
            "mean_accuracy": float(np.nanmean(report["accuracy"])),
            "mean_balanced_accuracy": float(np.nanmean(balanced_accuracy)),
            "attributes": per_attribute,
        }

    results = {
        "experiment": "attribute_cams",
        "setup": setup,
        "p_train": {n: float(p) for n, p in zip(names, p_train)},
        "models": {name: {"loss": losses_by_model[name], **report_json(reports[name])}
                   for name in MODELS},
        "table1": rows1, "table2": rows2, "targets": rows_targets,
        "finding": finding, "figures": figures, "warnings": caught,
    }
    write_json(out / "results.json", results)
    for filename, text in markdown_outputs(results, registry.readme_link_prefix(out)).items():
        (out / filename).write_text(text)
    summary = (out / "summary.md").read_text()
    for name in MODELS:
        print(f"[{MODEL_LABELS[name]}] mean accuracy {results['models'][name]['mean_accuracy']:.3f}"
              f", mean balanced accuracy "
              f"{results['models'][name]['mean_balanced_accuracy']:.3f}", flush=True)
    print(summary, flush=True)
    return results
