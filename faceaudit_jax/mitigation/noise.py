"""Attribution-guided mask / noise augmentation against a known confounder.

De Coninck et al. alter the training images where a confounder's attribution
is highest, so a classifier cannot lean on it:

- scope "general": one map for every image, the data set's mean attribution
  map (normalised to [0, 1]);
- scope "specific": each image's own map;
- mode "mask": the selected pixels are replaced by grey (0.5);
- mode "noise": Gaussian noise (mean 0, std 0.5, independent per pixel and
  channel) is added to the selected pixels, then the image is clipped to [0, 1].

The selection is "the top quantile q": the pixels whose attribution is at or
above the map's q-quantile, i.e. the top (1 - q) share. q = 0.7 alters the
30% most attributed pixels, q = 0.95 the top 5%. (The authors' code does
exactly this: `map > torch.quantile(map, q)`.) Here the share is exact: the
number of selected pixels is round((1 - q) * H * W), chosen by rank, so ties
in the map (e.g. flat regions) never change how much of the image is altered;
ties at the threshold go to the lower pixel index (row-major). q must lie in
(0, 1]; q = 1 selects nothing.

Everything is jittable with q, mode, scope, fill and std static, so the
augmentation runs inside a jitted train step.

For many runs with one compiled step, `quantile_selections` ranks each map once
(a sort per step costs as much as the CNN's update on a CPU) and
`make_selection_augment_fn` takes the selection and the mode (AUGMENT_NONE /
AUGMENT_NOISE / AUGMENT_MASK) as data; `SelectionAugment` and
`selection_batch_fn` are that augmentation and its batches for
`train_lib.fit(..., augment_fn=SelectionAugment(fill, std))`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.data import pipeline

Array = jax.Array

MODES = ("noise", "mask")
SCOPES = ("general", "specific")


def _check_quantile(q: float) -> float:
    try:
        q = float(q)
    except (TypeError, jax.errors.ConcretizationTypeError) as error:
        raise ValueError(f"quantile q must be a Python number in (0, 1], got {q!r}") from error
    if not (0.0 < q <= 1.0):  # also rejects NaN
        raise ValueError(f"quantile q must lie in (0, 1], got {q}")
    return q


def selected_count(num_pixels: int, q: float) -> int:
    """How many of `num_pixels` pixels the top quantile q selects: round((1 - q) * n)."""
    q = _check_quantile(q)
    return int(np.clip(np.rint((1.0 - q) * num_pixels), 0, num_pixels))


def quantile_mask(attribution: Array, q: float) -> Array:
    """Boolean selection of the top (1 - q) share of pixels of each map.

    Args:
      attribution: [H, W] or [B, H, W] (each map ranked on its own).
      q: quantile in (0, 1] (static).

    Returns:
      bool array of attribution's shape with exactly round((1 - q) * H * W)
      True pixels per map: those of highest attribution.
    """
    q = _check_quantile(q)
    attribution = jnp.asarray(attribution)
    if attribution.ndim not in (2, 3):
        raise ValueError(f"attribution must be [H, W] or [B, H, W], got shape {attribution.shape}")
    height, width = attribution.shape[-2:]
    num_pixels = height * width
    count = selected_count(num_pixels, q)
    flat = attribution.reshape(-1, num_pixels).astype(jnp.float32)
    # Rank of each pixel in descending order of attribution (stable: ties keep
    # index order); the first `count` ranks are the selection.
    order = jnp.argsort(-flat, axis=-1, stable=True)
    ranks = jnp.zeros_like(order).at[
        jnp.arange(flat.shape[0])[:, None], order].set(jnp.arange(num_pixels, dtype=order.dtype))
    return (ranks < count).reshape(attribution.shape)


def _broadcast_selection(images: Array, selection: Array) -> Array:
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if selection.shape not in (images.shape[1:3], images.shape[:3]):
        raise ValueError(
            f"selection must be [H, W] or [B, H, W] matching images {images.shape}, got "
            f"{selection.shape}")
    return selection[..., None].astype(bool)


def apply_mask(images: Array, selection: Array, fill: float = 0.5) -> Array:
    """Replace the selected pixels (all channels) by `fill` (grey by default).

    images [B, H, W, C] in [0, 1]; selection bool [H, W] or [B, H, W].
    """
    sel = _broadcast_selection(images, selection)
    return jnp.where(sel, jnp.asarray(fill, images.dtype), images)


def apply_noise(key: Array, images: Array, selection: Array, std: float = 0.5) -> Array:
    """Add N(0, std^2) noise to the selected pixels, then clip to [0, 1]."""
    sel = _broadcast_selection(images, selection)
    noise = std * jax.random.normal(key, images.shape, images.dtype)
    return jnp.where(sel, jnp.clip(images + noise, 0.0, 1.0), images)


@functools.partial(jax.jit, static_argnames=("q", "mode", "scope", "fill", "std"))
def _augment(key, images, attribution, q, mode, scope, fill, std):
    selection = quantile_mask(attribution, q)
    if mode == "mask":
        return apply_mask(images, selection, fill)
    return apply_noise(key, images, selection, std)


def augment(key: Array, images: Array, attribution: Array, q: float,
            mode: str = "noise", scope: str = "general",
            fill: float = 0.5, std: float = 0.5) -> Array:
    """One of the four augmentations, General/Specific x Mask/Noise.

    Args:
      key: PRNG key (used by mode "noise").
      images: [B, H, W, C] in [0, 1].
      attribution: scope "general": the data set's mean map [H, W];
        scope "specific": each image's own map [B, H, W].
      q: quantile in (0, 1]; the top (1 - q) share of pixels is altered.
      mode: "noise" or "mask". scope: "general" or "specific".
      fill: grey level of the mask. std: noise standard deviation.

    Returns:
      augmented images, same shape and dtype.
    """
    q = _check_quantile(q)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    expected = images.shape[1:3] if scope == "general" else images.shape[:3]
    if tuple(attribution.shape) != tuple(expected):
        what = "the data-set mean map [H, W]" if scope == "general" else "one map per image [B, H, W]"
        raise ValueError(
            f"scope {scope!r} needs {what} = {tuple(expected)}, got attribution of shape "
            f"{tuple(attribution.shape)}")
    return _augment(key, images, attribution, q, mode, scope, float(fill), float(std))


def make_augment_fn(q: float, mode: str = "noise", scope: str = "general",
                    fill: float = 0.5, std: float = 0.5) -> Callable[[Array, Array, Array], Array]:
    """`augment_fn(key, images, attribution)` with the settings bound (validated now).

    For a jitted step that augments inside (e.g. ``train_lib.make_train_step``'s hook).
    """
    q = _check_quantile(q)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")

    def augment_fn(key, images, attribution):
        return augment(key, images, attribution, q, mode, scope, fill, std)

    return augment_fn


# ----------------------------------------------------------------------------- runtime choice

# Runtime augmentation codes: the mode is data and the pixel selection is an input,
# so every run shares one compiled train step.
AUGMENT_NONE, AUGMENT_NOISE, AUGMENT_MASK = 0, 1, 2
MODE_CODES = {"noise": AUGMENT_NOISE, "mask": AUGMENT_MASK}


def quantile_selections(maps: np.ndarray, q: float, batch_size: int = 100) -> np.ndarray:
    """`quantile_mask` of every map, bool [N, H, W] (or [H, W] for one map).

    The selection of a map does not change during training, so it is computed
    once per run instead of once per step: ranking 16k pixels is a sort, and
    XLA's CPU sort per step cost as much as the CNN's forward and backward
    pass (measured 0.33 s vs 0.16 s per batch of 32 at 128 px).
    """
    q = _check_quantile(q)
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 2:
        return np.asarray(_quantile_mask_jit(jnp.asarray(maps), q))
    if maps.ndim != 3:
        raise ValueError(f"maps must be [H, W] or [N, H, W], got shape {maps.shape}")
    batch_size = int(min(batch_size, maps.shape[0]))
    out = []
    for idx, real in pipeline.padded_index_batches(maps.shape[0], batch_size):
        out.append(np.asarray(_quantile_mask_jit(jnp.asarray(maps[idx]), q))[:real])
    return np.concatenate(out)


def make_selection_augment_fn(fill: float = 0.5, std: float = 0.5) -> Callable:
    """`augment_fn(key, images, spec)` with the augmentation chosen at run time (the
    batch-level form for ``train_lib.fit`` is ``SelectionAugment``).

    spec: {"selection": bool [B, H, W], each image's top-(1 - q) pixels
    (`quantile_selections` of the general map, broadcast, or of the specific
    maps), "mode": int32 scalar, AUGMENT_NONE / AUGMENT_NOISE / AUGMENT_MASK}.
    The alteration is `mitigation.apply_noise` (N(0, std^2), clipped) or
    `apply_mask` (grey `fill`); `lax.switch` runs only the chosen branch. With
    selection = `quantile_mask(map, q)` this equals `augment(key,
    images, map, q, mode, scope)` for either scope.
    """

    def no_change(key, images, selection):
        return images

    def add_noise(key, images, selection):
        return apply_noise(key, images, selection, std)

    def grey_out(key, images, selection):
        return apply_mask(images, selection, fill)

    def augment_fn(key, images, spec):
        return jax.lax.switch(spec["mode"], (no_change, add_noise, grey_out),
                              key, images, spec["selection"])

    return augment_fn


@dataclasses.dataclass(frozen=True)
class SelectionAugment:
    """``augment_fn(key, batch) -> batch`` for ``train_lib.fit``: ``make_selection_augment_fn``
    on batch["image"] with batch["selection"] and batch["mode"] (see ``selection_batch_fn``).
    Hashable by value, so every run with the same fill / std shares one compiled step."""

    fill: float = 0.5
    std: float = 0.5

    def __call__(self, key: Array, batch: dict) -> dict:
        spec = {"selection": batch["selection"], "mode": batch["mode"]}
        return {**batch, "image": make_selection_augment_fn(self.fill, self.std)(key, batch["image"], spec)}


def selection_batch_fn(images_u8: np.ndarray, labels: np.ndarray, mode: int,
                       selection: np.ndarray | None, batch_size: int, seed: int) -> Callable[[int], dict]:
    """``batch_fn(step)`` of one augmented run: {"image", "label", "selection" bool [B, H, W], "mode"}.

    Args:
      images_u8: [N, H, W, 3]; labels: int [N]; rows as ``pipeline.array_batch_fn``.
      mode: AUGMENT_NONE, AUGMENT_NOISE or AUGMENT_MASK.
      selection: bool pixels to alter (``quantile_selections``): [H, W] for every
        image (broadcast once), [N, H, W] per image (gathered per batch), or None
        with AUGMENT_NONE.
    """
    n, height, width = np.shape(images_u8)[:3]
    if mode not in (AUGMENT_NONE, AUGMENT_NOISE, AUGMENT_MASK):
        raise ValueError(f"mode={mode!r}; expected AUGMENT_NONE, AUGMENT_NOISE or AUGMENT_MASK")
    if selection is None:
        if mode != AUGMENT_NONE:
            raise ValueError("an augmentation needs a pixel selection; got None")
        selection = np.zeros((height, width), bool)
    selection = np.asarray(selection)
    if selection.dtype != bool:
        raise ValueError(f"selection must be bool (from quantile_selections), got dtype {selection.dtype}")
    if selection.shape not in ((n, height, width), (height, width)):
        raise ValueError(f"selection must be [H, W] or [N, H, W] for images {np.shape(images_u8)}, "
                         f"got {selection.shape}")
    mode = jnp.asarray(mode, jnp.int32)
    if selection.ndim == 3:
        rows = pipeline.array_batch_fn(images_u8, batch_size, seed, label=labels, selection=selection)
        return lambda step: {**rows(step), "mode": mode}
    rows = pipeline.array_batch_fn(images_u8, batch_size, seed, label=labels)
    shared = jnp.broadcast_to(jnp.asarray(selection), (int(batch_size), height, width))
    return lambda step: {**rows(step), "selection": shared, "mode": mode}


_quantile_mask_jit = jax.jit(quantile_mask, static_argnums=1)
