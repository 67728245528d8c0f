"""Calibration: Expected Calibration Error and reliability diagrams.

Bins are equal-width on [0, 1]: bin b = [b/M, (b+1)/M) for b < M - 1 and the
last bin is closed, [(M-1)/M, 1], so a confidence of exactly 1.0 falls in the
last bin (np.histogram's convention). With n predictions,

    ECE = sum_b |B_b| / n * |acc_b - conf_b|,

acc_b the fraction correct and conf_b the mean confidence in bin b (empty bins
contribute 0). The paper uses M = 100. For a softmax classifier pass the raw
top-class probability as the confidence (e.g.
`explain.patches.confidence_from_logits(logits, "top_softmax", normalised=False)`).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class ReliabilityData(NamedTuple):
    """Per-bin statistics of a reliability diagram (M bins).

    bin_edges [M + 1]; accuracy [M] and mean_confidence [M] (NaN in empty
    bins); counts int [M]; ece scalar.
    """

    bin_edges: np.ndarray
    accuracy: np.ndarray
    mean_confidence: np.ndarray
    counts: np.ndarray
    ece: float


def _bin_ids(confidences: Array, num_bins: int) -> Array:
    ids = jnp.floor(confidences * num_bins).astype(jnp.int32)
    return jnp.clip(ids, 0, num_bins - 1)


def _bin_sums(confidences: Array, correct: Array, num_bins: int) -> tuple[Array, Array, Array]:
    """(count, sum of correct, sum of confidence) per bin, each [num_bins]."""
    ids = _bin_ids(confidences, num_bins)
    ones = jnp.ones_like(confidences)
    counts = jax.ops.segment_sum(ones, ids, num_segments=num_bins)
    correct_sums = jax.ops.segment_sum(correct, ids, num_segments=num_bins)
    confidence_sums = jax.ops.segment_sum(confidences, ids, num_segments=num_bins)
    return counts, correct_sums, confidence_sums


def _ece(confidences: Array, correct: Array, num_bins: int) -> Array:
    """Jittable core (no value checks)."""
    confidences = confidences.astype(jnp.float32)
    correct = correct.astype(jnp.float32)
    counts, correct_sums, confidence_sums = _bin_sums(confidences, correct, num_bins)
    # sum_b |B_b|/n |acc_b - conf_b| = sum_b |sum correct - sum conf| / n.
    return jnp.sum(jnp.abs(correct_sums - confidence_sums)) / confidences.shape[0]


_ece_jit = jax.jit(_ece, static_argnums=2)


def _validate(confidences, correct, num_bins) -> tuple[Array, Array]:
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    confidences = jnp.asarray(confidences)
    correct = jnp.asarray(correct)
    if confidences.ndim != 1 or correct.shape != confidences.shape:
        raise ValueError(
            f"confidences and correct must be 1-D of the same length, got shapes "
            f"{confidences.shape} and {correct.shape}")
    if confidences.shape[0] == 0:
        raise ValueError("ECE needs at least one prediction, got 0")
    if not isinstance(confidences, jax.core.Tracer):
        values = np.asarray(confidences, np.float64)
        if np.isnan(values).any():
            raise ValueError(f"confidences contain {int(np.isnan(values).sum())} NaN value(s)")
        if values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(
                f"confidences must lie in [0, 1], got range [{values.min()}, {values.max()}]")
    return confidences, correct


def expected_calibration_error(confidences: Array, correct: Array, num_bins: int = 100) -> Array:
    """ECE over `num_bins` equal-width bins on [0, 1].

    Args:
      confidences: [n] in [0, 1].
      correct: [n] bool or {0, 1}: whether each prediction was right.
      num_bins: M (the paper uses 100).

    Returns:
      scalar float32 in [0, 1].
    """
    confidences, correct = _validate(confidences, correct, num_bins)
    return _ece_jit(confidences, correct, int(num_bins))


def reliability_diagram_data(confidences: Array, correct: Array,
                             num_bins: int = 100) -> ReliabilityData:
    """Per-bin accuracy, mean confidence and counts, plus the ECE (host arrays)."""
    confidences, correct = _validate(confidences, correct, num_bins)
    counts, correct_sums, confidence_sums = jax.device_get(_bin_sums(
        confidences.astype(jnp.float32), correct.astype(jnp.float32), int(num_bins)))
    counts = np.asarray(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, correct_sums / counts, np.nan)
        mean_confidence = np.where(counts > 0, confidence_sums / counts, np.nan)
    ece = float(_ece_jit(confidences, correct, int(num_bins)))
    return ReliabilityData(
        bin_edges=np.linspace(0.0, 1.0, int(num_bins) + 1),
        accuracy=accuracy.astype(np.float64),
        mean_confidence=mean_confidence.astype(np.float64),
        counts=np.rint(counts).astype(np.int64),
        ece=ece,
    )


def plot_reliability_diagram(data: ReliabilityData, path: str,
                             title: Optional[str] = None) -> str:
    """Save ``reliability_figure(data, title)`` at ``path`` (format from its extension,
    e.g. .png / .pdf, parents created); returns the path written."""
    fig = reliability_figure(data, title)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def reliability_figure(data: ReliabilityData, title: Optional[str] = None):
    """A reliability diagram (matplotlib Figure): per-bin accuracy bars, the gap to each
    bin's mean confidence, the identity diagonal and the ECE in the title."""
    from matplotlib.figure import Figure  # no pyplot state: safe in threads and tests

    edges = np.asarray(data.bin_edges)
    width = np.diff(edges)
    left = edges[:-1]
    filled = np.asarray(data.counts) > 0
    accuracy = np.where(filled, data.accuracy, 0.0)
    confidence = np.where(filled, data.mean_confidence, 0.0)

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(left[filled], accuracy[filled], width=width[filled], align="edge",
           color="tab:blue", edgecolor="black", linewidth=0.3, label="accuracy")
    gap_low = np.minimum(accuracy, confidence)
    # The gap to each bin's mean confidence, hatched and unfilled so it stays
    # readable where it overlaps the accuracy bar (over-accurate bins).
    ax.bar(left[filled], np.abs(confidence - accuracy)[filled], bottom=gap_low[filled],
           width=width[filled], align="edge", fill=False, hatch="///",
           edgecolor="tab:red", linewidth=0.6, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    heading = f"ECE = {data.ece:.4f}"
    ax.set_title(f"{title}\n{heading}" if title else heading)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig
