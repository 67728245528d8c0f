"""Attention-based explanations of ViT face embedders, batched over images.

All functions take stacked attention probabilities ``attn`` [L, B, heads, T, T]
(layer, image, head, query token, key token; token 0 = CLS, then the patches in
row-major grid order) as returned in ``aux["attn"]`` by
``models.vit.ViTFaceEmbedder``, and return one map per image over the patch
grid, [B, rows, cols]. The reference implementations (jacobgil/vit-explain,
hila-chefer/Transformer-Explainability) explain one image at a time; here every
step is a batched einsum, and only the read-out row is propagated (a [B, T]
vector times each layer's [B, T, T] matrix, O(L T^2) instead of the O(L T^3)
full matrix product), which gives the same row as the full product.

Methods (``attention_maps(..., method=...)``):

- ``"rollout"`` (Abnar and Zuidema 2020): per layer, fuse the heads (mean, max
  or min), optionally zero the lowest ``discard_ratio`` share of entries (never
  the CLS->CLS entry, as vit-explain), A' = 0.5 A + 0.5 I with rows
  renormalised to sum 1; rollout = A'_L ... A'_1; the map is the read-out row
  over the patch tokens. (vit-explain's ``a / a.sum(dim=-1)`` divides columns by
  broadcasting; here rows are renormalised, as the paper states.)
- ``"grad_rollout"`` (Chefer, Gur and Wolf 2021, "Generic attention-model
  explainability", their eq. 5-6): A_bar = E_h[(dy/dA ⊙ A)^+] per layer,
  R = I, then R <- R + A_bar R from the first layer to the last; the map is
  the read-out row of R over the patches. y is ``target_fn(embeddings)``.
- ``"nograd"``: the same relevance update with the gradient replaced by ones,
  A_bar = E_h[A^+] = E_h[A]. Note what this is exactly: because each row of A
  sums to 1, (I + E_h A) = 2 * (0.5 I + 0.5 E_h A) with rows already summing
  to 1, so the map equals 2^L times mean-fusion rollout without discarding;
  after min-max normalisation the two are identical (a test checks this).
- ``"nograd_lrp"``: one reading of the paper's "No-Grad ViT-LRP" (Chefer et
  al. 2021 CVPR with the gradient factor dropped: A_bar = E_h[(R_A)^+], where
  R_A is the LRP relevance of the attention probabilities). R_A is computed as
  A ⊙ dy/dA on the conservative-propagation graph of Ali et al. 2022 (LayerNorm
  normalisers and attention probabilities detached, ``lrp_detach=True`` in the
  model), where gradient x input is an LRP-0 relevance; then the same R update.
  It is not Chefer's exact alpha-beta LRP; it does propagate relevance without
  the extra gradient weighting and differs from rollout.

Gradient methods cost one forward and one backward pass (no weight gradients).
By default (``fused=True``) the head-fused relevance A_bar is produced inside
the backward pass by the model's ``relevance_tap`` (a custom VJP), so the
per-head gradients are never materialised; ``attention_and_grads`` gives the
raw [L, B, heads, T, T] gradients when they are wanted.

For a verification pair the target is the similarity of an image's embedding
with the other image's (held fixed): ``pair_attention_maps`` does this for a
batch of pairs in one forward and one backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from faceaudit_jax.explain import upsampling

HEAD_FUSIONS = ("mean", "max", "min")
READOUTS = ("cls", "mean")
METHODS = ("rollout", "grad_rollout", "nograd", "nograd_lrp")
GRADIENT_METHODS = ("grad_rollout", "nograd_lrp")
SIMILARITIES = ("neg_sq_dist", "cosine")


# ----------------------------------------------------------------------------------------
# Validation helpers (shapes are static, so these run at trace time).


def _check_attn(attn: jax.Array, name: str = "attn") -> None:
    if attn.ndim != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must be [L, B, heads, T, T], got shape {tuple(attn.shape)}")
    if attn.shape[-1] < 2:
        raise ValueError(f"{name} has T={attn.shape[-1]} tokens; need the CLS token and at "
                         f"least one patch")


def _resolve_grid(num_tokens: int, grid_shape: tuple[int, int] | None) -> tuple[int, int]:
    num_patches = num_tokens - 1
    if grid_shape is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patch tokens do not form a square grid; pass "
                             f"grid_shape=(rows, cols)")
        return (side, side)
    rows, cols = (int(v) for v in grid_shape)
    if rows * cols != num_patches:
        raise ValueError(f"grid_shape={tuple(grid_shape)} has {rows * cols} cells but the "
                         f"attention has {num_patches} patch tokens")
    return (rows, cols)


def _readout_vector(batch: int, num_tokens: int, readout: str, dtype) -> jax.Array:
    """[B, T] row that reads the model's output from the token mixing matrix."""
    if readout == "cls":
        row = jnp.zeros((num_tokens,), dtype).at[0].set(1.0)
    elif readout == "mean":
        # Mean pooling reads the patch tokens, so the output row is their average.
        row = jnp.full((num_tokens,), 1.0 / (num_tokens - 1), dtype).at[0].set(0.0)
    else:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    return jnp.broadcast_to(row, (batch, num_tokens))


def _to_grid(row: jax.Array, grid_shape) -> jax.Array:
    """[B, T] read-out row -> [B, rows, cols] over the patch tokens."""
    rows, cols = _resolve_grid(row.shape[-1], grid_shape)
    return row[:, 1:].reshape(row.shape[0], rows, cols)


# ----------------------------------------------------------------------------------------
# Per-layer token mixing matrices.


def fuse_heads(attn: jax.Array, head_fusion: str = "mean") -> jax.Array:
    """[L, B, heads, T, T] -> [L, B, T, T] by the mean, max or min over heads."""
    _check_attn(attn)
    if head_fusion == "mean":
        return jnp.mean(attn, axis=2)
    if head_fusion == "max":
        return jnp.max(attn, axis=2)
    if head_fusion == "min":
        return jnp.min(attn, axis=2)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_lowest(fused: jax.Array, discard_ratio: float) -> jax.Array:
    """Zero the int(T*T*discard_ratio) smallest entries of each [T, T] matrix.

    As vit-explain, the CLS->CLS entry (flat index 0) is never zeroed (so one
    fewer entry is dropped when it is among the smallest). Ties are broken by
    position (stable sort). fused: [..., T, T].
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    num_tokens = fused.shape[-1]
    num_drop = int(num_tokens * num_tokens * discard_ratio)
    if num_drop == 0:
        return fused
    flat = fused.reshape(fused.shape[:-2] + (num_tokens * num_tokens,))
    # rank of every entry in ascending order: a double argsort avoids a batched scatter.
    ranks = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1, stable=True)
    drop = (ranks < num_drop).at[..., 0].set(False)
    return jnp.where(drop, 0.0, flat).reshape(fused.shape)


def _propagate_row(row: jax.Array, mixing: jax.Array, residual: bool) -> jax.Array:
    """row [B, T] times the layer product M_L ... M_1 (or (I+M_L)...(I+M_1)).

    mixing: [L, B, T, T]. Multiplying from the left, last layer first, keeps
    every step a vector-matrix product.
    """

    def step(vec, layer_matrix):
        moved = jnp.einsum("bt,bts->bs", vec, layer_matrix)
        return (vec + moved if residual else moved), None

    out, _ = jax.lax.scan(step, row, mixing[::-1])
    return out


# ----------------------------------------------------------------------------------------
# Map methods on precomputed attention (and gradients).


def attention_rollout(attn: jax.Array, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      *, readout: str = "cls",
                      grid_shape: tuple[int, int] | None = None) -> jax.Array:
    """Attention rollout (Abnar and Zuidema 2020), batched.

    Args:
      attn: [L, B, heads, T, T] attention probabilities.
      head_fusion: "mean", "max" or "min" over heads.
      discard_ratio: share of the lowest fused entries zeroed per layer.
      readout: "cls" (the CLS row) or "mean" (the mean of the patch rows, for
        mean-pooled embedders).
      grid_shape: (rows, cols) of the patch grid; ``None`` = square.

    Returns:
      [B, rows, cols]: the read-out row of A'_L ... A'_1 over the patch tokens,
      A' = rows-renormalised (0.5 A_fused + 0.5 I).
    """
    fused = discard_lowest(fuse_heads(attn, head_fusion), discard_ratio)
    eye = jnp.eye(fused.shape[-1], dtype=fused.dtype)
    mixing = 0.5 * fused + 0.5 * eye
    mixing = mixing / jnp.sum(mixing, axis=-1, keepdims=True)
    row = _readout_vector(attn.shape[1], attn.shape[-1], readout, fused.dtype)
    return _to_grid(_propagate_row(row, mixing, residual=False), grid_shape)


def grad_weighted_rollout(attn: jax.Array, grads: jax.Array, *, readout: str = "cls",
                          grid_shape: tuple[int, int] | None = None) -> jax.Array:
    """Chefer et al. (2021, ICCV) relevance: A_bar = E_h[(grads ⊙ A)^+], R <- R + A_bar R.

    Args:
      attn: [L, B, heads, T, T] attention probabilities.
      grads: same shape, d target / d attention probabilities per image.

    Returns:
      [B, rows, cols]: the read-out row of R = (I + A_bar_L) ... (I + A_bar_1)
      over the patch tokens.
    """
    _check_attn(attn)
    if grads.shape != attn.shape:
        raise ValueError(f"grads must have the attention's shape {tuple(attn.shape)}, got "
                         f"{tuple(grads.shape)}")
    weighted = jnp.mean(jnp.maximum(grads * attn, 0.0), axis=2)
    return relevance_rollout(weighted, readout=readout, grid_shape=grid_shape)


def relevance_rollout(weighted: jax.Array, *, readout: str = "cls",
                      grid_shape: tuple[int, int] | None = None) -> jax.Array:
    """Chefer's update R <- R + A_bar R from head-fused relevances A_bar [L, B, T, T].

    ``grad_weighted_rollout`` with A_bar already computed (e.g. by the model's
    fused ``relevance_tap``). Returns [B, rows, cols].
    """
    if weighted.ndim != 4 or weighted.shape[-1] != weighted.shape[-2]:
        raise ValueError(f"weighted must be [L, B, T, T], got shape {tuple(weighted.shape)}")
    row = _readout_vector(weighted.shape[1], weighted.shape[-1], readout, weighted.dtype)
    return _to_grid(_propagate_row(row, weighted, residual=True), grid_shape)


def nograd_rollout(attn: jax.Array, *, readout: str = "cls",
                   grid_shape: tuple[int, int] | None = None) -> jax.Array:
    """Chefer's relevance update with the gradient replaced by ones: A_bar = E_h[A^+].

    Equals 2^L x ``attention_rollout(attn, "mean", 0.0)`` (rows of A sum to 1),
    i.e. the same map after normalisation; kept as the literal "no-gradient"
    variant of the generic rule. Returns [B, rows, cols].
    """
    return grad_weighted_rollout(attn, jnp.ones_like(attn), readout=readout,
                                 grid_shape=grid_shape)


# ----------------------------------------------------------------------------------------
# From a model to maps.


def attention_and_grads(apply_fn: Callable, params: Any, images: jax.Array,
                        target_fn: Callable, target_args: Any = None,
                        lrp_detach: bool = False):
    """One forward and one backward pass: attention and d target / d attention.

    Args:
      apply_fn: ``apply_fn(params, images, attn_perturbation=None, lrp_detach=False)``
        -> (embeddings [B, D], aux with aux["attn"] [L, B, heads, T, T]), e.g.
        ``models.vit.ViTApply(model)``.
      target_fn: ``target_fn(embeddings)`` (or ``target_fn(embeddings,
        target_args)`` when target_args is not None) -> [B] scores; score b must
        depend only on image b's embedding (true for any per-image model), so
        the gradient of their sum gives every image's own gradient at once.

    Returns:
      (attn [L, B, heads, T, T], grads [same], embeddings [B, D]).
    """
    _, aux = jax.eval_shape(lambda p, x: apply_fn(p, x), params, images)
    zeros = jnp.zeros(aux["attn"].shape, aux["attn"].dtype)

    def total_target(perturbation):
        embeddings, aux_out = apply_fn(params, images, attn_perturbation=perturbation,
                                       lrp_detach=lrp_detach)
        scores = target_fn(embeddings) if target_args is None else target_fn(embeddings,
                                                                              target_args)
        if scores.shape != (images.shape[0],):
            raise ValueError(f"target_fn must return one score per image, shape "
                             f"({images.shape[0]},), got {tuple(scores.shape)}")
        return jnp.sum(scores), (aux_out["attn"], embeddings)

    grads, (attn, embeddings) = jax.grad(total_target, has_aux=True)(zeros)
    return attn, grads, embeddings


# Jitted once per (apply_fn, target_fn, lrp_detach, shapes); also traced inline by
# attention_maps' own jit.
attention_and_grads = jax.jit(attention_and_grads,
                              static_argnames=("apply_fn", "target_fn", "lrp_detach"))


def fused_relevance(apply_fn: Callable, params: Any, images: jax.Array, target_fn: Callable,
                    target_args: Any = None, lrp_detach: bool = False):
    """A_bar = E_h[(d target / dA ⊙ A)^+] per layer from one forward + backward pass.

    Same result as ``attention_and_grads`` followed by the head-mean of
    (grads ⊙ attn)^+, but computed inside the backward pass through the
    model's ``relevance_tap`` argument, so the per-head gradients and the
    stacked attention are never materialised ([L, B, T, T] instead of two
    [L, B, heads, T, T] arrays). apply_fn must accept ``relevance_tap``
    (``models.vit.ViTApply`` does).

    Returns:
      (A_bar [L, B, T, T], embeddings [B, D]).
    """
    _, aux = jax.eval_shape(lambda p, x: apply_fn(p, x), params, images)
    num_layers, batch, _, num_tokens, _ = aux["attn"].shape
    zeros = jnp.zeros((num_layers, batch, num_tokens, num_tokens), aux["attn"].dtype)

    def total_target(tap):
        embeddings, _ = apply_fn(params, images, lrp_detach=lrp_detach, relevance_tap=tap)
        scores = target_fn(embeddings) if target_args is None else target_fn(embeddings,
                                                                              target_args)
        if scores.shape != (images.shape[0],):
            raise ValueError(f"target_fn must return one score per image, shape "
                             f"({images.shape[0]},), got {tuple(scores.shape)}")
        return jnp.sum(scores), embeddings

    weighted, embeddings = jax.grad(total_target, has_aux=True)(zeros)
    return weighted, embeddings


def normalize_maps(maps: jax.Array) -> jax.Array:
    """Min-max normalise each [H, W] map of [B, H, W] to [0, 1]; constant maps -> 0."""
    low = jnp.min(maps, axis=(1, 2), keepdims=True)
    span = jnp.max(maps, axis=(1, 2), keepdims=True) - low
    return jnp.where(span > 0, (maps - low) / jnp.where(span > 0, span, 1.0), 0.0)


def _check_method(method: str, target_fn) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in GRADIENT_METHODS and target_fn is None:
        raise ValueError(f"method {method!r} needs a target_fn(embeddings) -> [B]")


def _grid_maps(apply_fn, params, images, method, target_fn, target_args, readout, grid_shape,
               head_fusion, discard_ratio, fused=True):
    """[B, rows, cols] raw maps for one of METHODS."""
    if method in ("rollout", "nograd"):
        _, aux = apply_fn(params, images)
        if method == "rollout":
            return attention_rollout(aux["attn"], head_fusion, discard_ratio, readout=readout,
                                     grid_shape=grid_shape)
        return nograd_rollout(aux["attn"], readout=readout, grid_shape=grid_shape)
    lrp_detach = method == "nograd_lrp"
    if fused:
        weighted, _ = fused_relevance(apply_fn, params, images, target_fn, target_args,
                                      lrp_detach)
        return relevance_rollout(weighted, readout=readout, grid_shape=grid_shape)
    attn, grads, _ = attention_and_grads(apply_fn, params, images, target_fn, target_args,
                                         lrp_detach=lrp_detach)
    return grad_weighted_rollout(attn, grads, readout=readout, grid_shape=grid_shape)


def _upsample_normalise(grid_maps: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    # A token reads the non-overlapping patch p*j .. p*j + p - 1, centred at
    # p*j + (p - 1) / 2: exactly where half-pixel resizing puts cell j, so for
    # patch grids "half_pixel" is the receptive-field-aligned choice
    # (explain.upsampling.patch_grid), unlike for padded conv nets.
    return normalize_maps(upsampling.upsample_grid_maps(grid_maps, tuple(image_hw), "half_pixel"))


def _check_images(images, name="images") -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be [B, H, W, 3], got shape {tuple(images.shape)}")


_STATIC = ("apply_fn", "method", "target_fn", "readout", "grid_shape", "head_fusion",
           "discard_ratio", "fused")


def _attention_maps_impl(apply_fn, params, images, method, target_fn, target_args, readout,
                         grid_shape, head_fusion, discard_ratio, fused=True):
    grid_maps = _grid_maps(apply_fn, params, images, method, target_fn, target_args, readout,
                           grid_shape, head_fusion, discard_ratio, fused)
    return _upsample_normalise(grid_maps, images.shape[1:3])


_attention_maps_jit = jax.jit(_attention_maps_impl, static_argnames=_STATIC)


def attention_maps(apply_fn: Callable, params: Any, images: jax.Array, method: str = "rollout",
                   target_fn: Callable | None = None, *, target_args: Any = None,
                   readout: str = "cls", grid_shape: tuple[int, int] | None = None,
                   head_fusion: str = "mean", discard_ratio: float = 0.0,
                   fused: bool = True) -> jax.Array:
    """Attention explanation maps for a batch of images, in one jitted call.

    Args:
      apply_fn: ``apply_fn(params, images, attn_perturbation=None, lrp_detach=False,
        relevance_tap=None)`` -> (embeddings [B, D], aux["attn"] [L, B, heads, T, T]); e.g.
        ``models.vit.ViTApply(model)``. Static for jit: reuse the same object.
      params: the model variables.
      images: [B, H, W, 3] in [0, 1].
      method: one of METHODS ("rollout", "grad_rollout", "nograd", "nograd_lrp").
      target_fn: for gradient methods, ``target_fn(embeddings) -> [B]`` (static
        for jit: keep it a module-level function; pass changing data through
        ``target_args``, then it is called as ``target_fn(embeddings, target_args)``).
      readout: "cls" or "mean" (match the model's pooling).
      grid_shape: patch grid (rows, cols); ``None`` = square.
      head_fusion, discard_ratio: rollout options.
      fused: gradient methods take A_bar from the model's ``relevance_tap``
        (``fused_relevance``; less memory traffic). ``False`` uses only
        ``attn_perturbation`` (``attention_and_grads``), for apply functions
        without ``relevance_tap``. Same maps either way.

    Returns:
      [B, H, W] float32 maps, bilinearly upsampled from the patch grid to the
      image size and min-max normalised per image to [0, 1] (a constant map
      becomes all zeros).
    """
    _check_images(images)
    _check_method(method, target_fn)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    grid_shape = None if grid_shape is None else tuple(int(v) for v in grid_shape)
    return _attention_maps_jit(apply_fn, params, images, method, target_fn, target_args,
                               readout, grid_shape, head_fusion, float(discard_ratio),
                               bool(fused))


# ----------------------------------------------------------------------------------------
# Verification pairs.


def similarity(emb_a: jax.Array, emb_b: jax.Array, kind: str = "neg_sq_dist") -> jax.Array:
    """Similarity of L2-normalised embeddings, [B, D] x [B, D] -> [B].

    "neg_sq_dist": -||a - b||^2 (the paper's distance, negated so higher is
    more similar); "cosine": a . b. A zero-norm embedding gives distance 2 /
    cosine 0 instead of NaN.
    """
    unit_a = _l2_normalize(emb_a)
    unit_b = _l2_normalize(emb_b)
    if kind == "neg_sq_dist":
        return -jnp.sum(jnp.square(unit_a - unit_b), axis=-1)
    if kind == "cosine":
        return jnp.sum(unit_a * unit_b, axis=-1)
    raise ValueError(f"similarity kind must be one of {SIMILARITIES}, got {kind!r}")


def _l2_normalize(emb: jax.Array) -> jax.Array:
    norm_sq = jnp.sum(jnp.square(emb), axis=-1, keepdims=True)
    return emb * jnp.where(norm_sq > 0, jax.lax.rsqrt(jnp.where(norm_sq > 0, norm_sq, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class PairSimilarityTarget:
    """target_fn for a stacked batch [probes; galleries] of 2B images.

    Score i = similarity(e_i, stop_gradient(e_partner(i))), the partner of probe
    b being gallery b and vice versa: each image is explained against the other
    image's (fixed) embedding. Hashable, so it is a valid static jit argument.
    """

    kind: str = "neg_sq_dist"

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        half = embeddings.shape[0] // 2
        partner = jax.lax.stop_gradient(jnp.roll(embeddings, half, axis=0))
        return similarity(embeddings, partner, self.kind)


def pair_attention_maps(apply_fn: Callable, params: Any, probes: jax.Array,
                        galleries: jax.Array, method: str = "rollout",
                        similarity_kind: str = "neg_sq_dist", **kwargs) -> tuple[jax.Array,
                                                                                  jax.Array]:
    """Maps for B verification pairs in one call (one forward + backward over 2B images).

    Args:
      probes, galleries: [B, H, W, 3] each, same shape.
      method: one of METHODS; gradient methods explain each image's similarity
        to its partner's (fixed) embedding (``similarity_kind``).
      **kwargs: readout, grid_shape, head_fusion, discard_ratio (see
        ``attention_maps``).

    Returns:
      (maps_probe, maps_gallery): [B, H, W] each, normalised to [0, 1].
    """
    _check_images(probes, "probes")
    _check_images(galleries, "galleries")
    if probes.shape != galleries.shape:
        raise ValueError(f"probes and galleries must have the same shape (pairs of same-size "
                         f"images), got {tuple(probes.shape)} and {tuple(galleries.shape)}")
    if similarity_kind not in SIMILARITIES:
        raise ValueError(f"similarity_kind must be one of {SIMILARITIES}, got "
                         f"{similarity_kind!r}")
    stacked = jnp.concatenate([probes, galleries], axis=0)
    maps = attention_maps(apply_fn, params, stacked, method,
                          PairSimilarityTarget(similarity_kind), **kwargs)
    half = probes.shape[0]
    return maps[:half], maps[half:]


@dataclasses.dataclass(frozen=True)
class PredictedClassTarget:
    """target_fn(embeddings [B, D], centres [D, C]) -> [B]: each image's predicted-class cosine.

    cos(e_b, c_k) for k = argmax_k cos(e_b, c_k) (the argmax is a constant of
    the prediction): the per-image, classification-focused target of a
    margin-trained face model, independent of any verification partner.
    ``centres`` are the classifier's class centres (columns; normalised here).
    """

    def __call__(self, embeddings: jax.Array, centres: jax.Array) -> jax.Array:
        unit = _l2_normalize(embeddings)
        unit_centres = _l2_normalize(jnp.swapaxes(centres, 0, 1))  # [C, D]
        cosines = unit @ unit_centres.T
        top = jax.lax.stop_gradient(jnp.argmax(cosines, axis=-1))
        return jnp.take_along_axis(cosines, top[:, None], axis=1)[:, 0]


def image_attention_maps(apply_fn: Callable, params: Any, images: jax.Array, centres,
                         method: str = "rollout", **kwargs) -> jax.Array:
    """Per-image (classification-focused) maps [B, H, W]: gradient methods explain each
    image's predicted-class cosine against the class ``centres`` [D, C], not a pair
    similarity (``pair_attention_maps``). Rollout methods ignore the target.
    """
    centres = jnp.asarray(centres, jnp.float32)
    if centres.ndim != 2:
        raise ValueError(f"centres must be the class centres [D, C]; got shape {centres.shape}")
    return attention_maps(apply_fn, params, images, method, PredictedClassTarget(),
                          target_args=centres, **kwargs)


TARGETS = ("pair", "image")


def targeted_pair_maps(apply_fn: Callable, params: Any, probes: jax.Array, galleries: jax.Array,
                       method: str, target: str = "pair", centres=None,
                       **kwargs) -> tuple[jax.Array, jax.Array]:
    """(maps_probe, maps_gallery) [B, H, W] of B pairs for an explanation ``target``.

    "pair": each image's similarity to its partner (``pair_attention_maps``);
    "image": each image's own predicted-class cosine against ``centres`` [D, C]
    (``image_attention_maps``, one map per image whatever the pair). Rollout
    methods use no target, so both give the same maps.
    """
    if target not in TARGETS:
        raise ValueError(f"explain.target={target!r}; expected one of {TARGETS}")
    if target == "pair":
        return pair_attention_maps(apply_fn, params, probes, galleries, method, **kwargs)
    if centres is None:
        raise ValueError("explain.target='image' needs the classifier's class centres")
    both = image_attention_maps(apply_fn, params, jnp.concatenate([probes, galleries]), centres,
                                method, **kwargs)
    return both[:probes.shape[0]], both[probes.shape[0]:]
