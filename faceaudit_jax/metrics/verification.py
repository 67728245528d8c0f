"""Face-verification metrics: cosine scores, thresholds, k-fold accuracy, ROC.

Conventions used throughout:
- A pair is predicted "same" when its score is >= the threshold.
- Candidate thresholds for a set of scores are the midpoints between
  consecutive distinct scores, plus the smallest score (accept everything)
  and the float64 value just above the largest score (reject everything).
  Every achievable split of the sorted scores is represented exactly once.
- Among thresholds of equal accuracy the lowest one wins (the first in
  ascending order, as the usual LFW grid-search scripts do with argmax).

Everything except `cosine_similarity` is host-side numpy in float64 (pair
counts are small, and exact tie handling matters more than speed); the
threshold search is one sort plus cumulative sums, never a loop over
candidate thresholds.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

# Below this norm an embedding counts as zero: its cosine with anything is 0.
COSINE_EPS = 1e-8


def cosine_similarity(a, b, eps: float = COSINE_EPS):
    """Cosine similarity along the last axis, safe for zero-norm vectors.

    a, b: [..., D] (broadcastable). Returns [...]. Each vector is divided by
    max(||v||, eps), so a zero vector scores 0 against anything instead of
    NaN. Works on jax and numpy inputs (returns a jax array).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    norm_a = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    norm_b = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (norm_a * norm_b)


def pair_scores(embeddings_a, embeddings_b, eps: float = COSINE_EPS) -> np.ndarray:
    """Cosine scores of pairs: embeddings [P, D] each -> float64 [P]."""
    embeddings_a = np.asarray(embeddings_a, np.float64)
    embeddings_b = np.asarray(embeddings_b, np.float64)
    if embeddings_a.shape != embeddings_b.shape or embeddings_a.ndim != 2:
        raise ValueError(
            f"embeddings_a has shape {embeddings_a.shape} and embeddings_b "
            f"{embeddings_b.shape}; expected two arrays of the same shape [P, D]")
    norm_a = np.maximum(np.linalg.norm(embeddings_a, axis=-1), eps)
    norm_b = np.maximum(np.linalg.norm(embeddings_b, axis=-1), eps)
    return np.sum(embeddings_a * embeddings_b, axis=-1) / (norm_a * norm_b)


def _check_scores_labels(scores, is_same) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    is_same = np.asarray(is_same)
    if scores.ndim != 1 or scores.shape != is_same.shape:
        raise ValueError(
            f"scores has shape {scores.shape} and is_same {is_same.shape}; "
            "expected two 1-D arrays of the same length")
    if scores.size == 0:
        raise ValueError("scores is empty; expected at least one pair")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contains NaN or inf; expected finite scores")
    return scores, is_same.astype(bool)


def _split_thresholds_and_accuracy(scores: np.ndarray, is_same: np.ndarray,
                                   weights: np.ndarray):
    """Accuracy of every candidate split for several weightings of the pairs.

    scores [n] float64, is_same [n] bool, weights [F, n] in {0, 1} (which
    pairs count; one row per fold). Returns (thresholds [F, n+1], accuracy
    [F, n+1], valid [F, n+1]): split i predicts "same" for the i-th smallest
    counted score onwards; valid is False where split i falls between two
    equal counted scores (not achievable by any threshold) or duplicates an
    earlier split (no counted score between them).
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = is_same[order].astype(np.float64)
    w = weights[:, order].astype(np.float64)
    total = w.sum(axis=1, keepdims=True)
    # Counted positives / negatives strictly below split i (i = 0..n).
    zeros = np.zeros((w.shape[0], 1))
    pos_below = np.concatenate([zeros, np.cumsum(w * pos, axis=1)], axis=1)
    neg_below = np.concatenate([zeros, np.cumsum(w * (1.0 - pos), axis=1)], axis=1)
    pos_total = pos_below[:, -1:]
    correct = (pos_total - pos_below) + neg_below
    accuracy = correct / np.maximum(total, 1.0)

    # Nearest counted score below / at-or-above each split.
    counted = w > 0
    below = np.where(counted, s[None, :], -np.inf)
    prev_counted = np.concatenate(
        [np.full((w.shape[0], 1), -np.inf), np.maximum.accumulate(below, axis=1)], axis=1)
    above = np.where(counted, s[None, :], np.inf)
    next_counted = np.concatenate(
        [np.minimum.accumulate(above[:, ::-1], axis=1)[:, ::-1],
         np.full((w.shape[0], 1), np.inf)], axis=1)

    has_prev = np.isfinite(prev_counted)
    has_next = np.isfinite(next_counted)
    with np.errstate(invalid="ignore"):
        midpoint = 0.5 * (prev_counted + next_counted)
    thresholds = np.where(
        has_prev & has_next, midpoint,
        np.where(has_next, next_counted, np.nextafter(prev_counted, np.inf)))
    # A split is real only where it separates two different counted values.
    valid = np.where(has_prev & has_next, prev_counted < next_counted, True)
    # Keep one split per distinct threshold: the first index where the
    # counted neighbourhood changes (uncounted pairs create duplicate splits).
    prev_shift = np.concatenate([np.full((w.shape[0], 1), np.nan), prev_counted[:, :-1]], axis=1)
    next_shift = np.concatenate([np.full((w.shape[0], 1), np.nan), next_counted[:, :-1]], axis=1)
    duplicate = (prev_shift == prev_counted) & (next_shift == next_counted)
    valid &= ~duplicate
    # Reject-all and accept-all exist exactly once each even with no counted pair
    # in between; keep the first accept-all (i with no counted score below).
    return thresholds, accuracy, valid


def _best_split(thresholds, accuracy, valid):
    """Row-wise best threshold: highest accuracy, lowest threshold on ties."""
    score = np.where(valid, accuracy, -np.inf)
    best_acc = score.max(axis=1, keepdims=True)
    # Lowest threshold among the best: thresholds increase with the split index.
    candidates = np.where(score == best_acc, thresholds, np.inf)
    idx = np.argmin(candidates, axis=1)
    rows = np.arange(thresholds.shape[0])
    return thresholds[rows, idx], accuracy[rows, idx]


def best_threshold(scores, is_same) -> tuple[float, float]:
    """The threshold maximising verification accuracy on these pairs.

    scores [n], is_same [n] bool. Returns (threshold, accuracy); ties go to
    the lowest threshold. Exact over all achievable splits (see module doc).
    """
    scores, is_same = _check_scores_labels(scores, is_same)
    weights = np.ones((1, scores.size))
    thr, acc = _best_split(*_split_thresholds_and_accuracy(scores, is_same, weights))
    return float(thr[0]), float(acc[0])


def fold_ids(num_pairs: int, num_folds: int) -> np.ndarray:
    """Contiguous folds as in the LFW protocol (pairs.txt lists fold by fold).

    Returns int [num_pairs]; the first num_pairs % num_folds folds get one
    extra pair (scikit-learn KFold without shuffling does the same).
    """
    if num_folds < 2:
        raise ValueError(f"num_folds={num_folds}; expected at least 2")
    if num_pairs < num_folds:
        raise ValueError(
            f"{num_pairs} pairs cannot be split into num_folds={num_folds} folds; "
            "expected at least one pair per fold")
    sizes = np.full(num_folds, num_pairs // num_folds)
    sizes[: num_pairs % num_folds] += 1
    return np.repeat(np.arange(num_folds), sizes)


def kfold_verification_accuracy(scores, is_same, num_folds: int = 10,
                                folds: Optional[np.ndarray] = None) -> dict:
    """The LFW protocol: threshold chosen on k-1 folds, accuracy on the k-th.

    scores [n] (higher = more similar), is_same [n] bool. folds: optional
    int [n] fold id per pair (default: `fold_ids`, contiguous). Returns a dict
    with mean_accuracy, std_accuracy (population std over folds, as the
    reference scripts report), mean_threshold, fold_accuracies [k],
    fold_thresholds [k]. All folds are solved at once (one sort, cumulative
    sums with a row of weights per fold).
    """
    scores, is_same = _check_scores_labels(scores, is_same)
    if folds is None:
        folds = fold_ids(scores.size, num_folds)
    folds = np.asarray(folds)
    if folds.shape != scores.shape:
        raise ValueError(f"folds has shape {folds.shape}; expected {scores.shape}")
    fold_values = np.unique(folds)
    if fold_values.size < 2:
        raise ValueError(f"folds has {fold_values.size} distinct value(s); expected at least 2")
    held_out = folds[None, :] == fold_values[:, None]  # [F, n]
    thr, _ = _best_split(*_split_thresholds_and_accuracy(scores, is_same, ~held_out))
    predicted = scores[None, :] >= thr[:, None]
    correct = (predicted == is_same[None, :]) & held_out
    fold_acc = correct.sum(axis=1) / held_out.sum(axis=1)
    return {
        "mean_accuracy": float(fold_acc.mean()),
        "std_accuracy": float(fold_acc.std()),
        "mean_threshold": float(thr.mean()),
        "fold_accuracies": fold_acc,
        "fold_thresholds": thr,
    }


def verification_rates(scores, is_same, threshold: float) -> dict:
    """Rates at one threshold (predicted same iff score >= threshold).

    Returns accuracy, tpr (= recall on matching pairs), fnr, tnr (on
    non-matching pairs), fpr, and the counts tp, fn, tn, fp. A rate whose
    denominator is empty is NaN (e.g. tnr when every pair matches).
    """
    scores, is_same = _check_scores_labels(scores, is_same)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & is_same))
    fn = int(np.sum(~predicted & is_same))
    tn = int(np.sum(~predicted & ~is_same))
    fp = int(np.sum(predicted & ~is_same))
    positives, negatives = tp + fn, tn + fp
    nan = float("nan")
    return {
        "accuracy": (tp + tn) / scores.size,
        "tpr": tp / positives if positives else nan,
        "recall": tp / positives if positives else nan,
        "fnr": fn / positives if positives else nan,
        "tnr": tn / negatives if negatives else nan,
        "fpr": fp / negatives if negatives else nan,
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


def decisions_at_mean_threshold(scores, is_same, folds) -> dict:
    """The LFW protocol's decisions: k-fold accuracy, then one threshold for every pair.

    scores [P] (cosine), is_same bool [P], folds int [P]. Returns "kfold"
    (``kfold_verification_accuracy``), "threshold" (the mean of the fold
    thresholds), "predicted_same" bool [P] (score >= threshold) and "rates"
    (``verification_rates`` at that threshold). With L2-normalised embeddings
    d = ||e_a - e_b||^2 = 2 - 2 cos, so the threshold in d is 2 - 2 * threshold.
    """
    scores = np.asarray(scores, np.float64)
    kfold = kfold_verification_accuracy(scores, is_same, folds=folds)
    threshold = float(kfold["mean_threshold"])
    return {"kfold": kfold, "threshold": threshold, "predicted_same": scores >= threshold,
            "rates": verification_rates(scores, is_same, threshold)}


def roc_curve(scores, is_same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for thresholds at every distinct score, descending.

    Returns (fpr [m+1], tpr [m+1], thresholds [m+1]) starting at (0, 0) with
    threshold +inf; point j uses threshold = the j-th largest distinct score
    (predicted same iff score >= threshold). Needs both classes present.
    """
    scores, is_same = _check_scores_labels(scores, is_same)
    positives = int(is_same.sum())
    negatives = scores.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"ROC needs matching and non-matching pairs; got {positives} matching "
            f"and {negatives} non-matching")
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    pos = is_same[order]
    # Last index of each run of equal scores: all of a tie enters together.
    run_end = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(pos)[run_end]
    fp = np.cumsum(~pos)[run_end]
    tpr = np.r_[0.0, tp / positives]
    fpr = np.r_[0.0, fp / negatives]
    thresholds = np.r_[np.inf, s[run_end]]
    return fpr, tpr, thresholds


def roc_auc(scores, is_same) -> float:
    """Area under the ROC curve (trapezoid over `roc_curve`)."""
    fpr, tpr, _ = roc_curve(scores, is_same)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) * 0.5))
