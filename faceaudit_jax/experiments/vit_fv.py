"""ViT face-verification heatmaps for positive and negative decisions (Correia et al.).

The job (``run(config, workdir)``), on synthetic faces by default:

1. Data. Training images are indices 0 .. N-1 (identity = index //
   ``images_per_identity``); test images start at ``data.test_offset``, so
   test identities are disjoint from the training ones. Faces are rendered
   once and kept as uint8 (training re-reads them every epoch).
2. Model. A ViT face embedder (``models.vit``, ``vit_tiny_face_p16`` by
   default) inside ``ViTMarginClassifier`` (cosine head over the training
   identities), trained with CosFace through ``train_lib.fit`` (Orbax
   checkpoints under ``<workdir>/models/vit_embedder``; a rerun reloads).
   ``train_lib``'s update calls ``loss_fn(first model output, batch)``; the
   classifier's first output are the cosines, so ``models.vit.CosFaceOnCosines`` applies
   the margin and scale to them (``losses.cosface_logits`` would re-normalise
   embeddings and centres the model has already normalised).
3. Verification protocol. LFW-style pairs on the test identities
   (``data.sampling.verification_pairs``, identity-disjoint folds); cosine
   scores of L2-normalised embeddings (d = ||e_P - e_G||^2 = 2 - 2 cos, so
   thresholds in either are equivalent); 10-fold accuracy
   (``metrics.verification.kfold_verification_accuracy``); the decision
   threshold is the mean of the fold thresholds. True-positive (matched,
   accepted) and true-negative (mismatched, rejected) pairs are analysed.
4. Table 1 analogue. For every attention method (``explain.methods``), each
   image's map explains its similarity to the partner's fixed embedding
   (``explain.attention.pair_attention_maps``); ``explain.fv_heatmaps.
   explain_pairs`` binarises with Otsu, builds OIM / UM / N-IUM, masks
   (black fill), scores SM+ (eq. 1) on positive and SM- (eq. 2) on negative
   pairs, selects a technique per pair and draws the heatmap, all pairs of a
   batch in one jitted call. Reported per technique: mean and median SM (NaN,
   i.e. RA = 0 or d = 0, left out and counted), the share of pairs where it
   is selected, and the mean removed area RA. The main method is
   ``"nograd_lrp"``, this code base's reading of the paper's "No-Grad
   ViT-LRP" (``explain.attention``: Chefer's relevance rule with the gradient
   factor dropped on Ali et al.'s conservative-propagation graph). The plain
   ``"nograd"`` variant is left out by default: its maps equal attention
   rollout's after normalisation.
5. Perturbation curves on a subset of the analysed pairs (deletion with the
   same black fill, ``metrics.perturbation``): recall vs the share of masked
   probe pixels on true-positive pairs (gallery untouched), TNR vs the share
   of masked pixels of both images on true-negative pairs, at the protocol's
   threshold. A faster drop is better. Methods and the evidence they rank by:

   - ViT heatmap: the selected-technique heatmap of the pair (one map per
     pair, used for both images of a negative pair, as the masks are defined
     pixel-wise across the two aligned faces); pixels outside its support
     follow the image's own attention map, so the order never falls back to
     row-major ties;
   - ViT attention: the image's own attention map (main method);
   - CorrRISE: positive pairs by S (S+ first), negative pairs by -S (the
     dissimilar regions S- first);
   - RISE and occlusion: positive pairs by the similarity saliency / drop,
     negative pairs by its negative (regions whose presence lowers the
     similarity first);
   - random: uniform noise (the chance reference).
6. Outputs under ``workdir``: ``results.json`` (setup, training, protocol,
   Table 1 for every method, curve values and AUCs, timings, warnings),
   ``per_pair.json`` (the main method's per-pair distances, RA, SM and
   selection), ``table1.md``, ``perturbation_curves.png``,
   ``examples_positive.png`` / ``examples_negative.png`` and ``summary.md``
   (the README fragment; ``scripts/update_readme.py`` pastes it).

Paper's Table 1 (LFW, their ViT): mean SM+ OIM 10.00 vs UM 4.80; mean SM-
OIM 1.84, UM 1.56, N-IUM 1.70.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.experiments import registry
from faceaudit_jax import keys, train_lib
from faceaudit_jax.data import pipeline, sampling
from faceaudit_jax.experiments.registry import write_json
from faceaudit_jax.explain import attention as attention_lib
from faceaudit_jax.explain import corrrise as corrrise_lib
from faceaudit_jax.explain import fv_heatmaps as fv
from faceaudit_jax.explain import occlusion as occlusion_lib
from faceaudit_jax.explain import rise as rise_lib
from faceaudit_jax.metrics import perturbation as perturbation_lib
from faceaudit_jax.metrics import verification as verification_lib
from faceaudit_jax.metrics.verification import cosine_similarity
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.models import vit
from faceaudit_jax.viz import verification as verification_figures


TECHNIQUE_LABELS = {"oim": "OIM", "um": "UM", "n_ium": "N-IUM"}
METHOD_LABELS = {
    "rollout": "attention rollout",
    "grad_rollout": "gradient-weighted rollout (Chefer et al.)",
    "nograd": "no-gradient relevance (= rollout after normalisation)",
    "nograd_lrp": "No-Grad ViT-LRP",
}
CURVE_METHODS = ("vit_heatmap", "vit_attention", "corrrise", "rise", "occlusion", "random")
CURVE_LABELS = {"vit_heatmap": "ViT heatmap (selected mask)", "vit_attention": "ViT attention map",
                "corrrise": "CorrRISE", "rise": "RISE", "occlusion": "occlusion",
                "random": "random"}
# The paper's Table 1 (LFW): mean SM+ and SM- per technique.
PAPER_TABLE1 = {"sm_plus": {"oim": 10.00, "um": 4.80},
                "sm_minus": {"oim": 1.84, "um": 1.56, "n_ium": 1.70}}


# ----------------------------------------------------------------------------- data


from faceaudit_jax.data.verification import (  # noqa: F401  (re-exported)
    build_source, make_batch_fn, render_uint8, split_indices, to_float)
from faceaudit_jax.data import verification as verification_data


# ----------------------------------------------------------------------------- training


def build_embedder(model_cfg) -> vit.ViTFaceEmbedder:
    overrides = dict(model_cfg.get("overrides", {}) or {})
    return vit.build_vit(str(model_cfg.name), **overrides)


@dataclasses.dataclass
class TrainedEmbedder:
    embedder: vit.ViTFaceEmbedder
    params: dict  # {"params": embedder sub-tree}, for ViTApply
    num_steps: int
    run_dir: str
    last_metrics: dict
    # [D, C] class centres of the CosFace head: the per-image explanation target.
    centres: Optional[np.ndarray] = None


def _fingerprint(config, num_identities: int) -> dict:
    """What the checkpoint depends on; a mismatch means another experiment's model."""
    return {
        "model": str(config.model.name),
        "overrides": dict(config.model.get("overrides", {}) or {}),
        "resolution": int(config.data.resolution), "data_seed": int(config.data.seed),
        "independent": bool(config.data.independent),
        "images_per_identity": int(config.data.images_per_identity),
        "num_identities": int(num_identities), "batch_size": int(config.train.batch_size),
        "num_epochs": int(config.train.num_epochs), "lr": float(config.train.lr),
        "scale": float(config.train.scale), "margin": float(config.train.margin),
        "flip": bool(config.train.flip), "seed": int(config.seed),
    }






def _last_train_record(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("kind") == "train"]
    return records[-1] if records else {}


def train_embedder(config, workdir: str, images: np.ndarray, identity: np.ndarray
                   ) -> TrainedEmbedder:
    """Train (or resume, or reload when finished) the ViT with CosFace on the training faces.

    images: uint8 [N, H, W, 3]; identity: [N] (any ids; mapped to 0..C-1).
    """
    classes, labels = np.unique(identity, return_inverse=True)
    embedder = build_embedder(config.model)
    if embedder.config.image_size != int(config.data.resolution):
        raise ValueError(
            f"the ViT is built for {embedder.config.image_size} px but data.resolution="
            f"{config.data.resolution}; set model.overrides.image_size or data.resolution")
    model = vit.ViTMarginClassifier(embedder.config, int(classes.size))
    models_dir = Path(workdir) / "models"
    registry.ignore_models_folder(models_dir)
    run_dir = models_dir / "vit_embedder"
    registry.check_fingerprint(run_dir, _fingerprint(config, classes.size),
                               overwrite=registry.overwrite_requested(config))
    batch_size = int(config.train.batch_size)
    num_steps = pipeline.steps_per_epoch(images.shape[0], batch_size) * int(config.train.num_epochs)
    if num_steps < 1:
        raise ValueError(f"train.num_epochs={config.train.num_epochs}; expected >= 1")
    tx = train_lib.make_optimizer(config.train, num_steps)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(int(config.seed)),
                                         int(config.data.resolution), tx)
    batch_fn = make_batch_fn(images, labels, batch_size, int(config.seed),
                             bool(config.train.flip))
    loss_fn = vit.CosFaceOnCosines(float(config.train.scale), float(config.train.margin))
    state = train_lib.fit(model, state, batch_fn, num_steps, str(run_dir), loss_fn=loss_fn,
                          ckpt_every=int(config.train.ckpt_every),
                          log_every=int(config.train.log_every), desc="train ViT (CosFace)")
    params = {"params": state.params["embedder"]}
    return TrainedEmbedder(embedder, params, num_steps, str(run_dir), _last_train_record(run_dir),
                           centres=np.asarray(state.params["class_centres"]))


# ----------------------------------------------------------------------------- embedding


@dataclasses.dataclass(frozen=True)
class ViTEmbed:
    """``embed_fn(params, images [B, H, W, 3]) -> [B, D]``; hashable by the model config."""

    apply: vit.ViTApply

    def __call__(self, params, images):
        return self.apply(params, images)[0]


class BoundEmbed:
    """``embed_fn(images) -> [B, D]`` with the parameters bound, for the black-box explainers.

    Hashes by identity (a static jit argument): create one per run and reuse it.
    """

    def __init__(self, embed: ViTEmbed, params):
        self.embed = embed
        self.params = params

    def __call__(self, images):
        return self.embed(self.params, images)


@functools.partial(jax.jit, static_argnums=0)
def _embed_uint8(embed: ViTEmbed, params, images_uint8):
    return embed(params, to_float(images_uint8))


def embed_images(embed: ViTEmbed, params, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeddings [N, D] of uint8 images, in fixed-size (padded) batches: one compile."""
    outputs = []
    num = images_uint8.shape[0]
    for start in range(0, num, batch_size):
        chunk = images_uint8[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outputs.append(np.asarray(_embed_uint8(embed, params, chunk))[:batch_size - pad])
    return np.concatenate(outputs)


# ----------------------------------------------------------------------------- protocol


def verification_protocol(embeddings: np.ndarray, identity: np.ndarray, seed: int,
                          num_folds: int, pairs_per_fold: int) -> dict:
    """LFW-style k-fold verification on the test faces.

    Returns pairs (``a``, ``b`` indices into the test images, ``same``,
    ``fold``), ``scores`` (cosine), ``kfold`` (the accuracy dict),
    ``threshold`` (mean fold threshold, cosine), ``predicted_same`` and the
    rates at that threshold.
    """
    pairs = sampling.verification_pairs(identity, seed, num_folds=num_folds,
                                        pairs_per_fold=pairs_per_fold)
    scores = verification_lib.pair_scores(embeddings[pairs["a"]], embeddings[pairs["b"]])
    kfold = verification_lib.kfold_verification_accuracy(scores, pairs["same"],
                                                         folds=pairs["fold"])
    threshold = float(kfold["mean_threshold"])
    rates = verification_lib.verification_rates(scores, pairs["same"], threshold)
    return {"pairs": pairs, "scores": scores, "kfold": kfold, "threshold": threshold,
            "predicted_same": scores >= threshold, "rates": rates}


def select_pairs(same: np.ndarray, predicted_same: np.ndarray, decision: str, count: int,
                 seed: int) -> np.ndarray:
    """Indices of up to ``count`` true-positive ("tp") or true-negative ("tn") pairs, shuffled."""
    if decision == "tp":
        pool = np.flatnonzero(same & predicted_same)
    elif decision == "tn":
        pool = np.flatnonzero(~same & ~predicted_same)
    else:
        raise ValueError(f"decision={decision!r}; expected 'tp' or 'tn'")
    if pool.size == 0:
        raise ValueError(f"the model made no {decision.upper()} decision on the test pairs; "
                         "train longer or use more test pairs")
    order = np.random.default_rng([int(seed), 0 if decision == "tp" else 1]).permutation(pool)
    return order[:int(count)]


# ----------------------------------------------------------------------------- explanation

# Per-pair scalars of explain_pairs kept for every method; the maps only for the main one.
_SCALAR_KEYS = ("d", "d_pg", "d_pp", "d_npg", "ra", "sm_plus", "sm_minus", "selected",
                "constant_p", "constant_g")
_MAP_KEYS = ("heatmap", "heatmap_raw", "binary_p", "binary_g")


EXPLAIN_TARGETS = ("pair", "image")


def explain_pair_batches(embed: ViTEmbed, params, probes: np.ndarray, galleries: np.ndarray,
                         positive: np.ndarray, method: str, explain_cfg, grid_shape,
                         keep_maps: bool, centres: Optional[np.ndarray] = None
                         ) -> dict[str, np.ndarray]:
    """Attention maps, masks, SM and heatmaps for P pairs, ``explain_cfg.batch_pairs`` at a time.

    ``explain_cfg.target``: "pair" (default) explains each image's similarity
    to its partner (pair-conditioned maps); "image" explains each image's own
    predicted-class cosine against the training ``centres`` [D, C]
    (classification-focused, one map per image whatever the pair, as the
    paper). Rollout methods use no target, so both give the same maps.

    probes, galleries: uint8 [P, H, W, 3]; positive: bool [P] (the decision).
    Every batch has the same size (the last one padded with its final pair),
    so each jitted step compiles once. Returns numpy arrays: "d" [P] and the
    other ``_SCALAR_KEYS`` ([3, P] per technique or [P]); with keep_maps also
    "maps_p", "maps_g" and ``_MAP_KEYS`` [P, H, W] and "masks" [3, P, H, W].
    """
    num_pairs = probes.shape[0]
    batch = int(min(int(explain_cfg.batch_pairs), num_pairs))
    collected: dict[str, list] = {}
    for start in range(0, num_pairs, batch):
        rows = np.arange(start, min(start + batch, num_pairs))
        padded = np.concatenate([rows, np.repeat(rows[-1:], batch - rows.size)])
        probe = to_float(probes[padded])
        gallery = to_float(galleries[padded])
        target = str(explain_cfg.get("target", "pair"))
        if target not in EXPLAIN_TARGETS:
            raise ValueError(f"explain.target={target!r}; expected one of {EXPLAIN_TARGETS}")
        options = dict(readout=embed.apply.model.config.pool, grid_shape=grid_shape)
        if target == "pair":
            maps_p, maps_g = attention_lib.pair_attention_maps(
                embed.apply, params, probe, gallery, method, **options)
        else:
            if centres is None:
                raise ValueError("explain.target='image' needs the classifier's class centres")
            both = attention_lib.image_attention_maps(
                embed.apply, params, jnp.concatenate([probe, gallery]), centres, method,
                **options)
            maps_p, maps_g = both[:batch], both[batch:]
        result = fv.explain_pairs(
            embed, probe, gallery, maps_p, maps_g, jnp.asarray(positive[padded]),
            embed_params=params, fill=explain_cfg.fill, bins=int(explain_cfg.bins),
            dilation_size=int(explain_cfg.dilation_size),
            gaussian_size=int(explain_cfg.gaussian_size),
            gaussian_variance=float(explain_cfg.gaussian_variance), warn=False)
        keep = slice(0, rows.size)
        for key in _SCALAR_KEYS:
            value = np.asarray(result[key])
            collected.setdefault(key, []).append(value[..., keep] if value.ndim == 2 else
                                                 value[keep])
        if keep_maps:
            for key, value in (("maps_p", maps_p), ("maps_g", maps_g),
                               *((k, result[k]) for k in _MAP_KEYS)):
                collected.setdefault(key, []).append(np.asarray(value)[keep])
            collected.setdefault("masks", []).append(np.asarray(result["masks"])[:, keep])
    out = {}
    for key, parts in collected.items():
        axis = 1 if (key in ("masks",) or (parts[0].ndim == 2 and key in _SCALAR_KEYS)) else 0
        out[key] = np.concatenate(parts, axis=axis)
    return out


def _stats(values: np.ndarray) -> dict:
    """mean / median over the defined (finite) values, with counts."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "median": float(np.median(finite)) if finite.size else float("nan"),
            "defined": int(finite.size), "undefined": int(values.size - finite.size)}


def sm_table(result: Mapping[str, np.ndarray], positive: np.ndarray) -> dict:
    """The Table 1 analogue for one attention method.

    result: ``explain_pair_batches`` output over P pairs; positive: bool [P].
    Returns {"positive": {...}, "negative": {...}}; each holds "n", per
    technique the SM statistics ("sm_plus" for OIM, UM; "sm_minus" for OIM,
    UM, N-IUM), "wins" (share of the pairs where the technique is selected),
    "undecided" (share with no defined SM for any candidate) and "ra" (mean
    removed area).
    """
    positive = np.asarray(positive, bool)
    table = {}
    for side, rows, metric, candidates in (
            ("positive", positive, "sm_plus", fv.POSITIVE_TECHNIQUES),
            ("negative", ~positive, "sm_minus", fv.NEGATIVE_TECHNIQUES)):
        count = int(rows.sum())
        selected = np.asarray(result["selected"])[rows]
        entry: dict[str, Any] = {"n": count, "metric": metric, metric: {}, "wins": {}, "ra": {}}
        for tech in candidates:
            k = fv.TECHNIQUES.index(tech)
            entry[metric][tech] = _stats(np.asarray(result[metric])[k, rows])
            entry["wins"][tech] = float(np.mean(selected == k)) if count else float("nan")
            entry["ra"][tech] = float(np.mean(np.asarray(result["ra"])[k, rows])) if count \
                else float("nan")
        entry["undecided"] = float(np.mean(selected < 0)) if count else float("nan")
        table[side] = entry
    return table


def oim_finding(table: Mapping) -> dict:
    """Which technique leads by mean SM, by median SM and by share of wins, per decision.

    Returns {"positive" | "negative": {"best_by_mean", "best_by_median",
    "best_by_wins" (technique names; None when no SM is defined),
    "oim_wins_by_mean", "oim_wins_by_median", "oim_wins_by_share" (bools)}}.
    Ties go to the earlier technique in ``TECHNIQUES`` order.
    """
    finding = {}
    for side in ("positive", "negative"):
        entry = table[side]
        metric = entry["metric"]
        best = {}
        for stat in ("mean", "median"):
            values = {t: s[stat] for t, s in entry[metric].items()
                      if s[stat] is not None and np.isfinite(s[stat])}
            best[stat] = max(values, key=values.get) if values else None
        wins = {t: v for t, v in entry["wins"].items() if v is not None and np.isfinite(v)}
        best_wins = max(wins, key=wins.get) if wins else None
        finding[side] = {"best_by_mean": best["mean"], "best_by_median": best["median"],
                         "best_by_wins": best_wins,
                         "oim_wins_by_mean": best["mean"] == "oim",
                         "oim_wins_by_median": best["median"] == "oim",
                         "oim_wins_by_share": best_wins == "oim"}
    return finding


# ----------------------------------------------------------------------------- curves


@dataclasses.dataclass(frozen=True)
class RejectionScore:
    """score_fn for ``perturbation_curve`` on (probe, gallery) items: 1 where rejected.

    TNR on mismatched pairs = mean of cos(f(P'), f(G')) < threshold. Hashable
    by the embed_fn, so curves of one model share one compilation.
    """

    embed_fn: Callable

    def __call__(self, perturbed, thresholds):
        probes, galleries = perturbed
        emb = self.embed_fn(jnp.concatenate([probes, galleries]))
        half = probes.shape[0]
        return (cosine_similarity(emb[:half], emb[half:]) < thresholds).astype(jnp.float32)


def heatmap_ranking(heatmap: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Saliency whose descending order is the heatmap's, then ``fallback``'s outside its support.

    heatmap >= 0, fallback in [0, 1], both [B, H, W]: pixels with heat get
    1 + heat / max heat (> any fallback value), the others the fallback.
    """
    heatmap = np.asarray(heatmap, np.float32)
    peak = heatmap.reshape(heatmap.shape[0], -1).max(axis=1)[:, None, None]
    scaled = np.where(peak > 0, heatmap / np.where(peak > 0, peak, 1.0), 0.0)
    return np.where(heatmap > 0, 1.0 + scaled, np.asarray(fallback, np.float32))


def curve_saliencies(bound: BoundEmbed, probes, galleries, explained: Mapping,
                     positive: np.ndarray, curves_cfg, key, fill: float = 0.0
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{method: (probe saliency, gallery saliency)} [P, H, W] each; descending = mask first.

    probes, galleries: float [P, H, W, 3]; explained: the main method's
    ``explain_pair_batches`` output for these P pairs; positive: bool [P].
    The black-box baselines run once over all P pairs (one call each); the
    occluder is filled with ``fill``, like every removed pixel here. Signs
    follow the module docstring.
    """
    positive = np.asarray(positive, bool)
    sign = np.where(positive, 1.0, -1.0).astype(np.float32)[:, None, None]
    key_corr, key_rise, key_random = jax.random.split(key, 3)
    chunk = int(curves_cfg.chunk_size)
    s_a, s_b = corrrise_lib.corrrise_batch(
        bound, probes, galleries, key_corr, num_masks=int(curves_cfg.corrrise_masks),
        num_patches=int(curves_cfg.corrrise_patches),
        patch_size=int(curves_cfg.corrrise_patch_size), chunk_size=chunk)
    r_a, r_b = rise_lib.rise_batch(
        bound, probes, galleries, key_rise, num_masks=int(curves_cfg.rise_masks),
        grid_size=int(curves_cfg.rise_grid), keep_prob=float(curves_cfg.rise_keep_prob),
        chunk_size=chunk)
    o_a, o_b = occlusion_lib.occlusion_batch(
        bound, probes, galleries, patch_size=int(curves_cfg.occlusion_patch),
        stride=int(curves_cfg.occlusion_stride), fill_value=float(fill), chunk_size=chunk)
    noise = np.asarray(jax.random.uniform(key_random, (2,) + tuple(probes.shape[:3])))
    heat = explained["heatmap"]
    return {
        "vit_heatmap": (heatmap_ranking(heat, explained["maps_p"]),
                        heatmap_ranking(heat, explained["maps_g"])),
        "vit_attention": (explained["maps_p"], explained["maps_g"]),
        "corrrise": (sign * np.asarray(s_a), sign * np.asarray(s_b)),
        "rise": (sign * np.asarray(r_a), sign * np.asarray(r_b)),
        "occlusion": (sign * np.asarray(o_a), sign * np.asarray(o_b)),
        "random": (noise[0], noise[1]),
    }


def perturbation_curves(bound: BoundEmbed, probes, galleries, saliencies: Mapping, positive: bool,
                        threshold: float, num_steps: int, fill: float, chunk_size: int) -> dict:
    """Recall (positive pairs, probe masked) or TNR (negative pairs, both masked) curves.

    Returns {"fractions": [S], method: {"values": [S], "auc": float}}.
    """
    out: dict[str, Any] = {}
    thresholds = jnp.full((probes.shape[0],), threshold, jnp.float32)
    scorer = RejectionScore(bound)
    for name, (sal_p, sal_g) in saliencies.items():
        if positive:
            fractions, values = perturbation_lib.verification_curve(
                bound, probes, galleries, sal_p, threshold, num_steps=num_steps,
                mode="deletion", baseline=fill, chunk_size=chunk_size)
        else:
            fractions, per_pair = perturbation_lib.perturbation_curve(
                scorer, (probes, galleries), (jnp.asarray(sal_p), jnp.asarray(sal_g)),
                num_steps=num_steps, mode="deletion", baseline=fill, context=thresholds,
                chunk_size=chunk_size)
            values = np.asarray(per_pair).mean(axis=1)
        out["fractions"] = np.asarray(fractions)
        out[name] = {"values": np.asarray(values),
                     "auc": perturbation_lib.curve_auc(fractions, values)}
    return out


# ----------------------------------------------------------------------------- figures


def curves_figure(path: Path, curves: Mapping, num_positive: int, num_negative: int) -> str:
    """``viz.verification.masking_curves_figure`` with this experiment's methods and labels."""
    return verification_figures.masking_curves_figure(path, curves, num_positive, num_negative,
                                                      CURVE_METHODS, CURVE_LABELS)


def examples_figure(path: Path, probes, galleries, explained: Mapping, rows: Sequence[int],
                    positive: bool, method_label: str, fill: float = 0.0) -> str:
    """``viz.verification.pair_examples_figure`` with this experiment's technique labels."""
    return verification_figures.pair_examples_figure(path, probes, galleries, explained, rows,
                                                     positive, method_label, TECHNIQUE_LABELS,
                                                     fill)


# ----------------------------------------------------------------------------- markdown


def _fmt(value, fmt: str = ".2f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, fmt)


def _pct(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.0f}%"


def table1_markdown(table: Mapping, method_label: str) -> str:
    """Table 1 analogue: SM statistics, win shares and RA per technique, with the paper's means."""
    pos, neg = table["positive"], table["negative"]
    header = ("| technique | mean SM+ | median SM+ | selected (TP) | RA (TP) | mean SM- "
              "| median SM- | selected (TN) | RA (TN) | paper mean SM+ | paper mean SM- |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for tech in fv.TECHNIQUES:
        plus = pos["sm_plus"].get(tech)
        minus = neg["sm_minus"].get(tech)
        cells = [TECHNIQUE_LABELS[tech]]
        if plus is not None:
            cells += [_fmt(plus["mean"]), _fmt(plus["median"]), _pct(pos["wins"][tech]),
                      _fmt(pos["ra"][tech], ".3f")]
        else:
            cells += ["—"] * 4
        cells += [_fmt(minus["mean"]), _fmt(minus["median"]), _pct(neg["wins"][tech]),
                  _fmt(neg["ra"][tech], ".3f")]
        cells += [_fmt(PAPER_TABLE1["sm_plus"].get(tech)) if tech in PAPER_TABLE1["sm_plus"]
                  else "—", _fmt(PAPER_TABLE1["sm_minus"][tech])]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n{method_label}; {pos['n']} true-positive and {neg['n']} true-negative pairs. "
            "Selected = share of pairs where the technique has the largest SM. Undefined SM "
            f"(RA = 0) left out: {_undefined_note(table)}.\n")
    return header + "\n".join(lines) + "\n" + note


def _undefined_note(table: Mapping) -> str:
    parts = []
    for side, metric in (("positive", "sm_plus"), ("negative", "sm_minus")):
        for tech, stats in table[side][metric].items():
            if stats["undefined"]:
                parts.append(f"{stats['undefined']} {TECHNIQUE_LABELS[tech]} "
                             f"{'SM+' if side == 'positive' else 'SM-'}")
    return ", ".join(parts) if parts else "none"


def methods_markdown(tables: Mapping[str, Mapping]) -> str:
    """Mean SM per technique and the winner share for every attention method."""
    header = ("| attention method | mean SM+ OIM / UM | OIM selected (TP) | mean SM- OIM / UM / "
              "N-IUM | OIM selected (TN) |\n|---|---|---|---|---|\n")
    lines = []
    for method, table in tables.items():
        pos, neg = table["positive"], table["negative"]
        plus = " / ".join(_fmt(pos["sm_plus"][t]["mean"]) for t in fv.POSITIVE_TECHNIQUES)
        minus = " / ".join(_fmt(neg["sm_minus"][t]["mean"]) for t in fv.NEGATIVE_TECHNIQUES)
        lines.append(f"| {METHOD_LABELS.get(method, method)} | {plus} | "
                     f"{_pct(pos['wins']['oim'])} | {minus} | {_pct(neg['wins']['oim'])} |")
    return header + "\n".join(lines) + "\n"


def _finding_sentence(table: Mapping, finding: Mapping) -> str:
    """One sentence per decision: does OIM lead by mean SM (the paper's criterion), by
    median, and by the share of pairs where it is selected?"""

    def name(tech):
        return TECHNIQUE_LABELS[tech] if tech else "none"

    def verdict(side, metric, label, paper):
        f, entry = finding[side], table[side]
        means = ", ".join(f"{TECHNIQUE_LABELS[t]} {_fmt(s['mean'])}"
                          for t, s in entry[metric].items())
        paper_numbers = ", ".join(f"{TECHNIQUE_LABELS[t]} {v:.2f}" for t, v in paper.items())
        if f["oim_wins_by_mean"]:
            head = f"OIM wins by mean {label} ({means}; paper: {paper_numbers})"
        else:
            head = (f"OIM does not win by mean {label}: {name(f['best_by_mean'])} does "
                    f"({means}; paper: {paper_numbers})")
        medians = ", ".join(f"{TECHNIQUE_LABELS[t]} {_fmt(s['median'])}"
                            for t, s in entry[metric].items())
        median = (f"by median {name(f['best_by_median'])} leads ({medians})")
        wins = entry["wins"]
        share = (f"OIM is selected for the most pairs ({_pct(wins['oim'])})"
                 if f["oim_wins_by_share"] else
                 f"{name(f['best_by_wins'])} is selected for the most pairs "
                 f"({_pct(wins[f['best_by_wins']])}; OIM {_pct(wins['oim'])})")
        return f"{head}; {median}; {share}"

    positive = verdict("positive", "sm_plus", "SM+", PAPER_TABLE1["sm_plus"])
    negative = verdict("negative", "sm_minus", "SM-", PAPER_TABLE1["sm_minus"])
    return f"Here, for positive decisions {positive}. For negative decisions {negative}."


def _model_sentence(setup: Mapping) -> str:
    model = setup["model"]
    arch = (f"{model['name']}: {model['image_size']} px, {model['grid'][0]} x {model['grid'][1]} "
            f"patches, {model['num_layers']} layers")
    if setup.get("model_source") == "checkpoint":
        return f"The ViT face embedder of {setup['model_path']} ({arch})"
    return (f"A ViT face embedder ({arch}) trained with CosFace on {setup['train_identities']} "
            f"identities of {setup.get('source', 'synthetic faces')} ({setup['train_images']} images, "
            f"{setup['num_epochs']} epochs)")


def summary_markdown(setup: Mapping, protocol: Mapping, table: Mapping, finding: Mapping,
                     curves: Mapping, prefix: str) -> str:
    kfold = protocol["kfold"]
    lines = [
        "### ViT face-verification heatmaps",
        "",
        f"{_model_sentence(setup)} reaches {100 * kfold['mean_accuracy']:.1f} ± "
        f"{100 * kfold['std_accuracy']:.1f}% 10-fold verification accuracy on "
        f"{protocol['num_pairs']} pairs of {setup['test_identities']} unseen identities of "
        f"{setup.get('source', 'synthetic faces')}; "
        f"{setup['main_method_label']} maps (Chefer et al.'s relevance rule without the "
        "gradient factor on the conservative-propagation graph; the literal no-gradient rule "
        "would equal attention rollout) "
        + ("explain each image's similarity to its partner (pair-conditioned maps; "
           "`--config.explain.target=image` explains each image's own predicted-class cosine, "
           "as the paper) "
           if setup.get("explain_target", "pair") == "pair" else
           "explain each image's own predicted-class cosine against the CosFace class centres "
           "(per-image, classification-focused maps, as the paper) ")
        + f"and are binarised with Otsu, combined into OIM / UM / "
        f"N-IUM and scored with SM+ / SM- on {table['positive']['n']} true-positive and "
        f"{table['negative']['n']} true-negative pairs (black fill).",
        "",
        table1_markdown(table, setup["main_method_label"]).rstrip(),
        "",
        _finding_sentence(table, finding),
        f"SM divides by the removed area RA, and OIM removes the least (mean RA "
        f"{_fmt(table['positive']['ra']['oim'], '.3f')} on true-positive, "
        f"{_fmt(table['negative']['ra']['oim'], '.3f')} on true-negative pairs), so small "
        "distance changes give it large, noisy SM values.",
        "",
    ]
    pos_auc = ", ".join(f"{CURVE_LABELS[n]} {curves['positive'][n]['auc']:.3f}"
                        for n in CURVE_METHODS if n in curves["positive"])
    neg_auc = ", ".join(f"{CURVE_LABELS[n]} {curves['negative'][n]['auc']:.3f}"
                        for n in CURVE_METHODS if n in curves["negative"])
    lines += [
        f"Perturbation curves (area under the curve, lower = faster drop = better): recall on "
        f"{setup['curves']['num_positive']} true-positive pairs, probe masked: {pos_auc}; TNR "
        f"on {setup['curves']['num_negative']} true-negative pairs, both masked: {neg_auc}.",
        "",
        f"![perturbation curves]({prefix}perturbation_curves.png)",
        "",
        f"Examples: [true-positive pairs]({prefix}examples_positive.png), "
        f"[true-negative pairs]({prefix}examples_negative.png); all attention methods in "
        f"[table1.md]({prefix}table1.md), numbers in [results.json]({prefix}results.json).",
    ]
    return "\n".join(lines) + "\n"


def write_reports(workdir, results: Mapping) -> None:
    """table1.md and summary.md from the results dict (as ``run`` returns or results.json holds).

    ``rewrite_reports`` calls it on a finished run's results.json, so wording
    changes need no recomputation; JSON nulls (NaN) print as "n/a".
    """
    out = Path(workdir)
    main_method = results["main_method"]
    tables = results["table1"]
    method_label = METHOD_LABELS.get(main_method, main_method)
    main_table_md = table1_markdown(tables[main_method], method_label)
    (out / "table1.md").write_text(
        f"# ViT face-verification heatmaps: Table 1 analogue\n\n"
        f"## {method_label} (main method)\n\n{main_table_md}"
        f"\n## All attention methods\n\n{methods_markdown(tables)}")
    (out / "summary.md").write_text(summary_markdown(
        results["setup"], results["verification"], tables[main_method],
        oim_finding(tables[main_method]), results["curves"], registry.readme_link_prefix(out)))


def rewrite_reports(workdir) -> None:
    """Regenerate table1.md and summary.md from ``<workdir>/results.json``."""
    path = Path(workdir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the experiment first")
    write_reports(workdir, json.loads(path.read_text()))




# ----------------------------------------------------------------------------- the job


def _check_methods(config) -> tuple[tuple[str, ...], str]:
    methods = tuple(config.explain.methods)
    main = str(config.explain.main_method)
    unknown = [m for m in methods if m not in attention_lib.METHODS]
    if unknown or not methods:
        raise ValueError(f"explain.methods={methods}; expected a non-empty subset of "
                         f"{attention_lib.METHODS}")
    if main not in methods:
        raise ValueError(f"explain.main_method={main!r} is not in explain.methods={methods}")
    fill = config.explain.fill
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not np.isfinite(fill):
        # The curves' deletion baseline and the occluder need one number as well.
        raise ValueError(f"explain.fill={fill!r}; expected a finite number (0.0 = black)")
    return methods, main


def load_checkpoint(config) -> tuple[TrainedEmbedder, dict]:
    """The ViT of ``model.path`` (a vit_fv workdir or its models/vit_embedder) and its setup fields."""
    embedder, params, centres, record = model_sources.load_vit_checkpoint(config.model.path)
    if embedder.config.image_size != int(config.data.resolution):
        raise ValueError(f"model.path={config.model.path!r} holds a ViT for {embedder.config.image_size} px "
                         f"but data.resolution={config.data.resolution}")
    trained = TrainedEmbedder(embedder, params, 0, str(model_sources.vit_embedder_run_dir(config.model.path)),
                              {}, centres=centres)
    return trained, {"model_source": "checkpoint", "model_path": str(config.model.path),
                     "train_identities": int(record["num_identities"]), "train_images": None}


def _check_model_source(config) -> str:
    source = str(config.model.get("source", "train") or "train")
    if source not in ("train", "checkpoint"):
        raise ValueError(f"model.source={source!r}; vit_fv explains a ViT: expected 'train' or 'checkpoint'")
    if source == "checkpoint":
        model_sources.vit_embedder_run_dir(config.model.get("path", ""))
    return source


def obtain_embedder(config, workdir: str) -> tuple[TrainedEmbedder, dict]:
    """``model.source``: train the ViT here (or reload this workdir's), or load a checkpoint."""
    if _check_model_source(config) == "checkpoint":
        return load_checkpoint(config)
    images, identity = verification_data.load_images(config, "train")
    trained = train_embedder(config, workdir, images, identity)
    return trained, {"train_identities": int(np.unique(identity).size),
                     "train_images": int(images.shape[0])}


def train(config, workdir: str) -> TrainedEmbedder:
    """Train (or reload) the ViT embedder only."""
    images, identity = verification_data.load_images(config, "train")
    return train_embedder(config, workdir, images, identity)


def run(config, workdir: str) -> dict:
    """Train the ViT, run the verification protocol, Table 1, curves, figures; write results."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    methods, main_method = _check_methods(config)
    clock = {"start": time.perf_counter()}

    def lap(name: str) -> None:
        clock[name] = time.perf_counter()
        print(f"vit_fv: {name} done ({clock[name] - clock['start']:.0f} s)", flush=True)

    _check_model_source(config)  # a clear error before any work
    test_source, test_idx = verification_data.split_rows(config, "test")
    test_images, test_identity = verification_data.render_uint8(test_source, test_idx,
                                                                int(config.data.render_batch))
    lap("render")

    trained, train_info = obtain_embedder(config, workdir)
    lap("train")

    embed = ViTEmbed(vit.ViTApply(trained.embedder))
    params = trained.params
    grid_shape = trained.embedder.config.grid_shape
    embeddings = embed_images(embed, params, test_images, int(config.test.batch_size))
    protocol = verification_protocol(embeddings, test_identity, int(config.test.pair_seed),
                                     int(config.test.num_folds),
                                     int(config.test.pairs_per_fold))
    pairs, predicted = protocol["pairs"], protocol["predicted_same"]
    tp = select_pairs(pairs["same"], predicted, "tp", int(config.explain.num_positive),
                      int(config.seed))
    tn = select_pairs(pairs["same"], predicted, "tn", int(config.explain.num_negative),
                      int(config.seed))
    chosen = np.concatenate([tp, tn])
    positive = np.concatenate([np.ones(tp.size, bool), np.zeros(tn.size, bool)])
    probes = test_images[pairs["a"][chosen]]
    galleries = test_images[pairs["b"][chosen]]
    lap("protocol")

    caught: list[str] = []
    explained: dict[str, dict] = {}
    tables: dict[str, dict] = {}
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", RuntimeWarning)
        for method in methods:
            explained[method] = explain_pair_batches(
                embed, params, probes, galleries, positive, method, config.explain, grid_shape,
                keep_maps=method == main_method, centres=trained.centres)
            fv.warn_undefined(explained[method], positive)
            tables[method] = sm_table(explained[method], positive)
        lap("table1")

        main = explained[main_method]
        n_pos = int(min(int(config.curves.num_positive), tp.size))
        n_neg = int(min(int(config.curves.num_negative), tn.size))
        subset = np.concatenate([np.arange(n_pos), tp.size + np.arange(n_neg)])
        sub_main = {k: (v[:, subset] if k == "masks" or (v.ndim == 2 and k in _SCALAR_KEYS)
                        else v[subset]) for k, v in main.items()}
        bound = BoundEmbed(embed, params)
        sub_probes, sub_galleries = to_float(probes[subset]), to_float(galleries[subset])
        saliencies = curve_saliencies(bound, sub_probes, sub_galleries, sub_main,
                                      positive[subset], config.curves,
                                      jax.random.PRNGKey(keys.run_seed(int(config.seed), "vit_fv", "curves")),
                                      float(config.explain.fill))
        lap("baseline_maps")
        curves = {}
        for side, rows, is_positive in (("positive", np.arange(n_pos), True),
                                        ("negative", n_pos + np.arange(n_neg), False)):
            curves[side] = perturbation_curves(
                bound, sub_probes[rows], sub_galleries[rows],
                {name: (s[0][rows], s[1][rows]) for name, s in saliencies.items()},
                is_positive, protocol["threshold"], int(config.curves.num_steps),
                float(config.explain.fill), int(config.curves.chunk_size))
        lap("curves")
    for record in records:
        message = f"{record.category.__name__}: {record.message}"
        if message not in caught:
            caught.append(message)

    finding = oim_finding(tables[main_method])
    method_label = METHOD_LABELS.get(main_method, main_method)
    vit_cfg = trained.embedder.config
    rates = protocol["rates"]
    setup = {
        "source": verification_data.data_name(config.data), "resolution": int(config.data.resolution),
        "model": {"name": str(config.model.name), "image_size": vit_cfg.image_size,
                  "patch_size": vit_cfg.patch_size, "grid": list(vit_cfg.grid_shape),
                  "hidden_dim": vit_cfg.hidden_dim, "num_layers": vit_cfg.num_layers,
                  "num_heads": vit_cfg.num_heads, "embed_dim": vit_cfg.embed_dim,
                  "pool": vit_cfg.pool},
        **train_info, "num_epochs": int(config.train.num_epochs),
        "batch_size": int(config.train.batch_size), "num_steps": trained.num_steps,
        "loss": {"kind": "cosface", "scale": float(config.train.scale),
                 "margin": float(config.train.margin)},
        "test_identities": int(np.unique(test_identity).size),
        "test_images": int(test_idx.size),
        "methods": list(methods), "main_method": main_method,
        "main_method_label": method_label, "fill": float(config.explain.fill),
        "explain_target": str(config.explain.get("target", "pair")),
        "heatmap": {"bins": int(config.explain.bins),
                    "dilation_size": int(config.explain.dilation_size),
                    "gaussian_size": int(config.explain.gaussian_size),
                    "gaussian_variance": float(config.explain.gaussian_variance)},
        "curves": {"num_positive": n_pos, "num_negative": n_neg,
                   "num_steps": int(config.curves.num_steps),
                   "corrrise_masks": int(config.curves.corrrise_masks),
                   "corrrise_patches": int(config.curves.corrrise_patches),
                   "corrrise_patch_size": int(config.curves.corrrise_patch_size),
                   "rise_masks": int(config.curves.rise_masks),
                   "rise_grid": int(config.curves.rise_grid),
                   "occlusion_patch": int(config.curves.occlusion_patch),
                   "occlusion_stride": int(config.curves.occlusion_stride)},
    }
    protocol_json = {
        "num_pairs": int(pairs["same"].size), "num_folds": int(config.test.num_folds),
        "kfold": {k: (np.asarray(v).tolist() if np.ndim(v) else v)
                  for k, v in protocol["kfold"].items()},
        "threshold_cosine": protocol["threshold"],
        "threshold_sq_distance": 2.0 - 2.0 * protocol["threshold"],
        "rates_at_threshold": rates,
        "num_true_positive": int(rates["tp"]), "num_true_negative": int(rates["tn"]),
    }
    seconds = {name: round(clock[name] - clock[prev], 1) for prev, name in zip(
        ["start", "render", "train", "protocol", "table1", "baseline_maps"],
        ["render", "train", "protocol", "table1", "baseline_maps", "curves"])}
    results = {
        "setup": setup,
        "training": {"num_steps": trained.num_steps, "last_log": trained.last_metrics},
        "verification": protocol_json,
        "main_method": main_method,
        "table1": tables,
        "oim_finding": finding,
        "paper_table1": PAPER_TABLE1,
        "curves": curves,
        "warnings": caught,
        "seconds": seconds,
    }
    write_json(out / "results.json", results)
    write_json(out / "per_pair.json", {
        "method": main_method, "techniques": list(fv.TECHNIQUES),
        "pair_index": chosen, "probe_image": test_idx[pairs["a"][chosen]],
        "gallery_image": test_idx[pairs["b"][chosen]], "positive": positive,
        **{k: main[k] for k in ("d", "d_pg", "d_pp", "d_npg", "ra", "sm_plus", "sm_minus",
                                "selected")}})

    write_reports(out, results)
    curves_figure(out / "perturbation_curves.png", curves, n_pos, n_neg)
    num_examples = int(config.explain.num_examples)
    examples_figure(out / "examples_positive.png", probes, galleries, main,
                    list(range(min(num_examples, tp.size))), True, method_label,
                    float(config.explain.fill))
    examples_figure(out / "examples_negative.png", probes, galleries, main,
                    list(tp.size + np.arange(min(num_examples, tn.size))), False, method_label,
                    float(config.explain.fill))
    lap("write")
    return results
