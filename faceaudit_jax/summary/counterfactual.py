"""A ground truth for FaceX rankings: what a model's output does when one attribute is switched.

FaceX ranks face regions by where the CAMs sit (IoR) and scores a bias
experiment by the rank of the confounder's region (RP), assuming a biased
model looks at the biased region. The synthetic renderer can check that
assumption: it draws each test face again with one region-linked attribute
switched and everything else unchanged (``data.synthetic.render_counterfactual``),
so the change of the model's logit says how much the model relies on that
attribute, region by region, without any explainer.

* ``counterfactual_effects(logit_fn, ...)``: per attribute, the mean |logit
  change| over the test faces the switch applies to (and the signed mean,
  with minus without the attribute).
* ``region_effects(logit_fn, ..., attribute)``: per parse region, the mean
  |logit change| when the attribute is switched inside that region only (the
  face keeps its own pixels elsewhere): where the evidence for the attribute
  sits, in the regions FaceX ranks.
* ``attribute_ior_scores(ior_r, attributes)``: an attribute's IoR score = the
  best IoR among its regions (as RP takes the best rank).
* ``compare_rankings(ior_r, effects)``: Spearman rank correlation between the
  two scores over the attributes, and each attribute's rank under both.

A miss (the confounder's RP is large) then reads two ways: the ground truth
ranks the confounder first too (the explainer missed it), or the model relies
on something else (the explainer may be right). ``region_effects`` goes one
step further: it names the region whose pixels carry the evidence, which is
the region a right explanation ranks first.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import regions
from faceaudit_jax.data import synthetic


def average_ranks(values) -> np.ndarray:
    """1-based ranks of ``values`` in descending order, ties sharing their mean rank."""
    v = np.asarray(values, np.float64)
    order = np.argsort(-v, kind="stable")
    ranks = np.empty(v.size, np.float64)
    ranks[order] = np.arange(1, v.size + 1)
    for value in np.unique(v):
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two score vectors (ties get average ranks).

    NaN where fewer than 3 finite pairs remain or one side is constant.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two vectors of one length; got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return float("nan")
    ra, rb = average_ranks(a[keep]), average_ranks(b[keep])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def counterfactual_effects(logit_fn: Callable, seed: int, indices, resolution: int,
                           attributes: Sequence[str] = synthetic.COUNTERFACTUAL_ATTRIBUTES,
                           *, batch_size: int = 32, independent: bool = False,
                           images_per_identity: int = 10) -> dict:
    """Logit changes when each attribute is switched on the faces ``indices``.

    ``logit_fn(images [B, H, W, 3]) -> logits [B]`` (one logit per image).
    Each face is rendered as drawn and with the attribute flipped; for the
    faces the flip applies to, ``delta = z(with) - z(without)``. Returns
    attribute -> {"mean_abs_change", "mean_change" (with minus without: > 0
    pushes towards the positive class), "num_images"}.
    """
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError(f"indices must be a non-empty 1-D array; got shape {indices.shape}")
    out = {}
    for attribute in attributes:
        col = regions.attribute_id(attribute)
        deltas = []
        for start in range(0, indices.size, batch_size):
            chunk = indices[start:start + batch_size]
            factual, counter, applicable = synthetic.render_counterfactual(
                seed, chunk, attribute, resolution, independent=independent,
                images_per_identity=images_per_identity)
            if not applicable.any():
                continue
            z_f = np.asarray(logit_fn(factual["image"]), np.float64).reshape(-1)
            z_c = np.asarray(logit_fn(counter["image"]), np.float64).reshape(-1)
            had = np.asarray(factual["attrs"])[:, col] == 1
            delta = np.where(had, z_f - z_c, z_c - z_f)
            deltas.append(delta[applicable])
        d = np.concatenate(deltas) if deltas else np.zeros(0)
        out[attribute] = {
            "mean_abs_change": float(np.abs(d).mean()) if d.size else float("nan"),
            "mean_change": float(d.mean()) if d.size else float("nan"),
            "num_images": int(d.size),
        }
    return out


@jax.jit
def _composite(factual, counter, parse_with, region):
    """The factual images with the counterfactual's pixels where ``parse_with`` is ``region``."""
    return jnp.where((parse_with == region)[..., None], counter, factual)


def region_effects(logit_fn: Callable, seed: int, indices, resolution: int, attribute: str, *,
                   batch_size: int = 32, independent: bool = False, images_per_identity: int = 10,
                   num_regions: int = regions.NUM_REGIONS) -> np.ndarray:
    """float64 [num_regions]: mean |logit change| when ``attribute`` is switched inside one region.

    For region r each face keeps its own pixels except where r is, which come
    from the face rendered with ``attribute`` switched. Regions are read off
    the parse map of whichever of the two images has the attribute (so a
    necklace's pixels count for neck_l, not for the neck they cover in the
    image without it). The mean is over the faces the switch applies to (a
    face without region r changes by 0).
    """
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError(f"indices must be a non-empty 1-D array; got shape {indices.shape}")
    col = regions.attribute_id(attribute)
    total, count = np.zeros(num_regions), 0
    for start in range(0, indices.size, batch_size):
        factual, counter, applicable = synthetic.render_counterfactual(
            seed, indices[start:start + batch_size], attribute, resolution,
            independent=independent, images_per_identity=images_per_identity)
        applicable = np.asarray(applicable)
        if not applicable.any():
            continue
        z_f = np.asarray(logit_fn(factual["image"]), np.float64).reshape(-1)
        had = jnp.asarray(np.asarray(factual["attrs"])[:, col] == 1)
        parse_with = jnp.where(had[:, None, None], factual["parse"], counter["parse"])
        for r in range(num_regions):
            mixed = _composite(factual["image"], counter["image"], parse_with, jnp.int32(r))
            z_r = np.asarray(logit_fn(mixed), np.float64).reshape(-1)
            total[r] += np.abs(z_r - z_f)[applicable].sum()
        count += int(applicable.sum())
    return total / count if count else np.full(num_regions, np.nan)


def attribute_ior_scores(ior_r, attributes: Sequence[str],
                         names: Sequence[str] = regions.REGIONS) -> np.ndarray:
    """float64 [A]: each attribute's best IoR among its regions (NaN if none present)."""
    values = np.asarray(ior_r, np.float64)
    if values.shape != (len(names),):
        raise ValueError(f"ior_r must be [{len(names)}]; got shape {values.shape}")
    index = {n: i for i, n in enumerate(names)}
    scores = []
    for attribute in attributes:
        own = [values[index[r]] for r in regions.regions_of(attribute)]
        own = [v for v in own if np.isfinite(v)]
        if not regions.regions_of(attribute):
            raise ValueError(f"attribute {attribute!r} is tied to no region")
        scores.append(max(own) if own else np.nan)
    return np.asarray(scores, np.float64)


def compare_rankings(ior_r, effects: dict, confounders: Optional[Sequence[str]] = None) -> dict:
    """Spearman between the IoR and the ground-truth attribute scores, and ranks.

    ``effects`` from ``counterfactual_effects``. Returns ``spearman``,
    ``attributes``, ``ior_rank`` / ``truth_rank`` (attribute -> 1-based rank
    among the attributes, ties averaged) and, for each of ``confounders``,
    ``confounder_truth_rank`` / ``confounder_ior_rank``.
    """
    attributes = [a for a in effects if np.isfinite(effects[a]["mean_abs_change"])]
    truth = np.array([effects[a]["mean_abs_change"] for a in attributes])
    ior_scores = attribute_ior_scores(ior_r, attributes)
    keep = np.isfinite(ior_scores)
    kept = [a for a, k in zip(attributes, keep) if k]
    truth_rank = dict(zip(kept, average_ranks(truth[keep]).tolist()))
    ior_rank = dict(zip(kept, average_ranks(ior_scores[keep]).tolist()))
    out = {"spearman": spearman(ior_scores, truth), "attributes": kept,
           "truth_rank": truth_rank, "ior_rank": ior_rank}
    if confounders:
        out["confounder_truth_rank"] = {c: truth_rank.get(c) for c in confounders}
        out["confounder_ior_rank"] = {c: ior_rank.get(c) for c in confounders}
    return out


__all__ = ["average_ranks", "spearman", "counterfactual_effects", "attribute_ior_scores",
           "compare_rankings"]
