"""CAMs of many binary attributes of a batch in one jitted call.

A multi-attribute classifier (AFFACT: one network, one logit z_a per
attribute) explained attribute by attribute with ``compute_cams`` would run
the backbone once per attribute. Here the backbone runs once:

    fmap = features_fn(images)                    # one forward pass
    logits, head_vjp = jax.vjp(head_fn, fmap)     # the head, once
    for every attribute a (vmap over the index):
        grads_a = head_vjp(d target(z[:, a]) / d logits)   # head-only backward
        cam_a = formula(fmap, grads_a)

with target = ``cams.binary_target(., mode)``: "predicted" explains the
predicted class (|z|, gradient sign(z) dz; paper eq. 4), "positive" the
positive class whatever the prediction (z; eq. 8), "negative" -z. The maps are
upsampled to the image size (cells at their receptive-field centres) and min-max normalised per map with the
helpers of ``explain.cams`` (``upsample_maps``, ``normalize_maps``), so
``attribute_cams(...)[0][:, i]`` equals ``compute_cams`` with the target
``binary_target(z[:, a_i], mode)``. For a ResNet head (pool + dense) the extra
work per attribute is a [B, M] x [M, C] product and the CAM formula, so 40
attributes cost about one forward pass, not 40.

``mean_cams_by_prediction`` (and the streaming ``init_cam_sums`` /
``accumulate_cam_sums`` / ``finalize_cam_means``) averages the CAMs of every
attribute over the images predicted positive and over those predicted negative
(the paper's Figure 2), with running sums so a whole test set fits in memory.

Avoiding retracing: as in ``explain.cams``, the functions are static arguments
of the jitted core. Build ``cam_fn = make_attribute_cam_fn(...)`` once and call
it per batch; it compiles once per image shape.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import regions
from faceaudit_jax.explain import cams as cams_lib
from faceaudit_jax.explain import upsampling

Array = jax.Array
CamFormula = Callable[[Array, Array], Array]
AttributeSpec = Union[None, int, str, Sequence[Union[int, str]]]


def resolve_attribute_indices(attributes: AttributeSpec,
                              output_names: Sequence[str] | None = None) -> tuple[int, ...] | None:
    """Output indices (a hashable tuple) for ints and/or attribute names.

    Names are looked up in ``output_names`` (default: the 40 CelebA attributes
    in ``regions.ATTRIBUTES`` order, the order of an AFFACT head). None means
    every output of the head (resolved when the head's output size is known).
    """
    if attributes is None:
        return None
    if isinstance(attributes, (str, int, np.integer)):
        attributes = [attributes]
    names = tuple(regions.ATTRIBUTES if output_names is None else output_names)
    indices = []
    for item in attributes:
        if isinstance(item, str):
            if output_names is None:
                indices.append(regions.attribute_id(item))
            elif item in names:
                indices.append(names.index(item))
            else:
                raise ValueError(
                    f"attribute {item!r} is not an output of this head; expected one of: "
                    f"{', '.join(names)}")
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if item < 0:
                raise ValueError(f"attribute index {item} is negative; expected 0 <= index")
            indices.append(int(item))
        else:
            raise ValueError(
                f"attributes must be output indices or attribute names; got {item!r}")
    if not indices:
        raise ValueError("attributes is empty; expected at least one attribute")
    return tuple(indices)


def _indices_for(logits: Array, indices: tuple[int, ...] | None) -> tuple[int, ...]:
    if logits.ndim != 2:
        raise ValueError(
            f"head_fn must return logits [B, num_attributes]; got shape {logits.shape}")
    num_outputs = logits.shape[1]
    if indices is None:
        return tuple(range(num_outputs))
    bad = [i for i in indices if i >= num_outputs]
    if bad:
        raise ValueError(
            f"attribute index {bad[0]} out of range for a head with {num_outputs} outputs")
    return indices


def _map_over_attributes(fn, indices: tuple[int, ...], chunk_size: int | None):
    """fn over the attribute indices, stacked on a new leading axis [A, ...].

    vmap by default; ``chunk_size`` bounds memory by mapping over chunks of
    that many attributes (each chunk vmapped).
    """
    index_array = jnp.asarray(indices, dtype=jnp.int32)
    if chunk_size is None or chunk_size >= len(indices):
        return jax.vmap(fn)(index_array)
    return jax.lax.map(fn, index_array, batch_size=chunk_size)


def attribute_target_gradients(fmap: Array, head_fn: Callable[[Array], Array],
                               mode: str = "predicted",
                               attributes: tuple[int, ...] | None = None,
                               chunk_size: int | None = None) -> tuple[Array, Array]:
    """Gradient of each attribute's binary target w.r.t. the feature map.

    Args:
      fmap: [B, h, w, C] feature map (e.g. ``features_fn(images)``).
      head_fn: fmap -> logits [B, M].
      mode: "predicted" (|z|), "positive" (z) or "negative" (-z).
      attributes: output indices and/or CelebA attribute names (None: all M).

    Returns:
      (grads [A, B, h, w, C], logits [B, M]). Images must be independent in
      the head (inference-mode normalisation), as for ``compute_cams``.
    """
    logits, head_vjp = jax.vjp(head_fn, fmap)
    indices = _indices_for(logits, resolve_attribute_indices(attributes))

    def grads_of(a):
        return head_vjp(_target_cotangent(logits, a, mode))[0]

    return _map_over_attributes(grads_of, indices, chunk_size), logits


def _target_cotangent(logits: Array, a: Array, mode: str) -> Array:
    """d sum_b binary_target(z[b, a], mode) / d logits: [B, M], nonzero in column a only."""
    def summed_target(z):
        return jnp.sum(cams_lib.binary_target(z[:, a], mode))

    return jax.grad(summed_target)(logits)


def attribute_cams_from_features(fmap: Array, head_fn: Callable[[Array], Array],
                                 method: Union[str, CamFormula] = "grad_cam",
                                 mode: str = "predicted",
                                 attributes: tuple[int, ...] | None = None,
                                 chunk_size: int | None = None) -> tuple[Array, Array]:
    """Raw CAMs [B, A, h, w] (after the ReLU, unresized) and logits [B, M]."""
    formula = cams_lib.resolve_cam_method(method)
    logits, head_vjp = jax.vjp(head_fn, fmap)
    indices = _indices_for(logits, resolve_attribute_indices(attributes))

    def cam_of(a):
        (grads,) = head_vjp(_target_cotangent(logits, a, mode))
        return formula(fmap, grads)

    raw = _map_over_attributes(cam_of, indices, chunk_size)  # [A, B, h, w]
    if raw.shape[1:] != fmap.shape[:3]:
        raise ValueError(
            f"CAM method {getattr(formula, '__name__', formula)!r} returned maps of shape "
            f"{raw.shape[1:]}; expected [B, h, w] = {fmap.shape[:3]}")
    return jnp.swapaxes(raw, 0, 1), logits


def postprocess_maps(raw: Array, size: tuple[int, int] | None, normalize: bool = True,
                     grid="aligned") -> Array:
    """Raw CAMs [B, A, h, w] -> float32 [B, A, H, W]: resize to ``size`` (None: keep
    h x w) with cells at the centres ``grid`` gives (``explain.upsampling``:
    "aligned", "half_pixel" or a CellGrid) and min-max normalise each map, all
    B * A maps as one batch."""
    batch, num_attrs, h, w = raw.shape
    maps = raw.astype(jnp.float32).reshape(batch * num_attrs, h, w)
    if size is not None and normalize:
        maps = cams_lib.upsample_normalize_maps(maps, size, grid=grid)
    elif size is not None:
        maps = cams_lib.upsample_maps(maps, size, grid=grid)
    elif normalize:
        maps = cams_lib.normalize_maps(maps)
    return maps.reshape(batch, num_attrs, *maps.shape[1:])


def _attribute_cams_impl(images, features_fn, head_fn, formula, mode, attributes,
                         upsample, normalize, chunk_size):
    fmap = features_fn(images)
    if fmap.ndim != 4 or fmap.shape[0] != images.shape[0]:
        raise ValueError(
            f"features_fn must return a feature map [B, h, w, C] with B = {images.shape[0]}; "
            f"got {fmap.shape}")
    raw, logits = attribute_cams_from_features(fmap, head_fn, formula, mode, attributes,
                                               chunk_size)
    indices = _indices_for(logits, attributes)
    maps = postprocess_maps(raw, images.shape[1:3] if upsample is not None else None,
                            normalize, upsample)
    selected = logits[:, np.asarray(indices)] if attributes is not None else logits
    return maps, selected, jnp.all(jnp.isfinite(images))


_attribute_cams_jit = jax.jit(
    _attribute_cams_impl,
    static_argnames=("features_fn", "head_fn", "formula", "mode", "attributes",
                     "upsample", "normalize", "chunk_size"))


def _check_options(mode: str, chunk_size: int | None) -> None:
    if mode not in cams_lib.BINARY_TARGET_MODES:
        raise ValueError(
            f"unknown binary target mode {mode!r}; expected one of: "
            f"{', '.join(cams_lib.BINARY_TARGET_MODES)}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")


def make_attribute_cam_fn(features_fn: Callable[[Array], Array],
                          head_fn: Callable[[Array], Array],
                          method: Union[str, CamFormula] = "grad_cam",
                          mode: str = "predicted",
                          attributes: AttributeSpec = None,
                          *, output_names: Sequence[str] | None = None,
                          upsample=True, normalize: bool = True,
                          chunk_size: int | None = None,
                          validate: bool = True) -> Callable[[Array], tuple[Array, Array]]:
    """A jitted ``cam_fn(images [B,H,W,3]) -> (cams [B,A,H,W], logits [B,A])``.

    Args:
      features_fn, head_fn: pure closures (``models.resnet.classifier_fns``).
      method: a ``cams.CAM_METHODS`` name ("grad_cam", "grad_cam_plusplus",
        "hires_cam", "element_wise_grad_cam") or a formula fn(acts, grads).
      mode: "predicted" (|z|), "positive" (z) or "negative" (-z).
      attributes: output indices and/or attribute names (looked up in
        ``output_names``, default the CelebA order); None = every output.
      upsample: resize to the image size with each cell at its receptive-field
        centre (True / "aligned": ``features_fn.cell_grid`` when declared),
        "half_pixel" (pytorch-grad-cam), a ``CellGrid``, or False (fmap size h x w).
      normalize: min-max normalise each map to [0, 1] (a map without
        activation is all 0), as ``compute_cams`` does.
      chunk_size: map over chunks of this many attributes instead of one vmap
        over all, bounding the [A, B, h, w, C] gradient memory.
      validate: raise ValueError on NaN/inf images (one scalar transfer per call).

    Returns the function; ``logits`` are those of the selected attributes, in
    the order of ``attributes``. Build it once: it compiles once per shape.
    """
    formula = cams_lib.resolve_cam_method(method)
    _check_options(mode, chunk_size)
    indices = resolve_attribute_indices(attributes, output_names)
    upsample = upsampling.resolve_upsample(upsample, features_fn)

    def cam_fn(images):
        cams_lib._check_images_static(images)
        maps, logits, finite = _attribute_cams_jit(
            jnp.asarray(images), features_fn=features_fn, head_fn=head_fn, formula=formula,
            mode=mode, attributes=indices, upsample=upsample, normalize=normalize,
            chunk_size=chunk_size)
        if validate and not bool(finite):
            raise ValueError("images hold NaN or inf values; expected finite pixel values")
        return maps, logits

    return cam_fn


def attribute_cams(features_fn: Callable[[Array], Array],
                   head_fn: Callable[[Array], Array],
                   images,
                   method: Union[str, CamFormula] = "grad_cam",
                   mode: str = "predicted",
                   attributes: AttributeSpec = None,
                   **options) -> tuple[Array, Array]:
    """CAMs of all (or the selected) attributes: (cams [B, A, H, W], logits [B, A]).

    One forward pass, then one head VJP per attribute (vmapped); see
    ``make_attribute_cam_fn`` for the options. Pass the same function objects
    on every call to reuse the compiled code.
    """
    return make_attribute_cam_fn(features_fn, head_fn, method, mode, attributes,
                                 **options)(images)


# --------------------------------------------------------------------------
# Mean CAM per attribute over positive and over negative predictions
# --------------------------------------------------------------------------

class CamSums(NamedTuple):
    """Running sums of CAMs split by the predicted class (a pytree; jit-friendly)."""

    positive_sum: Array  # float32 [A, H, W]
    positive_count: Array  # int32 [A]
    negative_sum: Array  # float32 [A, H, W]
    negative_count: Array  # int32 [A]


class CamMeans(NamedTuple):
    positive: np.ndarray  # [A, H, W] mean CAM over positive predictions (NaN if none)
    negative: np.ndarray  # [A, H, W] mean CAM over negative predictions (NaN if none)
    num_positive: np.ndarray  # [A] int
    num_negative: np.ndarray  # [A] int


def init_cam_sums(num_attributes: int, height: int, width: int) -> CamSums:
    """Empty running sums for ``accumulate_cam_sums``."""
    for name, value in (("num_attributes", num_attributes), ("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    zeros = jnp.zeros((num_attributes, height, width), jnp.float32)
    counts = jnp.zeros((num_attributes,), jnp.int32)
    return CamSums(zeros, counts, zeros, counts)


@jax.jit
def _accumulate(sums: CamSums, cams: Array, logits: Array, valid: Array) -> CamSums:
    positive = (logits >= 0) & valid  # z == 0 is positive, as in binary_target
    negative = (logits < 0) & valid
    cams = cams.astype(jnp.float32)
    return CamSums(
        sums.positive_sum + jnp.einsum("ba,bahw->ahw", positive.astype(jnp.float32), cams),
        sums.positive_count + jnp.sum(positive, axis=0, dtype=jnp.int32),
        sums.negative_sum + jnp.einsum("ba,bahw->ahw", negative.astype(jnp.float32), cams),
        sums.negative_count + jnp.sum(negative, axis=0, dtype=jnp.int32),
    )


def accumulate_cam_sums(sums: CamSums, cams, logits, valid=None) -> CamSums:
    """Add a batch: cams [B, A, H, W], logits [B, A] (positive iff z >= 0).

    ``valid`` (bool [B] or [B, A]) leaves images out, e.g. non-frontal faces
    or unknown targets. Jitted; no host transfer.
    """
    cams = jnp.asarray(cams)
    logits = jnp.asarray(logits)
    if cams.ndim != 4 or logits.shape != cams.shape[:2]:
        raise ValueError(
            f"cams must be [B, A, H, W] and logits [B, A]; got {cams.shape} and {logits.shape}")
    if cams.shape[1:] != sums.positive_sum.shape:
        raise ValueError(
            f"cams {cams.shape} do not match the running sums [A, H, W] = "
            f"{sums.positive_sum.shape}")
    if valid is None:
        valid = jnp.ones(logits.shape, bool)
    valid = jnp.asarray(valid, bool)
    if valid.ndim == 1:
        valid = valid[:, None]
    try:
        valid = jnp.broadcast_to(valid, logits.shape)
    except ValueError:
        raise ValueError(
            f"valid must be [B] or [B, A] = {logits.shape}; got {valid.shape}") from None
    return _accumulate(sums, cams, logits, valid)


def finalize_cam_means(sums: CamSums, names: Sequence[str] | None = None) -> CamMeans:
    """Means from the running sums; a side without images is NaN with a warning."""
    out = []
    for label, total, count in (("positive", sums.positive_sum, sums.positive_count),
                                ("negative", sums.negative_sum, sums.negative_count)):
        total = np.asarray(total, dtype=np.float64)
        count = np.asarray(count, dtype=np.int64)
        empty = count == 0
        if empty.any():
            which = ", ".join(names[i] if names is not None else str(i)
                              for i in np.flatnonzero(empty))
            warnings.warn(
                f"no {label}ly predicted images for attribute(s) {which}; their mean "
                f"{label} CAM is NaN", RuntimeWarning, stacklevel=2)
        mean = np.where(empty[:, None, None], np.nan,
                        total / np.maximum(count, 1)[:, None, None])
        out.extend([mean, count])
    return CamMeans(positive=out[0], negative=out[2], num_positive=out[1], num_negative=out[3])


def mean_cams_by_prediction(cams, logits, valid=None,
                            names: Sequence[str] | None = None) -> CamMeans:
    """Per attribute, the mean CAM over positive and over negative predictions.

    cams [B, A, H, W], logits [B, A] -> CamMeans (positive, negative [A, H, W],
    num_positive, num_negative [A]). For a whole test set stream instead:
    ``sums = init_cam_sums(A, H, W)``, then ``sums = accumulate_cam_sums(sums,
    cams, logits)`` per batch and ``finalize_cam_means(sums)``.
    """
    cams = jnp.asarray(cams)
    if cams.ndim != 4:
        raise ValueError(f"cams must be [B, A, H, W]; got shape {cams.shape}")
    sums = init_cam_sums(*cams.shape[1:])
    return finalize_cam_means(accumulate_cam_sums(sums, cams, logits, valid), names)
