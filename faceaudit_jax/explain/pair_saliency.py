"""Saliency of face-verification pairs by method name, run as a resumable sweep.

One entry point for the five pair explainers the CorrRISE protocol compares
(similarity Grad-CAM / Grad-CAM++, similarity RISE, occlusion, CorrRISE), so
an experiment names a method instead of dispatching on it; plus the two map
statistics its report needs (rank agreement of two maps, S- mass in a mask).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np
import scipy.stats

from faceaudit_jax import sweeps
from faceaudit_jax.explain import corrrise as corrrise_lib
from faceaudit_jax.explain import occlusion as occlusion_lib
from faceaudit_jax.explain import rise as rise_lib

METHODS = ("grad_cam", "grad_cam_plusplus", "rise", "occlusion", "corrrise")
GRADIENT_METHODS = ("grad_cam", "grad_cam_plusplus")
METHOD_LABELS = {
    "grad_cam": "Grad-CAM (similarity)",
    "grad_cam_plusplus": "Grad-CAM++ (similarity)",
    "rise": "RISE (similarity)",
    "occlusion": "Occlusion (xFace-style)",
    "corrrise": "CorrRISE",
}


class PairModel(NamedTuple):
    """What the explainers need of an embedder.

    embed_fn(images [B, H, W, 3] in [0, 1]) -> embeddings [B, D] (traceable;
    a numpy model goes through ``explain.corrrise.numpy_embed_fn``);
    features_fn / head_fn split it at the last feature map for the gradient
    methods, None for a black box (then only the black-box methods apply).
    """

    features_fn: Optional[Callable]
    head_fn: Optional[Callable]
    embed_fn: Callable


def available_methods(model: PairModel) -> tuple[str, ...]:
    """METHODS that ``model`` supports (a black box has no gradient methods)."""
    if model.features_fn is None or model.head_fn is None:
        return tuple(m for m in METHODS if m not in GRADIENT_METHODS)
    return METHODS


def _to_float(images_uint8):
    return jnp.asarray(images_uint8, jnp.float32) / 255.0


def _explain_group(method: str, model: PairModel, a, b, key, ecfg):
    """(sal_a, sal_b) [P, H, W] of one group of pairs, images float in [0, 1]."""
    if method in GRADIENT_METHODS:
        return corrrise_lib.similarity_cam(model.features_fn, model.head_fn, a, b, method=method)
    if method == "rise":
        return rise_lib.rise_batch(model.embed_fn, a, b, key, num_masks=int(ecfg.rise_masks),
                                   grid_size=int(ecfg.rise_grid), chunk_size=int(ecfg.chunk_size))
    if method == "occlusion":
        return occlusion_lib.occlusion_batch(model.embed_fn, a, b, patch_size=int(ecfg.occlusion_patch),
                                             stride=int(ecfg.occlusion_stride),
                                             chunk_size=int(ecfg.chunk_size))
    return corrrise_lib.corrrise_batch(
        model.embed_fn, a, b, key, num_masks=int(ecfg.num_masks), num_patches=int(ecfg.num_patches),
        patch_size=int(ecfg.patch_size), correlation=str(ecfg.correlation),
        chunk_size=int(ecfg.chunk_size))


def explain_pairs(method: str, model: PairModel, images_a, images_b, key, ecfg,
                  directory=None) -> tuple[np.ndarray, np.ndarray]:
    """Saliency (sal_a, sal_b) [P, H, W] of one method on uint8 pairs [P, H, W, 3].

    ``ecfg`` holds the method settings (rise_masks, rise_grid, occlusion_patch,
    occlusion_stride, num_masks, num_patches, patch_size, correlation,
    chunk_size) and ``pairs_per_call``: the pairs go in groups of that many,
    the chunks of a ``sweeps.run_sweep``. In a multi-process job each process
    explains its groups and every process gets all maps; with a ``directory``
    the maps are kept per group and a killed run resumes.
    """
    if method not in available_methods(model):
        raise ValueError(f"method={method!r}; expected one of {available_methods(model)} for this model")

    def explain_group(pair_indices):
        sa, sb = _explain_group(method, model, _to_float(images_a[pair_indices]),
                                _to_float(images_b[pair_indices]), key, ecfg)
        return {"a": np.asarray(sa), "b": np.asarray(sb)}

    group = min(int(ecfg.pairs_per_call), images_a.shape[0])
    result = sweeps.run_sweep(explain_group, images_a.shape[0], group, directory,
                              config={"method": method, "explain": ecfg})
    return result.outputs["a"], result.outputs["b"]


def map_rank_correlation(maps_x: np.ndarray, maps_y: np.ndarray) -> np.ndarray:
    """Spearman correlation between corresponding maps [M, H, W] -> [M] (0 for a constant map)."""
    out = np.zeros(maps_x.shape[0])
    for i, (x, y) in enumerate(zip(maps_x, maps_y)):
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            out[i] = scipy.stats.spearmanr(x.ravel(), y.ravel()).statistic
    return out


def negative_mass_share(saliency: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per map: share of the S- mass (|min(s, 0)|) that falls inside ``mask``; NaN without S-."""
    neg = np.maximum(-saliency, 0.0)
    total = neg.sum(axis=(-2, -1))
    inside = (neg * mask).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)
