"""Patch region classifier and the small confounded classifier (De Coninck et al.).

The region classifier predicts a label of the *whole* image (e.g. Male) from
one k x k patch plus a learned region indicator: an embedding of the patch's
grid position, reshaped to a k x k map and concatenated to the patch as a 4th
channel. Trained with one random patch per image per step, its confidence at
each grid position then says where the label's information lives
(`faceaudit_jax.explain.patches`).

`SmallConvNet` is the classifier of the debiasing experiment (three conv
layers with batch norm, dropout), trained on biased data with or without the
mask / noise augmentations of `faceaudit_jax.mitigation.noise`.

Backbones: "small" (`SmallPatchBackbone`, a fast conv stack for CPU) and
"resnet18" (`PatchResNet18`: torchvision-layout ResNet-18 built from
`faceaudit_jax.models.resnet.BasicBlock`, with its own 4-channel stem because
the shared `ResNetBackbone` takes 3-channel images).

Pure helpers (`grid_positions`, `crop_patches`, `sample_patches`) are
jit-friendly and shared with the sliding-window attribution; `PatchSampler`
is the region classifier's in-step augmentation for `train_lib.fit` (one
random grid patch per image). Both classifiers train through `train_lib.fit`;
this module adds only their optimiser recipes (optax transformations with the
papers' schedules).

Paper-scale settings (region classifier): 128 x 128 images, k = 32, a 49 x 49
grid (p = 2401, stride 2 px), ResNet-18, AdamW lr 1e-3 divided by 10 every 40
epochs, 90 epochs, batch 256, cross-entropy with label smoothing 0.1. See
`PATCH_NET_PAPER` and `CONFOUNDED_CLASSIFIER_PAPER`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from faceaudit_jax.models import resnet

Array = jax.Array

# The papers' hyper-parameters, for configs to start from (the configs
# themselves live under configs/).
PATCH_NET_PAPER: dict[str, Any] = {
    "image_size": 128,
    "patch_size": 32,
    "grid": 49,                 # 49 x 49 = 2401 positions, stride 2 px
    "backbone": "resnet18",
    "epochs": 90,
    "batch_size": 256,
    "learning_rate": 1e-3,      # AdamW
    "lr_decay_every_epochs": 40,
    "lr_decay_factor": 0.1,
    "label_smoothing": 0.1,
}
CONFOUNDED_CLASSIFIER_PAPER: dict[str, Any] = {
    "image_size": 128,
    "batch_size": 128,
    "learning_rate": 1e-5,      # AdamW
    "weight_decay": 1e-3,       # as in the authors' released training script
    "lr_decay_per_epoch": 0.95,  # exponential decay, stepped once per epoch
    "epochs_noise": 20,
    "epochs_mask": 10,
    "noise_std": 0.5,
    "quantiles": (0.6, 0.7, 0.8, 0.95),
}


# ---------------------------------------------------------------------------
# Grid positions and patch extraction (pure, jit-friendly)
# ---------------------------------------------------------------------------

def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from H (square) or (H, W); ValueError for anything else."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    return size  # type: ignore[return-value]


def grid_positions(image_size: int | Sequence[int], k: int, grid: int) -> np.ndarray:
    """Top-left corners of k x k patches on a `grid` x `grid` lattice spanning the image.

    Args:
      image_size: H (square) or (H, W).
      k: patch side in pixels.
      grid: positions per side, sqrt(p). The first patch touches the top-left
        corner and the last the bottom-right one; corners in between are
        evenly spaced and rounded to whole pixels (the paper's 128 px, k = 32,
        grid = 49 gives an exact stride of 2). grid = 1 gives the centred patch.

    Returns:
      int32 [p, 2] (x, y) corners, p = grid**2, in row-major order: position
      id = row * grid + col with row along y. Reshaping anything indexed by
      position id to [grid, grid] therefore gives an image-oriented map.

    Raises:
      ValueError: k < 1 or k larger than the image, grid < 1, or a grid with
        more positions per side than there are distinct pixel offsets
        (H - k + 1 or W - k + 1), which would repeat positions.
    """
    height, width = image_hw(image_size)
    k = int(k)
    grid = int(grid)
    if k < 1:
        raise ValueError(f"patch size k must be >= 1, got {k}")
    if k > height or k > width:
        raise ValueError(
            f"patch size k={k} is larger than the image ({height} x {width}); "
            "expected k <= min(H, W)")
    if grid < 1:
        raise ValueError(f"grid (positions per side) must be >= 1, got {grid}")
    max_grid = min(height - k, width - k) + 1
    if grid > max_grid:
        raise ValueError(
            f"a {grid} x {grid} grid of {k} px patches does not fit a "
            f"{height} x {width} image: at most {max_grid} distinct positions per "
            f"side (min(H, W) - k + 1)")

    def axis(extent: int) -> np.ndarray:
        if grid == 1:
            return np.array([(extent - k) // 2])
        return np.rint(np.linspace(0, extent - k, grid)).astype(np.int64)

    ys, xs = np.meshgrid(axis(height), axis(width), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.int32)


def crop_patches(images: Array, image_ids: Array, locations: Array, k: int) -> Array:
    """Gather k x k patches: patch n is images[image_ids[n]] at locations[n].

    Args:
      images: [B, H, W, C].
      image_ids: int [N], which image each patch comes from.
      locations: int [N, 2] (x, y) top-left corners. Corners are clamped so the
        patch stays inside the image (lax.dynamic_slice semantics).
      k: patch side (static).

    Returns:
      [N, k, k, C]. One XLA gather; no Python loop over patches.
    """
    channels = images.shape[-1]

    def one(image_id, xy):
        start = (image_id, xy[1], xy[0], 0)
        return jax.lax.dynamic_slice(images, start, (1, k, k, channels))[0]

    return jax.vmap(one)(image_ids, locations)


def sample_patches(key: Array, images: Array, k: int, positions: Array) -> tuple[Array, Array]:
    """One uniformly random grid patch per image (the region classifier's input).

    Args:
      key: PRNG key.
      images: [B, H, W, C].
      k: patch side (static).
      positions: int [p, 2] (x, y) corners, e.g. from `grid_positions`.

    Returns:
      (patches [B, k, k, C], position_ids int32 [B] indexing `positions`).
    """
    positions = jnp.asarray(positions, jnp.int32)
    batch = images.shape[0]
    position_ids = jax.random.randint(key, (batch,), 0, positions.shape[0], dtype=jnp.int32)
    patches = crop_patches(images, jnp.arange(batch), positions[position_ids], k)
    return patches, position_ids


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------

class SmallPatchBackbone(nn.Module):
    """A fast conv stack for CPU: 3x3 convs with batch norm, strides (1, 2, 2, ...).

    [N, k, k, C_in] -> logits [N, num_classes].
    """

    num_classes: int = 2
    widths: Sequence[int] = (32, 64, 128)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        for i, width in enumerate(self.widths):
            stride = 1 if i == 0 else 2
            x = nn.Conv(width, (3, 3), strides=(stride, stride), use_bias=False,
                        name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


class PatchResNet18(nn.Module):
    """ResNet-18 (torchvision layout) on the 4-channel patch + region-indicator input.

    The shared `resnet.ResNetBackbone` takes 3-channel images only, so this
    module reuses its `BasicBlock` with its own stem: the RGB channels are
    normalised with ImageNet's mean/std (as the authors' pipeline does), the
    indicator channel is left as is, then a 7x7 stride-2 conv, batch norm,
    3x3 stride-2 max pool, stages (2, 2, 2, 2) of widths (64, 128, 256, 512),
    global average pool and a dense layer. [N, k, k, 4] -> logits [N, classes].
    """

    num_classes: int = 2
    widths: Sequence[int] = (64, 128, 256, 512)
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        mean = jnp.asarray(resnet.IMAGENET_MEAN, x.dtype)
        std = jnp.asarray(resnet.IMAGENET_STD, x.dtype)
        x = jnp.concatenate([(x[..., :3] - mean) / std, x[..., 3:]], axis=-1)
        x = nn.Conv(self.widths[0], (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name="norm1")(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
            for index in range(num_blocks):
                stride = 2 if (stage > 1 and index == 0) else 1
                x = resnet.BasicBlock(features=int(width), strides=stride, norm="batch",
                                      name=f"layer{stage}_{index}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


class PatchNet(nn.Module):
    """Region classifier: k x k RGB patch + learned position channel -> image-label logits.

    Attributes:
      num_classes: classes of the image label (2 for gender).
      num_positions: p, the number of grid positions (size of the embedding table).
      patch_size: k.
      backbone: "small" (`SmallPatchBackbone`, for CPU) or "resnet18" (paper scale).
      widths: channel widths of the small backbone.

    Call: `model.apply(variables, patches [N, k, k, 3], position_ids int [N],
    train=False)` -> logits [N, num_classes].
    """

    num_classes: int = 2
    num_positions: int = 49 * 49
    patch_size: int = 32
    backbone: str = "small"
    widths: Sequence[int] = (32, 64, 128)

    def setup(self):
        if self.backbone == "small":
            self.net = SmallPatchBackbone(self.num_classes, tuple(self.widths))
        elif self.backbone == "resnet18":
            self.net = PatchResNet18(self.num_classes)
        else:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; expected 'small' or 'resnet18'")
        # The region indicator: one k*k map per grid position.
        self.position_embedding = nn.Embed(
            self.num_positions, self.patch_size * self.patch_size,
            embedding_init=nn.initializers.normal(stddev=0.1))

    def __call__(self, patches: Array, position_ids: Array, train: bool = False) -> Array:
        k = self.patch_size
        if patches.shape[1:3] != (k, k):
            raise ValueError(f"patches must be [N, {k}, {k}, C], got {patches.shape}")
        indicator = self.position_embedding(position_ids).reshape(-1, k, k, 1)
        x = jnp.concatenate([patches, indicator.astype(patches.dtype)], axis=-1)
        return self.net(x, train=train)


class SmallConvNet(nn.Module):
    """The debiasing experiment's classifier: three conv layers, batch norm, dropout.

    Each block: 3x3 conv -> batch norm -> ReLU -> 2x2 max pool -> dropout;
    then global average pooling, dropout and a dense layer.
    [B, H, W, 3] -> logits [B, num_classes].
    """

    num_classes: int = 2
    widths: Sequence[int] = (32, 64, 128)
    conv_dropout: float = 0.1
    head_dropout: float = 0.5

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> Array:
        x = images
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)


class PooledSmallConvNet(nn.Module):
    """`patch_net.SmallConvNet` behind an `input_pool` x `input_pool` average pool.

    The pool keeps the 128 px images (and the augmentations, applied before
    the model) while the convolutions run at 64 px: the CPU budget of this
    experiment. input_pool = 1 is the plain SmallConvNet.
    [B, H, W, 3] -> logits [B, num_classes].
    """

    num_classes: int = 2
    widths: Sequence[int] = (32, 64, 128)
    conv_dropout: float = 0.1
    head_dropout: float = 0.5
    input_pool: int = 1

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.input_pool > 1:
            window = (self.input_pool, self.input_pool)
            images = nn.avg_pool(images, window, strides=window)
        return SmallConvNet(self.num_classes, tuple(self.widths), self.conv_dropout,
                            self.head_dropout, name="net")(images, train=train)


# ---------------------------------------------------------------------------
# Training recipe: the papers' optimisers and the patch sampling of the region classifier
# ---------------------------------------------------------------------------

def patch_net_schedule(steps_per_epoch: int, learning_rate: float = 1e-3,
                       decay_every_epochs: int = 40, decay_factor: float = 0.1,
                       num_epochs: int = 90) -> optax.Schedule:
    """Step decay: lr divided by 1/decay_factor every `decay_every_epochs` epochs."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    boundaries = {
        epoch * steps_per_epoch: decay_factor
        for epoch in range(decay_every_epochs, max(num_epochs, 1), decay_every_epochs)
    }
    return optax.piecewise_constant_schedule(learning_rate, boundaries)


def patch_net_optimizer(steps_per_epoch: int, learning_rate: float = 1e-3,
                        weight_decay: float = 1e-2, decay_every_epochs: int = 40,
                        decay_factor: float = 0.1, num_epochs: int = 90
                        ) -> optax.GradientTransformation:
    """AdamW with the region classifier's step schedule.

    weight_decay defaults to 1e-2, PyTorch's AdamW default (the paper gives none).
    """
    schedule = patch_net_schedule(steps_per_epoch, learning_rate, decay_every_epochs,
                                  decay_factor, num_epochs)
    return optax.adamw(schedule, weight_decay=weight_decay)


def confounded_classifier_optimizer(steps_per_epoch: int, learning_rate: float = 1e-5,
                                    decay_per_epoch: float = 0.95,
                                    weight_decay: float = 1e-3
                                    ) -> optax.GradientTransformation:
    """AdamW with exponential decay stepped once per epoch (lr * 0.95**epoch)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    schedule = optax.exponential_decay(learning_rate, transition_steps=steps_per_epoch,
                                       decay_rate=decay_per_epoch, staircase=True)
    return optax.adamw(schedule, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class PatchSampler:
    """``augment_fn(key, batch) -> batch`` for ``train_lib.fit`` of a `PatchNet`: adds
    "patches" [B, k, k, 3] and "position_ids" int32 [B], one uniformly random grid patch
    of each batch["image"] [B, H, W, 3] (`sample_patches` over `grid_positions(image_size,
    patch_size, grid)`). Hashable by value: one compiled step per setting."""

    image_size: int | tuple[int, int]
    patch_size: int
    grid: int

    def __call__(self, key: Array, batch: Mapping[str, Array]) -> dict[str, Array]:
        positions = jnp.asarray(grid_positions(self.image_size, self.patch_size, self.grid))
        patches, position_ids = sample_patches(key, batch["image"], self.patch_size, positions)
        return {**batch, "patches": patches, "position_ids": position_ids}


@functools.lru_cache(maxsize=16)
def make_patch_apply_fn(model: PatchNet) -> Callable[[Mapping, Array, Array], Array]:
    """Eval-mode `apply_fn(variables, patches, position_ids)` -> logits.

    Pass it with `variables=train_lib.state_variables(state)` to
    `faceaudit_jax.explain.patches.confidence_maps`: the function object is
    memoised per (hashable) model, so repeated calls reuse one compilation.
    """

    def apply_fn(variables, patches, position_ids):
        return model.apply(variables, patches, position_ids, train=False)

    return apply_fn
