"""Train and evaluate the 19-region face parser; load a trained one as a ``parsing.Parser``.

FaceX parses images without masks with a pretrained parser. This experiment
trains ``models.parser_net.ParserNet`` (pixel-wise cross entropy, Orbax
checkpoints, resumable) on synthetic faces or on CelebAMask-HQ, scores it by
IoU per region on held-out images (identity-disjoint synthetic faces, or the
data set's published test split), and writes:

- ``results.json``: per-region IoU, mean IoU, pixel accuracy, sizes, timings;
- ``table.md`` / ``summary.md``: the per-region IoU table;
- ``figure_examples.png``: image, ground truth and prediction for a few test
  images; ``figure_iou.png``: IoU per region.

``parsing.load_trained_parser(workdir)`` turns the trained model into a
``parsing.NetworkParser``; FaceX audits take it through
``--config.explain.parser=<workdir>``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from faceaudit_jax import parsing, regions, train_lib
from faceaudit_jax.data import pipeline, sources
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.models import parser_net

_MODEL_DIR = parsing.PARSER_RUN_DIR


def build_data(config) -> tuple[object, np.ndarray, np.ndarray]:
    """(source, train indices, test indices) for ``config.data.source``.

    Synthetic: index ranges (train.size images from 0, test.size from
    data.test_offset). Real data: any source with parse maps
    (``sources.build_split``: the published split, else a seeded split),
    the first train.size / test.size images of each (0 = all).
    """
    data = config.data
    train_size, test_size = int(config.train.size), int(config.test.size)
    if data.source == "synthetic":
        source = sources.build_source(data)
        if train_size < 1 or test_size < 1:
            raise ValueError(f"train.size={train_size} and test.size={test_size}: synthetic data needs "
                             "explicit positive sizes")
        offset = int(data.test_offset)
        if offset < train_size:
            raise ValueError(f"data.test_offset={offset} overlaps the {train_size} training images; "
                             "expected an offset >= train.size")
        return source, np.arange(train_size, dtype=np.int64), np.arange(offset, offset + test_size, dtype=np.int64)
    if data.get("test_root", ""):
        raise ValueError(f"data.test_root={data.test_root!r}: this experiment splits one data set "
                         "(its published split, else data.split_seed / data.test_fraction); leave "
                         "data.test_root empty")
    source, train_idx = sources.build_split(data, "train")
    _, test_idx = sources.build_split(data, "test")
    sources.require_parse(source, "training a face parser")
    train_idx = train_idx[:train_size] if train_size > 0 else train_idx
    test_idx = test_idx[:test_size] if test_size > 0 else test_idx
    return source, train_idx, test_idx


def build_model(config) -> parser_net.ParserNet:
    return parser_net.ParserNet(widths=tuple(int(w) for w in config.model.widths),
                                norm_groups=int(config.model.norm_groups))


def _fingerprint(config, num_train: int) -> dict:
    return {"source": str(config.data.source), "root": str(config.data.root),
            "resolution": int(config.data.resolution), "seed": int(config.seed),
            "widths": [int(w) for w in config.model.widths], "norm_groups": int(config.model.norm_groups),
            "num_train": int(num_train), "batch_size": int(config.train.batch_size),
            "num_epochs": int(config.train.num_epochs), "lr": float(config.train.lr),
            "class_weighting": str(config.train.class_weighting),
            "weight_power": float(config.train.weight_power)}


def _image_and_parse(batch: Mapping) -> dict:
    # The train step moves every key to the device; the parser needs two.
    return {"image": batch["image"], "parse": batch["parse"]}


def class_weights(config, source, train_idx: np.ndarray):
    """Median-frequency weights from the first ``train.weight_sample`` training maps, or None."""
    kind = str(config.train.class_weighting)
    if kind == "none":
        return None
    if kind != "median_frequency":
        raise ValueError(f"train.class_weighting={kind!r}; expected 'median_frequency' or 'none'")
    sample = train_idx[: int(config.train.weight_sample)]
    maps = np.concatenate([np.asarray(source.batch(sample[i:i + 64])["parse"])
                           for i in range(0, sample.size, 64)])
    return parser_net.median_frequency_weights(maps, power=float(config.train.weight_power))


def train_parser(config, workdir: str, source, train_idx: np.ndarray):
    """Train (or resume, or reload when finished) the parser under ``workdir/models/parser``."""
    models_dir = Path(workdir) / "models"
    workdir_lib.ignore_models_folder(models_dir)
    run_dir = Path(workdir) / _MODEL_DIR
    workdir_lib.check_fingerprint(run_dir, _fingerprint(config, train_idx.size),
                               overwrite=workdir_lib.overwrite_requested(config))
    model = build_model(config)
    batch_size = int(config.train.batch_size)
    num_steps = pipeline.steps_per_epoch(train_idx.size, batch_size) * int(config.train.num_epochs)
    # What load_parser needs to rebuild the checkpoint's tree (optimizer state included).
    (run_dir / "parser_config.json").write_text(json.dumps(
        {"widths": [int(w) for w in config.model.widths], "norm_groups": int(config.model.norm_groups),
         "resolution": int(config.data.resolution), "num_steps": int(num_steps),
         "train": config.train.to_dict()}, indent=2, default=list) + "\n")
    tx = train_lib.make_optimizer(config.train, num_steps)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(int(config.seed)),
                                         int(config.data.resolution), tx)
    batch_fn = pipeline.step_batch_fn(source, train_idx, batch_size, int(config.seed), _image_and_parse)
    weights = class_weights(config, source, train_idx)
    if weights is not None:
        (run_dir / "class_weights.json").write_text(json.dumps(
            {n: float(w) for n, w in zip(regions.REGIONS, weights)}, indent=2) + "\n")
    state = train_lib.fit(model, state, batch_fn, num_steps, str(run_dir),
                          loss_fn=parser_net.make_parser_loss(weights),
                          ckpt_every=int(config.train.ckpt_every), log_every=int(config.train.log_every),
                          desc="train parser")
    return model, train_lib.state_variables(state), num_steps


def table_markdown(result: Mapping) -> str:
    iou, share = np.asarray(result["per_region_iou"], float), np.asarray(result["pixel_share"], float)
    lines = ["| region | IoU | share of pixels |", "|---|---:|---:|"]
    for r, name in enumerate(regions.REGIONS):
        cell = "absent" if not np.isfinite(iou[r]) else f"{iou[r]:.3f}"
        lines.append(f"| {regions.REGION_LABELS[name]} | {cell} | {100 * share[r]:.2f}% |")
    lines.append(f"| **mean over present regions** | **{result['mean_iou']:.3f}** | |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path, dpi: int = 90) -> str:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path.name


def examples_figure(path: Path, images, truth, pred) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cmap = plt.get_cmap("tab20", 20)
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows + 0.9), squeeze=False)
    for i in range(rows):
        for j, (panel, title) in enumerate(((images[i], "image"), (truth[i], "ground truth"),
                                            (pred[i], "parser"))):
            ax = axes[i, j]
            if j == 0:
                ax.imshow(np.clip(panel, 0, 1))
            else:
                ax.imshow(panel, cmap=cmap, vmin=0, vmax=19, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title)
    legend = [Patch(color=cmap(r), label=regions.REGION_LABELS[n]) for r, n in enumerate(regions.REGIONS)]
    fig.legend(handles=legend, loc="lower center", ncol=5, fontsize=7)
    fig.tight_layout(rect=(0, 0.9 / (2.5 * rows + 0.9) + 0.04, 1, 1))
    return _save(fig, path)


def iou_figure(path: Path, iou) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iou = np.asarray(iou, float)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    labels = [regions.REGION_LABELS[n] for n in regions.REGIONS]
    ax.bar(np.arange(len(labels)), np.nan_to_num(iou), color=["tab:blue" if np.isfinite(v) else "lightgrey"
                                                              for v in iou])
    ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU (test)")
    ax.set_title(f"face parser: mean IoU {np.nanmean(iou):.3f}")
    fig.tight_layout()
    return _save(fig, path)


def summary_markdown(result: Mapping, prefix: str) -> str:
    return ("### Face parser (`configs/face_parser.py`)\n\n"
            f"Face parser ({result['source']}, {result['resolution']} px, {result['num_train']} training "
            f"images, {result['num_steps']} steps; {result['num_test']} held-out test images): "
            f"**mean IoU {result['mean_iou']:.3f}**, pixel accuracy {result['pixel_accuracy']:.3f}.\n\n"
            + table_markdown(result)
            + f"\n![parser examples]({prefix}figure_examples.png) ![IoU per region]({prefix}figure_iou.png)\n")


def report(results: Mapping, prefix: str = "") -> dict[str, str]:
    """{"table.md", "summary.md"}: the Markdown of a results dict as ``run`` writes it (pure;
    ``per_region_iou`` a {region: IoU} dict in ``regions.REGIONS`` order, figures linked via
    ``prefix``)."""
    flat = dict(results, per_region_iou=[results["per_region_iou"][n] for n in regions.REGIONS])
    return {"table.md": table_markdown(flat), "summary.md": summary_markdown(flat, prefix)}


def run(config, workdir: str) -> dict:
    start = time.perf_counter()
    out = Path(workdir)
    source, train_idx, test_idx = build_data(config)
    print(f"[face_parser] {config.data.source}: {train_idx.size} training, {test_idx.size} test images",
          flush=True)
    model, variables, num_steps = train_parser(config, workdir, source, train_idx)
    trained = time.perf_counter()
    scores = parser_net.evaluate_on_source(model, variables, source, test_idx,
                                          int(config.test.batch_size))
    result = {
        "source": str(config.data.source), "resolution": int(config.data.resolution),
        "num_train": int(train_idx.size), "num_test": int(test_idx.size), "num_steps": int(num_steps),
        "per_region_iou": {n: float(v) for n, v in zip(regions.REGIONS, scores["per_region_iou"])},
        "mean_iou": scores["mean_iou"], "pixel_accuracy": scores["pixel_accuracy"],
        "pixel_share": parser_net.region_pixel_share(scores["confusion"]).tolist(),
        "train_seconds": trained - start, "eval_seconds": time.perf_counter() - trained,
    }
    shown = test_idx[: int(config.test.num_examples)]
    batch = source.batch(shown)
    pred = parsing.NetworkParser(model, variables).parse(batch["image"])
    figures = {"examples": examples_figure(out / "figure_examples.png", np.asarray(batch["image"]),
                                           np.asarray(batch["parse"]), np.asarray(pred)),
               "iou": iou_figure(out / "figure_iou.png", scores["per_region_iou"])}
    result["figures"] = figures
    workdir_lib.write_json(out / "results.json", result)
    for name, text in report(result, workdir_lib.readme_link_prefix(workdir)).items():
        (out / name).write_text(text)
    print(f"[face_parser] mean IoU {result['mean_iou']:.3f}, pixel accuracy {result['pixel_accuracy']:.3f} "
          f"({time.perf_counter() - start:.0f}s)", flush=True)
    return result


def train(config, workdir: str):
    source, train_idx, _ = build_data(config)
    return train_parser(config, workdir, source, train_idx)
