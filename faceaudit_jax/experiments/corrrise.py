"""CorrRISE reproduction (Lu, Xu and Ebrahimi): Table 1 analogue, sanity check, figures.

Protocol (issue 5, item 5):
1. Train a `models.embedder` face embedder (small_resnet backbone) with the
   CosFace loss on ``train.num_identities`` synthetic identities at
   ``data.resolution`` px (identity = image index // images_per_identity).
2. Verification on disjoint test identities (from ``data.test_offset``):
   LFW-style identity-disjoint folds (`data.sampling.verification_pairs`),
   10-fold accuracy (`metrics.verification.kfold_verification_accuracy`);
   the fixed threshold used afterwards is the mean of the folds' thresholds.
3. Saliency for ``explain.num_pairs`` matching test pairs with five methods:
   similarity Grad-CAM and Grad-CAM++ (`explain.corrrise.similarity_cam`),
   similarity RISE, occlusion (xFace-style) and CorrRISE (signed map; its
   descending order puts S+ first, as Algorithm 2 sorts it).
4. Deletion / Insertion (`metrics.perturbation.deletion_insertion`): the
   probe A is perturbed along its own map, accuracy at the fixed threshold,
   area under accuracy vs fraction (in %).
5. Sanity check (Adebayo et al.): CorrRISE maps of the trained model vs a
   re-initialised model with the same architecture on the same pairs and
   masks; Spearman rank correlation per map, averaged.
6. Figures: S+ / S- for both images of a matching and a non-matching pair;
   deletion and insertion curves. Writes results.json, table1.md, summary.md.

Everything goes under the workdir; checkpoints under workdir/models/ (a
.gitignore there keeps them out of git). Rerunning reloads the finished model.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from faceaudit_jax.experiments import registry
from faceaudit_jax import regions, sweeps, train_lib
from faceaudit_jax.data import pipeline, sampling
from faceaudit_jax.experiments.registry import write_json
from faceaudit_jax.explain import corrrise as corrrise_lib
from faceaudit_jax.explain import occlusion as occlusion_lib
from faceaudit_jax.explain import rise as rise_lib
from faceaudit_jax.metrics import perturbation, verification
from faceaudit_jax.models import embedder as embedder_lib

METHODS = ("grad_cam", "grad_cam_plusplus", "rise", "occlusion", "corrrise")
METHOD_LABELS = {
    "grad_cam": "Grad-CAM (similarity)",
    "grad_cam_plusplus": "Grad-CAM++ (similarity)",
    "rise": "RISE (similarity)",
    "occlusion": "Occlusion (xFace-style)",
    "corrrise": "CorrRISE",
}
# The paper's Table 1 on LFW (Deletion / Insertion AUC, %); xFace is its occlusion method.
PAPER_LFW = {
    "grad_cam": (50.65, 65.00),
    "grad_cam_plusplus": (46.40, 68.02),
    "rise": (34.40, 81.83),
    "occlusion": (35.21, 79.95),
    "corrrise": (23.29, 85.70),
}


# ----------------------------------------------------------------------------- data


from faceaudit_jax.data.verification import (  # noqa: F401  (re-exported)
    build_source, render_uint8, split_indices, to_float)
from faceaudit_jax.data import verification as verification_data


def make_batch_fn(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  seed: int) -> Callable[[int], dict]:
    """``batch_fn(step)`` for `train_lib.fit` (no flips: CorrRISE's embedder trains on plain faces)."""
    return verification_data.make_batch_fn(images, labels, batch_size, seed, flip=False)


# ----------------------------------------------------------------------------- model




def _build(config, num_classes: int):
    return embedder_lib.build_embedder_with_margin(
        num_classes, name=str(config.model.name), embedding_dim=int(config.model.embedding_dim))


def train_embedder(config, workdir: str, images: np.ndarray, identity: np.ndarray):
    """Train (or resume / reload) the embedder with CosFace. Returns (FaceEmbedder, variables, info)."""
    classes, labels = np.unique(identity, return_inverse=True)
    model = _build(config, int(classes.size))
    models_dir = Path(workdir) / "models"
    registry.ignore_models_folder(models_dir)
    run_dir = models_dir / "embedder"
    batch_size = int(config.train.batch_size)
    num_steps = pipeline.steps_per_epoch(images.shape[0], batch_size) * int(config.train.num_epochs)
    # A resumed run must not restore a checkpoint of other settings.
    registry.check_fingerprint(run_dir, {
        "model": str(config.model.name), "embedding_dim": int(config.model.embedding_dim),
        "resolution": int(config.data.resolution), "num_images": int(images.shape[0]),
        "num_classes": int(classes.size), "batch_size": batch_size, "num_steps": int(num_steps),
        "loss": str(config.train.loss), "lr": float(config.train.lr), "seed": int(config.seed)},
        overwrite=registry.overwrite_requested(config))
    tx = train_lib.make_optimizer(config.train, num_steps)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(int(config.seed)),
                                         int(config.data.resolution), tx)
    loss_fn = embedder_lib.margin_loss_fn(str(config.train.loss), scale=float(config.train.scale),
                                          margin=float(config.train.margin))
    state = train_lib.fit(model, state, make_batch_fn(images, labels, batch_size, int(config.seed)),
                          num_steps, str(run_dir), loss_fn=loss_fn,
                          ckpt_every=int(config.train.ckpt_every),
                          log_every=int(config.train.log_every), desc="train embedder (CosFace)")
    variables = embedder_lib.embedder_variables(train_lib.state_variables(state))
    last = {}
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        records = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
        records = [r for r in records if r.get("kind") == "train"]
        last = records[-1] if records else {}
    return model.embedder, variables, {"num_steps": num_steps, "last_train_record": last}


def random_variables(model, config) -> dict:
    """Re-initialised variables of the same architecture (the sanity check's model)."""
    size = int(config.data.resolution)
    key = jax.random.PRNGKey(int(config.sanity.seed))
    return model.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False)


def embed_all(embed_fn, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    out = [np.asarray(embed_fn(to_float(images_uint8[i:i + batch_size])))
           for i in range(0, images_uint8.shape[0], batch_size)]
    return np.concatenate(out)


# ----------------------------------------------------------------------------- saliency


def explain_pairs(method: str, fns, images_a, images_b, key, ecfg,
                  directory=None) -> tuple[np.ndarray, np.ndarray]:
    """Saliency (sal_a, sal_b) [P, H, W] of one method, in groups of ecfg.pairs_per_call pairs.

    The groups are the chunks of a ``sweeps.run_sweep``: in a multi-process
    job each process explains its groups and every process gets all maps;
    with a ``directory`` the maps are kept per group and a killed run resumes.
    """
    features_fn, head_fn, embed_fn = fns
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {METHODS}")

    def explain_group(pair_indices):
        a = to_float(images_a[pair_indices])
        b = to_float(images_b[pair_indices])
        if method in ("grad_cam", "grad_cam_plusplus"):
            sa, sb = corrrise_lib.similarity_cam(features_fn, head_fn, a, b, method=method)
        elif method == "rise":
            sa, sb = rise_lib.rise_batch(embed_fn, a, b, key, num_masks=int(ecfg.rise_masks),
                                         grid_size=int(ecfg.rise_grid),
                                         chunk_size=int(ecfg.chunk_size))
        elif method == "occlusion":
            sa, sb = occlusion_lib.occlusion_batch(embed_fn, a, b,
                                                   patch_size=int(ecfg.occlusion_patch),
                                                   stride=int(ecfg.occlusion_stride),
                                                   chunk_size=int(ecfg.chunk_size))
        else:
            sa, sb = corrrise_lib.corrrise_batch(
                embed_fn, a, b, key, num_masks=int(ecfg.num_masks),
                num_patches=int(ecfg.num_patches), patch_size=int(ecfg.patch_size),
                correlation=str(ecfg.correlation), chunk_size=int(ecfg.chunk_size))
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


# ----------------------------------------------------------------------------- figures


def saliency_figure(path: Path, rows: list, outlines=None) -> str:
    """rows: [(title, image_a, image_b, s_a, s_b)] -> A, S+_A, S-_A, B, S+_B, S-_B per row.

    ``outlines``: optional bool [H, W] mask per row, drawn as a contour on A's panels.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 2.3 * len(rows)))
    axes = fig.subplots(len(rows), 6, squeeze=False)
    for r, (title, img_a, img_b, s_a, s_b) in enumerate(rows):
        panels = []
        for name, img, s in (("A", img_a, s_a), ("B", img_b, s_b)):
            pos, neg = np.maximum(s, 0.0), np.minimum(s, 0.0)
            panels += [(f"{title}: {name}", img, None),
                       (f"S+ {name} (max {pos.max():.2f})", img, pos),
                       (f"S- {name} (min {neg.min():.2f})", img, -neg)]
        for c, (ax, (label, img, heat)) in enumerate(zip(axes[r], panels)):
            ax.imshow(img)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=max(float(heat.max()), 1e-6))
            if outlines is not None and c < 3 and outlines[r].any():
                ax.contour(outlines[r].astype(float), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)


def curves_figure(path: Path, results: Mapping) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, mode in zip(axes, ("deletion", "insertion")):
        for method, res in results.items():
            fractions, accuracy = res[mode]
            ax.plot(fractions, accuracy,
                    label=f"{METHOD_LABELS[method]} ({100 * res[mode + '_auc']:.1f})")
        ax.set_title(f"{mode.capitalize()} (AUC %)")
        ax.set_xlabel("fraction of pixels")
        ax.set_ylabel("verification accuracy")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


# ----------------------------------------------------------------------------- report


def table_markdown(table: Mapping) -> str:
    """Algorithm 2's sum (the rule of the paper's numbers) next to the paper, then the trapezoid."""
    lines = ["| method | Deletion AUC (%) ↓ | Insertion AUC (%) ↑ | paper LFW Del / Ins "
             "| trapezoid Del / Ins |",
             "|---|---:|---:|---:|---:|"]
    for method in METHODS:
        row = table[method]
        paper = PAPER_LFW[method]
        # Recomputed from the stored curves, so tables written before the sum was kept agree.
        sums = [100.0 * perturbation.curve_auc(row["fractions"], row[f"{mode}_curve"], rule="sum")
                for mode in ("deletion", "insertion")]
        lines.append(f"| {METHOD_LABELS[method]} | {sums[0]:.2f} | {sums[1]:.2f} | "
                     f"{paper[0]:.2f} / {paper[1]:.2f} | "
                     f"{row['deletion_auc']:.2f} / {row['insertion_auc']:.2f} |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: Mapping, prefix: str) -> str:
    s = results["setup"]
    v = results["verification"]
    sc = results["sanity_check"]
    best_del = min(METHODS, key=lambda m: results["table"][m]["deletion_auc"])
    best_ins = max(METHODS, key=lambda m: results["table"][m]["insertion_auc"])
    return (
        "### CorrRISE\n\n"
        f"A {s['model']} face embedder trained with CosFace on {s['train_identities']} synthetic "
        f"identities ({s['train_images']} images, {s['resolution']} px, {s['train_steps']} updates) "
        f"reaches {100 * v['mean_accuracy']:.2f}% ± {100 * v['std_accuracy']:.2f} 10-fold "
        f"verification accuracy on {v['num_pairs']} pairs of {s['test_identities']} unseen "
        f"identities; Deletion / Insertion (Algorithm 2's sum over steps 1..n, next to the "
        f"paper's numbers; the trapezoid rule with step 0 in the last column; {s['num_steps']} "
        f"steps, fixed threshold "
        f"{v['threshold']:.3f}) on {s['num_explained_pairs']} matching pairs, CorrRISE with "
        f"{s['num_masks']} masks of {s['num_patches']} patches of {s['patch_size']} px, RISE with "
        f"{s['rise_masks']} masks.\n\n"
        + table_markdown(results["table"])
        + f"\nLowest deletion: {METHOD_LABELS[best_del]}; highest insertion: "
        f"{METHOD_LABELS[best_ins]}. Sanity check: Spearman rank correlation between CorrRISE "
        f"maps of the trained and a re-initialised model = {sc['mean_spearman']:.3f} "
        f"(over {sc['num_maps']} maps; near 0 means the maps depend on the learned weights).\n\n"
        f"Figures: [saliency, matching and non-matching pair]({prefix}figure_saliency.png), "
        f"[deletion / insertion curves]({prefix}figure_curves.png).\n"
        + occluded_markdown(results.get("occluded"), prefix)
    )


def occluded_markdown(occ, prefix: str) -> str:
    if not occ:
        return ""
    return (
        "\n#### Occluded probes (the Webface-Occ analogue)\n\n"
        f"{occ['num_pairs']} matching pairs whose probe wears glasses or a hat and whose partner "
        f"wears neither; {100 * occ['accuracy_at_threshold']:.1f}% of them pass the fixed threshold.\n\n"
        + table_markdown(occ["table"])
        + f"\nCorrRISE's dissimilar (S-) mass on the probe: {100 * occ['corrrise_negative_mass_on_occluder']:.1f}% "
        f"falls on the occluder, which covers {100 * occ['occluder_area_share']:.1f}% of the image "
        f"(more than its area in {occ['pairs_with_more_negative_mass_than_area']} of "
        f"{occ['num_pairs']} pairs). Figures: [occluded pair]({prefix}figure_saliency_occluded.png), "
        f"[curves]({prefix}figure_curves_occluded.png).\n"
    )


# ----------------------------------------------------------------------------- scenarios


def method_table(fns, images_a, images_b, threshold: float, key, ecfg, scenario: str):
    """Saliency of every method on matching pairs, scored by Deletion / Insertion.

    Returns (table {method: AUCs and curves}, curves {method: raw result},
    saliency {method: (sal_a, sal_b)}).
    """
    embed_fn = fns[2]
    table, curves, saliency = {}, {}, {}
    for method in METHODS:
        start = time.perf_counter()
        sal_a, sal_b = explain_pairs(method, fns, images_a, images_b, key, ecfg)
        seconds = time.perf_counter() - start
        saliency[method] = (sal_a, sal_b)
        res = perturbation.deletion_insertion(
            embed_fn, to_float(images_a), to_float(images_b), jnp.asarray(sal_a), threshold,
            num_steps=int(ecfg.num_steps), chunk_size=int(ecfg.curve_chunk))
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


def occluder_mask(parse: np.ndarray) -> np.ndarray:
    """bool [..., H, W]: pixels of the occluders of this scenario (glasses, hat)."""
    ids = [regions.region_id("eye_g"), regions.region_id("hat")]
    return np.isin(parse, ids)


def negative_mass_share(saliency: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per map: share of the S- mass (|min(s, 0)|) that falls inside ``mask``; NaN without S-."""
    neg = np.maximum(-saliency, 0.0)
    total = neg.sum(axis=(-2, -1))
    inside = (neg * mask).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def occluded_pairs(attrs: np.ndarray, identity: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) positions of matching pairs whose probe A wears glasses or a hat and whose B wears
    neither: the occluder is the one thing that differs. At most one pair per probe, in order."""
    occluded = (attrs[:, regions.attribute_id("Eyeglasses")] == 1) | (
        attrs[:, regions.attribute_id("Wearing_Hat")] == 1)
    a_list, b_list = [], []
    for a in np.flatnonzero(occluded):
        partners = np.flatnonzero((identity == identity[a]) & ~occluded)
        if partners.size:
            a_list.append(a)
            b_list.append(partners[0])
        if len(a_list) == count:
            break
    return np.asarray(a_list, np.int64), np.asarray(b_list, np.int64)


def occluded_scenario(config, source, fns, test_idx, test_images, test_identity, embeddings,
                      threshold: float, key) -> dict:
    """The Webface-Occ analogue: matching pairs whose probe wears glasses or a hat.

    Same model and threshold as the plain scenario; every method scored by
    Deletion / Insertion, plus where CorrRISE puts its dissimilar (S-) mass:
    the share inside the occluder against the occluder's share of the image.
    """
    ecfg = config.explain
    attrs = source.attributes(test_idx)["attrs"]
    pos_a, pos_b = occluded_pairs(attrs, test_identity, int(config.occluded.num_pairs))
    if pos_a.size == 0:
        # The plain scenario's results are kept; only this one is left out.
        warnings.warn("occluded scenario skipped: no test image wears glasses or a hat with a plain "
                      "image of the same person; raise test.num_identities")
        return None
    images_a, images_b = test_images[pos_a], test_images[pos_b]
    same_scores = verification.pair_scores(embeddings[pos_a], embeddings[pos_b])
    table, curves, saliency = method_table(fns, images_a, images_b, threshold, key, ecfg, "occluded")
    parse_a = np.asarray(source.batch(test_idx[pos_a])["parse"])
    mask = occluder_mask(parse_a)
    s_a = saliency["corrrise"][0]
    share = negative_mass_share(s_a, mask)
    area = mask.mean(axis=(-2, -1))
    shown = int(np.argmax(area))
    rows = [(f"occluded match ({float(same_scores[shown]):.2f})", images_a[shown], images_b[shown],
             s_a[shown], saliency["corrrise"][1][shown], mask[shown])]
    return {
        "num_pairs": int(pos_a.size),
        "accuracy_at_threshold": float(np.mean(same_scores >= threshold)),
        "table": table, "curves": curves, "figure_rows": rows,
        "corrrise_negative_mass_on_occluder": float(np.nanmean(share)),
        "occluder_area_share": float(np.mean(area)),
        "pairs_with_more_negative_mass_than_area": int(np.sum(share > area)),
    }


def occluded_figure(path: Path, rows: list) -> str:
    """The occluded pair's CorrRISE maps with the occluder outlined on A."""
    saliency_figure(path, [r[:5] for r in rows], outlines=[r[5] for r in rows])
    return str(path)


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    t0 = time.perf_counter()
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    train_images, train_identity = verification_data.load_images(config, "train")
    source, test_idx = verification_data.split_rows(config, "test")
    test_images, test_identity = verification_data.render_uint8(source, test_idx,
                                                                int(config.data.render_batch))
    print(f"[corrrise] {train_images.shape[0]} training and {test_images.shape[0]} test faces",
          flush=True)

    model, variables, train_info = train_embedder(config, workdir, train_images, train_identity)
    fns = embedder_lib.embedder_fns(model, variables)
    embed_fn = fns[2]
    print(f"[corrrise] trained ({time.perf_counter() - t0:.0f}s); verification", flush=True)

    embeddings = embed_all(embed_fn, test_images, int(config.test.batch_size))
    pairs = sampling.verification_pairs(test_identity, int(config.test.pair_seed),
                                        num_folds=int(config.test.num_folds),
                                        pairs_per_fold=int(config.test.pairs_per_fold))
    scores = verification.pair_scores(embeddings[pairs["a"]], embeddings[pairs["b"]])
    kfold = verification.kfold_verification_accuracy(scores, pairs["same"],
                                                     num_folds=int(config.test.num_folds),
                                                     folds=pairs["fold"])
    threshold = float(kfold["mean_threshold"])

    ecfg = config.explain
    matched = np.flatnonzero(pairs["same"])[: int(ecfg.num_pairs)]
    images_a, images_b = test_images[pairs["a"][matched]], test_images[pairs["b"][matched]]
    key = jax.random.PRNGKey(int(ecfg.seed))
    table, curves, saliency = method_table(fns, images_a, images_b, threshold, key, ecfg, "plain")

    occluded = None
    if bool(config.occluded.enabled):
        occluded = occluded_scenario(config, source, fns, test_idx, test_images, test_identity,
                                     embeddings, threshold, key)
    if occluded:
        curves_figure(out / "figure_curves_occluded.png", occluded.pop("curves"))
        occluded_figure(out / "figure_saliency_occluded.png", occluded.pop("figure_rows"))

    # Sanity check: same pairs, same masks, re-initialised weights.
    num_sanity = int(config.sanity.num_pairs)
    random_fns = embedder_lib.embedder_fns(model, random_variables(model, config))
    rand_a, rand_b = explain_pairs("corrrise", random_fns, images_a[:num_sanity],
                                   images_b[:num_sanity], key, ecfg)
    trained_a, trained_b = (m[:num_sanity] for m in saliency["corrrise"])
    rho = map_rank_correlation(np.concatenate([trained_a, trained_b]),
                               np.concatenate([rand_a, rand_b]))

    # Figure: one matching and one non-matching pair (CorrRISE S+ / S-).
    mismatched = np.flatnonzero(~pairs["same"])[0]
    non_a, non_b = test_images[pairs["a"][[mismatched]]], test_images[pairs["b"][[mismatched]]]
    ns_a, ns_b = explain_pairs("corrrise", fns, non_a, non_b, key, ecfg)
    match_score = float(scores[matched[0]])
    non_score = float(scores[mismatched])
    fig_rows = [(f"match ({match_score:.2f})", images_a[0], images_b[0],
                 saliency["corrrise"][0][0], saliency["corrrise"][1][0]),
                (f"non-match ({non_score:.2f})", non_a[0], non_b[0], ns_a[0], ns_b[0])]
    saliency_figure(out / "figure_saliency.png", fig_rows)
    curves_figure(out / "figure_curves.png", curves)

    results = {
        "setup": {
            "model": str(config.model.name), "resolution": int(config.data.resolution),
            "train_identities": int(config.train.num_identities),
            "train_images": int(train_images.shape[0]), "train_steps": int(train_info["num_steps"]),
            "loss": str(config.train.loss), "scale": float(config.train.scale),
            "margin": float(config.train.margin),
            "test_identities": int(config.test.num_identities),
            "num_explained_pairs": int(matched.size), "num_steps": int(ecfg.num_steps),
            "num_masks": int(ecfg.num_masks), "num_patches": int(ecfg.num_patches),
            "patch_size": int(ecfg.patch_size), "correlation": str(ecfg.correlation),
            "rise_masks": int(ecfg.rise_masks), "occlusion_patch": int(ecfg.occlusion_patch),
            "occlusion_stride": int(ecfg.occlusion_stride),
            "last_train_record": train_info["last_train_record"],
        },
        "verification": {
            "mean_accuracy": kfold["mean_accuracy"], "std_accuracy": kfold["std_accuracy"],
            "threshold": threshold, "fold_accuracies": kfold["fold_accuracies"],
            "num_pairs": int(scores.size),
        },
        "table": table,
        "paper_lfw": {m: {"deletion_auc": d, "insertion_auc": i} for m, (d, i) in PAPER_LFW.items()},
        "sanity_check": {"mean_spearman": float(rho.mean()), "per_map": rho,
                         "num_maps": int(rho.size)},
        "figures": {"saliency": "figure_saliency.png", "curves": "figure_curves.png",
                    **({"saliency_occluded": "figure_saliency_occluded.png",
                        "curves_occluded": "figure_curves_occluded.png"} if occluded else {})},
        "occluded": occluded,
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / "results.json", results)
    (out / "table1.md").write_text(table_markdown(table))
    (out / "summary.md").write_text(summary_markdown(results, f"{registry.readme_link_prefix(out)}"))
    print(f"[corrrise] done in {results['seconds']:.0f}s -> {out}", flush=True)
    return results


