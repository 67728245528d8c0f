"""Flax ResNets: torchvision-layout ResNet-18/34/50 and a small fast ResNet for CPU runs.

Every classifier here is split into a backbone and a head, because the CAM code
differentiates the head only with respect to the last feature map (a CAM then
costs about one forward pass):

- ``ResNetClassifier.features(x, train=False)`` -> fmap [B, h, w, C], the output
  of the last conv stage before pooling;
- ``ResNetClassifier.head(fmap)`` -> logits [B, num_outputs]: global average
  pool + Dense, so it works for any spatial size (FaceX explains at a higher
  resolution than it trains);
- ``features(x, stage=s)`` / ``head(fmap, stage=s)`` split the same network
  after stage s (1..4, torchvision's ``layer1``..``layer4``) instead: the head
  then runs the later stages too. A CAM on stage 3 has twice the resolution of
  one on stage 4 (pytorch-grad-cam's ``target_layers=[model.layer3]``);
- ``ResNetClassifier.__call__(x, train=False)`` -> (logits, aux) with
  ``aux["fmap"]`` [B, h, w, C] and ``aux["pooled"]`` [B, C].

Inputs are float images in [0, 1], [B, H, W, 3]; the model normalises them with
per-channel mean/std constants (ImageNet's by default), so callers never do.

Pure helpers: ``build_model(name, num_outputs, **kw)``,
``init_variables(model, key, image_size)``, ``classifier_fns(model, variables)``
(eval-mode closures with the variables bound, what ``explain.cams`` consumes)
and ``build_backbone(name, **kw)`` for modules (e.g. a face embedder) that put
their own head on the same backbone.

Parameter naming (regular on purpose, so torchvision weights can be imported):

==========================================  =========================================
torchvision state_dict key                  Flax variable path (classifier)
==========================================  =========================================
``conv1.weight`` [O, I, 7, 7]               ``params/backbone/conv1/kernel`` [7, 7, I, O]
``bn1.{weight,bias}``                       ``params/backbone/norm1/{scale,bias}``
``bn1.{running_mean,running_var}``          ``batch_stats/backbone/norm1/{mean,var}``
``layer{s}.{b}.conv{k}.weight``             ``params/backbone/layer{s}_{b}/conv{k}/kernel``
``layer{s}.{b}.bn{k}.*``                    ``.../layer{s}_{b}/norm{k}/*`` (as bn1)
``layer{s}.{b}.downsample.0.weight``        ``params/backbone/layer{s}_{b}/downsample_conv/kernel``
``layer{s}.{b}.downsample.1.*``             ``.../layer{s}_{b}/downsample_norm/*`` (as bn1)
``fc.weight`` [K, C], ``fc.bias`` [K]       ``params/fc/kernel`` [C, K], ``params/fc/bias``
==========================================  =========================================

Conv kernels go from OIHW to HWIO (``w.transpose(2, 3, 1, 0)``), the Dense
kernel is transposed; stage index s counts from 1 and block index b from 0, as
in torchvision. Padding is explicit (3 for the 7x7 stem, 1 for 3x3 convs and
the max pool, none for 1x1) and the bottleneck strides on its 3x3 conv
(torchvision's "ResNet v1.5"), so an imported network computes the same
function. BatchNorm uses torchvision's eps 1e-5 and momentum 0.1 (Flax
momentum 0.9). With ``norm="group"`` the same paths hold GroupNorm parameters
and there are no ``batch_stats``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import jax.numpy as jnp
import flax.linen as nn

from faceaudit_jax.explain.upsampling import CellGrid, compose_layers

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

NORM_KINDS = ("batch", "group")
BLOCK_KINDS = ("basic", "bottleneck")
STEM_KINDS = ("imagenet", "small")

# He-normal with fan_out, as torchvision initialises its ResNet convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _make_norm(kind: str, num_groups: int, train: bool, dtype: Any, name: str) -> nn.Module:
    """One normalisation layer; ``kind`` is "batch" or "group" (validated upstream)."""
    if kind == "batch":
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
        )
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, name=name)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torchvision's symmetric padding k // 2 (so odd sizes round like torch)."""
    return ((k // 2, k // 2), (k // 2, k // 2))


class _ResidualBlock(nn.Module):
    """A residual branch plus its shortcut: a strided 1x1 conv + norm where the
    shape changes, else the identity. Subclasses give the branch and ``expansion``
    (output channels = ``features * expansion``)."""

    features: int
    strides: int = 1
    norm: str = "batch"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    expansion = 1

    @nn.nowrap
    def branch(self, x: jax.Array, conv, norm) -> jax.Array:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(_make_norm, self.norm, self.norm_groups, train, self.dtype)
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init, dtype=self.dtype)
        out_features = self.features * self.expansion
        y = self.branch(x, conv, norm)
        residual = x
        if self.strides != 1 or x.shape[-1] != out_features:
            residual = conv(out_features, (1, 1), (self.strides, self.strides), padding="VALID",
                            name="downsample_conv")(x)
            residual = norm(name="downsample_norm")(residual)
        return nn.relu(y + residual)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs with a residual connection (ResNet-18/34). Output channels = ``features``."""

    expansion = 1

    @nn.nowrap
    def branch(self, x: jax.Array, conv, norm) -> jax.Array:
        stride = (self.strides, self.strides)
        y = conv(self.features, (3, 3), stride, padding=_pad(3), name="conv1")(x)
        y = nn.relu(norm(name="norm1")(y))
        y = conv(self.features, (3, 3), padding=_pad(3), name="conv2")(y)
        return norm(name="norm2")(y)


class BottleneckBlock(_ResidualBlock):
    """1x1 -> 3x3 (strided) -> 1x1 convs (ResNet-50). Output channels = 4 * ``features``."""

    expansion = 4

    @nn.nowrap
    def branch(self, x: jax.Array, conv, norm) -> jax.Array:
        stride = (self.strides, self.strides)
        y = conv(self.features, (1, 1), padding="VALID", name="conv1")(x)
        y = nn.relu(norm(name="norm1")(y))
        y = conv(self.features, (3, 3), stride, padding=_pad(3), name="conv2")(y)
        y = nn.relu(norm(name="norm2")(y))
        y = conv(self.features * self.expansion, (1, 1), padding="VALID", name="conv3")(y)
        return norm(name="norm3")(y)


_BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


def _check_images(x: jax.Array) -> None:
    """Shape/dtype checks that run at trace time (static information only)."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape [B, H, W, 3], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"expected float images in [0, 1], got dtype {x.dtype}; convert uint8 images with x / 255"
        )


class ResNetBackbone(nn.Module):
    """Normalise [0, 1] images, then stem + residual stages -> last feature map [B, h, w, C].

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      widths: base channel width per stage (block outputs are width * expansion).
      block: "basic" or "bottleneck".
      stem: "imagenet" (7x7 stride-2 conv + 3x3 stride-2 max pool, total stride 32
        with the usual stage strides) or "small" (one 3x3 stride-2 conv, no pool).
      stem_width: channels of the stem conv.
      stage_strides: stride of the first block of each stage.
      norm: "batch" (carries ``batch_stats``) or "group".
      norm_groups: GroupNorm groups (must divide every normalised width).
      mean, std: per-channel constants for input normalisation.
      dtype: computation dtype (parameters stay float32).
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int] = (64, 128, 256, 512)
    block: str = "basic"
    stem: str = "imagenet"
    stem_width: int = 64
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    norm: str = "batch"
    norm_groups: int = 32
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    dtype: Any = jnp.float32

    @property
    def out_channels(self) -> int:
        return int(self.widths[-1]) * _BLOCKS[self.block].expansion

    @property
    def total_stride(self) -> int:
        stem_stride = 4 if self.stem == "imagenet" else 2
        stride = stem_stride
        for s in self.stage_strides:
            stride *= s
        return stride

    def check_stage(self, stage: Optional[int]) -> int:
        """``stage`` (None: the last) as an int in 1..len(stage_sizes); ValueError otherwise."""
        last = len(self.stage_sizes)
        if stage is None:
            return last
        if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 1 <= stage <= last:
            raise ValueError(f"stage={stage!r}; expected a ResNet stage 1..{last} "
                             f"(torchvision's layer1..layer{last}) or None for the last")
        return int(stage)

    def layer_geometry(self, stage: Optional[int] = None) -> tuple[tuple[int, int, int], ...]:
        """(kernel, stride, pad_before) of the convs and pools on the path from the
        image to stage ``stage``'s output (None: the last feature map), in order
        (one spatial axis; both are alike).

        Residual shortcuts are left out: a 1x1 unpadded stride-s shortcut reads
        input s * j, the same centre as its block's 3x3 conv padded by 1.
        """
        layers = [(7, 2, 3), (3, 2, 1)] if self.stem == "imagenet" else [(3, 2, 1)]
        block = _BLOCKS[self.block]
        last = self.check_stage(stage)
        for num_blocks, stage_stride in zip(self.stage_sizes[:last], self.stage_strides[:last]):
            for index in range(num_blocks):
                stride = int(stage_stride) if index == 0 else 1
                if block is BasicBlock:
                    layers += [(3, stride, 1), (3, 1, 1)]
                else:
                    layers += [(1, 1, 0), (3, stride, 1), (1, 1, 0)]
        return tuple(layers)

    def cell_grid(self, stage: Optional[int] = None) -> CellGrid:
        """Receptive-field centres of stage ``stage``'s (None: the last) feature cells in pixels.

        Exact (derived from ``layer_geometry``): every layer is padded
        symmetrically, so cell j sits at pixel ``total_stride * j`` on both
        axes (not at total_stride * j + total_stride / 2 - 0.5, where
        half-pixel resizing would put it).
        """
        offset, stride = compose_layers(self.layer_geometry(stage))
        return CellGrid((offset, offset), (stride, stride))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, after_stage: int = 0,
                 stop_stage: Optional[int] = None) -> jax.Array:
        """Images [B, H, W, 3] -> stage ``stop_stage``'s output (None: the last).

        ``after_stage`` = s > 0 starts from stage s's output instead of the
        images (stem and stages 1..s skipped), so that
        ``backbone(backbone(x, stop_stage=s), after_stage=s)`` is ``backbone(x)``.
        """
        stop = self.check_stage(stop_stage)
        if after_stage:
            self.check_stage(after_stage)
        norm = functools.partial(_make_norm, self.norm, self.norm_groups, train, self.dtype)
        if not after_stage:
            x = self._stem(x, norm)
        block_cls = _BLOCKS[self.block]
        for stage, (num_blocks, width, stage_stride) in enumerate(
            zip(self.stage_sizes, self.widths, self.stage_strides), start=1
        ):
            if not after_stage < stage <= stop:
                continue
            for index in range(num_blocks):
                x = block_cls(
                    features=int(width),
                    strides=int(stage_stride) if index == 0 else 1,
                    norm=self.norm,
                    norm_groups=self.norm_groups,
                    dtype=self.dtype,
                    name=f"layer{stage}_{index}",
                )(x, train=train)
        return x

    def _stem(self, x: jax.Array, norm) -> jax.Array:
        _check_images(x)
        mean = jnp.asarray(self.mean, dtype=jnp.float32)
        std = jnp.asarray(self.std, dtype=jnp.float32)
        x = ((x.astype(jnp.float32) - mean) / std).astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.Conv(self.stem_width, (7, 7), (2, 2), padding=_pad(7), use_bias=False,
                        kernel_init=_conv_init, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(norm(name="norm1")(x))
            # Flax pads max pools with -inf, like torch's implicit padding.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        else:
            x = nn.Conv(self.stem_width, (3, 3), (2, 2), padding=_pad(3), use_bias=False,
                        kernel_init=_conv_init, dtype=self.dtype, name="conv1")(x)
            x = nn.relu(norm(name="norm1")(x))
        return x


def global_average_pool(fmap: jax.Array) -> jax.Array:
    """[B, h, w, C] -> [B, C], mean over the spatial axes (any h, w)."""
    return jnp.mean(fmap, axis=(1, 2))


class ResNetClassifier(nn.Module):
    """Backbone + global average pool + Dense; see the module docstring for the methods.

    ``backbone`` is an (unbound) ``ResNetBackbone``; Flax adopts it as the
    submodule "backbone". ``dropout_rate`` applies dropout to the pooled
    features in training only (rng name "dropout"). ``dtype`` is the Dense's
    computation dtype; logits are returned as float32.
    """

    num_outputs: int
    backbone: ResNetBackbone
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        self.dropout = nn.Dropout(rate=self.dropout_rate)
        self.fc = nn.Dense(self.num_outputs, dtype=self.dtype)

    def features(self, x: jax.Array, train: bool = False, stage: Optional[int] = None) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] -> conv stage ``stage``'s output [B, h, w, C]
        (None: the last stage)."""
        return self.backbone(x, train=train, stop_stage=stage)

    def _pooled_to_logits(self, pooled: jax.Array, train: bool) -> jax.Array:
        pooled = self.dropout(pooled, deterministic=not train)
        return self.fc(pooled).astype(jnp.float32)

    def head(self, fmap: jax.Array, train: bool = False, stage: Optional[int] = None) -> jax.Array:
        """fmap [B, h, w, C] (any h, w) of stage ``stage`` (None: the last) -> logits
        [B, num_outputs] (float32), through the later stages when there are any."""
        last = self.backbone.check_stage(None)
        if stage is not None and self.backbone.check_stage(stage) < last:
            fmap = self.backbone(fmap, train=train, after_stage=stage)
        return self._pooled_to_logits(global_average_pool(fmap), train)

    def __call__(self, x: jax.Array, train: bool = False):
        """Images -> (logits [B, num_outputs], {"fmap": [B, h, w, C], "pooled": [B, C]})."""
        fmap = self.features(x, train=train)
        pooled = global_average_pool(fmap)
        logits = self._pooled_to_logits(pooled, train)
        return logits, {"fmap": fmap, "pooled": pooled}


def _imagenet_resnet(stage_sizes: tuple[int, ...], block: str) -> dict:
    """torchvision's ResNet layout (same field order as every entry, for stable JSON)."""
    return dict(stage_sizes=stage_sizes, widths=(64, 128, 256, 512), block=block,
                stem="imagenet", stem_width=64, stage_strides=(1, 2, 2, 2), norm="batch",
                norm_groups=32)


# name -> ResNetBackbone fields (norm and GroupNorm groups included)
_ARCHITECTURES: dict[str, dict] = {
    "small_resnet": dict(
        stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128), block="basic", stem="small",
        stem_width=16, stage_strides=(1, 2, 2, 2), norm="group", norm_groups=8,
    ),
    "resnet18": _imagenet_resnet((2, 2, 2, 2), "basic"),
    "resnet34": _imagenet_resnet((3, 4, 6, 3), "basic"),
    "resnet50": _imagenet_resnet((3, 4, 6, 3), "bottleneck"),
}
MODEL_NAMES: tuple[str, ...] = tuple(_ARCHITECTURES)


def backbone_kwargs(name: str, **overrides) -> dict:
    """The ``ResNetBackbone`` fields of a named architecture, with validated overrides.

    Overridable: norm, norm_groups, mean, std, widths, stem_width. Raises
    ValueError for an unknown name, norm, or a GroupNorm that does not divide
    the widths.
    """
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model name {name!r}; expected one of {list(MODEL_NAMES)}")
    allowed = {"norm", "norm_groups", "mean", "std", "widths", "stem_width"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown backbone option(s) {unknown}; expected some of {sorted(allowed)}")
    kwargs = dict(_ARCHITECTURES[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if kwargs["norm"] not in NORM_KINDS:
        raise ValueError(f"unknown norm {kwargs['norm']!r}; expected one of {list(NORM_KINDS)}")
    for key in ("mean", "std"):
        values = tuple(float(v) for v in kwargs.get(key, IMAGENET_MEAN if key == "mean" else IMAGENET_STD))
        if len(values) != 3:
            raise ValueError(f"{key} must have 3 per-channel values, got {values}")
        if key == "std" and min(values) <= 0:
            raise ValueError(f"std must be positive, got {values}")
        kwargs[key] = values
    kwargs["widths"] = tuple(int(w) for w in kwargs["widths"])
    kwargs["stage_sizes"] = tuple(kwargs["stage_sizes"])
    kwargs["stage_strides"] = tuple(kwargs["stage_strides"])
    if kwargs["norm"] == "group":
        expansion = _BLOCKS[kwargs["block"]].expansion
        normalised = {int(kwargs["stem_width"])} | set(kwargs["widths"]) | {w * expansion for w in kwargs["widths"]}
        bad = sorted(w for w in normalised if w % int(kwargs["norm_groups"]) != 0)
        if bad:
            raise ValueError(
                f"norm_groups={kwargs['norm_groups']} must divide every normalised width; "
                f"it does not divide {bad}"
            )
    return kwargs


def build_backbone(name: str, dtype: Any = jnp.float32, **overrides) -> ResNetBackbone:
    """A ``ResNetBackbone`` for a named architecture (see ``backbone_kwargs``)."""
    return ResNetBackbone(**backbone_kwargs(name, **overrides), dtype=dtype)


def build_model(
    name: str,
    num_outputs: int,
    *,
    norm: str | None = None,
    norm_groups: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    widths: Sequence[int] | None = None,
    stem_width: int | None = None,
    dropout_rate: float = 0.0,
    dtype: Any = jnp.float32,
) -> ResNetClassifier:
    """A ``ResNetClassifier`` by name: "small_resnet", "resnet18", "resnet34", "resnet50".

    Defaults: torchvision ResNets use BatchNorm (norm="batch") so torchvision
    weights can be imported; small_resnet uses GroupNorm with 8 groups.
    ``num_outputs`` is the number of logits (1 for a single-logit binary
    classifier, 40 for all CelebA attributes).
    """
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}")
    if not 0.0 <= float(dropout_rate) < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    backbone = build_backbone(
        name, dtype=dtype, norm=norm, norm_groups=norm_groups, mean=mean, std=std, widths=widths,
        stem_width=stem_width,
    )
    return ResNetClassifier(num_outputs=num_outputs, backbone=backbone, dropout_rate=float(dropout_rate), dtype=dtype)


def _image_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        hw = (image_size, image_size)
    else:
        try:
            hw = tuple(int(s) for s in image_size)
        except TypeError:
            hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return hw


def init_variables(model: nn.Module, key: jax.Array, image_size) -> dict:
    """Initialise ``model`` for [1, H, W, 3] inputs; returns {"params", ["batch_stats"]}.

    ``image_size`` is an int (square) or (H, W). Initialisation is jitted (and
    the jitted function memoised per module) so the large ResNets do not run op
    by op and re-initialising does not recompile. Works for any Flax module
    whose ``init(key, x, train=False)`` takes images.
    """
    h, w = _image_hw(image_size)
    dummy = jnp.zeros((1, h, w, 3), jnp.float32)
    try:
        init_fn = _jitted_init(model)
    except TypeError:  # unhashable module: no memo
        init_fn = jax.jit(functools.partial(model.init, train=False))
    return dict(init_fn(key, dummy))


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module) -> Callable:
    """One jitted init per (hashable) module, so repeated initialisations compile once."""
    return jax.jit(functools.partial(model.init, train=False))


def classifier_fns(model: nn.Module, variables: dict, stage: Optional[int] = None,
                   output_index: Optional[int] = None) -> tuple[Callable, Callable]:
    """Eval-mode closures with ``variables`` bound: (features_fn, head_fn), split after
    ResNet stage ``stage`` (None: the last, so head_fn is pool + Dense).

    features_fn(images [B, H, W, 3]) -> fmap [B, h, w, C];
    head_fn(fmap) -> logits [B, num_outputs], or [B, 1] holding logit
    ``output_index`` alone when it is given (the one a CAM explains). Each is jitted with the variables
    passed as arguments (not baked in as constants), and both are
    differentiable, so ``jax.vjp(head_fn, fmap)`` gives Grad-CAM gradients.
    ``features_fn.cell_grid`` is the feature cells' receptive-field geometry
    (``cell_grid(model)``), which the CAM functions use to upsample maps.
    """
    variables = dict(variables)
    if stage is not None and isinstance(getattr(model, "backbone", None), ResNetBackbone):
        model.backbone.check_stage(stage)   # a bad stage fails here, not inside a trace
    if output_index is not None:
        num_outputs = getattr(model, "num_outputs", None)
        bound = np.inf if num_outputs is None else num_outputs   # unknown width: any k >= 0
        if isinstance(output_index, bool) or not 0 <= int(output_index) < bound:
            raise ValueError(f"output_index={output_index!r}; expected an int in [0, {num_outputs})")
        output_index = int(output_index)

    @jax.jit
    def _features(v, images):
        return model.apply(v, images, False, stage, method="features")

    @jax.jit
    def _head(v, fmap):
        return model.apply(v, fmap, False, stage, method="head")

    def features_fn(images: jax.Array) -> jax.Array:
        return _features(variables, images)

    def head_fn(fmap: jax.Array) -> jax.Array:
        logits = _head(variables, fmap)
        return logits if output_index is None else logits[:, output_index:output_index + 1]

    grid = cell_grid(model, stage)
    if grid is not None:
        features_fn.cell_grid = grid
    return features_fn, head_fn


def cell_grid(model: nn.Module, stage: Optional[int] = None) -> CellGrid | None:
    """The receptive-field ``CellGrid`` of a classifier's (or backbone's) feature map
    after ``stage`` (None: the last); None for a module that is neither and
    declares no ``cell_grid()``."""
    for candidate in (model, getattr(model, "backbone", None)):
        method = getattr(candidate, "cell_grid", None)
        if callable(method):
            return method() if stage is None else method(stage)
    return None
