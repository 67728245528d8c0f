"""ViT face-verification heatmaps for positive and negative decisions (Correia et al.).

``run(config, workdir)``: a ViT face embedder (``model.source``: "train", CosFace
here via ``models.vit_embedder``, or "checkpoint" of such a run) is verified
with the k-fold protocol on the test pairs of ``data.verification.test_pairs``
(drawn from identity-disjoint test identities, or with ``data.pairs`` =
"lfw" | "rfw" | "folder" the data set's own pairs file, read by
``data.sources.build_pairs``). Its true-positive and true-negative pairs are
explained by every attention method (``explain.fv_heatmaps``), reduced to
the Table 1 analogue (``summary.verification``), and ranked against
CorrRISE, RISE, occlusion and random on recall / TNR deletion curves
(``explain.pair_saliency.decision_saliencies``,
``metrics.perturbation.decision_curves``). ``report(results)`` renders the
Markdown. With a pairs file and ``model.source=train`` the ViT trains on the
training split of ``data.source`` at ``data.root``, whose identities the
pairs file may also name (for unseen-identity numbers pass a checkpoint;
pairs-only layouts such as LFW need one). Protocol, outputs and the paper's
numbers: docs/vit_fv.md.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from faceaudit_jax import keys
from faceaudit_jax.data import sources
from faceaudit_jax.data import verification as verification_data
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.explain import attention as attention_lib
from faceaudit_jax.explain import fv_heatmaps as fv
from faceaudit_jax.explain import pair_saliency
from faceaudit_jax.explain.pair_saliency import CURVE_LABELS, CURVE_METHODS
from faceaudit_jax.metrics import perturbation as perturbation_lib
from faceaudit_jax.metrics import verification as verification_lib
from faceaudit_jax.models import vit, vit_embedder
from faceaudit_jax.summary import verification as fv_summary
from faceaudit_jax.summary.verification import METHOD_LABELS, TECHNIQUE_LABELS
from faceaudit_jax.viz import verification as verification_figures
from faceaudit_jax.viz.report import fmt
from faceaudit_jax.workdir import write_json

# The paper's Table 1 (LFW): mean SM+ and SM- per technique.
PAPER_TABLE1 = {"sm_plus": {"oim": 10.00, "um": 4.80},
                "sm_minus": {"oim": 1.84, "um": 1.56, "n_ium": 1.70}}
_STAGES = ("render", "train", "protocol", "table1", "baseline_maps", "curves")


def _check_config(config) -> tuple[tuple[str, ...], str]:
    """(explain.methods, main method); every config error is raised here, before any work."""
    methods, main = tuple(config.explain.methods), str(config.explain.main_method)
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
    model_source = vit_embedder.check_model_source(config)
    if model_source == "train" or not verification_data.uses_pairs_file(config.data):
        try:
            sources.check_data_config(config.data)
        except ValueError as err:
            raise ValueError(f"{err} (model.source='train' trains on data.source's identities; a "
                             "pairs-only folder such as LFW needs model.source='checkpoint')") from None
    return methods, main


def obtain_embedder(config, workdir: str) -> tuple[vit_embedder.TrainedEmbedder, dict]:
    """``model.source``: train the ViT here (or reload this workdir's), or load a checkpoint."""
    if vit_embedder.check_model_source(config) == "checkpoint":
        return vit_embedder.load_checkpoint(config)
    images, identity = verification_data.load_images(config, "train")
    info = {"train_identities": int(np.unique(identity).size), "train_images": int(images.shape[0])}
    if verification_data.uses_pairs_file(config.data):  # the report names both data sets
        info["train_source"] = verification_data.data_name(config.data)
    return train(config, workdir, (images, identity)), info


def train(config, workdir: str, loaded=None) -> vit_embedder.TrainedEmbedder:
    """Train (or reload) the ViT in ``<workdir>/models/vit_embedder`` (kept out of git); ``loaded``:
    the training split's (images, identity) when the caller has read them."""
    images, identity = loaded or verification_data.load_images(config, "train")
    workdir_lib.ignore_models_folder(Path(workdir) / "models")
    return vit_embedder.train_embedder(config, Path(workdir) / "models" / "vit_embedder", images, identity)


def _decide(config, pairs, trained) -> dict:
    """Embeddings, the k-fold protocol, and the true decisions to explain (TP first, then TN)."""
    embed = vit_embedder.ViTEmbed(vit.ViTApply(trained.embedder))
    embeddings = vit_embedder.embed_images(embed, trained.params, pairs.images,
                                           int(config.test.batch_size))
    scores = verification_lib.pair_scores(embeddings[pairs.a], embeddings[pairs.b])
    protocol = verification_lib.decisions_at_mean_threshold(scores, pairs.same, pairs.fold)
    tp, tn = (verification_data.select_pairs(pairs.same, protocol["predicted_same"], decision,
                                             int(count), int(config.seed))
              for decision, count in (("tp", config.explain.num_positive),
                                      ("tn", config.explain.num_negative)))
    chosen = np.concatenate([tp, tn])
    return {"embed": embed, "protocol": protocol, "num_tp": tp.size, "num_tn": tn.size,
            "chosen": chosen, "positive": np.arange(chosen.size) < tp.size,
            "probes": pairs.images[pairs.a[chosen]], "galleries": pairs.images[pairs.b[chosen]]}


def _explain(config, methods, main_method, trained, decided) -> tuple[dict, dict]:
    """({method: explain_pair_batches output}, {method: sm_table}); maps kept for the main one."""
    explained, tables = {}, {}
    for method in methods:
        explained[method] = fv.explain_pair_batches(
            decided["embed"], trained.params, decided["probes"], decided["galleries"],
            decided["positive"], method, config.explain, trained.embedder.config.grid_shape,
            keep_maps=method == main_method, centres=trained.centres)
        fv.warn_undefined(explained[method], decided["positive"])
        tables[method] = fv_summary.sm_table(explained[method], decided["positive"])
    return explained, tables


def _curves(config, trained, decided, main: Mapping, lap) -> tuple[dict, int, int]:
    """Recall (TP, probe masked) and TNR (TN, both masked) deletion curves of every method."""
    n_pos = int(min(int(config.curves.num_positive), decided["num_tp"]))
    n_neg = int(min(int(config.curves.num_negative), decided["num_tn"]))
    rows = np.concatenate([np.arange(n_pos), decided["num_tp"] + np.arange(n_neg)])
    bound = vit_embedder.BoundEmbed(decided["embed"], trained.params)
    fill = float(config.explain.fill)
    key = jax.random.PRNGKey(keys.run_seed(int(config.seed), "vit_fv", "curves"))
    maps = {k: main[k][rows] for k in ("heatmap", "maps_p", "maps_g")}
    saliencies = pair_saliency.decision_saliencies(
        bound, decided["probes"][rows], decided["galleries"][rows], maps, decided["positive"][rows],
        config.curves, key, fill)
    lap("baseline_maps")
    probes = verification_data.to_float(decided["probes"][rows])
    galleries = verification_data.to_float(decided["galleries"][rows])
    curves = {}
    for side, part, is_positive in (("positive", np.arange(n_pos), True),
                                    ("negative", n_pos + np.arange(n_neg), False)):
        curves[side] = perturbation_lib.decision_curves(
            bound, probes[part], galleries[part],
            {name: (s[0][part], s[1][part]) for name, s in saliencies.items()}, is_positive,
            decided["protocol"]["threshold"], int(config.curves.num_steps), fill,
            int(config.curves.chunk_size))
    return curves, n_pos, n_neg


def _setup(config, trained, train_info: dict, pairs, methods, main_method: str, n_pos: int,
           n_neg: int) -> dict:
    vit_cfg = trained.embedder.config
    return {
        "source": pairs.name, "resolution": int(config.data.resolution),
        "model": {"name": str(config.model.name), "image_size": vit_cfg.image_size,
                  "patch_size": vit_cfg.patch_size, "grid": list(vit_cfg.grid_shape),
                  "hidden_dim": vit_cfg.hidden_dim, "num_layers": vit_cfg.num_layers,
                  "num_heads": vit_cfg.num_heads, "embed_dim": vit_cfg.embed_dim,
                  "pool": vit_cfg.pool},
        **train_info, "num_epochs": int(config.train.num_epochs),
        "batch_size": int(config.train.batch_size), "num_steps": trained.num_steps,
        "loss": {"kind": "cosface", "scale": float(config.train.scale),
                 "margin": float(config.train.margin)},
        "test_identities": None if pairs.identity is None else int(np.unique(pairs.identity).size),
        "test_images": int(pairs.images.shape[0]),
        "methods": list(methods), "main_method": main_method,
        "main_method_label": METHOD_LABELS.get(main_method, main_method),
        "fill": float(config.explain.fill), "explain_target": str(config.explain.get("target", "pair")),
        "heatmap": {"bins": int(config.explain.bins), "dilation_size": int(config.explain.dilation_size),
                    "gaussian_size": int(config.explain.gaussian_size),
                    "gaussian_variance": float(config.explain.gaussian_variance)},
        "curves": {"num_positive": n_pos, "num_negative": n_neg,
                   **{k: int(config.curves[k]) for k in (
                       "num_steps", "corrrise_masks", "corrrise_patches", "corrrise_patch_size",
                       "rise_masks", "rise_grid", "occlusion_patch", "occlusion_stride")}},
    }


def _verification(pairs, protocol: Mapping) -> dict:
    rates = protocol["rates"]
    return {
        "num_pairs": int(pairs.same.size), "num_folds": pairs.num_folds,
        "kfold": {k: (np.asarray(v).tolist() if np.ndim(v) else v)
                  for k, v in protocol["kfold"].items()},
        "threshold_cosine": protocol["threshold"],
        "threshold_sq_distance": 2.0 - 2.0 * protocol["threshold"],
        "rates_at_threshold": rates,
        "num_true_positive": int(rates["tp"]), "num_true_negative": int(rates["tn"]),
    }


def _per_pair(main_method: str, pairs, decided, main: Mapping) -> dict:
    """per_pair.json: drawn pairs name their images' rows; file pairs their pairs-file rows."""
    chosen = decided["chosen"]
    where = ({"pairs_file_row": chosen} if pairs.rows is None else
             {"probe_image": pairs.rows[pairs.a[chosen]], "gallery_image": pairs.rows[pairs.b[chosen]]})
    return {"method": main_method, "techniques": list(fv.TECHNIQUES), "pair_index": chosen, **where,
            "positive": decided["positive"],
            **{k: main[k] for k in ("d", "d_pg", "d_pp", "d_npg", "ra", "sm_plus", "sm_minus",
                                    "selected")}}


def _figures(out: Path, config, decided, main: Mapping, curves: Mapping, n_pos: int, n_neg: int,
             method_label: str) -> None:
    verification_figures.masking_curves_figure(out / "perturbation_curves.png", curves, n_pos, n_neg,
                                               CURVE_METHODS, CURVE_LABELS)
    count, fill = int(config.explain.num_examples), float(config.explain.fill)
    for name, rows, positive in (
            ("examples_positive.png", np.arange(min(count, decided["num_tp"])), True),
            ("examples_negative.png", decided["num_tp"] + np.arange(min(count, decided["num_tn"])), False)):
        verification_figures.pair_examples_figure(out / name, decided["probes"], decided["galleries"], main,
                                                  list(rows), positive, method_label,
                                                  TECHNIQUE_LABELS, fill)


def run(config, workdir: str) -> dict:
    """Obtain the ViT, run the verification protocol, Table 1, curves, figures; write results."""
    methods, main_method = _check_config(config)
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    clock = {"start": time.perf_counter()}

    def lap(name: str) -> None:
        clock[name] = time.perf_counter()
        print(f"vit_fv: {name} done ({clock[name] - clock['start']:.0f} s)", flush=True)

    pairs = verification_data.test_pairs(config)
    lap("render")
    trained, train_info = obtain_embedder(config, workdir)
    lap("train")
    decided = _decide(config, pairs, trained)
    lap("protocol")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", RuntimeWarning)
        explained, tables = _explain(config, methods, main_method, trained, decided)
        lap("table1")
        curves, n_pos, n_neg = _curves(config, trained, decided, explained[main_method], lap)
        lap("curves")
    caught = list(dict.fromkeys(f"{r.category.__name__}: {r.message}" for r in records))
    results = {
        "setup": _setup(config, trained, train_info, pairs, methods, main_method, n_pos, n_neg),
        "training": {"num_steps": trained.num_steps, "last_log": trained.last_metrics},
        "verification": _verification(pairs, decided["protocol"]),
        "main_method": main_method, "table1": tables,
        "oim_finding": fv_summary.oim_finding(tables[main_method]),
        "paper_table1": PAPER_TABLE1, "curves": curves, "warnings": caught,
        "seconds": {name: round(clock[name] - clock[prev], 1)
                    for prev, name in zip(("start",) + _STAGES, _STAGES)},
    }
    write_json(out / "results.json", results)
    write_json(out / "per_pair.json", _per_pair(main_method, pairs, decided, explained[main_method]))
    write_reports(out, results)
    _figures(out, config, decided, explained[main_method], curves, n_pos, n_neg,
             results["setup"]["main_method_label"])
    lap("write")
    return results


# ----------------------------------------------------------------------------- report


def _model_sentence(setup: Mapping) -> str:
    model = setup["model"]
    arch = (f"{model['name']}: {model['image_size']} px, {model['grid'][0]} x {model['grid'][1]} "
            f"patches, {model['num_layers']} layers")
    if setup.get("model_source") == "checkpoint":
        return f"The ViT face embedder of {setup['model_path']} ({arch})"
    return (f"A ViT face embedder ({arch}) trained with CosFace on {setup['train_identities']} "
            f"identities of {setup.get('train_source', setup.get('source', 'synthetic faces'))} "
            f"({setup['train_images']} images, "
            f"{setup['num_epochs']} epochs)")


_TARGET_CLAUSES = {
    "pair": "explain each image's similarity to its partner (pair-conditioned maps; "
            "`--config.explain.target=image` explains each image's own predicted-class cosine, "
            "as the paper) ",
    "image": "explain each image's own predicted-class cosine against the CosFace class centres "
             "(per-image, classification-focused maps, as the paper) "}


def _curves_paragraph(setup: Mapping, curves: Mapping) -> str:
    auc = {side: ", ".join(f"{CURVE_LABELS[n]} {curves[side][n]['auc']:.3f}"
                           for n in CURVE_METHODS if n in curves[side])
           for side in ("positive", "negative")}
    return (f"Perturbation curves (area under the curve, lower = faster drop = better): recall on "
            f"{setup['curves']['num_positive']} true-positive pairs, probe masked: {auc['positive']}; "
            f"TNR on {setup['curves']['num_negative']} true-negative pairs, both masked: "
            f"{auc['negative']}.")


def summary_markdown(results: Mapping, prefix: str = "") -> str:
    """The README fragment of a results dict; links to the figures go through ``prefix``."""
    setup, protocol = results["setup"], results["verification"]
    table = results["table1"][results["main_method"]]
    kfold, source = protocol["kfold"], setup.get("source", "synthetic faces")
    tested = (f"pairs of {setup['test_identities']} unseen identities of {source}"
              if setup.get("test_identities") is not None else f"pairs of {source}")
    ra = {side: fmt(table[side]["ra"]["oim"], ".3f") for side in ("positive", "negative")}
    return "\n".join([
        "### ViT face-verification heatmaps", "",
        f"{_model_sentence(setup)} reaches {100 * kfold['mean_accuracy']:.1f} ± "
        f"{100 * kfold['std_accuracy']:.1f}% {protocol['num_folds']}-fold verification accuracy on "
        f"{protocol['num_pairs']} {tested}; {setup['main_method_label']} maps (Chefer et al.'s "
        "relevance rule without the gradient factor on the conservative-propagation graph; the "
        "literal no-gradient rule would equal attention rollout) "
        + _TARGET_CLAUSES[setup.get("explain_target", "pair")]
        + f"and are binarised with Otsu, combined into OIM / UM / N-IUM and scored with SM+ / SM- "
        f"on {table['positive']['n']} true-positive and {table['negative']['n']} true-negative pairs "
        "(black fill).", "",
        fv_summary.table1_markdown(table, setup["main_method_label"], PAPER_TABLE1).rstrip(), "",
        fv_summary.finding_sentence(table, fv_summary.oim_finding(table), PAPER_TABLE1),
        f"SM divides by the removed area RA, and OIM removes the least (mean RA {ra['positive']} on "
        f"true-positive, {ra['negative']} on true-negative pairs), so small distance changes give it "
        "large, noisy SM values.", "",
        _curves_paragraph(setup, results["curves"]), "",
        f"![perturbation curves]({prefix}perturbation_curves.png)", "",
        f"Examples: [true-positive pairs]({prefix}examples_positive.png), "
        f"[true-negative pairs]({prefix}examples_negative.png); all attention methods in "
        f"[table1.md]({prefix}table1.md), numbers in [results.json]({prefix}results.json).",
    ]) + "\n"


def report(results: Mapping, prefix: str = "") -> dict[str, str]:
    """{"table1.md", "summary.md"}: the Markdown of a results dict (as ``run`` returns or
    results.json holds; JSON nulls print as "n/a"). Pure: figures link through ``prefix``."""
    main_method, tables = results["main_method"], results["table1"]
    label = METHOD_LABELS.get(main_method, main_method)
    table1 = (f"# ViT face-verification heatmaps: Table 1 analogue\n\n## {label} (main method)\n\n"
              f"{fv_summary.table1_markdown(tables[main_method], label, PAPER_TABLE1)}"
              f"\n## All attention methods\n\n{fv_summary.methods_markdown(tables)}")
    return {"table1.md": table1, "summary.md": summary_markdown(results, prefix)}


def write_reports(workdir, results: Mapping) -> None:
    """table1.md and summary.md of ``report(results)`` in ``workdir``."""
    for name, text in report(results, workdir_lib.readme_link_prefix(workdir)).items():
        (Path(workdir) / name).write_text(text)


def rewrite_reports(workdir) -> None:
    """Regenerate table1.md and summary.md from ``<workdir>/results.json`` (no recomputation)."""
    path = Path(workdir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the experiment first")
    write_reports(workdir, json.loads(path.read_text()))
