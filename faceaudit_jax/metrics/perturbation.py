"""Deletion / Insertion curves for saliency maps (CorrRISE Algorithm 2), batched.

For n steps and p = 0, 1/n, ..., n/n, the top k_p = floor(p * H * W)
pixels of each image's saliency (all channels of a pixel together; ties in
the saliency broken by pixel index, row-major) are
- deleted: replaced by the baseline (a constant such as 0, each image's mean
  colour, or any baseline image, e.g. `blur_images`), or
- inserted: copied into the baseline, the rest of the image staying baseline.
A curve is a statistic of the perturbed images at each p; its metric is the
area under it on [0, 1]. Two rules (``curve_auc``): ``"sum"`` is CorrRISE's
Algorithm 2, sum_{i=1..n} acc_i / n (the step p = 0 left out; the rule behind
the paper's numbers), ``"trapezoid"`` the trapezoid rule with p = 0
included. For a deletion curve starting at accuracy 1 the trapezoid is larger
by (acc_0 - acc_n) / (2 n). Lower deletion AUC and higher insertion AUC mean a
better saliency map.

Verification (`verification_curve`, `deletion_insertion`): the probe image A
of each pair is perturbed with its own saliency and compared with the
unmodified image B (embedded once); the statistic is verification accuracy
at a fixed threshold (the paper evaluates matching pairs, where accuracy is
the fraction still accepted). `perturbation_curve` is the generic engine:
any number of images per item (e.g. both images of a pair, each with its own
saliency, for the ViT paper's recall / TNR curves) and any score function.

Speed: all (n + 1) x B perturbed items are built inside one jitted function
from a rank map (pixel rank < k_p), never stored together, and scored in
chunks of `chunk_size` items with `lax.map`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.metrics.verification import cosine_similarity

Baseline = Union[float, str, Any]

MODES = ("deletion", "insertion")


def saliency_ranks(saliency) -> jax.Array:
    """Rank of every pixel by saliency: int32 [B, H, W], 0 = most salient.

    Ties are broken by pixel index (row-major), so each image's ranks are a
    permutation of 0 .. H*W - 1 and exactly k pixels have rank < k.
    """
    saliency = jnp.asarray(saliency, jnp.float32)
    if saliency.ndim != 3:
        raise ValueError(f"saliency has shape {saliency.shape}; expected [B, H, W]")
    return _ranks(saliency)


@jax.jit
def _ranks(saliency):
    batch, height, width = saliency.shape
    flat = saliency.reshape(batch, -1)
    order = jnp.argsort(-flat, axis=1, stable=True)
    rows = jnp.arange(batch)[:, None]
    positions = jnp.broadcast_to(jnp.arange(flat.shape[1], dtype=jnp.int32), flat.shape)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[rows, order].set(positions)
    return ranks.reshape(batch, height, width)


def step_counts(num_pixels: int, num_steps: int) -> np.ndarray:
    """Pixels perturbed at each step: int [num_steps + 1], k_i = floor(i * HW / n)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}; expected at least 1")
    return (np.arange(num_steps + 1, dtype=np.int64) * num_pixels) // num_steps


def blur_images(images, sigma: float = 5.0) -> jax.Array:
    """Gaussian blur [B, H, W, C] (separable, edge-padded): a baseline image."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images has shape {images.shape}; expected [B, H, W, C]")
    if sigma <= 0:
        raise ValueError(f"sigma={sigma}; expected a positive blur width")
    radius = max(1, int(round(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = jnp.asarray(kernel / kernel.sum(), jnp.float32)
    return _blur(images, kernel, radius)


@jax.jit(static_argnums=(2,))
def _blur(images, kernel, radius):
    padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    height, width = images.shape[1:3]
    size = 2 * radius + 1
    rows = sum(kernel[i] * padded[:, i:i + height] for i in range(size))
    return sum(kernel[i] * rows[:, :, i:i + width] for i in range(size))


def _resolve_baseline(baseline: Baseline, images: jax.Array) -> jax.Array:
    """A baseline broadcastable to images [B, H, W, C]: [] or [B, H, W, C] or [B,1,1,C]."""
    if isinstance(baseline, str):
        if baseline == "mean":
            return jnp.mean(images, axis=(1, 2), keepdims=True)
        if baseline == "blur":
            return blur_images(images)
        raise ValueError(f"baseline={baseline!r}; expected a number, 'mean', 'blur' or an array")
    baseline = jnp.asarray(baseline, jnp.float32)
    if baseline.ndim == 0:
        return baseline
    if baseline.ndim != 4 or baseline.shape[0] != images.shape[0] or \
            jnp.broadcast_shapes(baseline.shape, images.shape) != images.shape:
        raise ValueError(
            f"baseline has shape {baseline.shape}; expected a number or an array "
            f"broadcastable to the images {images.shape} with the same batch size")
    return baseline


def _check_images_saliency(images, saliency):
    images = jnp.asarray(images, jnp.float32)
    saliency = jnp.asarray(saliency, jnp.float32)
    if images.ndim != 4 or saliency.shape != images.shape[:3]:
        raise ValueError(
            f"images has shape {images.shape} and saliency {saliency.shape}; "
            "expected images [B, H, W, C] and saliency [B, H, W]")
    return images, saliency


def perturbation_curve(score_fn: Callable, images, saliency, num_steps: int = 20,
                       mode: str = "deletion", baseline: Baseline = 0.0, context=None,
                       chunk_size: int = 64) -> tuple[np.ndarray, jax.Array]:
    """Values of score_fn on perturbed items at every step: (fractions, values).

    images: an array [B, H, W, C] or a tuple/list of such arrays (the images
    of one item, e.g. (images_a, images_b)); saliency: [B, H, W] or the same
    structure, one map per image. baseline: a number, 'mean' (each image's
    mean colour), 'blur' (`blur_images`) or arrays with images' structure.
    context: optional pytree of per-item arrays [B, ...] passed, gathered for
    the chunk's items, to score_fn(perturbed, context) -> [M], where
    perturbed has images' structure with M items. Returns fractions
    float [num_steps + 1] (k_i / HW) and values [num_steps + 1, B].
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    single = not isinstance(images, (tuple, list))
    image_list = [images] if single else list(images)
    saliency_list = [saliency] if single else list(saliency)
    if len(saliency_list) != len(image_list):
        raise ValueError(
            f"{len(image_list)} image arrays but {len(saliency_list)} saliency arrays; "
            "expected one saliency map per image")
    checked = [_check_images_saliency(i, s) for i, s in zip(image_list, saliency_list)]
    image_list = [c[0] for c in checked]
    if len({img.shape for img in image_list}) != 1:
        raise ValueError(f"image arrays have shapes {[i.shape for i in image_list]}; "
                         "expected the same shape for every image of an item")
    if isinstance(baseline, (tuple, list)):
        if len(baseline) != len(image_list):
            raise ValueError(f"{len(baseline)} baselines for {len(image_list)} image arrays")
        baselines = [_resolve_baseline(b, i) for b, i in zip(baseline, image_list)]
    else:
        baselines = [_resolve_baseline(baseline, i) for i in image_list]
    ranks = [saliency_ranks(c[1]) for c in checked]
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected a positive integer")
    batch, height, width, _ = image_list[0].shape
    counts = step_counts(height * width, int(num_steps))
    values = _curve_impl(tuple(image_list), tuple(ranks), tuple(baselines), context,
                         jnp.asarray(counts, jnp.int32), score_fn=score_fn, mode=mode,
                         single=single, chunk_size=chunk_size)
    return counts / float(height * width), values


@jax.jit(static_argnames=("score_fn", "mode", "single", "chunk_size"))
def _curve_impl(images, ranks, baselines, context, counts, *, score_fn, mode, single,
                chunk_size):
    batch = images[0].shape[0]
    num_items = counts.shape[0] * batch
    num_chunks = -(-num_items // chunk_size)

    def perturb(image, rank, base, k):
        # image [H, W, C], rank [H, W]; selected = the k most salient pixels.
        selected = (rank < k)[:, :, None]
        if mode == "deletion":
            return jnp.where(selected, base, image)
        return jnp.where(selected, image, base)

    def chunk(chunk_index):
        work = chunk_index * chunk_size + jnp.arange(chunk_size)
        work = jnp.minimum(work, num_items - 1)  # padding repeats the last item
        step, item = work // batch, work % batch
        k = counts[step]
        perturbed = []
        for image, rank, base in zip(images, ranks, baselines):
            item_base = base if base.ndim == 0 else base[item]
            vmapped = jax.vmap(perturb, in_axes=(0, 0, None if base.ndim == 0 else 0, 0))
            perturbed.append(vmapped(image[item], rank[item], item_base, k))
        item_context = jax.tree.map(lambda x: x[item], context)
        arg = perturbed[0] if single else tuple(perturbed)
        out = score_fn(arg, item_context)
        if out.shape != (chunk_size,):
            raise ValueError(f"score_fn returned shape {out.shape} for {chunk_size} items; "
                             f"expected ({chunk_size},)")
        return out.astype(jnp.float32)

    values = jax.lax.map(chunk, jnp.arange(num_chunks))
    return values.reshape(-1)[:num_items].reshape(counts.shape[0], batch)


AUC_RULES = ("trapezoid", "sum")


def curve_auc(fractions, values, rule: str = "trapezoid") -> float:
    """Area under values [S] (or the mean of [S, B] over B) on fractions [S].

    ``rule="trapezoid"``: the trapezoid rule over every step, p = 0 included.
    ``rule="sum"``: CorrRISE Algorithm 2, sum_{i >= 1} (p_i - p_{i-1}) v_i,
    i.e. (1 / n) sum_{i=1..n} v_i for n equal steps (a right Riemann sum).
    """
    if rule not in AUC_RULES:
        raise ValueError(f"rule={rule!r}; expected one of {AUC_RULES}")
    fractions = np.asarray(fractions, np.float64)
    values = np.asarray(values, np.float64)
    if values.ndim == 2:
        values = values.mean(axis=1)
    if values.shape != fractions.shape:
        raise ValueError(f"values has shape {values.shape}; expected {fractions.shape}")
    if rule == "sum":
        return float(np.sum(np.diff(fractions) * values[1:]))
    return float(np.sum(np.diff(fractions) * (values[1:] + values[:-1]) * 0.5))


def verification_curve(embed_fn: Callable, images_a, images_b, saliency_a,
                       threshold: float, num_steps: int = 20, mode: str = "deletion",
                       baseline: Baseline = 0.0, is_same=None, chunk_size: int = 64
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Verification accuracy vs perturbed fraction: (fractions [n+1], accuracy [n+1]).

    The probe images_a [P, H, W, C] are perturbed with their own saliency_a
    [P, H, W]; images_b stay as they are. A pair is accepted when
    cos(f(A'), f(B)) >= threshold; accuracy is the fraction of pairs whose
    decision matches is_same (default: all pairs match, as in the paper).
    """
    images_a = jnp.asarray(images_a, jnp.float32)
    images_b = jnp.asarray(images_b, jnp.float32)
    if images_a.shape != images_b.shape or images_a.ndim != 4:
        raise ValueError(
            f"images_a has shape {images_a.shape} but images_b has shape {images_b.shape}; "
            "expected pair batches [P, H, W, C] of the same shape")
    num_pairs = images_a.shape[0]
    is_same = np.ones(num_pairs, bool) if is_same is None else np.asarray(is_same, bool)
    if is_same.shape != (num_pairs,):
        raise ValueError(f"is_same has shape {is_same.shape}; expected ({num_pairs},)")
    ref_b = _embed_in_chunks(embed_fn, images_b, chunk_size)
    thresholds = jnp.full((num_pairs,), float(threshold), jnp.float32)
    fractions, correct = perturbation_curve(
        _AccuracyScore(embed_fn), images_a, saliency_a, num_steps=num_steps, mode=mode,
        baseline=baseline, context=(ref_b, jnp.asarray(is_same), thresholds),
        chunk_size=chunk_size)
    return fractions, np.asarray(correct).mean(axis=1)


class _AccuracyScore:
    """score_fn for verification accuracy: equal (and hash-equal) per embed_fn.

    score_fn is a static jit argument; equality by embed_fn means repeated
    curves with the same model reuse the compiled function. The threshold
    travels in the context as data, so changing it never recompiles.
    """

    def __init__(self, embed_fn):
        self.embed_fn = embed_fn

    def __hash__(self):
        return hash(self.embed_fn)

    def __eq__(self, other):
        return isinstance(other, _AccuracyScore) and other.embed_fn is self.embed_fn

    def __call__(self, perturbed, context):
        ref_b, same, threshold = context
        accepted = cosine_similarity(self.embed_fn(perturbed), ref_b) >= threshold
        return (accepted == same).astype(jnp.float32)


@jax.jit(static_argnums=(0, 2))
def _embed_chunks_impl(embed_fn, images, chunk_size):
    num = images.shape[0]
    num_chunks = -(-num // chunk_size)
    padded = jnp.pad(images, ((0, num_chunks * chunk_size - num),) + ((0, 0),) * 3)
    out = jax.lax.map(embed_fn, padded.reshape((num_chunks, chunk_size) + images.shape[1:]))
    return out.reshape(num_chunks * chunk_size, -1)[:num]


def _embed_in_chunks(embed_fn, images, chunk_size):
    return _embed_chunks_impl(embed_fn, images, int(min(chunk_size, images.shape[0])))


@dataclasses.dataclass(frozen=True)
class RejectionScore:
    """score_fn for ``perturbation_curve`` on (probe, gallery) items: 1 where rejected.

    TNR on mismatched pairs = mean of cos(f(P'), f(G')) < threshold (the
    thresholds [P] travel as the context). Hashable by the embed_fn, so the
    curves of one model share one compilation.
    """

    embed_fn: Callable

    def __call__(self, perturbed, thresholds):
        probes, galleries = perturbed
        emb = self.embed_fn(jnp.concatenate([probes, galleries]))
        half = probes.shape[0]
        return (cosine_similarity(emb[:half], emb[half:]) < thresholds).astype(jnp.float32)


def decision_curves(embed_fn: Callable, probes, galleries, saliencies, positive: bool,
                    threshold: float, num_steps: int, fill: float, chunk_size: int) -> dict:
    """Deletion curves of true decisions at a fixed threshold, one per saliency method.

    positive=True: recall of matched pairs with the probe masked by its
    saliency (gallery untouched, ``verification_curve``); False: TNR of
    mismatched pairs with both images masked by their own saliency
    (``RejectionScore``). probes, galleries: float [P, H, W, 3];
    saliencies: {method: (saliency_p, saliency_g)} [P, H, W] each, descending =
    removed first; removed pixels become ``fill``. Returns {"fractions": [S],
    method: {"values": [S], "auc": trapezoid area}}.
    """
    out: dict[str, Any] = {}
    thresholds = jnp.full((probes.shape[0],), threshold, jnp.float32)
    scorer = RejectionScore(embed_fn)
    for name, (sal_p, sal_g) in saliencies.items():
        if positive:
            fractions, values = verification_curve(
                embed_fn, probes, galleries, sal_p, threshold, num_steps=num_steps,
                mode="deletion", baseline=fill, chunk_size=chunk_size)
        else:
            fractions, per_pair = perturbation_curve(
                scorer, (probes, galleries), (jnp.asarray(sal_p), jnp.asarray(sal_g)),
                num_steps=num_steps, mode="deletion", baseline=fill, context=thresholds,
                chunk_size=chunk_size)
            values = np.asarray(per_pair).mean(axis=1)
        out["fractions"] = np.asarray(fractions)
        out[name] = {"values": np.asarray(values), "auc": curve_auc(fractions, values)}
    return out


def deletion_insertion(embed_fn: Callable, images_a, images_b, saliency_a,
                       threshold: float, num_steps: int = 20,
                       deletion_baseline: Baseline = 0.0, insertion_baseline: Baseline = 0.0,
                       is_same=None, chunk_size: int = 64) -> dict:
    """Both curves and their AUCs for one saliency method.

    Returns {"deletion": (p, acc), "insertion": (p, acc), "deletion_auc",
    "insertion_auc" (trapezoid), "deletion_auc_sum", "insertion_auc_sum"
    (Algorithm 2's sum, the rule of the paper's numbers)}; see
    `verification_curve` for the protocol.
    """
    result = {}
    for mode, base in (("deletion", deletion_baseline), ("insertion", insertion_baseline)):
        fractions, accuracy = verification_curve(
            embed_fn, images_a, images_b, saliency_a, threshold, num_steps=num_steps,
            mode=mode, baseline=base, is_same=is_same, chunk_size=chunk_size)
        result[mode] = (fractions, accuracy)
        result[f"{mode}_auc"] = curve_auc(fractions, accuracy)
        result[f"{mode}_auc_sum"] = curve_auc(fractions, accuracy, rule="sum")
    return result


def plot_curves(curves: dict, path: str, title: Optional[str] = None,
                ylabel: str = "verification accuracy", xlabel: str = "fraction of pixels"
                ) -> str:
    """Plots {name: (fractions, values)} with the AUC in each label; saves to path.

    values may be [S] or [S, B] (averaged over B). Returns path.
    """
    # The object-oriented API draws off-screen whatever backend is configured.
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("curves is empty; expected at least one named curve")
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    for name, (fractions, values) in curves.items():
        values = np.asarray(values, np.float64)
        if values.ndim == 2:
            values = values.mean(axis=1)
        auc = curve_auc(fractions, values)
        ax.plot(np.asarray(fractions), values, label=f"{name} (AUC {auc:.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
