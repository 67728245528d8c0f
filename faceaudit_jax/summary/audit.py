"""FaceX audit of a binary classifier as an evaluator: CAMs over a test set, reduced to IoR and top patches.

``AuditEvaluator(source, indices, target, explain_cfg, batch_size)`` holds the
test images and explanation settings; ``run(clf)`` explains ``clf`` on them and
yields named results (big_vision's evaluator habit), ``evaluate(clf)`` returns
them as one ``AuditResult``. The explain step (CAMs, logits, predicted and
true class) is one ``jax.jit`` with the model as a static argument and its
variables traced, so every classifier of one architecture shares a compile.
Region IoR (eqs. 3-4) and top patches (eqs. 6-7) stream through
``summary.ior`` / ``summary.top_patches`` accumulators; in a multi-process job
each process explains its block of the images (``distributed.process_shard``)
and sums, counts and top patches are reduced over all processes at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from faceaudit_jax import contracts, distributed, regions
from faceaudit_jax.data import pipeline
from faceaudit_jax.explain import cams, upsampling
from faceaudit_jax.models import resnet
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


def confounder_rp(ior_r: np.ndarray, confounders: Sequence[str]) -> list[Optional[int]]:
    """RP of each confounder: the best rank among its regions (FaceX's metric)."""
    return [ior_lib.ranking_position(ior_r, regions.regions_of(c)) for c in confounders]


def ordered_rps(rps: Sequence[Optional[int]]) -> list[Optional[int]]:
    """RPs sorted best first, unranked (None) last: [RP1, RP2, ...] of Table 3."""
    found = sorted(rp for rp in rps if rp is not None)
    return found + [None] * (len(rps) - len(found))


def mean_rp(rps: Sequence[Optional[int]]) -> Optional[float]:
    """Mean of the ranked RPs (None entries left out); None when none is ranked."""
    found = [rp for rp in rps if rp is not None]
    return float(np.mean(found)) if found else None


def check_explain_settings(explain_cfg, resolution: int, model_name: Optional[str] = None) -> None:
    """Fail before any training on explanation settings the audit would reject after it:
    a top-k patch size that does not tile the explained images, or a CAM stage the
    model does not have. ``resolution``: the training resolution (the explained one
    is ``explain_cfg.resolution`` when set). ``model_name``: the architecture the
    job will build (``resnet.MODEL_NAMES``); any other name (a model loaded from
    a folder or a function) has its stage checked when it is split for the audit."""
    size = int(explain_cfg.get("resolution", None) or resolution)
    try:
        top_lib.check_patch_size(size, size, explain_cfg.patch_size)
    except ValueError as err:
        raise ValueError(f"explain.patch_size={explain_cfg.patch_size!r} does not fit the "
                         f"{size} px images the audit explains: {err}") from None
    stage = explain_cfg.get("stage", None)
    if stage is not None and model_name in resnet.MODEL_NAMES:
        resnet.build_backbone(str(model_name)).check_stage(stage)


def at_explain_resolution(source, explain_cfg):
    """``source`` at ``explain_cfg.resolution`` (unchanged when that is unset or None)."""
    res = explain_cfg.get("resolution", None)
    return source if not res else source.with_resolution(int(res))


def _combine(summary, groups=(0, 1)):
    counts = summary.counts_by_group[list(groups)]
    sums = np.nan_to_num(summary.ior_by_group[list(groups)]) * counts
    total = counts.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, sums.sum(0) / np.maximum(total, 1), np.nan), total


@functools.cache
def _binary_target(mode: str):
    # One function per mode: a new one per call would be a new static argument.
    return cams.make_binary_target(mode)


@functools.partial(jax.jit, static_argnames=("model", "output_index", "target_mode", "method",
                                             "upsample", "stage"))
def _explain_step(variables, images, valid, truth, *, model, output_index, target_mode, method,
                  upsample, stage=None):
    """Maps [B,H,W] (zero on padding rows), logit [B], predicted and true class [B], in-range flag."""
    features_fn, head_fn = resnet.classifier_fns(model, variables, stage, output_index=output_index)
    cam_fn = cams.make_cam_fn(features_fn, head_fn, _binary_target(target_mode), method,
                              return_logits=True, upsample=upsample, validate=False)
    maps, logits = cam_fn(images)
    maps = maps * valid[:, None, None]       # padded rows add nothing to top-k
    pred = (logits[:, 0] > 0).astype(jnp.int32)
    return maps, logits[:, 0], pred, truth, contracts.in_unit_range(images)


@dataclasses.dataclass
class _Overlays:
    """The first ``limit`` explained images, their maps and classes (for the report's figure).

    ``resolution``: the images' side, so a process with no image still
    holds arrays of the right shape for the cross-process gather.
    """

    limit: int
    resolution: int
    images: list = dataclasses.field(default_factory=list)
    maps: list = dataclasses.field(default_factory=list)
    truth: list = dataclasses.field(default_factory=list)
    predicted: list = dataclasses.field(default_factory=list)

    def add(self, images, maps, logits, truth, num_valid: int) -> None:
        if len(self.images) >= self.limit:
            return
        take = min(self.limit - len(self.images), num_valid)
        self.images.extend(np.asarray(images[:take]))
        self.maps.extend(np.asarray(maps[:take]))
        self.truth.extend(int(t) for t in np.asarray(truth[:take]))
        self.predicted.extend(int(z > 0) for z in np.asarray(logits[:take]))

    def finish(self, target: str) -> tuple[np.ndarray, np.ndarray, list]:
        """(images [n,H,W,3], maps [n,H,W], titles): the first ``limit`` of all processes'.

        Processes hold consecutive blocks of the images, so the first rows of
        the gather in process order are the first images overall, as in one process.
        """
        shape = np.shape(self.images[0]) if self.images else (self.resolution, self.resolution, 3)
        rows = distributed.allgather_rows({
            "images": np.asarray(self.images, np.float32).reshape(-1, *shape),
            "maps": np.asarray(self.maps, np.float32).reshape(-1, *shape[:2]),
            "truth": np.asarray(self.truth, np.int32), "predicted": np.asarray(self.predicted, np.int32)})
        rows = {k: v[:self.limit] for k, v in rows.items()}
        titles = [f"{target}={t} pred={z}" for t, z in zip(rows["truth"], rows["predicted"])]
        return rows["images"], rows["maps"], titles


class AuditEvaluator:
    """FaceX audit of classifiers on fixed test images (``source`` rows ``indices``).

    ``explain_cfg`` fields: method, target_mode, ior_mode, patch_size, top_k,
    num_overlays, optional upsample and stage (the ResNet stage whose output the
    CAMs are computed on, 1..4; None or absent: the last). ``parser`` (a ``parsing.Parser``) supplies
    the parse maps; None reads the batch's own (ground-truth) masks.
    """

    def __init__(self, source, indices: np.ndarray, target: str, explain_cfg, batch_size: int, *,
                 parser=None, desc: str = "explain"):
        self.source, self.indices = source, np.asarray(indices)
        self.target, self.target_col = target, regions.attribute_id(target)
        self.cfg, self.batch_size = explain_cfg, int(batch_size)
        self.parser, self.desc = parser, desc
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive int")

    def run(self, clf) -> Iterator[tuple[str, object]]:
        """Explain ``clf``; yields (name, value) for every field of ``AuditResult``."""
        result = self.evaluate(clf)
        for field in dataclasses.fields(result):
            yield field.name, getattr(result, field.name)

    def _step_settings(self, clf) -> dict:
        stage = self.cfg.get("stage", None)
        upsample = upsampling.resolve_upsample(self.cfg.get("upsample", True), clf.fns(stage)[0])
        return dict(model=clf.model, output_index=int(clf.output_index), stage=stage,
                    target_mode=str(self.cfg.target_mode), method=self.cfg.method, upsample=upsample)

    def evaluate(self, clf) -> AuditResult:
        """Explain ``clf`` (a ``models.sources.Classifier``) and reduce to IoR and top patches."""
        start = time.perf_counter()
        settings = self._step_settings(clf)
        by_pred = ior_lib.IoRAccumulator.init(regions.NUM_REGIONS, 3)
        by_true = ior_lib.IoRAccumulator.init(regions.NUM_REGIONS, 3)
        top = top_lib.TopPatchAccumulator.init(int(self.cfg.top_k), regions.NUM_REGIONS)
        # Counted on device: reading it per batch would stall the loop on a host round trip.
        correct, total = jnp.zeros((), jnp.int32), 0
        overlays = _Overlays(int(self.cfg.num_overlays), int(self.source.resolution))
        # Any image count: a shorter last block, its last batch padded with masked rows.
        local_indices, offset = distributed.process_shard(self.indices, uneven=True)
        count, num = jax.process_count(), len(self.indices)
        if num % count and distributed.is_primary():
            print(f"[{self.desc}] {num} images over {count} processes: blocks of "
                  f"{-(-num // count)}, shorter at the end (every image is explained; the "
                  f"last batches are padded with masked rows)", flush=True)
        batches = pipeline.iterate_batches(self.source, local_indices, self.batch_size)
        for batch, valid in tqdm(batches, total=math.ceil(len(local_indices) / self.batch_size),
                                 desc=self.desc, leave=False):
            valid_j = jnp.asarray(valid)
            truth = (batch["attrs"][:, self.target_col] == 1).astype(jnp.int32)
            maps, logit, pred, truth, ok = _explain_step(clf.variables, batch["image"], valid_j,
                                                         truth, **settings)
            contracts.raise_unit_violation(ok, batch["image"], "images")
            parse = batch["parse"] if self.parser is None else self.parser.parse(batch["image"], batch)
            by_pred = ior_lib.IoRAccumulator.update(
                by_pred, maps, parse, jnp.where(valid_j, pred, _PAD_GROUP), self.cfg.ior_mode)
            by_true = ior_lib.IoRAccumulator.update(
                by_true, maps, parse, jnp.where(valid_j, truth, _PAD_GROUP), self.cfg.ior_mode)
            ids = np.arange(offset, offset + self.batch_size)
            top = top_lib.TopPatchAccumulator.update(top, maps, parse, ids, int(self.cfg.patch_size))
            correct = correct + jnp.sum((pred == truth) & valid_j)
            total += int(valid.sum())
            overlays.add(batch["image"], maps, logit, truth, int(valid.sum()))
            offset += self.batch_size
        return _reduce(by_pred, by_true, top, correct, total, overlays.finish(self.target), start)


def _reduce(by_pred, by_true, top, correct, total, overlays: tuple, start: float) -> AuditResult:
    """Sum the accumulators over all processes and finalize them into an ``AuditResult``."""
    by_pred, by_true = distributed.global_ior_state(by_pred), distributed.global_ior_state(by_true)
    top = distributed.global_top_patch_state(top)
    correct, total = (int(v) for v in distributed.global_sum((correct, jnp.asarray(total))))
    pred_summary = ior_lib.IoRAccumulator.finalize(by_pred)
    true_summary = ior_lib.IoRAccumulator.finalize(by_true)
    overall, counts = _combine(pred_summary)
    # Top-patch image ids are positions in ``indices``; padded rows had zero maps.
    return AuditResult(
        ior=overall.astype(np.float32), counts=counts,
        ior_by_predicted=pred_summary.ior_by_group[:2],
        ior_by_true=true_summary.ior_by_group[:2],
        counts_by_predicted=pred_summary.counts_by_group[:2],
        top=top_lib.TopPatchAccumulator.finalize(top), accuracy=int(correct) / max(total, 1),
        num_images=total, overlay_images=overlays[0], overlay_maps=overlays[1],
        overlay_titles=overlays[2],
        seconds=time.perf_counter() - start)


def audit(clf, source, indices: np.ndarray, target: str, explain_cfg, batch_size: int, *,
          desc: str = "explain", parser=None) -> AuditResult:
    """``AuditEvaluator(...).evaluate(clf)`` in one call."""
    return AuditEvaluator(source, indices, target, explain_cfg, batch_size, parser=parser,
                          desc=desc).evaluate(clf)


def audit_payload(result: AuditResult) -> dict:
    """The JSON-ready numbers of an audit: IoR, counts, per-class IoR, ranking, symmetry."""
    symmetry = ior_lib.left_right_symmetry(result.ior)
    return {
        "ior": dict(zip(regions.REGIONS, result.ior.tolist())),
        "counts": dict(zip(regions.REGIONS, result.counts.tolist())),
        "ior_by_predicted_class": {str(c): dict(zip(regions.REGIONS, result.ior_by_predicted[c].tolist()))
                                   for c in (0, 1)},
        "ior_by_true_class": {str(c): dict(zip(regions.REGIONS, result.ior_by_true[c].tolist()))
                              for c in (0, 1)},
        "ranking": [{"rank": r, "region": n, "ior": v} for r, n, v in result.ranking()],
        "accuracy_at_explained_resolution": result.accuracy,
        "num_images": result.num_images,
        "explain_seconds": result.seconds,
        # Near 0 and 0.5 on left-right symmetric faces when maps sit where the model looks.
        "symmetry_right_minus_left": symmetry["mean_right_minus_left"],
        "symmetry_right_wins_share": symmetry["right_wins_share"],
        "symmetry_pairs": symmetry["pairs"],
    }
