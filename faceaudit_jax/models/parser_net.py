"""A small U-Net face parser for the 19 CelebAMask-HQ regions, its loss and its IoU metrics.

FaceX parses test images with a pretrained FaRL parser; no such weights can be
fetched here, so this network is trained in the project: on CelebAMask-HQ
when it is present (``data.folders.CelebAMaskHQ``), on the synthetic faces of
``data.synthetic.render`` otherwise. ``parsing.NetworkParser`` wraps a
trained one behind the ``parse(images)`` interface.

- ``ParserNet(__call__(images [B, H, W, 3] in [0, 1], train=False))`` -> logits
  [B, H, W, num_regions]. H and W must be divisible by 2 ** (len(widths) - 1).
- ``parser_loss(logits, batch)`` -> (loss, metrics): pixel-wise softmax cross
  entropy against ``batch["parse"]``; the ``loss_fn`` signature of
  ``train_lib`` (``train_lib.fit(model, state, batch_fn, ..., loss_fn=parser_loss)``).
- ``train_parser_step(model, state, batch)`` -> (state, metrics): one jitted
  update through ``train_lib.make_train_step`` (compiled once per shape).
- ``confusion_matrix``, ``per_region_iou``, ``mean_iou``: jittable metrics;
  stream a data set by summing confusion matrices and calling
  ``iou_from_confusion`` once at the end.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import regions


class _ConvBlock(nn.Module):
    """Two 3x3 conv -> GroupNorm -> ReLU layers."""

    features: int
    norm_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        name=f"conv{i + 1}")(x)
            x = nn.GroupNorm(num_groups=self.norm_groups, dtype=self.dtype, name=f"norm{i + 1}")(x)
            x = nn.relu(x)
        return x


class ParserNet(nn.Module):
    """U-Net: an encoder of ``len(widths)`` levels (2x2 max pool between levels), a decoder
    that upsamples (nearest, then a 3x3 conv in the block) and concatenates the skip of the
    same level, and a 1x1 conv to ``num_regions`` logits at full resolution.

    GroupNorm rather than BatchNorm: no running statistics, so train and eval
    compute the same function and small batches are fine.
    """

    num_regions: int = regions.NUM_REGIONS
    widths: Sequence[int] = (16, 32, 64, 128)
    norm_groups: int = 8
    dtype: Any = jnp.float32

    @property
    def total_stride(self) -> int:
        return 2 ** (len(self.widths) - 1)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        del train  # same function in training and evaluation (no dropout, no BatchNorm)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape [B, H, W, 3], got {tuple(images.shape)}")
        height, width = images.shape[1:3]
        if height % self.total_stride or width % self.total_stride:
            raise ValueError(f"image size {height}x{width} is not divisible by {self.total_stride} "
                             f"(2 ** (len(widths) - 1) for widths {tuple(self.widths)})")
        bad = [w for w in self.widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every width; it does not divide {bad}")
        x = (images.astype(jnp.float32) * 2.0 - 1.0).astype(self.dtype)
        skips = []
        for level, features in enumerate(self.widths):
            if level:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = _ConvBlock(features, self.norm_groups, self.dtype, name=f"down{level}")(x)
            skips.append(x)
        for level in range(len(self.widths) - 2, -1, -1):
            b, h, w, c = x.shape
            x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x = _ConvBlock(self.widths[level], self.norm_groups, self.dtype, name=f"up{level}")(x)
        logits = nn.Conv(self.num_regions, (1, 1), dtype=self.dtype, name="classifier")(x)
        return logits.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------


def segmentation_cross_entropy(logits: jax.Array, parse: jax.Array, class_weights=None) -> jax.Array:
    """Mean pixel-wise softmax cross entropy; logits [B, H, W, R], parse int [B, H, W].

    Pixels whose id is outside 0..R-1 (e.g. -1 for "unlabelled") are ignored.
    ``class_weights`` [R] weights each pixel by its true region's weight
    (normalised by the total weight, so the scale of the loss stays put).
    """
    num_regions = logits.shape[-1]
    parse = parse.astype(jnp.int32)
    valid = (parse >= 0) & (parse < num_regions)
    safe = jnp.where(valid, parse, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    weight = valid.astype(jnp.float32)
    if class_weights is not None:
        weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1e-12)


def parser_loss(logits: jax.Array, batch: Mapping[str, jax.Array], class_weights=None):
    """``train_lib`` loss: (cross entropy, {"pixel_accuracy", "mean_iou"}) against ``batch["parse"]``.

    ``class_weights`` [R] reweights pixels by their true region (see
    ``median_frequency_weights``); bind it with ``make_parser_loss``.
    """
    parse = batch["parse"]
    if logits.shape[:3] != parse.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not cover parse maps {tuple(parse.shape)}")
    loss = segmentation_cross_entropy(logits, parse, class_weights)
    pred = jnp.argmax(logits, axis=-1)
    confusion = confusion_matrix(pred, parse, logits.shape[-1])
    iou = iou_from_confusion(confusion)
    accuracy = jnp.trace(confusion) / jnp.maximum(jnp.sum(confusion), 1)
    return loss, {"pixel_accuracy": accuracy.astype(jnp.float32), "mean_iou": jnp.nanmean(iou)}


def median_frequency_weights(parse_maps, num_regions: int = regions.NUM_REGIONS,
                             power: float = 1.0, max_weight: float = 50.0) -> np.ndarray:
    """Median-frequency balancing (Eigen and Fergus 2015): w_r = (median(f) / f_r) ** power, float32 [R].

    f_r is region r's share of the pixels in the images where r occurs. Small
    regions (eyes, brows, lips: 0.1-0.3% of a face image) otherwise get no
    gradient next to background and skin, and a short training run never
    predicts them. Regions absent from every map get weight 0; weights are
    capped at ``max_weight``. ``power`` < 1 softens the balancing (0.5: the
    square root), so that background and skin still count.
    """
    parse = np.asarray(parse_maps).reshape(np.shape(parse_maps)[0], -1)
    valid = (parse >= 0) & (parse < num_regions)
    counts = np.stack([np.bincount(row[ok], minlength=num_regions) for row, ok in zip(parse, valid)])
    pixels = counts.sum(0).astype(np.float64)
    images_pixels = ((counts > 0) * valid.sum(1, keepdims=True)).sum(0).astype(np.float64)
    present = pixels > 0
    if not present.any():
        raise ValueError("median_frequency_weights got parse maps without a single labelled pixel")
    freq = np.where(present, pixels / np.maximum(images_pixels, 1.0), np.nan)
    weights = np.where(present, (np.nanmedian(freq) / np.where(present, freq, 1.0)) ** float(power), 0.0)
    return np.minimum(weights, max_weight).astype(np.float32)


def make_parser_loss(class_weights=None):
    """``parser_loss`` with ``class_weights`` bound (None: the plain loss)."""
    if class_weights is None:
        return parser_loss
    weights = np.asarray(class_weights, np.float32)
    return functools.partial(parser_loss, class_weights=jnp.asarray(weights))


def train_parser_step(model: nn.Module, state, batch: Mapping[str, jax.Array]):
    """One jitted update of ``model`` on ``batch`` ("image", "parse") -> (state, metrics).

    Uses ``train_lib.make_train_step(model, parser_loss)``, which is memoised,
    so repeated calls compile once per batch shape. ``state`` is donated.
    """
    from faceaudit_jax import train_lib  # train_lib imports models; import here to stay acyclic

    step = train_lib.make_train_step(model, parser_loss)
    return step(state, {"image": batch["image"], "parse": batch["parse"]})


# ---------------------------------------------------------------------------
# IoU metrics
# ---------------------------------------------------------------------------


def confusion_matrix(pred: jax.Array, target: jax.Array, num_regions: int = regions.NUM_REGIONS) -> jax.Array:
    """int32 [R, R] counts, rows = target region, columns = predicted region.

    One scatter-add (bincount) over all pixels. Pixels with an id outside
    0..R-1 in either map are left out (e.g. -1 for unlabelled).
    """
    pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
    target = jnp.asarray(target).astype(jnp.int32).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} pixels but target has {target.size}")
    valid = (pred >= 0) & (pred < num_regions) & (target >= 0) & (target < num_regions)
    flat = jnp.where(valid, target * num_regions + pred, 0)
    counts = jnp.bincount(flat, weights=valid.astype(jnp.int32), length=num_regions * num_regions)
    return counts.astype(jnp.int32).reshape(num_regions, num_regions)


def iou_from_confusion(confusion: jax.Array) -> jax.Array:
    """Per-region IoU float32 [R] from a confusion matrix; NaN where a region is in neither map."""
    confusion = jnp.asarray(confusion).astype(jnp.float32)
    intersection = jnp.diagonal(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return jnp.where(union > 0, intersection / jnp.where(union > 0, union, 1.0), jnp.nan)


def per_region_iou(pred: jax.Array, target: jax.Array, num_regions: int = regions.NUM_REGIONS) -> jax.Array:
    """IoU of each region over all pixels of the batch: [R], NaN where the region occurs in neither."""
    return iou_from_confusion(confusion_matrix(pred, target, num_regions))


def mean_iou(pred: jax.Array, target: jax.Array, num_regions: int = regions.NUM_REGIONS) -> jax.Array:
    """Mean of ``per_region_iou`` over the regions that occur (NaN-skipping)."""
    return jnp.nanmean(per_region_iou(pred, target, num_regions))


@functools.partial(jax.jit, static_argnames=("model", "num_regions"))
def _batch_confusion(model, variables, images, parse, num_regions):
    pred = jnp.argmax(model.apply(variables, images, train=False), axis=-1)
    return confusion_matrix(pred, parse, num_regions)


def evaluate_parser(model: nn.Module, variables: Mapping, batches: Iterable[Mapping]) -> dict[str, np.ndarray]:
    """Stream batches ("image", "parse") through the parser, summing confusion matrices.

    Returns {"per_region_iou": [R] (NaN where a region never occurs),
    "mean_iou": scalar, "pixel_accuracy": scalar, "confusion": [R, R]}.
    """
    confusion = None
    for batch in batches:
        counts = _batch_confusion(model, variables, jnp.asarray(batch["image"]), jnp.asarray(batch["parse"]),
                                  model.num_regions)
        # int64 on the host: a real data set has more pixels than int32 counts hold.
        counts = np.asarray(counts, np.int64)
        confusion = counts if confusion is None else confusion + counts
    if confusion is None:
        raise ValueError("evaluate_parser got no batches")
    iou = np.asarray(iou_from_confusion(confusion))
    return {"per_region_iou": iou, "mean_iou": float(np.nanmean(iou)),
            "pixel_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)), "confusion": confusion}


def evaluate_on_source(model, variables, source, test_idx: np.ndarray, batch_size: int) -> dict:
    """``evaluate_parser`` over ``source`` rows ``test_idx`` (padding rows of the last batch dropped)."""
    from faceaudit_jax.data import pipeline

    def batches():
        for batch, valid in pipeline.iterate_batches(source, test_idx, batch_size):
            if valid.all():
                yield batch
            else:
                keep = int(valid.sum())
                yield {"image": batch["image"][:keep], "parse": batch["parse"][:keep]}

    return evaluate_parser(model, variables, batches())


def region_pixel_share(confusion: np.ndarray) -> np.ndarray:
    """Share of test pixels whose true region is r: a rare region's IoU is noisier."""
    rows = confusion.sum(1).astype(np.float64)
    return rows / max(rows.sum(), 1.0)
