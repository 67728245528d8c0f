"""FLAC: suppress the link between a classifier's features and a protected attribute.

Sarridis et al., "FLAC: Fairness-Aware Representation Learning by Suppressing
Attribute-Class Associations" (the mitigation FaceX's Figure 5 audits). A
frozen bias-capturing network, trained to predict the protected attribute,
embeds every training image; the classifier's own embedding is trained so that,
within each batch,

* two images of the same class whose protected features differ (``s_p`` below
  the batch threshold) come close, and
* two images of different classes whose protected features agree (``s_p``
  above it) move apart,

by matching, row by row over those selected pairs, the distribution of the
classifier's similarities to that of the protected *dissimilarities*
(Jeffreys divergence). Similarities are ``1 / (1 + dist**d)`` of Euclidean
distances; the threshold is the midpoint of the batch's largest and smallest
protected similarity. The classifier then gains nothing from encoding the
protected attribute, and the rare bias-conflicting images steer the whole
embedding instead of being memorised one by one (what group reweighting does
with the same few images).

Here: ``flac_loss`` (pure: two embeddings and labels in, a scalar out),
``FlacLoss`` (the training objective ``weighted BCE + alpha * flac_loss`` as a
``train_lib`` loss reading the model's pooled features) and
``protected_features_augment`` (the bias-capturing network run inside the
jitted step). The weights follow the authors' CelebA recipe:
0.01 * cross-entropy + 20000 * FLAC, d = 0.5.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from faceaudit_jax import losses

_DIST_EPS = 1e-6     # inside the square root: finite gradients at distance 0
_NORM_EPS = 1e-7     # row normaliser of the masked distributions


def pairwise_distances(x: jax.Array) -> jax.Array:
    """Euclidean distances [B, B] between the rows of ``x`` [B, D], as sqrt(d^2 + eps)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return jnp.sqrt(jnp.maximum(d2, 0.0) + _DIST_EPS)


def _similarity(x: jax.Array, d: float) -> jax.Array:
    return 1.0 / (1.0 + pairwise_distances(x) ** d)


def flac_pair_mask(protected_features: jax.Array, labels: jax.Array, d: float = 0.5) -> jax.Array:
    """bool [B, B]: the pairs FLAC constrains (same class and protected similarity
    below the batch midpoint, or different classes and above it)."""
    s_p = _similarity(protected_features, d)
    threshold = 0.5 * (jnp.max(s_p) + jnp.min(s_p))
    same = labels[:, None] == labels[None, :]
    return (same & (s_p < threshold)) | (~same & (s_p > threshold))


def flac_loss(protected_features: jax.Array, features: jax.Array, labels: jax.Array,
              d: float = 0.5) -> jax.Array:
    """FLAC's divergence between protected dissimilarities and feature similarities.

    Args:
      protected_features: [B, P] the bias-capturing network's embedding (constant).
      features: [B, D] the trained classifier's embedding.
      labels: [B] class labels (any dtype with equality).
      d: exponent of the distance in the similarity 1 / (1 + dist**d).
    Returns:
      scalar float32: the mean over selected pairs (``flac_pair_mask``) of
      (p - q) * (log p - log q), with p = 1 - s_protected and q = s_features
      each divided by its row sum over the selected pairs; 0 when no pair is
      selected (e.g. a batch of one class with identical protected features).
    """
    if protected_features.ndim != 2 or features.ndim != 2 or labels.ndim != 1:
        raise ValueError(f"expected protected_features [B, P], features [B, D], labels [B]; got "
                         f"{protected_features.shape}, {features.shape}, {labels.shape}")
    if not protected_features.shape[0] == features.shape[0] == labels.shape[0]:
        raise ValueError(f"batch sizes differ: protected_features {protected_features.shape[0]}, "
                         f"features {features.shape[0]}, labels {labels.shape[0]}")
    protected_features = jax.lax.stop_gradient(protected_features)
    mask = flac_pair_mask(protected_features, labels, d)
    maskf = mask.astype(jnp.float32)
    p = 1.0 - _similarity(protected_features, d)
    q = _similarity(features, d)
    p = p / (jnp.sum(p * maskf, axis=1, keepdims=True) + _NORM_EPS)
    q = q / (jnp.sum(q * maskf, axis=1, keepdims=True) + _NORM_EPS)
    # Unselected entries (the diagonal has p = 0) must not reach a log.
    p_safe, q_safe = jnp.where(mask, p, 1.0), jnp.where(mask, q, 1.0)
    terms = jnp.where(mask, (p_safe - q_safe) * (jnp.log(p_safe) - jnp.log(q_safe)), 0.0)
    return jnp.sum(terms) / jnp.maximum(jnp.sum(maskf), 1.0)


@dataclasses.dataclass(frozen=True)
class FlacLoss:
    """``ce_weight * BCE + alpha * flac_loss`` for a single-logit classifier.

    A ``train_lib`` loss that reads the whole model output (``takes_model_output``):
    (logits [B, 1], {"pooled": [B, C], ...}) from ``ResNetClassifier``, and
    ``batch["protected_features"]`` (``protected_features_augment``),
    ``batch["label"]`` [B] and ``batch["label_mask"]``. Frozen and compared by
    value, so runs with the same weights share one compiled step.
    """

    alpha: float = 20000.0
    ce_weight: float = 0.01
    d: float = 0.5

    takes_model_output = True

    def __call__(self, output: Any, batch: Mapping[str, jax.Array]):
        logits, extras = output
        bce = losses.sigmoid_bce(logits, batch["label"], batch["label_mask"])
        divergence = flac_loss(batch["protected_features"], extras["pooled"], batch["label"], self.d)
        loss = self.ce_weight * bce + self.alpha * divergence
        return loss, {"bce": bce, "flac": divergence}


def protected_features_augment(model: Any, variables: Mapping) -> Any:
    """A ``train_lib`` ``augment_fn`` adding ``batch["protected_features"]``: the
    frozen bias-capturing ``ResNetClassifier``'s pooled features of ``batch["image"]``
    (eval mode), computed inside the jitted training step."""

    def augment(key: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
        del key  # deterministic: the bias network runs in eval mode
        _, extras = model.apply(variables, batch["image"], train=False)
        return {**batch, "protected_features": jax.lax.stop_gradient(extras["pooled"])}

    return augment
