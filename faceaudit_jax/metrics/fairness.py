"""Error rates per attribute and accuracy per group.

Binary-attribute CAM paper (Table 1): for every attribute m the false negative
rate FNR = FN / (TP + FN) over the samples whose target is positive and the
false positive rate FPR = FP / (FP + TN) over those whose target is negative,
with the attributes ordered by their imbalance |p_m - 0.5| (p_m the share of
positives). An unbalanced classifier shows a high error rate on the minority
class of the most imbalanced attributes.

Data-attribution paper: accuracy per subgroup (skin-tone group, or the cells of
target x confounder) and the gap between the best and the worst group.

Targets follow the batch format: int8 [N, A] with 1 present, 0 absent and -1
unknown; unknown entries are left out of every count. Predictions are bool,
or numbers thresholded at `threshold`: positive iff score >= threshold (logits
of a +-1 Euclidean or a BCE head with the default 0; z = 0 counts as positive,
as in `explain.cams.binary_target`).

The counting functions (`confusion_counts`, `group_counts`) are jnp and
jit-friendly, and their results add up across batches, so whole test sets are
reduced by streaming; the `*_from_counts` finalisers are host-side because they
warn.

Noise-debiasing paper (Table 1): `subgroup_metrics` (accuracy for the target's
two classes, their gap with its standard error, and the target x confounder
cells), `aggregate_repeats` (mean ± s.d. over repeated trainings) and
`paired_gap_change` (a gap change paired by repeat, with its standard error).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _as_predicted_positive(predictions, threshold: float):
    predictions = jnp.asarray(predictions)
    if predictions.dtype == jnp.bool_:
        return predictions
    return predictions >= threshold


def _check_targets(targets, predictions):
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"targets must be integers (1 present, 0 absent, -1 unknown); got dtype "
            f"{targets.dtype}")
    if targets.shape != jnp.shape(predictions) or targets.ndim not in (1, 2):
        raise ValueError(
            f"predictions {jnp.shape(predictions)} and targets {targets.shape} must "
            "have the same shape [N] or [N, A]")
    return targets


class ConfusionCounts(NamedTuple):
    """Per-attribute confusion counts over the known targets; add across batches."""

    true_positive: jax.Array  # int32 [A]
    false_negative: jax.Array  # int32 [A]
    false_positive: jax.Array  # int32 [A]
    true_negative: jax.Array  # int32 [A]

    def __add__(self, other):  # tuple + would concatenate; counts add
        return ConfusionCounts(*(a + b for a, b in zip(self, other)))


def confusion_counts(predictions, targets, threshold: float = 0.0) -> ConfusionCounts:
    """Confusion counts per attribute, unknown targets (-1) masked out.

    Args:
      predictions: bool, or logits / scores (positive iff >= `threshold`),
        [N] or [N, A].
      targets: int [N] or [N, A]: 1 present, 0 absent, -1 unknown. Other
        values are unknown too (never counted).

    Returns:
      ConfusionCounts of int32 [A] (shape () for 1-D input).
    """
    predicted = _as_predicted_positive(predictions, threshold)
    targets = _check_targets(targets, predicted)
    positive = targets == 1
    negative = targets == 0

    def count(x):
        return jnp.sum(x, axis=0, dtype=jnp.int32)

    return ConfusionCounts(
        true_positive=count(positive & predicted),
        false_negative=count(positive & ~predicted),
        false_positive=count(negative & predicted),
        true_negative=count(negative & ~predicted),
    )


class ErrorRates(NamedTuple):
    """Error rates per attribute (numpy, host-side)."""

    fnr: np.ndarray  # [A] FN / (TP + FN); NaN where no positive target
    fpr: np.ndarray  # [A] FP / (FP + TN); NaN where no negative target
    num_positive: np.ndarray  # [A] int, known positive targets
    num_negative: np.ndarray  # [A] int, known negative targets
    positive_share: np.ndarray  # [A] p_m among the known targets (NaN if none)
    accuracy: np.ndarray  # [A] over the known targets (NaN if none)


def _names_for(indices, names):
    return ", ".join(names[i] if names is not None else str(i) for i in indices)


def _warn_empty(empty, names, what):
    empty = np.atleast_1d(empty)
    if empty.any():
        warnings.warn(
            f"no {what} samples for attribute(s) {_names_for(np.flatnonzero(empty), names)}; "
            f"their {'FNR' if what == 'positive' else 'FPR'} is NaN",
            RuntimeWarning, stacklevel=3)


def error_rates_from_counts(counts: ConfusionCounts,
                            names: Sequence[str] | None = None) -> ErrorRates:
    """FNR, FPR, p_m and accuracy from (possibly accumulated) confusion counts.

    An attribute with no positive (no negative) known target gets FNR (FPR)
    NaN with a RuntimeWarning naming it; the other attributes are unaffected.
    """
    tp, fn, fp, tn = (np.asarray(c, dtype=np.int64) for c in counts)
    if names is not None and len(names) != np.atleast_1d(tp).shape[0]:
        raise ValueError(f"got {len(names)} names for {np.atleast_1d(tp).shape[0]} attributes")
    num_positive = tp + fn
    num_negative = fp + tn
    known = num_positive + num_negative

    def ratio(numerator, denominator):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)

    _warn_empty(num_positive == 0, names, "positive")
    _warn_empty(num_negative == 0, names, "negative")
    return ErrorRates(
        fnr=ratio(fn, num_positive),
        fpr=ratio(fp, num_negative),
        num_positive=num_positive,
        num_negative=num_negative,
        positive_share=ratio(num_positive, known),
        accuracy=ratio(tp + tn, known),
    )


def attribute_error_rates(predictions, targets, threshold: float = 0.0,
                          names: Sequence[str] | None = None) -> ErrorRates:
    """FNR and FPR per attribute over the known targets (-1 masked out).

    Args:
      predictions: bool, or logits (positive iff >= `threshold`), [N, A].
      targets: int8 [N, A], 1 / 0 / -1 (unknown).
      names: optional attribute names for the warnings.
    """
    return error_rates_from_counts(confusion_counts(predictions, targets, threshold), names)


def positive_share(targets, names: Sequence[str] | None = None) -> np.ndarray:
    """p_m [A]: share of positives among the known targets (training-set p_m).

    NaN with a RuntimeWarning for an attribute with no known target.
    """
    targets = np.asarray(targets)
    if not np.issubdtype(targets.dtype, np.integer) or targets.ndim not in (1, 2):
        raise ValueError(
            f"targets must be an integer array [N] or [N, A] (1, 0, -1 unknown); got "
            f"dtype {targets.dtype}, shape {targets.shape}")
    positives = (targets == 1).sum(axis=0)
    known = positives + (targets == 0).sum(axis=0)
    empty = np.atleast_1d(known == 0)
    if empty.any():
        warnings.warn(
            f"no known targets for attribute(s) {_names_for(np.flatnonzero(empty), names)}; "
            "their positive share is NaN", RuntimeWarning, stacklevel=2)
    return np.where(known > 0, positives / np.maximum(known, 1), np.nan)


def imbalance(p_positive) -> np.ndarray:
    """|p_m - 0.5|: 0 for a balanced attribute, 0.5 for a one-class one."""
    return np.abs(np.asarray(p_positive, dtype=np.float64) - 0.5)


def imbalance_order(p_positive, most_imbalanced_first: bool = True) -> np.ndarray:
    """Attribute indices sorted by imbalance |p_m - 0.5| (stable; NaN last).

    Use p_m of the training set, as the paper does: the order states how
    skewed the data the model learnt from was.
    """
    score = imbalance(p_positive)
    key = -score if most_imbalanced_first else score
    key = np.where(np.isnan(key), np.inf, key)  # attributes without p_m go last
    return np.argsort(key, kind="stable")


def group_ids(target, confounder, num_confounder_values: int = 2):
    """Cell id of target x confounder: target * K + confounder, -1 if either is unknown.

    With binary attributes (K = 2): (0,0) -> 0, (0,1) -> 1, (1,0) -> 2,
    (1,1) -> 3. Negative inputs (the -1 "unknown" code) and confounder values
    >= K give -1, which `group_counts` leaves out.
    """
    target = jnp.asarray(target).astype(jnp.int32)
    confounder = jnp.asarray(confounder).astype(jnp.int32)
    if target.shape != confounder.shape:
        raise ValueError(
            f"target {target.shape} and confounder {confounder.shape} must have the same shape")
    if num_confounder_values < 1:
        raise ValueError(f"num_confounder_values must be >= 1; got {num_confounder_values}")
    known = (target >= 0) & (confounder >= 0) & (confounder < num_confounder_values)
    return jnp.where(known, target * num_confounder_values + confounder, -1)


class GroupCounts(NamedTuple):
    """Per-group sample and correct counts; add across batches."""

    correct: jax.Array  # int32 [G]
    total: jax.Array  # int32 [G]

    def __add__(self, other):
        return GroupCounts(self.correct + other.correct, self.total + other.total)


def group_counts(correct, groups, num_groups: int) -> GroupCounts:
    """Correct and total counts per integer group (segment sums; jit-friendly).

    Args:
      correct: bool [N], the prediction was right.
      groups: int [N] group ids in 0..num_groups-1; negative ids (unknown) and
        ids >= num_groups are left out.
    """
    correct = jnp.asarray(correct)
    groups = jnp.asarray(groups)
    if correct.ndim != 1 or groups.shape != correct.shape:
        raise ValueError(
            f"correct {correct.shape} and groups {groups.shape} must both be [N]")
    if not jnp.issubdtype(groups.dtype, jnp.integer):
        raise ValueError(f"groups must be integers; got dtype {groups.dtype}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1; got {num_groups}")
    in_range = (groups >= 0) & (groups < num_groups)
    # Out-of-range ids go to an extra overflow segment that is dropped.
    segment = jnp.where(in_range, groups, num_groups)
    total = jax.ops.segment_sum(jnp.ones_like(groups, jnp.int32), segment, num_groups + 1)
    right = jax.ops.segment_sum(correct.astype(jnp.int32), segment, num_groups + 1)
    return GroupCounts(correct=right[:num_groups], total=total[:num_groups])


class GroupAccuracy(NamedTuple):
    accuracy: np.ndarray  # [G], NaN for a group without samples
    count: np.ndarray  # [G] int
    gap: float  # best minus worst accuracy over the non-empty groups (NaN if none)
    best: int  # id of the best group (-1 if none)
    worst: int  # id of the worst group (-1 if none)


def group_accuracy_from_counts(counts: GroupCounts,
                               group_names: Sequence[str] | None = None) -> GroupAccuracy:
    """Accuracy per group and the best-worst gap; empty groups are NaN with a warning."""
    right = np.asarray(counts.correct, dtype=np.int64)
    total = np.asarray(counts.total, dtype=np.int64)
    empty = total == 0
    if empty.any():
        warnings.warn(
            f"no samples in group(s) {_names_for(np.flatnonzero(empty), group_names)}; "
            "their accuracy is NaN and they are left out of the gap",
            RuntimeWarning, stacklevel=2)
    accuracy = np.where(empty, np.nan, right / np.maximum(total, 1))
    if empty.all():
        return GroupAccuracy(accuracy, total, float("nan"), -1, -1)
    best = int(np.nanargmax(accuracy))
    worst = int(np.nanargmin(accuracy))
    return GroupAccuracy(accuracy, total, float(accuracy[best] - accuracy[worst]), best, worst)


def group_accuracy(correct, groups, num_groups: int,
                   group_names: Sequence[str] | None = None) -> GroupAccuracy:
    """Accuracy per integer group (e.g. skin tone, or `group_ids` cells) and the gap.

    Args:
      correct: bool [N]; groups: int [N] (negative = unknown, left out).
    """
    return group_accuracy_from_counts(group_counts(correct, groups, num_groups), group_names)


# ----------------------------------------------------------------------------- target x confounder

# The four cells of a binary target x binary confounder, in `group_ids` order.
SUBGROUP_CELLS = ("women_without", "women_with", "men_without", "men_with")


def subgroup_metrics(correct, target, confounder) -> dict[str, Any]:
    """The paper's Table 1 columns plus the four gender x confounder cells.

    Args:
      correct: bool [N]; target: int [N] (1 = man); confounder: int [N] (1 = present).

    Returns:
      {"accuracy", "men", "women", "gap" (|men - women|), "men_minus_women",
      "gap_se" (binomial standard error of men - women),
      "cells": {women_without, women_with, men_without, men_with},
      "cell_counts", "worst_cell", "cell_gap" (best minus worst cell)}.
    """
    correct = np.asarray(correct, bool)
    target = np.asarray(target)
    confounder = np.asarray(confounder)
    if not (correct.shape == target.shape == confounder.shape) or correct.ndim != 1:
        raise ValueError(f"correct {correct.shape}, target {target.shape} and confounder "
                         f"{confounder.shape} must all be [N]")
    if not (np.any(target == 1) and np.any(target == 0)):
        raise ValueError("the test set needs both men and women to measure a gap")
    groups = group_ids(target, confounder)
    cells = group_accuracy(correct, groups, 4, group_names=SUBGROUP_CELLS)
    men = float(correct[target == 1].mean())
    women = float(correct[target == 0].mean())
    # Binomial standard error of men - women (independent groups).
    gap_se = math.sqrt(men * (1 - men) / np.sum(target == 1)
                       + women * (1 - women) / np.sum(target == 0))
    return {
        "accuracy": float(correct.mean()), "men": men, "women": women,
        "gap": abs(men - women), "men_minus_women": men - women, "gap_se": gap_se,
        "cells": {name: float(a) for name, a in zip(SUBGROUP_CELLS, cells.accuracy)},
        "cell_counts": {name: int(c) for name, c in zip(SUBGROUP_CELLS, cells.count)},
        "worst_cell": SUBGROUP_CELLS[cells.worst] if cells.worst >= 0 else None,
        "cell_gap": float(cells.gap),
    }


MEAN_METRICS = ("accuracy", "men", "women", "gap", "men_minus_women", "gap_se", "cell_gap")


def aggregate_repeats(records: Sequence[dict]) -> dict[str, Any]:
    """One Table 1 cell from its repeated trainings (same data and augmentation,
    different initialisation, batch order and noise keys).

    Returns the first record's settings with every metric replaced by its mean
    over the trainings (the gap is the mean of per-training gaps: the expected
    gap of one trained model), `gap_std` / `accuracy_std` (ddof 1; 0 for one
    training), `num_repeats`, `repeats` (per-training accuracy, men, women,
    gap) and the summed `train_seconds`.
    """
    if not records:
        raise ValueError("aggregate_repeats needs at least one record")
    out = {k: v for k, v in records[0].items() if k not in ("fingerprint", "train_history")}
    for key in MEAN_METRICS:
        out[key] = float(np.mean([r[key] for r in records]))
    out["cells"] = {c: float(np.mean([r["cells"][c] for r in records])) for c in SUBGROUP_CELLS}
    out["worst_cell"] = min(SUBGROUP_CELLS, key=lambda c: out["cells"][c])
    for key in ("gap", "accuracy"):
        values = [r[key] for r in records]
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    out["num_repeats"] = len(records)
    out["repeats"] = [{k: r[k] for k in ("accuracy", "men", "women", "gap")} for r in records]
    out["train_seconds"] = round(sum((r.get("train_seconds") or 0.0) for r in records), 1)
    out["reloaded_model"] = all(r.get("reloaded_model") for r in records)
    return out


def paired_gap_change(runs: dict, name: str) -> dict[str, Any]:
    """How run `name` moved the gap from the original model, paired by repeat
    (a repeat's runs share initialisation and batch order): the mean of the
    per-repeat differences, its standard error (None for one training),
    whether it is resolved, |mean| > 2 standard errors, and in how many
    repeats the gap narrowed."""
    diffs = np.array([m["gap"] - o["gap"] for m, o in zip(runs[name]["repeats"],
                                                          runs["original"]["repeats"])])
    mean = float(diffs.mean())
    se = float(np.std(diffs, ddof=1) / math.sqrt(diffs.size)) if diffs.size > 1 else None
    return {"mean": mean, "se": se, "resolved": se is not None and abs(mean) > 2 * se,
            "num_narrower": int(np.sum(diffs < 0))}


def bias_group_report(logits, attrs, target: str, confounders, confounder_values) -> dict[str, float]:
    """Accuracy of a binary classifier overall, on bias-aligned and bias-conflicting images, and per cell.

    ``logits`` [N] (positive = target 1), ``attrs`` int [N, 40] (CelebA order).
    Aligned: every confounder takes the value that goes with the image's
    target in the training bias (``confounder_values`` for target = 1).
    Per-cell keys read "Male=1,Wearing_Lipstick=0". NaN where a group is empty.
    """
    import math

    from faceaudit_jax import regions
    from faceaudit_jax.data import sampling

    logits, attrs = np.asarray(logits), np.asarray(attrs)
    y, aligned = sampling.group_labels(attrs, target, confounders, confounder_values)
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
