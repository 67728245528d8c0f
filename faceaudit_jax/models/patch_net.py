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
jit-friendly and shared with the sliding-window attribution. The training
recipe functions build optax optimizers with the papers' schedules and jitted
train steps; they handle `batch_stats` (batch norm) and dropout keys
explicitly. The training loops over uint8 image arrays (`train_patch_net`,
`train_classifier` with `AugmentedBatches`, `recalibrate_batch_stats`) run
them with step-indexed batches and keys, so reruns repeat the same updates;
they do not go through `train_lib.fit` (their state is this module's
`TrainState`, their models are saved by `train_lib.save_variables`).

Paper-scale settings (region classifier): 128 x 128 images, k = 32, a 49 x 49
grid (p = 2401, stride 2 px), ResNet-18, AdamW lr 1e-3 divided by 10 every 40
epochs, 90 epochs, batch 256, cross-entropy with label smoothing 0.1. See
`PATCH_NET_PAPER` and `CONFOUNDED_CLASSIFIER_PAPER`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from faceaudit_jax.data import pipeline
from faceaudit_jax.mitigation import noise
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


# ---------------------------------------------------------------------------
# Training recipe
# ---------------------------------------------------------------------------

class TrainState(train_state.TrainState):
    """optax train state plus batch-norm statistics ({} for models without any)."""

    batch_stats: Any = None


def create_train_state(key: Array, model: nn.Module, example_inputs: Sequence[Array],
                       optimizer: optax.GradientTransformation) -> TrainState:
    """Initialise `model` on `example_inputs` (a tuple of positional inputs)."""
    params_key, dropout_key = jax.random.split(key)
    # One compiled init instead of op-by-op dispatch (much faster on CPU).
    init = jax.jit(lambda rngs, *inputs: model.init(rngs, *inputs, train=False))
    variables = init({"params": params_key, "dropout": dropout_key}, *example_inputs)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             tx=optimizer, batch_stats=variables.get("batch_stats", {}))


def state_variables(state: TrainState) -> dict[str, Any]:
    """The variables dict for `model.apply` (params, and batch_stats when present)."""
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


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


def smoothed_cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Mean softmax cross-entropy against integer labels with label smoothing."""
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
        if label_smoothing > 0 else jax.nn.one_hot(labels, num_classes)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _train_update(state: TrainState, inputs: tuple, labels: Array, dropout_key: Array,
                  label_smoothing: float) -> tuple[TrainState, dict[str, Array]]:
    """One gradient step of `state.apply_fn(*inputs, train=True)` on cross-entropy."""
    has_stats = bool(state.batch_stats)

    def loss_fn(params):
        variables = {"params": params}
        if has_stats:
            variables["batch_stats"] = state.batch_stats
            logits, updates = state.apply_fn(variables, *inputs, train=True,
                                             rngs={"dropout": dropout_key},
                                             mutable=["batch_stats"])
        else:
            logits = state.apply_fn(variables, *inputs, train=True,
                                    rngs={"dropout": dropout_key})
            updates = {}
        loss = smoothed_cross_entropy(logits, labels, label_smoothing)
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    if has_stats:
        state = state.replace(batch_stats=updates["batch_stats"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"loss": loss, "accuracy": accuracy}


def make_patch_train_step(positions: Array, patch_size: int, label_smoothing: float = 0.1
                          ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """Jitted region-classifier step: one random grid patch per image, smoothed CE.

    Returns `train_step(state, images [B, H, W, 3], labels int [B], key)` ->
    (state, {"loss", "accuracy"}). The patch sampling runs inside the jit.
    """
    positions = jnp.asarray(positions, jnp.int32)

    @jax.jit
    def train_step(state, images, labels, key):
        patch_key, dropout_key = jax.random.split(key)
        patches, position_ids = sample_patches(patch_key, images, patch_size, positions)
        return _train_update(state, (patches, position_ids), labels, dropout_key,
                             label_smoothing)

    return train_step


def make_classifier_train_step(augment_fn: Optional[Callable[..., Array]] = None,
                               label_smoothing: float = 0.0
                               ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """Jitted step for a whole-image classifier (e.g. `SmallConvNet`).

    Args:
      augment_fn: optional `augment_fn(key, images, attribution) -> images`
        applied inside the jit before the forward pass, e.g.
        `faceaudit_jax.mitigation.noise.make_augment_fn(q, mode, scope)`.
      label_smoothing: 0 by default (plain cross-entropy).

    Returns `train_step(state, images [B, H, W, 3], labels int [B], key,
    attribution=None)` -> (state, {"loss", "accuracy"}). `attribution` is the
    data-set mean map [H, W] (general scope) or the batch's own maps
    [B, H, W] (specific scope).
    """

    @jax.jit
    def train_step(state, images, labels, key, attribution=None):
        augment_key, dropout_key = jax.random.split(key)
        if augment_fn is not None:
            images = augment_fn(augment_key, images, attribution)
        return _train_update(state, (images,), labels, dropout_key, label_smoothing)

    return train_step


def make_patch_apply_fn(model: PatchNet) -> Callable[[Mapping, Array, Array], Array]:
    """Eval-mode `apply_fn(variables, patches, position_ids)` -> logits.

    Pass it with `variables=state_variables(state)` to
    `faceaudit_jax.explain.patches.confidence_maps`: the function object is
    stable, so repeated calls reuse one compilation.
    """

    def apply_fn(variables, patches, position_ids):
        return model.apply(variables, patches, position_ids, train=False)

    return apply_fn


def make_predict_fn(model: nn.Module) -> Callable[[Mapping, Array], Array]:
    """Jitted eval-mode `predict(variables, images)` -> logits for a whole-image model."""

    @jax.jit
    def predict(variables, images):
        return model.apply(variables, images, train=False)

    return predict


# ---------------------------------------------------------------------------
# Training loops over uint8 image arrays (the noise-debiasing experiment)
# ---------------------------------------------------------------------------

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


def train_patch_net(train_step: Callable, init_variables: Any, model: PatchNet,
                    optimizer: optax.GradientTransformation, images_u8: np.ndarray,
                    labels: np.ndarray, *, batch_size: int, epochs: int, key: jax.Array,
                    seed: int) -> tuple[TrainState, list[dict]]:
    """The region classifier: one random grid patch per image per step (inside the jit).

    Args:
      train_step: `patch_net.make_patch_train_step(positions, k, label_smoothing)`.
      init_variables: the initial variables of `model` (params, batch_stats).
      optimizer: e.g. `patch_net.patch_net_optimizer(steps_per_epoch, ...)`.
      images_u8: [N, H, W, 3]; labels: int [N] (the confounder, 0/1).
      key: randomness of the patch positions and dropout; seed: batch order.

    Returns:
      (state, per-epoch history of mean loss / accuracy).
    """
    batch_size, epochs = int(batch_size), int(epochs)
    per_epoch = pipeline.steps_per_epoch(images_u8.shape[0], batch_size)
    state = with_array_step(TrainState.create(
        apply_fn=model.apply, params=init_variables["params"], tx=optimizer,
        batch_stats=init_variables.get("batch_stats", {})))
    order = np.arange(images_u8.shape[0])
    history = []
    for epoch in range(epochs):
        metrics = []
        for within in range(per_epoch):
            step = epoch * per_epoch + within
            idx = pipeline.step_indices(order, batch_size, seed, step)
            state, m = train_step(state, pipeline.uint8_to_float(images_u8[idx]), jnp.asarray(labels[idx]),
                                  jax.random.fold_in(key, step))
            metrics.append(m)
        mean = jax.device_get(jax.tree_util.tree_map(lambda *x: jnp.mean(jnp.stack(x)), *metrics))
        history.append({"epoch": epoch + 1, "loss": float(mean["loss"]),
                        "accuracy": float(mean["accuracy"])})
    return state, history


def with_array_step(state: TrainState) -> TrainState:
    """TrainState.create starts `step` as the Python int 0, a weakly typed jit input;
    the step returns an int32 array, so the second call would compile the train step
    again. Starting from an int32 array keeps one compilation."""
    return state.replace(step=jnp.zeros((), jnp.int32))


class AugmentedBatches:
    """Training batches of one run: (images, labels, augmentation spec) of step `step`.

    The spec is the `make_selection_augment_fn` input: {"selection": bool
    [B, H, W], "mode"}. A shared [H, W] selection is broadcast once; per-image
    selections are gathered per batch.
    """

    def __init__(self, images_u8: np.ndarray, labels: np.ndarray, mode: int,
                 selection: Optional[np.ndarray], batch_size: int, seed: int):
        n = images_u8.shape[0]
        height, width = images_u8.shape[1:3]
        self.batch_size = int(batch_size)
        self.steps_per_epoch = pipeline.steps_per_epoch(n, self.batch_size)
        if mode not in (noise.AUGMENT_NONE, noise.AUGMENT_NOISE, noise.AUGMENT_MASK):
            raise ValueError(f"mode={mode!r}; expected AUGMENT_NONE, AUGMENT_NOISE or "
                             "AUGMENT_MASK (mitigation.noise)")
        if selection is None:
            if mode != noise.AUGMENT_NONE:
                raise ValueError("an augmentation needs a pixel selection; got None")
            selection = np.zeros((height, width), bool)
        selection = np.asarray(selection)
        if selection.dtype != bool:
            raise ValueError(f"selection must be bool (from quantile_selections), got dtype "
                             f"{selection.dtype}")
        self.per_image = selection.shape == images_u8.shape[:3]
        if not self.per_image and selection.shape != (height, width):
            raise ValueError(f"selection must be [H, W] or [N, H, W] for images "
                             f"{images_u8.shape}, got {selection.shape}")
        self.shared = None if self.per_image else jnp.broadcast_to(
            jnp.asarray(selection), (self.batch_size, height, width))
        self.images_u8, self.labels, self.selection = images_u8, labels, selection
        self.mode = jnp.asarray(mode, jnp.int32)
        self.seed = int(seed)
        self.order = np.arange(n)

    def __call__(self, step: int) -> tuple[jax.Array, jax.Array, dict]:
        idx = pipeline.step_indices(self.order, self.batch_size, self.seed, step)
        selection = jnp.asarray(self.selection[idx]) if self.per_image else self.shared
        return (pipeline.uint8_to_float(self.images_u8[idx]), jnp.asarray(self.labels[idx]),
                {"selection": selection, "mode": self.mode})


def train_classifier(train_step: Callable, state: TrainState, images_u8: np.ndarray,
                     labels: np.ndarray, mode: int, selection: Optional[np.ndarray], *,
                     batch_size: int, epochs: int, seed: int, key: jax.Array
                     ) -> tuple[TrainState, list[dict]]:
    """Train a whole-image classifier with `train_step` =
    `patch_net.make_classifier_train_step(make_selection_augment_fn(...))`.

    Args:
      mode: noise.AUGMENT_NONE, noise.AUGMENT_NOISE or noise.AUGMENT_MASK.
      selection: bool, the pixels to alter (`quantile_selections`): [H, W] for
        every image (general scope), [N, H, W] per training image (specific
        scope; each batch gets its own rows), or None with noise.AUGMENT_NONE.
      seed: batch order (`pipeline.step_indices`: epoch-wise shuffles, the
        same for every run, so runs differ only in what they are asked to vary).

    Returns (state, per-epoch mean loss / accuracy).
    """
    batches = AugmentedBatches(images_u8, labels, mode, selection, batch_size, seed)
    history = []
    for epoch in range(int(epochs)):
        metrics = []
        for within in range(batches.steps_per_epoch):
            step = epoch * batches.steps_per_epoch + within
            images, batch_labels, spec = batches(step)
            state, m = train_step(state, images, batch_labels, jax.random.fold_in(key, step),
                                  spec)
            metrics.append(m)
        mean = jax.device_get(jax.tree_util.tree_map(lambda *x: jnp.mean(jnp.stack(x)), *metrics))
        history.append({"epoch": epoch + 1, "loss": float(mean["loss"]),
                        "accuracy": float(mean["accuracy"])})
    return state, history


def make_batch_stats_step(model: nn.Module, augment_fn: Callable) -> Callable:
    """Jitted `stats_step(variables, images, key, spec)` -> the batch-norm statistics
    after one train-mode forward pass (no gradient) on the augmented batch."""

    @jax.jit
    def stats_step(variables, images, key, spec):
        augment_key, dropout_key = jax.random.split(key)
        images = augment_fn(augment_key, images, spec)
        _, updates = model.apply(variables, images, train=True, rngs={"dropout": dropout_key},
                                 mutable=["batch_stats"])
        return updates["batch_stats"]

    return stats_step


def recalibrate_batch_stats(stats_step: Callable, variables: dict, images_u8: np.ndarray,
                            labels: np.ndarray, mode: int, selection: Optional[np.ndarray], *,
                            batch_size: int, passes: int, seed: int, key: jax.Array) -> dict:
    """Re-estimate the batch-norm running statistics with the final weights.

    The running averages (momentum 0.9) trail the weights; with the large
    learning rate this CPU budget needs they lag enough to flip the eval-mode
    predictions of the small CNN (measured: train-mode accuracy 0.84, eval-mode
    0.53 with every face called a man). `passes` epochs of the run's own
    (augmented) training batches with the weights frozen bring them to the
    final weights' statistics (the old values decay by 0.9 per batch).

    Returns the variables with the new batch_stats (params unchanged).
    """
    if passes <= 0 or "batch_stats" not in variables:
        return variables
    batches = AugmentedBatches(images_u8, labels, mode, selection, batch_size, seed)
    variables = dict(variables)
    for step in range(int(passes) * batches.steps_per_epoch):
        images, _, spec = batches(step)
        variables["batch_stats"] = stats_step(variables, images, jax.random.fold_in(key, step),
                                              spec)
    return variables


def predict_labels(predict: Callable, variables: Any, images_u8: np.ndarray,
                   batch_size: int) -> np.ndarray:
    """Argmax class per image, int [N], in fixed-shape batches."""
    batch_size = int(min(batch_size, images_u8.shape[0]))
    out = []
    for idx, real in pipeline.padded_index_batches(images_u8.shape[0], batch_size):
        logits = predict(variables, pipeline.uint8_to_float(images_u8[idx]))
        out.append(np.asarray(jnp.argmax(logits, -1))[:real])
    return np.concatenate(out).astype(np.int32)


def variables_template(model: nn.Module, inputs: tuple) -> dict:
    """Shapes of a model's variables (params, batch_stats) without running or compiling
    its initialiser: the target structure for restoring saved variables."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    shapes = jax.eval_shape(lambda: model.init(rngs, *inputs, train=False))
    return {k: v for k, v in shapes.items() if k in ("params", "batch_stats") and v}
