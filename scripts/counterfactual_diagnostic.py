"""Is a FaceX miss the explainer's or the model's? A counterfactual ground truth.

For a few Table 1 models of the FaceX reproduction (same recipe and training
subsets as ``configs/facex_tables.py``), this script

1. trains (or reloads) each biased classifier and tests it per bias group;
2. renders every test face again with each region-linked attribute switched
   (``data.synthetic.render_counterfactual``) and records the mean |logit
   change|: the model's true reliance on each attribute, no explainer involved
   (``summary.counterfactual``);
3. audits the model with FaceX (soft IoR over the 19 regions) for every CAM
   method (Grad-CAM, Grad-CAM++, HiResCAM, Element-wise Grad-CAM), both
   upsampling conventions (receptive-field aligned, the default; half-pixel,
   pytorch-grad-cam's) and two explanation resolutions (the CAM on ResNet
   stage 4's feature map and on stage 3's, twice as fine; optionally other
   image sizes), and reports the
   confounder's RP, the left-right symmetry diagnostic and the Spearman
   correlation between the IoR ranking and the ground-truth ranking of the
   switchable attributes.

    PYTHONPATH=. python scripts/counterfactual_diagnostic.py --workdir results/counterfactual \
        --models results/facex/models    # reuses the FaceX reproduction's Table 1 models
    PYTHONPATH=. python scripts/counterfactual_diagnostic.py --confounders Wearing_Hat \
        --train-size 500 --epochs 1 --test-size 64 --workdir /tmp/cf_smoke      # a smoke run

Writes ``results.json`` and ``summary.md`` (the README picks it up) under the workdir (checkpoints under
``models/``, which should stay out of git). Reruns resume from checkpoints.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import facex_tables as tables_config  # noqa: E402
from faceaudit_jax import regions  # noqa: E402
from faceaudit_jax.data import pipeline, synthetic  # noqa: E402
from faceaudit_jax import classifiers  # noqa: E402
from faceaudit_jax.experiments import facex_tables  # noqa: E402
from faceaudit_jax.summary import facex_tables as tables_lib  # noqa: E402
from faceaudit_jax.workdir import write_json  # noqa: E402
from faceaudit_jax.metrics import fairness  # noqa: E402
from faceaudit_jax.explain import cams  # noqa: E402
from faceaudit_jax.summary import counterfactual as cf  # noqa: E402
from faceaudit_jax.summary import ior as ior_lib  # noqa: E402

METHODS = ("grad_cam", "grad_cam_plusplus", "hires_cam", "element_wise_grad_cam")
UPSAMPLING = ("aligned", "half_pixel")


def make_explain_fn(features_fn, head_fn):
    """Jitted (images, parse) -> (region sums [M, U, B, R], region pixel counts [B, R], logits).

    One forward pass and one head VJP per method serve every upsampling convention.
    """
    target = cams.make_binary_target("predicted")
    grids = {"aligned": features_fn.cell_grid, "half_pixel": "half_pixel"}

    @jax.jit
    def explain(images, parse):
        fmap = features_fn(images)
        per_method, logits = [], None
        for method in METHODS:
            raw, logits = cams.cams_from_features(fmap, head_fn, target, method)
            per_up = []
            for up in UPSAMPLING:
                maps = cams.upsample_normalize_maps(raw.astype(jnp.float32), images.shape[1:3],
                                                    grid=grids[up])
                sums, counts = ior_lib.region_sums_and_counts(maps, parse, regions.NUM_REGIONS)
                per_up.append(sums)
            per_method.append(jnp.stack(per_up))
        return jnp.stack(per_method), counts, logits[:, 0]

    return explain


def audit_all(clf, source, indices, batch_size, stage=None):
    """IoR_r [M, U, R] (mean over images where the region is present) and accuracy inputs."""
    features_fn, head_fn = clf.fns(stage)
    explain = make_explain_fn(features_fn, head_fn)
    ior_sum = np.zeros((len(METHODS), len(UPSAMPLING), regions.NUM_REGIONS))
    present = np.zeros(regions.NUM_REGIONS)
    logits = []
    for batch, valid in pipeline.iterate_batches(source, indices, batch_size):
        sums, counts, z = explain(batch["image"], batch["parse"])
        sums, counts = np.asarray(sums, np.float64)[:, :, valid], np.asarray(counts)[valid]
        ior_sum += np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).sum(2)
        present += (counts > 0).sum(0)
        logits.append(np.asarray(z)[valid])
    with np.errstate(invalid="ignore", divide="ignore"):
        ior_r = np.where(present > 0, ior_sum / np.maximum(present, 1), np.nan)
    return ior_r, np.concatenate(logits)


def run_model(ctx, config, target, confounder, resolutions, stages, log):
    spec = facex_tables.biased_spec(ctx, target, [confounder], float(config.table1.corr))
    case = facex_tables.case_config(config, target, [confounder], float(config.table1.corr))
    start = time.perf_counter()
    clf = classifiers.train_classifier(case, str(ctx.models_dir), spec.train_indices,
                                       ctx.source(True), spec.name)
    train_seconds = time.perf_counter() - start
    batch_size = int(config.test.batch_size)
    test_source = ctx.source(True)
    logits = classifiers.predict_logits(clf, test_source, spec.test_indices, batch_size)
    groups = fairness.bias_group_report(logits, spec.test_attrs, target, [confounder],
                                        spec.confounder_values)
    log(f"[{spec.name}] trained in {train_seconds:.0f} s; aligned acc "
        f"{groups['aligned_accuracy']:.3f}, conflicting {groups['conflicting_accuracy']:.3f}")

    start = time.perf_counter()
    truth = tables_lib.counterfactual_record(clf, config, spec)
    effects, by_region = truth["effects"], truth["region_effects"][confounder]
    truth_order = sorted(effects, key=lambda a: -effects[a]["mean_abs_change"])
    log(f"[{spec.name}] ground truth (mean |logit change|) in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{a} {effects[a]['mean_abs_change']:.2f}" for a in truth_order[:5]))

    audits = []
    for res, stage in [(r, s) for r in resolutions for s in stages]:
        start = time.perf_counter()
        source = pipeline.SyntheticSource(
            seed=int(config.data.seed), resolution=int(res), independent=True,
            images_per_identity=int(config.data.images_per_identity))
        ior_r, z = audit_all(clf, source, spec.test_indices, batch_size, stage)
        y = spec.test_attrs[:, regions.attribute_id(target)]
        accuracy = float(((z > 0).astype(np.int32) == y).mean())
        for mi, method in enumerate(METHODS):
            for ui, up in enumerate(UPSAMPLING):
                vec = ior_r[mi, ui]
                sym = ior_lib.left_right_symmetry(vec)
                cmp = cf.compare_rankings(vec, effects, confounders=[confounder])
                audits.append({
                    "resolution": int(res), "stage": int(stage), "method": method,
                    "upsample": up,
                    "accuracy_at_resolution": accuracy,
                    "rp": ior_lib.ranking_position(vec, regions.regions_of(confounder)),
                    "top3": [n for _, n, _ in ior_lib.rank_regions(vec)[:3]],
                    "right_minus_left": sym["mean_right_minus_left"],
                    "right_wins_share": sym["right_wins_share"],
                    "spearman": cmp["spearman"],
                    "confounder_ior_rank": cmp["confounder_ior_rank"][confounder],
                    "ior": dict(zip(regions.REGIONS, vec.tolist())),
                })
        log(f"[{spec.name}] audited at {res} px, stage {stage} in {time.perf_counter() - start:.0f} s "
            f"(accuracy {accuracy:.3f})")
    truth_rank = cf.average_ranks([effects[a]["mean_abs_change"] for a in effects])
    return {
        "name": spec.name, "target": target, "confounder": confounder,
        "train_seconds": train_seconds, "group_accuracy": groups,
        "effects": effects, "region_effects": by_region,
        "truth_rank": dict(zip(effects, truth_rank.tolist())),
        "confounder_truth_rank": dict(zip(effects, truth_rank.tolist()))[confounder],
        "audits": audits,
    }


def _fmt(v, spec=".2f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_markdown(records, config, elapsed) -> str:
    lines = [
        "### Counterfactual ground truth for FaceX (`scripts/counterfactual_diagnostic.py`)",
        "",
        f"Table 1 models of the FaceX recipe (`{config.model.name}`, "
        f"{config.data.resolution} px, {config.train.size} training images x "
        f"{config.train.num_epochs} epochs, batch {config.train.batch_size}, co-occurrence "
        f"{config.table1.corr}), {config.test.size} test faces balanced over target x "
        f"confounder. Ground truth: each test face rendered again with one attribute switched "
        f"(same identity, pose, lighting); an attribute's weight is the mean |logit change|. "
        f"RP: rank of the confounder's region among 18 face regions by IoR; GT rank: rank of "
        f"the confounder among the {len(synthetic.COUNTERFACTUAL_ATTRIBUTES)} switchable "
        f"attributes by logit change; rho: Spearman between the attributes' IoR (best region) "
        f"and their logit changes; r-l: mean IoR(right) - IoR(left) over ear/eye/brow. "
        f"Whole run {elapsed / 60:.1f} min on {os.cpu_count()} CPU cores.",
        "",
    ]
    for rec in records:
        g = rec["group_accuracy"]
        top = sorted(rec["effects"], key=lambda a: -rec["effects"][a]["mean_abs_change"])[:4]
        lines += [
            f"#### {rec['target']} x {rec['confounder']}: aligned acc. "
            f"{g['aligned_accuracy']:.3f}, conflicting {g['conflicting_accuracy']:.3f}; "
            f"GT rank of {rec['confounder']}: {_fmt(rec['confounder_truth_rank'], '.0f')}",
            "",
            "Largest logit changes: " + ", ".join(
                f"{a} {rec['effects'][a]['mean_abs_change']:.2f}" for a in top) + ". "
            f"{rec['confounder']} switched inside one region only: " + ", ".join(
                f"{r} {v:.2f}" for r, v in sorted(rec["region_effects"].items(),
                                                    key=lambda kv: -kv[1])[:3]) + ".",
            "",
            "| res. | stage | method | upsampling | acc. | RP | top-3 regions | rho | r-l | right wins |",
            "|---:|---:|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for a in rec["audits"]:
            lines.append(
                f"| {a['resolution']} | {a['stage']} | {a['method']} | {a['upsample']} | "
                f"{a['accuracy_at_resolution']:.3f} | {_fmt(a['rp'], 'd') if a['rp'] else 'n/a'} | "
                f"{', '.join(a['top3'])} | {_fmt(a['spearman'])} | "
                f"{_fmt(a['right_minus_left'], '+.3f')} | {_fmt(a['right_wins_share'])} |")
        lines.append("")
    # Summary per (resolution, stage, method, upsampling) over the models.
    keys = sorted({(a["resolution"], a["stage"], a["method"], a["upsample"])
                   for rec in records for a in rec["audits"]})
    lines += ["#### Over the models", "",
              "| res. | stage | method | upsampling | mean RP | mean rho | mean r-l | right wins |",
              "|---:|---:|---|---|---:|---:|---:|---:|"]
    for key in keys:
        rows = [a for rec in records for a in rec["audits"]
                if (a["resolution"], a["stage"], a["method"], a["upsample"]) == key]
        rps = [a["rp"] for a in rows if a["rp"] is not None]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {_fmt(float(np.mean(rps)) if rps else None)} | "
            f"{_fmt(float(np.nanmean([a['spearman'] for a in rows])))} | "
            f"{_fmt(float(np.mean([a['right_minus_left'] for a in rows])), '+.3f')} | "
            f"{_fmt(float(np.mean([a['right_wins_share'] for a in rows])))} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="results/counterfactual")
    parser.add_argument("--target", default="Male")
    parser.add_argument("--confounders", default="Wearing_Hat,Blond_Hair,Eyeglasses,Wearing_Lipstick")
    parser.add_argument("--resolutions", default="96",
                        help="image sizes to explain at (the first should be the training one)")
    parser.add_argument("--stages", default="4,3",
                        help="ResNet stages whose feature maps the CAMs are computed on")
    parser.add_argument("--models", default=None,
                        help="checkpoint folder to reuse (e.g. results/facex/models); "
                             "default <workdir>/models")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    args = parser.parse_args(argv)
    config = tables_config.get_config()
    with config.unlocked():
        if args.train_size:
            config.train.size = args.train_size
        if args.epochs:
            config.train.num_epochs = args.epochs
        if args.test_size:
            config.test.size = args.test_size
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ctx = facex_tables.TablesContext(config, work)
    if args.models:
        ctx.models_dir = Path(args.models)
    t0 = time.perf_counter()
    records = []

    def log(msg):
        print(msg, flush=True)

    for confounder in args.confounders.split(","):
        records.append(run_model(ctx, config, args.target, confounder,
                                 [int(r) for r in args.resolutions.split(",")],
                                 [int(s) for s in args.stages.split(",")], log))
        elapsed = time.perf_counter() - t0
        write_json(work / "results.json", {"config": config.to_dict(), "records": records,
                                           "elapsed_seconds": elapsed})
        (work / "summary.md").write_text(table_markdown(records, config, elapsed))
    print((work / "summary.md").read_text())


if __name__ == "__main__":
    main()
