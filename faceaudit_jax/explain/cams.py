"""Class activation maps (the Grad-CAM family) as pure JAX functions.

Two layers:

* CAM formulas, ``formula(acts, grads) -> maps``: ``acts`` is the feature map
  [B, h, w, C] of the layer being explained and ``grads`` the gradient of the
  target score w.r.t. it (same shape). Each returns the raw map [B, h, w]
  after the final ReLU, before any resizing or normalisation, with the same
  formulas as the reference pytorch-grad-cam library (which works on
  [B, C, h, w]; here the channel axis is last, as in Flax).
* ``compute_cams`` / ``make_cam_fn``: one forward pass through
  ``features_fn`` (images -> feature map), then the gradient of
  ``target_fn(head_fn(fmap))`` w.r.t. the feature map only (a VJP through the
  head: no backward pass through the backbone), the formula, an upsampling
  to the input size that puts each cell at its receptive-field centre
  (``explain.upsampling``) and a per-image min-max normalisation to [0, 1]. A CAM therefore costs about one forward pass.

Adding a formula: any function ``fn(acts, grads) -> [B, h, w]`` works. Pass it
directly as ``method=fn`` or register it by name::

    def gradient_only(acts, grads):
        return jax.nn.relu(grads.sum(-1))

    register_cam_method("gradient_only", gradient_only)
    maps = compute_cams(features_fn, head_fn, images, target_fn,
                        method="gradient_only")

Avoiding retracing: the jitted core takes ``features_fn``, ``head_fn``,
``target_fn`` and the formula as static arguments, so it is compiled once per
(functions, image shape) and reused as long as the *same function objects*
are passed again. Build the closures once (outside the loop over batches),
or better build ``cam_fn = make_cam_fn(features_fn, head_fn, target_fn)``
once and call ``cam_fn(images)`` per batch. Creating a new lambda or
``functools.partial`` per batch forces a new trace and compilation each time.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import contracts
from faceaudit_jax.explain import upsampling
from faceaudit_jax.explain.upsampling import CellGrid

Array = jax.Array
CamFormula = Callable[[Array, Array], Array]
TargetFn = Callable[[Array], Array]

# pytorch-grad-cam's Grad-CAM++ guard in the alpha denominator
# (grad_cam_plusplus.py: ``eps = 0.000001``).
GRAD_CAM_PLUSPLUS_EPS = 1e-6


# --------------------------------------------------------------------------
# CAM formulas: [B, h, w, C] x [B, h, w, C] -> [B, h, w]
# --------------------------------------------------------------------------

def _check_acts_grads(acts: Array, grads: Array) -> None:
    if acts.ndim != 4:
        raise ValueError(
            f"acts must be a feature map [B, h, w, C]; got shape {tuple(acts.shape)}")
    if grads.shape != acts.shape:
        raise ValueError(
            f"grads must have the shape of acts {tuple(acts.shape)}; "
            f"got {tuple(grads.shape)}")


def _weighted_sum(channel_weights: Array, acts: Array) -> Array:
    """sum_c w[b, c] * A[b, y, x, c] followed by the ReLU -> [B, h, w]."""
    cam = jnp.einsum("bc,byxc->byx", channel_weights, acts)
    return jax.nn.relu(cam)


def grad_cam(acts: Array, grads: Array) -> Array:
    """Grad-CAM (Selvaraju et al.): channel weights = spatial mean of grads.

    L = ReLU(sum_c mean_{y,x}(dS/dA_c) * A_c). Shapes: [B, h, w, C] -> [B, h, w].
    """
    _check_acts_grads(acts, grads)
    weights = jnp.mean(grads, axis=(1, 2))
    return _weighted_sum(weights, acts)


def grad_cam_plusplus(acts: Array, grads: Array) -> Array:
    """Grad-CAM++ (Chattopadhay et al., eq. 19 with exp(S) dropped, as in pytorch-grad-cam).

    alpha = g^2 / (2 g^2 + (sum_{y,x} A) g^3 + eps), set to 0 where g == 0;
    w_c = sum_{y,x} ReLU(g) * alpha; L = ReLU(sum_c w_c A_c).
    Shapes: [B, h, w, C] -> [B, h, w].
    """
    _check_acts_grads(acts, grads)
    grads_pow2 = grads * grads
    grads_pow3 = grads_pow2 * grads
    acts_spatial_sum = jnp.sum(acts, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    alpha = grads_pow2 / (2.0 * grads_pow2 + acts_spatial_sum * grads_pow3
                          + GRAD_CAM_PLUSPLUS_EPS)
    # The reference zeroes alpha where the gradient is exactly zero.
    alpha = jnp.where(grads != 0, alpha, 0.0)
    weights = jnp.sum(jax.nn.relu(grads) * alpha, axis=(1, 2))
    return _weighted_sum(weights, acts)


def hires_cam(acts: Array, grads: Array) -> Array:
    """HiResCAM (Draelos & Carin): L = ReLU(sum_c g_c * A_c), element-wise.

    Shapes: [B, h, w, C] -> [B, h, w].
    """
    _check_acts_grads(acts, grads)
    return jax.nn.relu(jnp.sum(grads * acts, axis=-1))


def element_wise_grad_cam(acts: Array, grads: Array) -> Array:
    """Element-wise Grad-CAM: L = ReLU(sum_c ReLU(g_c * A_c)).

    The outer ReLU is a no-op on a sum of non-negative terms; it is kept so
    every formula ends the same way. Shapes: [B, h, w, C] -> [B, h, w].
    """
    _check_acts_grads(acts, grads)
    return jax.nn.relu(jnp.sum(jax.nn.relu(grads * acts), axis=-1))


CAM_METHODS: dict[str, CamFormula] = {
    "grad_cam": grad_cam,
    "grad_cam_plusplus": grad_cam_plusplus,
    "hires_cam": hires_cam,
    "element_wise_grad_cam": element_wise_grad_cam,
}


def register_cam_method(name: str, fn: CamFormula, *, overwrite: bool = False) -> None:
    """Add a CAM formula ``fn(acts [B,h,w,C], grads [B,h,w,C]) -> [B,h,w]`` by name.

    Re-registering an existing name needs ``overwrite=True``: a jitted CAM
    function built earlier keeps the formula it was built with.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"CAM method name must be a non-empty string; got {name!r}")
    if not callable(fn):
        raise ValueError(f"CAM method {name!r} must be callable; got {type(fn).__name__}")
    if name in CAM_METHODS and not overwrite and CAM_METHODS[name] is not fn:
        raise ValueError(
            f"CAM method {name!r} is already registered; pass overwrite=True to replace it")
    CAM_METHODS[name] = fn


def resolve_cam_method(method: Union[str, CamFormula]) -> CamFormula:
    """The formula for a registered name, or ``method`` itself if it is callable."""
    if callable(method):
        return method
    try:
        return CAM_METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown CAM method {method!r}; expected a callable "
            f"fn(acts, grads) or one of: {', '.join(sorted(CAM_METHODS))}") from None


# --------------------------------------------------------------------------
# Targets: logits (or embeddings) -> [B] scores whose gradient is explained
# --------------------------------------------------------------------------

BINARY_TARGET_MODES = ("predicted", "positive", "negative")


def class_target(index: Union[int, Array, np.ndarray]) -> TargetFn:
    """Target for multi-class logits [B, K]: the logit of class ``index``.

    ``index`` is one int for the whole batch or an int array [B] (one class
    per image, e.g. the predicted or the true class).
    """
    if isinstance(index, (int, np.integer)):
        k = int(index)

        def target(logits: Array) -> Array:
            if logits.ndim != 2:
                raise ValueError(f"class_target expects logits [B, K]; got {logits.shape}")
            if not 0 <= k < logits.shape[-1]:
                raise ValueError(
                    f"class index {k} out of range for {logits.shape[-1]} classes")
            return logits[:, k]

        return target

    per_image = jnp.asarray(index, dtype=jnp.int32)
    if per_image.ndim != 1:
        raise ValueError(
            f"class_target index must be an int or an int array [B]; got shape {per_image.shape}")

    def target_per_image(logits: Array) -> Array:
        if logits.ndim != 2 or logits.shape[0] != per_image.shape[0]:
            raise ValueError(
                f"class_target with {per_image.shape[0]} indices expects logits "
                f"[{per_image.shape[0]}, K]; got {logits.shape}")
        return jnp.take_along_axis(logits, per_image[:, None], axis=1)[:, 0]

    return target_per_image


def predicted_class_target(logits: Array) -> Array:
    """Target for multi-class logits [B, K]: each image's arg-max logit."""
    if logits.ndim != 2:
        raise ValueError(f"predicted_class_target expects logits [B, K]; got {logits.shape}")
    top = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    return jnp.take_along_axis(logits, top[:, None], axis=1)[:, 0]


def _single_logit(logit: Array) -> Array:
    if logit.ndim == 2 and logit.shape[1] == 1:
        return logit[:, 0]
    if logit.ndim == 1:
        return logit
    raise ValueError(
        f"binary_target expects one logit per image, shape [B] or [B, 1]; got {tuple(logit.shape)}")


def binary_target(logit: Array, mode: str = "predicted") -> Array:
    """Score to explain for a single-logit binary classifier -> [B].

    * ``"predicted"``: |z|, i.e. the logit of the *predicted* class: z where
      z >= 0 (predicted positive) and -z where z < 0, so dS/dA = sign(z) dz/dA.
      z == 0 counts as positive (sigmoid(0) = 0.5 is read as class 1).
    * ``"positive"``: z, the positive class whatever the prediction (the
      common default that ignores images predicted negative).
    * ``"negative"``: -z, the negative class (pytorch-grad-cam's
      ``BinaryClassifierOutputTarget(0)``).

    ``logit`` is [B] or [B, 1]. Use ``make_binary_target(mode)`` for a
    ``target_fn`` to pass to ``compute_cams``.
    """
    if mode not in BINARY_TARGET_MODES:
        raise ValueError(
            f"unknown binary target mode {mode!r}; expected one of: "
            f"{', '.join(BINARY_TARGET_MODES)}")
    z = _single_logit(logit)
    if mode == "positive":
        return z
    if mode == "negative":
        return -z
    # The sign is a constant of the prediction, so the gradient is sign(z) dz
    # (jnp.abs would give a zero gradient at z == 0).
    sign = jax.lax.stop_gradient(jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype))
    return sign * z


def make_binary_target(mode: str = "predicted") -> TargetFn:
    """``target_fn`` for ``compute_cams`` built from ``binary_target(., mode)``.

    Call it once and reuse the returned function: a new function per call
    would retrace the jitted CAM computation.
    """
    binary_target(jnp.zeros((1,)), mode)  # validates mode eagerly

    def target(logit: Array) -> Array:
        return binary_target(logit, mode)

    target.__name__ = f"binary_target_{mode}"
    return target


def cosine_target(reference_embeddings: Union[Array, np.ndarray], *,
                  dissimilarity: bool = False, eps: float = 1e-8) -> TargetFn:
    """Target for embedders: cosine similarity of each embedding to a reference.

    ``reference_embeddings`` is [D] (one reference for the batch) or [B, D]
    (one per image). The returned function maps embeddings [B, D] -> [B]
    cos(e_b, ref_b); with ``dissimilarity=True`` it returns 1 - cos (explain
    what makes two faces differ, as FaceX does for non-matching pairs).
    """
    reference = jnp.asarray(reference_embeddings, dtype=jnp.float32)
    if reference.ndim not in (1, 2):
        raise ValueError(
            f"reference_embeddings must be [D] or [B, D]; got shape {reference.shape}")
    ref_unit = reference / jnp.maximum(
        jnp.linalg.norm(reference, axis=-1, keepdims=True), eps)

    def target(embeddings: Array) -> Array:
        if embeddings.ndim != 2 or embeddings.shape[-1] != reference.shape[-1]:
            raise ValueError(
                f"cosine_target expects embeddings [B, {reference.shape[-1]}]; "
                f"got {embeddings.shape}")
        if reference.ndim == 2 and reference.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"{reference.shape[0]} reference embeddings for a batch of "
                f"{embeddings.shape[0]}")
        unit = embeddings / jnp.maximum(
            jnp.linalg.norm(embeddings, axis=-1, keepdims=True), eps)
        cos = jnp.sum(unit * ref_unit, axis=-1)
        return 1.0 - cos if dissimilarity else cos

    return target


# --------------------------------------------------------------------------
# Raw maps, resizing and normalisation
# --------------------------------------------------------------------------

def cams_from_features(fmap: Array, head_fn: Callable[[Array], Array],
                       target_fn: TargetFn, method: Union[str, CamFormula] = "grad_cam",
                       ) -> tuple[Array, Array]:
    """Raw CAMs [B, h, w] and the head's outputs, given the feature map [B, h, w, C].

    The gradient flows through the head only (one VJP of
    target_fn o head_fn at ``fmap``). Images are independent (the head must
    not mix examples, e.g. BatchNorm in inference mode), so the gradient of
    the summed scores w.r.t. fmap[b] is the gradient of score b.
    """
    formula = resolve_cam_method(method)

    def summed_score(features):
        logits = head_fn(features)
        scores = target_fn(logits)
        if scores.ndim != 1 or scores.shape[0] != features.shape[0]:
            raise ValueError(
                f"target_fn must return one score per image, shape [{features.shape[0]}]; "
                f"got {scores.shape}")
        return jnp.sum(scores), logits

    _, vjp_fn, logits = jax.vjp(summed_score, fmap, has_aux=True)
    (grads,) = vjp_fn(jnp.ones((), dtype=jnp.result_type(fmap)))
    maps = formula(fmap, grads)
    expected = fmap.shape[:3]
    if maps.shape != expected:
        raise ValueError(
            f"CAM method {getattr(formula, '__name__', formula)!r} returned shape "
            f"{maps.shape}; expected [B, h, w] = {expected}")
    return maps, logits


def normalize_maps(maps: Array, rel_tol: float = 1e-6) -> Array:
    """Min-max normalise each map [B, H, W] to [0, 1].

    A map whose range is zero (no activation, or a constant map) becomes all
    0, never NaN. Ranges below ``rel_tol`` x the map's largest magnitude are
    treated as zero too, so interpolation round-off on a constant map is not
    stretched into noise.
    """
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    hi = jnp.max(maps, axis=(1, 2), keepdims=True)
    return _rescale_to_unit(maps, lo, hi, rel_tol)


def _rescale_to_unit(maps: Array, lo: Array, hi: Array, rel_tol: float) -> Array:
    """(maps - lo) / (hi - lo), or 0 where the range is below ``rel_tol`` x the magnitude."""
    span = hi - lo
    scale = jnp.maximum(jnp.abs(hi), jnp.abs(lo))
    has_range = span > rel_tol * scale
    safe_span = jnp.where(has_range, span, 1.0)
    return jnp.where(has_range, (maps - lo) / safe_span, 0.0)


def upsample_maps(maps: Array, size: tuple[int, int], *, grid="aligned") -> Array:
    """Resize [B, h, w] -> [B, H, W] by linear interpolation between cell centres.

    ``grid`` places the cells (``explain.upsampling``): "aligned" (cell j at
    pixel s * j, symmetric-padding conv nets), "half_pixel" (cv2 /
    pytorch-grad-cam; shrinking then antialiases like ``jax.image.resize``) or
    a ``CellGrid``.
    """
    spec = upsampling.resolve_upsample(grid)
    if spec is None:
        raise ValueError("upsample_maps needs a grid; got False/None")
    height, width = int(size[0]), int(size[1])
    if spec == "half_pixel" and (height < maps.shape[1] or width < maps.shape[2]):
        return jax.image.resize(maps, (maps.shape[0], height, width), method="bilinear")
    return upsampling.upsample_grid_maps(maps, (height, width), spec)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float32 [n_out, n_in]: half-pixel bilinear upsampling weights along one axis.

    What ``jax.image.resize(..., "bilinear")`` and cv2.resize do when
    enlarging: ``W @ v`` resizes a vector ``v`` of length n_in to n_out. Rows
    sum to 1. (``upsampling.upsampling_matrix`` gives any cell geometry.)
    """
    if n_out < n_in:
        raise ValueError(f"bilinear_matrix enlarges only; got {n_in} -> {n_out}")
    return upsampling.upsampling_matrix(n_in, n_out, *upsampling.half_pixel_offset(n_in, n_out))


def upsample_normalize_maps(maps: Array, size: tuple[int, int], rel_tol: float = 1e-6,
                            *, grid="aligned") -> Array:
    """``normalize_maps(upsample_maps(maps, size, grid=grid))``, writing the large maps once.

    Upsampling is linear with rows of weights summing to 1, so normalising
    commutes with it: normalise the small maps with the min and max the
    upsampled ones would have, then upsample. Those extremes are read off the
    few rows and columns where an interpolated map can peak
    (``upsampling.extreme_rows``), so the [B, H, W] output is produced by one
    pass and never re-read (for A attributes x B images this is most of the
    cost after the forward pass). Half-pixel shrinking falls back to the
    two-step path (antialiased weights span more than two inputs).
    """
    spec = upsampling.resolve_upsample(grid)
    if spec is None:
        raise ValueError("upsample_normalize_maps needs a grid; got False/None")
    _, h, w = maps.shape
    height, width = int(size[0]), int(size[1])
    if spec == "half_pixel" and (height < h or width < w):
        return normalize_maps(upsample_maps(maps, (height, width), grid=spec), rel_tol)
    wy, wx, ry, rx = upsampling.axis_matrices(spec, (h, w), (height, width))
    maps = maps.astype(jnp.float32)
    extremes = jnp.einsum("oh,bhw,pw->bop", wy[ry], maps, wx[rx])
    lo = jnp.min(extremes, axis=(1, 2), keepdims=True)
    hi = jnp.max(extremes, axis=(1, 2), keepdims=True)
    return jnp.einsum("oh,bhw,pw->bop", wy, _rescale_to_unit(maps, lo, hi, rel_tol), wx)


def _cams_and_logits_impl(images, features_fn, head_fn, target_fn, formula, upsample):
    fmap = features_fn(images)
    if fmap.ndim != 4 or fmap.shape[0] != images.shape[0]:
        raise ValueError(
            f"features_fn must return a feature map [B, h, w, C] with B = {images.shape[0]}; "
            f"got {fmap.shape}")
    raw, logits = cams_from_features(fmap, head_fn, target_fn, formula)
    raw = raw.astype(jnp.float32)
    # The value contract, per image, computed with the maps. Outside a caller's jit
    # a violation raises; inside one it must not come out as plausible (all-zero)
    # maps, so those images' maps are NaN.
    valid = contracts.in_unit_range(images, axis=(1, 2, 3))
    if upsample is not None:  # resolved by upsampling.resolve_upsample
        maps = upsample_normalize_maps(raw, images.shape[1:3], grid=upsample)
    else:
        maps = normalize_maps(raw)
    return jnp.where(valid[:, None, None], maps, jnp.nan), logits, jnp.all(valid)


_cams_and_logits_jit = jax.jit(
    _cams_and_logits_impl,
    static_argnames=("features_fn", "head_fn", "target_fn", "formula", "upsample"))


def _check_images_static(images) -> None:
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"images must be a batch [B, H, W, C]; got shape {None if shape is None else tuple(shape)}")
    if shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0); expected at least one image")
    contracts.check_float_dtype(images, "images")


def _check_images_on_host(images) -> None:
    """numpy images: the whole value contract (finite, in [0, 1]) before anything runs."""
    if isinstance(images, np.ndarray):
        message = contracts.unit_violation(images, "images")
        if message:
            raise ValueError(message)


def make_cam_fn(features_fn: Callable[[Array], Array],
                head_fn: Callable[[Array], Array],
                target_fn: TargetFn,
                method: Union[str, CamFormula] = "grad_cam",
                *, upsample: upsampling.UpsampleSpec = True, return_logits: bool = False,
                validate: bool = True) -> Callable[[Array], Union[Array, tuple[Array, Array]]]:
    """A jitted ``cam_fn(images [B,H,W,C]) -> maps [B,H,W]`` (or (maps, logits)).

    Build it once and call it per batch: it compiles once per image shape.
    Images must be float [B, H, W, C] with finite values in [0, 1]
    (faceaudit_jax.contracts); rank and dtype are always checked. ``validate``
    also checks the values: the flag is computed inside the jitted call, so
    it costs one scalar transfer per batch, and a violation raises ValueError
    naming the first bad index and value. With ``validate=False`` calls stay
    fully asynchronous (use it when the data pipeline already guarantees the
    contract). ``cam_fn`` may also be called inside the caller's own
    ``jax.jit`` (the value check is then skipped: NaN propagates to the maps).
    """
    formula = resolve_cam_method(method)
    upsample = upsampling.resolve_upsample(upsample, features_fn)

    def cam_fn(images):
        _check_images_static(images)
        maps, logits, valid = _cams_and_logits_jit(
            images, features_fn=features_fn, head_fn=head_fn, target_fn=target_fn,
            formula=formula, upsample=upsample)
        if validate:
            contracts.raise_unit_violation(valid, images, "images")
        return (maps, logits) if return_logits else maps

    return cam_fn


def compute_cams_and_logits(features_fn: Callable[[Array], Array],
                            head_fn: Callable[[Array], Array],
                            images: Union[Array, np.ndarray],
                            target_fn: TargetFn,
                            method: Union[str, CamFormula] = "grad_cam",
                            upsample: upsampling.UpsampleSpec = True) -> tuple[Array, Array]:
    """``compute_cams`` that also returns the head's outputs (logits) [B, ...]."""
    _check_images_static(images)
    _check_images_on_host(images)
    formula = resolve_cam_method(method)
    upsample = upsampling.resolve_upsample(upsample, features_fn)
    maps, logits, valid = _cams_and_logits_jit(
        jnp.asarray(images), features_fn=features_fn, head_fn=head_fn,
        target_fn=target_fn, formula=formula, upsample=upsample)
    contracts.raise_unit_violation(valid, images, "images")
    return maps, logits


def compute_cams(features_fn: Callable[[Array], Array],
                 head_fn: Callable[[Array], Array],
                 images: Union[Array, np.ndarray],
                 target_fn: TargetFn,
                 method: Union[str, CamFormula] = "grad_cam",
                 upsample: upsampling.UpsampleSpec = True,
                 return_logits: bool = False):
    """CAMs for a batch: [B, H, W] in [0, 1] (or (maps, logits) with ``return_logits``).

    ``features_fn(images) -> fmap [B, h, w, C]`` and ``head_fn(fmap) -> logits``
    are pure closures with parameters bound; ``target_fn(logits) -> [B]``
    picks the score to explain (``class_target``, ``make_binary_target``,
    ``cosine_target``, or any function). ``method`` is a registered name
    (``CAM_METHODS``) or a formula ``fn(acts, grads) -> [B, h, w]``.
    ``images``: float [B, H, W, C] with finite values in [0, 1]; anything
    else (uint8, 0..255, -1..1, NaN) raises ValueError before any work
    (numpy inputs checked on the host, JAX arrays with a flag computed in
    the jitted call; see faceaudit_jax.contracts).

    Maps are upsampled to the images' H x W by linear interpolation between
    the feature cells' receptive-field centres and min-max normalised per
    image. ``upsample``: True / "aligned" (default) uses
    ``features_fn.cell_grid`` when the model declares one
    (``models.resnet.classifier_fns`` does), else cell j at pixel s * j with
    s = H / h (symmetric-padding conv nets); "half_pixel" reproduces
    pytorch-grad-cam / cv2 (cell j at s * j + s / 2 - 0.5, half a stride down
    and right of a ResNet's receptive field); a ``upsampling.CellGrid`` gives
    any geometry; False keeps the feature-map size h x w. A map
    with no activation is all 0. The computation is jitted with the functions
    as static arguments: pass the same function objects on every call to
    reuse the compiled code (see the module docstring).
    """
    maps, logits = compute_cams_and_logits(features_fn, head_fn, images, target_fn,
                                           method, upsample)
    return (maps, logits) if return_logits else maps


__all__ = [
    "CAM_METHODS", "BINARY_TARGET_MODES", "GRAD_CAM_PLUSPLUS_EPS",
    "grad_cam", "grad_cam_plusplus", "hires_cam", "element_wise_grad_cam",
    "register_cam_method", "resolve_cam_method",
    "class_target", "predicted_class_target", "binary_target", "make_binary_target",
    "cosine_target", "cams_from_features", "normalize_maps", "upsample_maps",
    "upsample_normalize_maps", "bilinear_matrix", "CellGrid",
    "make_cam_fn", "compute_cams", "compute_cams_and_logits",
]
