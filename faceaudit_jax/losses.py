"""Loss functions: pure, jit-friendly, each a scalar mean over the valid entries.

- ``sigmoid_bce``: single-logit ([B] or [B, 1]) and multi-label ([B, A]) binary
  cross-entropy with a validity mask and optional sample / class weights.
- ``attribute_targets``: CelebA-style int8 attributes (1, 0, -1 unknown) ->
  (labels in {0, 1}, mask).
- ``balanced_weights`` / ``balanced_euclidean`` / ``euclidean``: the binary
  attribute paper's class-balanced Euclidean loss (eq. 5, weights eq. 6) and
  its unweighted variant (AFFACT-u).
- ``label_smoothed_cross_entropy``: softmax CE with uniform label smoothing.
- ``cosface_logits`` / ``arcface_logits`` / ``margin_softmax_loss``: additive
  margin losses for face embedders, on L2-normalised embeddings and class
  centres, safe for zero-norm inputs.

Argument checks that need values (e.g. labels outside {0, 1}) run only on
concrete arrays; under ``jit`` the inputs are traced and only shapes are checked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_NORM_EPS = 1e-12


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_values(name: str, x: Any, allowed: tuple, mask: Any = None) -> None:
    """Raise ValueError if a concrete ``x`` has values outside ``allowed`` (where mask is True)."""
    if not _is_concrete(x) or (mask is not None and not _is_concrete(mask)):
        return
    values = np.asarray(x)
    if mask is not None:
        values = values[np.broadcast_to(np.asarray(mask, bool), values.shape)]
    bad = np.setdiff1d(np.unique(values), np.asarray(allowed))
    if bad.size:
        raise ValueError(f"{name} must take values in {list(allowed)}, found {bad[:5].tolist()}")


def _check_class_ids(name: str, labels: Any, num_classes: int) -> None:
    """Raise ValueError if concrete integer class ids fall outside [0, num_classes)."""
    if not _is_concrete(labels):
        return
    values = np.asarray(labels)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(
            f"{name} must be class ids in [0, {num_classes}), got range [{values.min()}, {values.max()}]"
        )


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` over entries where ``mask`` is True; 0 if there are none."""
    if mask is None:
        return jnp.mean(values)
    mask = jnp.broadcast_to(mask, values.shape)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1).astype(values.dtype)


def _align_binary(logits: jax.Array, labels: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    """Accept [B] labels for [B, 1] logits (single-logit classifiers); shapes must then match."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim == 2 and logits.shape[1] == 1 and labels.ndim == 1:
        logits = logits[:, 0]
    if logits.shape != labels.shape:
        raise ValueError(
            f"{name}: logits shape {tuple(logits.shape)} and labels shape {tuple(labels.shape)} must match "
            "(labels [B] are accepted for logits [B, 1])"
        )
    return logits, labels


def attribute_targets(attrs: Any) -> tuple[jax.Array, jax.Array]:
    """int attributes [B, A] (1 present, 0 absent, -1 unknown) -> (labels float32 in {0, 1}, mask bool).

    Unknown entries get label 0 and mask False, so they drop out of every
    masked loss here. For the Euclidean losses use ``2 * labels - 1`` as targets.
    """
    _check_values("attrs", attrs, (-1, 0, 1))
    attrs = jnp.asarray(attrs)
    mask = attrs >= 0
    labels = (attrs == 1).astype(jnp.float32)
    return labels, mask


def sigmoid_bce(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    class_weights: jax.Array | None = None,
) -> jax.Array:
    """Binary cross-entropy with logits, averaged over valid entries.

    Args:
      logits: [B], [B, 1] (single logit) or [B, A] (multi-label).
      labels: same shape in {0, 1} (or [B] for [B, 1] logits).
      mask: optional bool, broadcastable to the labels; False entries (unknown
        labels) are ignored, including in the count that the mean divides by.
      class_weights: optional non-negative weights, broadcast to the labels
        with numpy rules: per sample (e.g. group-balanced reweighting) [B]
        for single-logit, [B, 1] for [B, A] logits; [A] per attribute; or [B, A]. The loss is then sum(w * l) / #valid, like
        torch's ``BCEWithLogitsLoss(weight=w)``.

    Returns:
      scalar float32; 0 when no entry is valid.
    """
    logits, labels = _align_binary(logits, labels, "sigmoid_bce")
    _check_values("labels", labels, (0, 1), mask)
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    # max(z, 0) - z*y + log(1 + exp(-|z|)): stable for large |z|.
    per_entry = jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    if class_weights is not None:
        weights = jnp.asarray(class_weights, jnp.float32)
        if weights.ndim > per_entry.ndim or any(
            w not in (1, e) for w, e in zip(weights.shape[::-1], per_entry.shape[::-1])
        ):
            raise ValueError(
                f"class_weights shape {tuple(weights.shape)} does not broadcast to the loss shape "
                f"{tuple(per_entry.shape)}; use [B] or [B, 1] per sample, [A] per attribute"
            )
        per_entry = per_entry * weights
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.ndim == 2 and mask.shape[1] == 1 and per_entry.ndim == 1:
            mask = mask[:, 0]
    return _masked_mean(per_entry, mask)


def balanced_weights(p_pos: Any) -> tuple[jax.Array, jax.Array]:
    """Class weights from the positive rate p of each attribute (binary-attribute paper, eq. 6).

    w(+1) = 1 if p > 0.5 else (1 - p) / p;   w(-1) = p / (1 - p) if p > 0.5 else 1.
    The minority class gets weight (majority rate / minority rate), the majority 1.
    p is clipped to [1e-6, 1 - 1e-6] so an attribute that never (or always)
    occurs gets a large finite weight rather than inf.

    Args:
      p_pos: [A] (or scalar) positive rates in [0, 1].
    Returns:
      (w_pos, w_neg), each shaped like p_pos, float32.
    """
    if _is_concrete(p_pos):
        p_np = np.asarray(p_pos, dtype=np.float64)
        if np.any(~np.isfinite(p_np)) or np.any(p_np < 0) or np.any(p_np > 1):
            raise ValueError(f"p_pos must be rates in [0, 1], got {p_np.ravel()[:8].tolist()}")
    p = jnp.clip(jnp.asarray(p_pos, jnp.float32), 1e-6, 1.0 - 1e-6)
    w_pos = jnp.where(p > 0.5, 1.0, (1.0 - p) / p)
    w_neg = jnp.where(p > 0.5, p / (1.0 - p), 1.0)
    return w_pos, w_neg


def balanced_euclidean(
    logits: jax.Array,
    labels_pm1: jax.Array,
    weights: tuple[jax.Array, jax.Array] | None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Class-weighted Euclidean loss (binary-attribute paper, eq. 5).

    L = 1/N sum_n sum_m w_m(t_nm) (z_nm - t_nm)^2, with targets t in {+1, -1}:
    summed over the attributes m, averaged over the N samples of the batch.
    Masked-out entries (unknown labels) contribute nothing.

    Args:
      logits: [B, A] (or [B] / [B, 1] for one attribute).
      labels_pm1: targets in {+1, -1}, same shape (for 0/1 labels pass 2 * y - 1).
      weights: (w_pos [A], w_neg [A]) from ``balanced_weights``, or None for unit weights.
      mask: optional bool broadcastable to the labels.
    Returns:
      scalar float32.
    """
    logits, labels = _align_binary(logits, labels_pm1, "balanced_euclidean")
    _check_values("labels_pm1", labels, (-1, 1), mask)
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    per_entry = jnp.square(logits - labels)
    if weights is not None:
        w_pos, w_neg = (jnp.asarray(w, jnp.float32) for w in weights)
        per_entry = per_entry * jnp.where(labels > 0, w_pos, w_neg)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.ndim == 2 and mask.shape[1] == 1 and per_entry.ndim == 1:
            mask = mask[:, 0]
        per_entry = jnp.where(jnp.broadcast_to(mask, per_entry.shape), per_entry, 0.0)
    per_sample = per_entry.reshape(per_entry.shape[0], -1).sum(axis=1) if per_entry.ndim > 1 else per_entry
    return jnp.mean(per_sample)


def euclidean(logits: jax.Array, labels_pm1: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Unweighted Euclidean loss (AFFACT-u): ``balanced_euclidean`` with all weights 1."""
    return balanced_euclidean(logits, labels_pm1, None, mask)


def label_smoothed_cross_entropy(logits: jax.Array, labels_int: jax.Array, smoothing: float = 0.1) -> jax.Array:
    """Softmax cross-entropy against (1 - s) * one_hot + s / K targets, mean over the batch.

    Args:
      logits: [B, K]; labels_int: [B] ints in [0, K); smoothing s in [0, 1).
    """
    if not 0.0 <= float(smoothing) < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    logits = jnp.asarray(logits, jnp.float32)
    labels_int = jnp.asarray(labels_int)
    if logits.ndim != 2 or labels_int.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [B, K] and labels [B], got {tuple(logits.shape)} and {tuple(labels_int.shape)}"
        )
    num_classes = logits.shape[-1]
    _check_class_ids("labels_int", labels_int, num_classes)
    targets = jax.nn.one_hot(labels_int, num_classes) * (1.0 - smoothing) + smoothing / num_classes
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1))


@dataclasses.dataclass(frozen=True)
class SoftmaxClassificationLoss:
    """``loss_fn(logits [B, K], batch) -> (loss, {"accuracy"})`` for ``train_lib.fit``:
    ``label_smoothed_cross_entropy`` against ``batch[label_key]`` (ints [B]) and the
    argmax accuracy. Frozen and hashable by value, so ``train_lib.make_train_step``
    reuses one compiled update for every run with the same settings."""

    label_smoothing: float = 0.0
    label_key: str = "label"

    def __call__(self, logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
        labels = batch[self.label_key]
        loss = label_smoothed_cross_entropy(logits, labels, self.label_smoothing)
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = _NORM_EPS) -> jax.Array:
    """x / max(||x||, eps): a zero vector stays zero and its gradient stays finite."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _cosines(embeddings: jax.Array, class_weights: jax.Array) -> jax.Array:
    """Cosine similarity [B, K] of embeddings [B, D] to class centres [K, D]."""
    embeddings = jnp.asarray(embeddings, jnp.float32)
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if embeddings.ndim != 2 or class_weights.ndim != 2 or embeddings.shape[1] != class_weights.shape[1]:
        raise ValueError(
            f"expected embeddings [B, D] and class_weights [K, D], got {tuple(embeddings.shape)} "
            f"and {tuple(class_weights.shape)}"
        )
    cos = l2_normalize(embeddings) @ l2_normalize(class_weights).T
    return jnp.clip(cos, -1.0, 1.0)


def _check_margin_args(labels: jax.Array, num_classes: int, batch: int, scale: float, margin: float) -> None:
    if jnp.shape(labels) != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(jnp.shape(labels))}")
    _check_class_ids("labels", labels, num_classes)
    if not float(scale) > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    if not 0.0 <= float(margin) < np.pi / 2:
        raise ValueError(f"margin must be in [0, pi/2), got {margin!r}")


def cosface_logits(
    embeddings: jax.Array,
    class_weights: jax.Array,
    labels: jax.Array,
    scale: float = 64.0,
    margin: float = 0.35,
) -> jax.Array:
    """CosFace (large margin cosine) logits: s * (cos(theta_k) - m * [k == y]).

    Args:
      embeddings: [B, D]; class_weights: [K, D] class centres (one row per
        class); labels: [B] ints in [0, K).
    Returns:
      logits [B, K] for a softmax cross-entropy.
    """
    return cosface_logits_from_cosines(_cosines(embeddings, class_weights), labels, scale, margin)


def cosface_logits_from_cosines(
    cosines: jax.Array, labels: jax.Array, scale: float = 64.0, margin: float = 0.35
) -> jax.Array:
    """CosFace logits s * (cos - m * [k == y]) on precomputed cosines [B, K] (e.g. a ViT margin head)."""
    cosines = jnp.asarray(cosines, jnp.float32)
    if cosines.ndim != 2:
        raise ValueError(f"expected cosines [B, K], got {tuple(cosines.shape)}")
    _check_margin_args(labels, cosines.shape[1], cosines.shape[0], scale, margin)
    one_hot = jax.nn.one_hot(labels, cosines.shape[1], dtype=cosines.dtype)
    return scale * (cosines - margin * one_hot)


def arcface_logits(embeddings: jax.Array, class_weights: jax.Array, labels: jax.Array,
                   scale: float = 64.0, margin: float = 0.5) -> jax.Array:
    """ArcFace (additive angular margin) logits: s * cos(theta_y + m) for the true class.

    cos(theta + m) is computed as cos*cos(m) - sin*sin(m) with sin from a
    clipped sqrt, so gradients stay finite at cos = +-1. Where theta + m would
    pass pi (cos(theta + m) no longer decreasing in theta), the usual
    fallback cos(theta) - m * sin(m) keeps the target logit monotonic.
    Shapes as in ``cosface_logits``.
    """
    cos = _cosines(embeddings, class_weights)
    _check_margin_args(labels, cos.shape[1], cos.shape[0], scale, margin)
    sin = jnp.sqrt(jnp.maximum(1.0 - jnp.square(cos), 1e-12))
    cos_m, sin_m = np.cos(margin), np.sin(margin)
    with_margin = cos * cos_m - sin * sin_m
    threshold = np.cos(np.pi - margin)
    with_margin = jnp.where(cos > threshold, with_margin, cos - sin_m * margin)
    one_hot = jax.nn.one_hot(labels, cos.shape[1], dtype=bool)
    return scale * jnp.where(one_hot, with_margin, cos)


MARGIN_KINDS = ("cosface", "arcface")


def margin_softmax_loss(
    embeddings: jax.Array,
    class_weights: jax.Array,
    labels: jax.Array,
    *,
    kind: str = "cosface",
    scale: float = 64.0,
    margin: float | None = None,
) -> jax.Array:
    """Mean softmax cross-entropy on CosFace or ArcFace margin logits.

    ``margin`` defaults to 0.35 for "cosface" and 0.5 for "arcface".
    Shapes as in ``cosface_logits``; returns a scalar.
    """
    if kind == "cosface":
        logits = cosface_logits(embeddings, class_weights, labels, scale, 0.35 if margin is None else margin)
    elif kind == "arcface":
        logits = arcface_logits(embeddings, class_weights, labels, scale, 0.5 if margin is None else margin)
    else:
        raise ValueError(f"unknown margin loss kind {kind!r}; expected one of {list(MARGIN_KINDS)}")
    return _softmax_cross_entropy(logits, labels)


def _softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(labels)[:, None], axis=-1))


# Multi-attribute batch losses (the binary-attribute CAM experiment's AFFACT-u / AFFACT-b):
# ``loss_fn(logits [B, A], batch)`` reading ``label`` / ``label_mask`` and, for the Euclidean
# kinds, the class weights ``weight_positive`` / ``weight_negative`` [A] carried in the batch.
MULTI_ATTRIBUTE_UNBALANCED_LOSSES = ("euclidean", "bce")


def weighted_euclidean_batch_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """sum_m w_m(t) (z_m - t_m)^2 with t = 2 * label - 1 and the class weights in the batch.

    One module-level function for unit weights (AFFACT-u) and eq. 6 weights
    (AFFACT-b), so models that differ only by the weights share one compiled step.
    """
    return balanced_euclidean(logits, 2.0 * batch["label"] - 1.0,
                              (batch["weight_positive"], batch["weight_negative"]),
                              batch["label_mask"])


def sigmoid_bce_batch_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """``sigmoid_bce`` over the known entries of ``batch["label"]`` (``label_mask``)."""
    return sigmoid_bce(logits, batch["label"], batch["label_mask"])


def sigmoid_bce_weighted_batch_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """``sigmoid_bce_batch_loss`` with a per-image weight ``batch["weight"]`` [B] (sum(w * l) / #valid).

    Group-balanced reweighting of a single-logit classifier: the weights ride
    along in the batch, so one module-level loss serves every weighting.
    """
    return sigmoid_bce(logits, batch["label"], batch["label_mask"], class_weights=batch["weight"])


def multi_attribute_class_weights(kind: str, p_train: Any) -> tuple[np.ndarray, np.ndarray]:
    """(w(+1), w(-1)) [A] for a loss kind: ones for "euclidean"/"bce", eq. 6 for "balanced".

    Attributes without a training p_m (NaN: no known target) get weight 1.
    """
    p = np.asarray(p_train, np.float64)
    if kind in MULTI_ATTRIBUTE_UNBALANCED_LOSSES:
        return np.ones(p.shape, np.float32), np.ones(p.shape, np.float32)
    if kind == "balanced":
        w_pos, w_neg = balanced_weights(np.where(np.isfinite(p), p, 0.5))
        return np.asarray(w_pos, np.float32), np.asarray(w_neg, np.float32)
    raise ValueError(f"unknown loss kind {kind!r}; expected 'euclidean', 'bce' or 'balanced'")


def multi_attribute_loss_fn(kind: str):
    """``loss_fn(logits [B, A], batch) -> scalar`` for "euclidean", "balanced" or "bce"."""
    if kind in ("euclidean", "balanced"):
        return weighted_euclidean_batch_loss
    if kind == "bce":
        return sigmoid_bce_batch_loss
    raise ValueError(f"unknown loss kind {kind!r}; expected 'euclidean', 'bce' or 'balanced'")


def cosface_loss_on_cosines(
    cosines: jax.Array, labels: jax.Array, scale: float = 64.0, margin: float = 0.35
) -> jax.Array:
    """Mean softmax cross-entropy of ``cosface_logits_from_cosines``; cosines [B, K], labels [B]."""
    return _softmax_cross_entropy(cosface_logits_from_cosines(cosines, labels, scale, margin), labels)
