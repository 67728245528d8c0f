"""Saliency of face-verification pairs by method name, run as a resumable sweep.

One entry point for the five pair explainers the CorrRISE protocol compares
(similarity Grad-CAM / Grad-CAM++, similarity RISE, occlusion, CorrRISE), so
an experiment names a method instead of dispatching on it; plus the two map
statistics its report needs (rank agreement of two maps, S- mass in a mask)
and the protocol's scores (``deletion_insertion_table`` of every method,
``model_randomisation_check``).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from faceaudit_jax import sweeps
from faceaudit_jax.data.pipeline import uint8_to_float
from faceaudit_jax.explain import corrrise as corrrise_lib
from faceaudit_jax.explain import occlusion as occlusion_lib
from faceaudit_jax.explain import rise as rise_lib
from faceaudit_jax.metrics import perturbation

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


def _explain_group(method: str, model: PairModel, a, b, key, ecfg):
    """(sal_a, sal_b) [P, H, W] of one group of pairs, images float in [0, 1]."""
    if method in GRADIENT_METHODS:
        return corrrise_lib.similarity_cam(model.features_fn, model.head_fn, a, b, method=method)
    if method == "rise":
        return rise_lib.rise_batch(model.embed_fn, a, b, key, num_masks=int(ecfg.rise_masks),
                                   grid_size=int(ecfg.rise_grid),
                                   keep_prob=float(ecfg.get("rise_keep_prob", 0.5)),
                                   chunk_size=int(ecfg.chunk_size))
    if method == "occlusion":
        return occlusion_lib.occlusion_batch(model.embed_fn, a, b, patch_size=int(ecfg.occlusion_patch),
                                             stride=int(ecfg.occlusion_stride),
                                             fill_value=float(ecfg.get("fill", 0.0)),
                                             chunk_size=int(ecfg.chunk_size))
    return corrrise_lib.corrrise_batch(
        model.embed_fn, a, b, key, num_masks=int(ecfg.num_masks), num_patches=int(ecfg.num_patches),
        patch_size=int(ecfg.patch_size), correlation=str(ecfg.correlation),
        chunk_size=int(ecfg.chunk_size))


def explain_pairs(method: str, model: PairModel, images_a, images_b, key, ecfg,
                  directory=None) -> tuple[np.ndarray, np.ndarray]:
    """Saliency (sal_a, sal_b) [P, H, W] of one method on uint8 pairs [P, H, W, 3].

    ``ecfg`` holds the method settings (rise_masks, rise_grid, optional
    rise_keep_prob (0.5), occlusion_patch, occlusion_stride, optional fill (the
    occluder's value, 0.0), num_masks, num_patches, patch_size, correlation,
    chunk_size) and ``pairs_per_call``: the pairs go in groups of that many,
    the chunks of a ``sweeps.run_sweep``. In a multi-process job each process
    explains its groups and every process gets all maps; with a ``directory``
    the maps are kept per group and a killed run resumes.
    """
    if method not in available_methods(model):
        raise ValueError(f"method={method!r}; expected one of {available_methods(model)} for this model")

    def explain_group(pair_indices):
        sa, sb = _explain_group(method, model, uint8_to_float(images_a[pair_indices]),
                                uint8_to_float(images_b[pair_indices]), key, ecfg)
        return {"a": np.asarray(sa), "b": np.asarray(sb)}

    group = min(int(ecfg.pairs_per_call), images_a.shape[0])
    result = sweeps.run_sweep(explain_group, images_a.shape[0], group, directory,
                              config={"method": method, "explain": ecfg})
    return result.outputs["a"], result.outputs["b"]


def map_rank_correlation(maps_x: np.ndarray, maps_y: np.ndarray) -> np.ndarray:
    """Spearman correlation between corresponding maps [M, H, W] -> [M] (0 for a constant map)."""
    flat_x = np.asarray(maps_x).reshape(maps_x.shape[0], -1)
    flat_y = np.asarray(maps_y).reshape(maps_y.shape[0], -1)
    # Average ranks are exact in float32 up to 2**24 pixels; the correlation of the
    # ranks (Pearson of ranks = Spearman) is taken in float64 like scipy's.
    rx = np.asarray(corrrise_lib.rankdata(jnp.asarray(flat_x), axis=1), np.float64)
    ry = np.asarray(corrrise_lib.rankdata(jnp.asarray(flat_y), axis=1), np.float64)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    varying = (np.ptp(flat_x, axis=1) > 0) & (np.ptp(flat_y, axis=1) > 0)
    denom = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    return np.where(varying, (rx * ry).sum(1) / np.where(varying, denom, 1.0), 0.0)


def negative_mass_share(saliency: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per map: share of the S- mass (|min(s, 0)|) that falls inside ``mask``; NaN without S-."""
    neg = np.maximum(-saliency, 0.0)
    total = neg.sum(axis=(-2, -1))
    inside = (neg * mask).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


# ----------------------------------------------------------------------------- the CorrRISE protocol's scores


def deletion_insertion_table(model: PairModel, images_a, images_b, threshold: float, key, ecfg,
                             scenario: str):
    """Saliency of every method the model supports on matching pairs, scored by Deletion / Insertion.

    images_a / images_b uint8 [P, H, W, 3] (matching pairs); ``threshold`` the
    fixed verification threshold the curves count accepted pairs at; ``ecfg``
    the explain config (the methods' settings, ``num_steps``, ``curve_chunk``);
    ``scenario`` names the run in the progress line. Returns (table {method:
    AUCs in %, curves [num_steps + 1] and fractions, explain_seconds}, curves
    {method: raw ``perturbation.deletion_insertion`` result}, saliency
    {method: (sal_a, sal_b) [P, H, W]}).
    """
    table, curves, saliency = {}, {}, {}
    for method in available_methods(model):
        start = time.perf_counter()
        sal_a, sal_b = explain_pairs(method, model, images_a, images_b, key, ecfg)
        seconds = time.perf_counter() - start
        saliency[method] = (sal_a, sal_b)
        res = perturbation.deletion_insertion(
            model.embed_fn, uint8_to_float(images_a), uint8_to_float(images_b), jnp.asarray(sal_a),
            threshold, num_steps=int(ecfg.num_steps), chunk_size=int(ecfg.curve_chunk))
        curves[method] = res
        table[method] = {"deletion_auc": 100.0 * res["deletion_auc"],
                         "insertion_auc": 100.0 * res["insertion_auc"],
                         "deletion_curve": np.asarray(res["deletion"][1]),
                         "insertion_curve": np.asarray(res["insertion"][1]),
                         "fractions": np.asarray(res["deletion"][0]),
                         "explain_seconds": seconds}
        print(f"[corrrise:{scenario}] {method}: del {table[method]['deletion_auc']:.2f} "
              f"ins {table[method]['insertion_auc']:.2f} ({seconds:.0f}s)", flush=True)
    return table, curves, saliency


def model_randomisation_check(random_model: Optional[PairModel], images_a, images_b,
                              trained_maps, key, ecfg, n: int) -> Optional[dict]:
    """Spearman agreement of CorrRISE maps of the trained and a re-initialised model.

    The first ``n`` pairs of images_a / images_b, the same masks (``key``);
    ``trained_maps`` (sal_a, sal_b) of the trained model. Returns
    {"mean_spearman", "per_map" [2n], "num_maps"}, or None for a black box
    (``random_model`` None: no weights to re-initialise).
    """
    if random_model is None:
        return None
    rand_a, rand_b = explain_pairs("corrrise", random_model, images_a[:n], images_b[:n], key,
                                   ecfg)
    rho = map_rank_correlation(np.concatenate([m[:n] for m in trained_maps]),
                               np.concatenate([rand_a, rand_b]))
    return {"mean_spearman": float(rho.mean()), "per_map": rho, "num_maps": int(rho.size)}


# ----------------------------------------------------------------------------- decision curves

# What the masking curves of a ViT verification audit rank pixels by (``decision_saliencies``).
CURVE_METHODS = ("vit_heatmap", "vit_attention", "corrrise", "rise", "occlusion", "random")
CURVE_LABELS = {"vit_heatmap": "ViT heatmap (selected mask)", "vit_attention": "ViT attention map",
                "corrrise": "CorrRISE", "rise": "RISE", "occlusion": "occlusion",
                "random": "random"}


def heatmap_ranking(heatmap: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Saliency whose descending order is the heatmap's, then ``fallback``'s outside its support.

    heatmap >= 0, fallback in [0, 1], both [B, H, W]: pixels with heat get
    1 + heat / max heat (> any fallback value), the others the fallback.
    """
    heatmap = np.asarray(heatmap, np.float32)
    peak = heatmap.reshape(heatmap.shape[0], -1).max(axis=1)[:, None, None]
    scaled = np.where(peak > 0, heatmap / np.where(peak > 0, peak, 1.0), 0.0)
    return np.where(heatmap > 0, 1.0 + scaled, np.asarray(fallback, np.float32))


def _black_box_settings(curves_cfg, fill: float, num_pairs: int) -> dict:
    """A vit_fv ``curves`` block in the field names ``explain_pairs`` reads; every pair in one call."""
    return ml_collections.ConfigDict({
        "num_masks": int(curves_cfg.corrrise_masks), "num_patches": int(curves_cfg.corrrise_patches),
        "patch_size": int(curves_cfg.corrrise_patch_size), "correlation": "pearson",
        "rise_masks": int(curves_cfg.rise_masks), "rise_grid": int(curves_cfg.rise_grid),
        "rise_keep_prob": float(curves_cfg.rise_keep_prob),
        "occlusion_patch": int(curves_cfg.occlusion_patch),
        "occlusion_stride": int(curves_cfg.occlusion_stride), "fill": float(fill),
        "chunk_size": int(curves_cfg.chunk_size), "pairs_per_call": int(num_pairs)})


def decision_saliencies(embed_fn: Callable, images_a, images_b, explained, positive, curves_cfg,
                        key, fill: float = 0.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{CURVE_METHODS name: (saliency_a, saliency_b)} [P, H, W] each; descending = mask first.

    images_a, images_b: uint8 [P, H, W, 3]; embed_fn(images [B, H, W, 3] in [0, 1])
    -> [B, D]; explained: a ViT's ``fv_heatmaps.explain_pair_batches`` output with
    maps for these P pairs; positive: bool [P] (the decision). ViT heatmap: the
    pair's selected-technique heatmap, then the image's own attention outside its
    support (``heatmap_ranking``); ViT attention: each image's map. The black-box
    methods (``explain_pairs``: CorrRISE, RISE, occlusion filled with ``fill``)
    rank by their similarity saliency on positive pairs and by its negative on
    negative pairs (the regions that lower the similarity first); random:
    uniform noise. ``curves_cfg``: vit_fv's ``curves`` block.
    """
    sign = np.where(np.asarray(positive, bool), 1.0, -1.0).astype(np.float32)[:, None, None]
    key_corr, key_rise, key_random = jax.random.split(key, 3)
    model = PairModel(None, None, embed_fn)
    settings = _black_box_settings(curves_cfg, fill, images_a.shape[0])
    signed = {method: tuple(sign * np.asarray(s) for s in explain_pairs(
        method, model, images_a, images_b, method_key, settings))
        for method, method_key in (("corrrise", key_corr), ("rise", key_rise),
                                   ("occlusion", None))}
    noise = np.asarray(jax.random.uniform(key_random, (2,) + tuple(images_a.shape[:3])))
    heat = explained["heatmap"]
    return {
        "vit_heatmap": (heatmap_ranking(heat, explained["maps_p"]),
                        heatmap_ranking(heat, explained["maps_g"])),
        "vit_attention": (explained["maps_p"], explained["maps_g"]),
        **signed,
        "random": (noise[0], noise[1]),
    }
