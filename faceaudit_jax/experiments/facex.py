"""FaceX (Sarridis et al.): summary explanations of a face-attribute classifier.

``run`` is the project's main job: train (or load) a classifier with an
injected shortcut, explain it with CAMs over a balanced test set, reduce the
maps to region IoR (eq. 3-4) and top patches (eq. 6-7) with streaming
accumulators, and write the report. ``train`` (train.py) stops after training
and testing; ``experiments.audit`` explains an existing model with the same
``audit`` and report writer. ``run_tables`` reproduces the paper's Tables 1,
3 and 4 and Figure 5 on synthetic faces.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from faceaudit_jax import distributed, regions
from faceaudit_jax.data import pipeline
from faceaudit_jax.experiments import classifier
from faceaudit_jax.experiments.registry import readme_link_prefix, write_json
from faceaudit_jax.explain import cams
from faceaudit_jax.summary import ior as ior_lib
from faceaudit_jax.summary import top_patches as top_lib

# Group ids for the IoR accumulators: class 0, class 1, and padding rows of
# the last batch (kept out of every reported number).
_PAD_GROUP = 2


@dataclasses.dataclass
class AuditResult:
    ior: np.ndarray                 # [R] IoR_r over all explained images (eq. 4)
    counts: np.ndarray              # [R] N_r
    ior_by_predicted: np.ndarray    # [2, R]
    ior_by_true: np.ndarray         # [2, R]
    counts_by_predicted: np.ndarray
    top: top_lib.TopPatches
    accuracy: float
    num_images: int
    overlay_images: np.ndarray
    overlay_maps: np.ndarray
    overlay_titles: list
    seconds: float

    def ranking(self):
        return ior_lib.rank_regions(self.ior)


def _combine(summary, groups=(0, 1)):
    counts = summary.counts_by_group[list(groups)]
    sums = np.nan_to_num(summary.ior_by_group[list(groups)]) * counts
    total = counts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, sums.sum(0) / np.maximum(total, 1), np.nan), total


def build_parser(explain_cfg):
    """The parser named by ``explain.parser``: None (the data set's own masks) or a trained one.

    "" or "ground_truth": ``batch["parse"]``; any other value is the workdir of
    a ``configs/face_parser.py`` run, whose network parses every test image.
    """
    name = str(explain_cfg.get("parser", "") or "")
    if name in ("", "ground_truth"):
        return None
    from faceaudit_jax.experiments import face_parser
    return face_parser.load_parser(name)


def audit(clf: classifier.TrainedClassifier, source, indices: np.ndarray, target: str,
          explain_cfg, batch_size: int, *, desc: str = "explain", parser=None) -> AuditResult:
    """Explain ``clf`` on ``indices`` and reduce to IoR and top patches, streaming.

    ``parser`` (a ``parsing.Parser``) supplies the parse maps; None reads the
    batch's own (ground-truth) masks. In a multi-process job each process
    explains its block of ``indices`` (``distributed.process_shard``) and the
    sums, counts and top patches are reduced over all processes at the end;
    overlays come from the process's own images.
    """
    features_fn, head_fn = clf.fns()
    cam_fn = cams.make_cam_fn(features_fn, head_fn,
                              cams.make_binary_target(explain_cfg.target_mode),
                              explain_cfg.method, return_logits=True,
                              upsample=explain_cfg.get("upsample", True))
    target_col = regions.attribute_id(target)
    by_pred = ior_lib.IoRAccumulator.init(regions.NUM_REGIONS, 3)
    by_true = ior_lib.IoRAccumulator.init(regions.NUM_REGIONS, 3)
    top = top_lib.TopPatchAccumulator.init(int(explain_cfg.top_k), regions.NUM_REGIONS)
    # Counted on device: reading it per batch would stall the loop on a host round trip.
    correct = jnp.zeros((), jnp.int32)
    total = 0
    n_over = int(explain_cfg.num_overlays)
    over_img, over_map, over_titles = [], [], []
    start = time.perf_counter()
    local_indices, offset = distributed.process_shard(indices)
    num_batches = math.ceil(len(local_indices) / batch_size)
    for batch, valid in tqdm(pipeline.iterate_batches(source, local_indices, batch_size),
                             total=num_batches, desc=desc, leave=False):
        maps, logits = cam_fn(batch["image"])
        parse = batch["parse"] if parser is None else parser.parse(batch["image"], batch)
        valid_j = jnp.asarray(valid)
        maps = maps * valid_j[:, None, None]       # padded rows add nothing to top-k
        pred = (logits[:, 0] > 0).astype(jnp.int32)
        truth = (batch["attrs"][:, target_col] == 1).astype(jnp.int32)
        by_pred = ior_lib.IoRAccumulator.update(
            by_pred, maps, parse, jnp.where(valid_j, pred, _PAD_GROUP),
            explain_cfg.ior_mode)
        by_true = ior_lib.IoRAccumulator.update(
            by_true, maps, parse, jnp.where(valid_j, truth, _PAD_GROUP),
            explain_cfg.ior_mode)
        ids = np.arange(offset, offset + batch_size)
        top = top_lib.TopPatchAccumulator.update(top, maps, parse, ids,
                                                 int(explain_cfg.patch_size))
        correct = correct + jnp.sum((pred == truth) & valid_j)
        total += int(valid.sum())
        if len(over_img) < n_over:
            take = min(n_over - len(over_img), int(valid.sum()))
            over_img.extend(np.asarray(batch["image"][:take]))
            over_map.extend(np.asarray(maps[:take]))
            z = np.asarray(logits[:take, 0])
            t = np.asarray(truth[:take])
            over_titles.extend(f"{target}={int(tt)} pred={int(zz > 0)}" for tt, zz in zip(t, z))
        offset += batch_size
    by_pred, by_true = distributed.global_ior_state(by_pred), distributed.global_ior_state(by_true)
    top = distributed.global_top_patch_state(top)
    correct, total = (int(v) for v in distributed.global_sum((correct, jnp.asarray(total))))
    pred_summary = ior_lib.IoRAccumulator.finalize(by_pred)
    true_summary = ior_lib.IoRAccumulator.finalize(by_true)
    overall, counts = _combine(pred_summary)
    top_result = top_lib.TopPatchAccumulator.finalize(top)
    # Top-patch image ids are positions in ``indices``; padded rows had zero maps.
    return AuditResult(
        ior=overall.astype(np.float32), counts=counts,
        ior_by_predicted=pred_summary.ior_by_group[:2],
        ior_by_true=true_summary.ior_by_group[:2],
        counts_by_predicted=pred_summary.counts_by_group[:2],
        top=top_result, accuracy=int(correct) / max(total, 1), num_images=total,
        overlay_images=np.stack(over_img), overlay_maps=np.stack(over_map),
        overlay_titles=over_titles, seconds=time.perf_counter() - start)


def confounder_rp(ior_r: np.ndarray, confounders: Sequence[str]) -> list[Optional[int]]:
    """RP of each confounder: the best rank among its regions (FaceX's metric)."""
    return [ior_lib.ranking_position(ior_r, regions.regions_of(c)) for c in confounders]


def explain_source(config, source):
    res = config.explain.get("resolution", None)
    return source if not res else source.with_resolution(int(res))


def _write_audit_report(workdir: Path, name: str, result: AuditResult, source,
                        indices: np.ndarray, config, extra: dict, out_dir=None) -> dict:
    from faceaudit_jax.viz import figures, prototype

    out = workdir / f"report_{name}" if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["prototype"] = str(out / "prototype_heatmap.png")
    prototype.plot_prototype_heatmap(
        result.ior, path=paths["prototype"],
        title=f"FaceX IoR: {config.bias.target} classifier ({name})")
    paths["overlays"] = str(out / "cam_overlays.png")
    figures.plot_cam_overlays(result.overlay_images, result.overlay_maps,
                              result.overlay_titles, path=paths["overlays"])
    gallery_regions = [r for r, _ in sorted(
        ((n, v) for n, v in zip(regions.REGIONS, result.ior) if not np.isnan(v) and n != "background"),
        key=lambda t: -t[1])][:6]
    needed = np.unique(result.top.image_ids[result.top.valid])
    images = {int(i): np.asarray(img) for i, img in zip(
        needed, source.batch(indices[needed])["image"])} if needed.size else {}
    paths["gallery"] = str(out / "patch_gallery.png")
    figures.plot_patch_gallery(lambda i: images[int(i)], result.top,
                               int(config.explain.patch_size), regions=gallery_regions,
                               path=paths["gallery"])
    ranking = result.ranking()
    symmetry = ior_lib.left_right_symmetry(result.ior)
    payload = {
        "ior": dict(zip(regions.REGIONS, result.ior.tolist())),
        "counts": dict(zip(regions.REGIONS, result.counts.tolist())),
        "ior_by_predicted_class": {str(c): dict(zip(regions.REGIONS, result.ior_by_predicted[c].tolist()))
                                   for c in (0, 1)},
        "ior_by_true_class": {str(c): dict(zip(regions.REGIONS, result.ior_by_true[c].tolist()))
                              for c in (0, 1)},
        "ranking": [{"rank": r, "region": n, "ior": v} for r, n, v in ranking],
        "accuracy_at_explained_resolution": result.accuracy,
        "num_images": result.num_images,
        "explain_seconds": result.seconds,
        # Near 0 and 0.5 on left-right symmetric faces when maps sit where the model looks.
        "symmetry_right_minus_left": symmetry["mean_right_minus_left"],
        "symmetry_right_wins_share": symmetry["right_wins_share"],
        "symmetry_pairs": symmetry["pairs"],
        **extra,
    }
    figures.write_report(str(out), result.ior, result.counts, ranking, paths, payload)
    return payload


def train(config, workdir: str) -> dict:
    """train.py for the main job: the biased classifier (and baseline), tested, not explained.

    Each model's run directory (``workdir/biased``, ``workdir/balanced``) is what
    ``configs/audit.py`` takes as ``model.path`` (``model.source=checkpoint``).
    """
    if config.experiment != "facex":
        raise ValueError(f"experiment {config.experiment!r} has no separate training step; "
                         "use explain.py to run it whole")
    return classifier.train(config, workdir)


def run(config, workdir: str) -> dict:
    """The main job: biased (and baseline) classifier, FaceX audit, report."""
    work = Path(workdir)
    t0 = time.perf_counter()
    # classifier.train refuses model.source != "train" with a pointer to configs/audit.py.
    trained = classifier.train(config, workdir)
    source, subsets = trained["source"], trained["subsets"]
    confs = classifier.confounder_list(config.bias)
    xsource = explain_source(config, source)
    summary = {"classifier": trained["results"]}
    parser = build_parser(config.explain)
    for name, clf in trained["models"].items():
        result = audit(clf, xsource, subsets["test"], config.bias.target, config.explain,
                       int(config.test.batch_size), desc=f"explain {name}", parser=parser)
        train_acc = trained["results"][name]["accuracy"]
        if result.accuracy < train_acc - 0.05:
            warnings.warn(
                f"{name}: accuracy at the explained resolution {xsource.resolution} is "
                f"{result.accuracy:.3f}, below {train_acc:.3f} at the training resolution "
                f"{source.resolution}; its maps explain a model that no longer works as trained")
        rps = confounder_rp(result.ior, confs)
        payload = _write_audit_report(work, name, result, xsource, subsets["test"], config, {
            "model": name, "target": config.bias.target, "confounders": confs,
            "confounder_rp": rps, "group_accuracy": trained["results"][name]})
        summary[name] = {"confounder_rp": rps, "ranking": payload["ranking"][:5],
                         "accuracy_at_explained_resolution": result.accuracy}
        top5 = ", ".join(f"{r['rank']}. {r['region']} ({r['ior']:.3f})" for r in payload["ranking"][:5])
        print(f"[{name}] FaceX ranking: {top5}", flush=True)
        print(f"[{name}] ranking position of {', '.join(confs)}: {rps} "
              f"(report: {work / f'report_{name}' / 'report.md'})", flush=True)
    write_json(work / "summary.json", summary)
    (work / "summary.md").write_text(summary_markdown(config, summary, elapsed=time.perf_counter() - t0,
                                                      link_prefix=readme_link_prefix(work)))
    return summary


def summary_markdown(config, summary: dict, elapsed: float, link_prefix: str = "") -> str:
    """The README fragment for the main job: group accuracies and the FaceX ranking.

    ``link_prefix`` goes before the heatmap's path inside the workdir (see
    ``registry.readme_link_prefix``): "" links relative to the workdir.
    """
    confs = ", ".join(classifier.confounder_list(config.bias))
    baseline = "balanced" in summary
    num_test = summary["classifier"]["biased"]["num_images"]
    data = ("synthetic faces" if config.data.source == "synthetic"
            else f"{config.data.source} images from data.root")
    lines = [
        "### Main job: FaceX audit of a shortcut (`configs/facex.py`)",
        "",
        f"{config.bias.target} classifier (`{config.model.name}`, {data}, {config.data.resolution} px, "
        f"{config.train.size} training images x {config.train.num_epochs} epochs) with a "
        f"{config.bias.corr} {config.bias.target} x {confs} link"
        + (f", vs the same architecture on a same-size subset balanced over "
           f"{config.bias.target} x {confs}" if baseline else "")
        + f"; test set balanced over the cells of {config.bias.target} x {confs} "
        f"({num_test} images, disjoint identities). "
        f"Whole run (training, testing, explaining, reports): {elapsed / 60:.1f} min "
        f"wall on {os.cpu_count()} CPU cores ({jax.default_backend()}).",
        "",
        "| model | accuracy | bias-aligned | bias-conflicting | gap | RP of confounder | top-3 regions |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in ("biased", "balanced"):
        if name not in summary:
            continue
        g = summary["classifier"][name]
        top3 = ", ".join(r["region"] for r in summary[name]["ranking"][:3])
        rps = ", ".join(str(r) for r in summary[name]["confounder_rp"])
        lines.append(f"| {name} | {g['accuracy']:.3f} | {g['aligned_accuracy']:.3f} | "
                     f"{g['conflicting_accuracy']:.3f} | {g['gap']:.3f} | {rps} | {top3} |")
    lines += ["", f"![prototype heatmap of the biased model]({link_prefix}report_biased/prototype_heatmap.png)"]
    return "\n".join(lines) + "\n"


def run_tables(config, workdir: str) -> dict:
    """Tables 1, 3, 4 and Figure 5 on synthetic faces (see ``facex_tables``)."""
    from faceaudit_jax.experiments import facex_tables
    return facex_tables.run_tables(config, workdir)
