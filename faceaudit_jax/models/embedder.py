"""Face embedder: a ResNet backbone and an embedding head, for verification.

``FaceEmbedder`` maps [B, 112, 112, 3] images in [0, 1] to embeddings [B, D]
(compare them with the cosine similarity; ``embed_fn`` from `embedder_fns`
returns them L2-normalised). It is split for Grad-CAM on the cosine score:

- ``features(x, train=False)`` -> fmap [B, h, w, C] (the backbone's last conv
  stage, `faceaudit_jax.models.resnet.ResNetBackbone`);
- ``embed_from_features(fmap, train=False)`` -> embeddings [B, D]: the head,
  in the ArcFace "BN-Dropout-FC-BN" layout: a norm on the feature map
  (BatchNorm, or GroupNorm for batch-independent models), dropout, flatten
  (keeps where on the face a feature is, as the ArcFace output layer does;
  fixes the input size) or global average pooling (any input size), a Dense
  to D, and a final BatchNorm on the embedding (batch norm models only);
- ``__call__(x, train=False)`` -> (embeddings [B, D], {"fmap": fmap}).

Training with a margin loss: ``EmbedderWithMargin`` adds the class centres
[K, D] as a parameter and returns ({"embeddings", "class_centres"}, aux),
which ``margin_loss_fn`` turns into the CosFace / ArcFace loss of
`faceaudit_jax.losses` — the pair plugs into `train_lib.fit` as a model and
its ``loss_fn``. ``embedder_variables`` cuts the trained variables down to
the bare ``FaceEmbedder`` for evaluation and explanation.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from faceaudit_jax import losses
from faceaudit_jax.models import resnet

POOLINGS = ("flatten", "avg")
HEAD_NORMS = ("batch", "group")


class FaceEmbedder(nn.Module):
    """ResNet backbone + embedding head; see the module docstring.

    Attributes:
      backbone_kwargs: `ResNetBackbone` fields (from `resnet.backbone_kwargs`).
      embedding_dim: D.
      head_norm: "batch" or "group" (norm on the feature map; "batch" also
        adds the final BatchNorm on the embedding).
      head_groups: GroupNorm groups for head_norm="group".
      pooling: "flatten" or "avg".
      dropout_rate: dropout on the feature map in training (rng "dropout").
    """

    backbone_kwargs: dict
    embedding_dim: int = 128
    head_norm: str = "batch"
    head_groups: int = 8
    pooling: str = "flatten"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        self.backbone = resnet.ResNetBackbone(**self.backbone_kwargs, dtype=self.dtype)
        if self.head_norm == "batch":
            self.fmap_norm = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
            self.embedding_norm = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        else:
            self.fmap_norm = nn.GroupNorm(num_groups=self.head_groups, epsilon=1e-5,
                                          dtype=self.dtype)
        self.dropout = nn.Dropout(rate=self.dropout_rate)
        self.fc = nn.Dense(self.embedding_dim, dtype=self.dtype)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] in [0, 1] -> last conv feature map [B, h, w, C]."""
        return self.backbone(x, train=train)

    def embed_from_features(self, fmap: jax.Array, train: bool = False) -> jax.Array:
        """Feature map [B, h, w, C] -> embeddings [B, D] (float32, not normalised)."""
        if self.head_norm == "batch":
            y = self.fmap_norm(fmap, use_running_average=not train)
        else:
            y = self.fmap_norm(fmap)
        y = self.dropout(y, deterministic=not train)
        if self.pooling == "flatten":
            y = y.reshape(y.shape[0], -1)
        else:
            y = jnp.mean(y, axis=(1, 2))
        y = self.fc(y)
        if self.head_norm == "batch":
            y = self.embedding_norm(y, use_running_average=not train)
        return y.astype(jnp.float32)

    def __call__(self, x: jax.Array, train: bool = False):
        """Images -> (embeddings [B, D], {"fmap": [B, h, w, C]})."""
        fmap = self.features(x, train=train)
        return self.embed_from_features(fmap, train=train), {"fmap": fmap}


class EmbedderWithMargin(nn.Module):
    """A `FaceEmbedder` plus class centres [num_classes, D] for margin-loss training.

    ``__call__(x, train)`` -> ({"embeddings": [B, D], "class_centres": [K, D]},
    {"fmap": ...}); `margin_loss_fn` computes the loss from that output.
    The embedder's variables live under the "embedder" collection path.
    """

    embedder: FaceEmbedder
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        embeddings, aux = self.embedder(x, train=train)
        centres = self.param("class_centres", nn.initializers.normal(stddev=0.01),
                             (self.num_classes, self.embedder.embedding_dim), jnp.float32)
        return {"embeddings": embeddings, "class_centres": centres}, aux


def build_embedder(name: str = "small_resnet", embedding_dim: int = 128, *,
                   head_norm: Optional[str] = None, head_groups: int = 8,
                   pooling: str = "flatten", dropout_rate: float = 0.0,
                   dtype: Any = jnp.float32, **backbone_overrides) -> FaceEmbedder:
    """A `FaceEmbedder` on a named ResNet ("small_resnet", "resnet18", ...).

    head_norm defaults to the backbone's norm (GroupNorm for small_resnet,
    BatchNorm for the torchvision ResNets). backbone_overrides go to
    `resnet.backbone_kwargs` (norm, norm_groups, widths, ...).
    """
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"embedding_dim={embedding_dim!r}; expected a positive int")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS}")
    if not 0.0 <= float(dropout_rate) < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r}; expected a value in [0, 1)")
    kwargs = resnet.backbone_kwargs(name, **backbone_overrides)
    head_norm = kwargs["norm"] if head_norm is None else head_norm
    if head_norm not in HEAD_NORMS:
        raise ValueError(f"head_norm={head_norm!r}; expected one of {HEAD_NORMS}")
    if head_norm == "group":
        channels = int(kwargs["widths"][-1]) * resnet._BLOCKS[kwargs["block"]].expansion
        if channels % head_groups:
            raise ValueError(
                f"head_groups={head_groups} does not divide the feature map's {channels} channels")
    return FaceEmbedder(backbone_kwargs=kwargs, embedding_dim=embedding_dim,
                        head_norm=head_norm, head_groups=int(head_groups), pooling=pooling,
                        dropout_rate=float(dropout_rate), dtype=dtype)


def build_embedder_with_margin(num_classes: int, name: str = "small_resnet",
                               embedding_dim: int = 128, **kwargs) -> EmbedderWithMargin:
    """`EmbedderWithMargin` around `build_embedder(name, embedding_dim, **kwargs)`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r}; expected an int >= 2")
    return EmbedderWithMargin(embedder=build_embedder(name, embedding_dim, **kwargs),
                              num_classes=num_classes)


def margin_loss_fn(kind: str = "cosface", scale: float = 64.0,
                   margin: Optional[float] = None, label_key: str = "identity") -> Callable:
    """A `train_lib` loss_fn(outputs, batch) -> (loss, {"class_accuracy"}) for margin training.

    outputs is `EmbedderWithMargin`'s first output; the labels are
    batch[label_key], ints in [0, num_classes). The loss is
    `losses.margin_softmax_loss` (CosFace margin 0.35 / ArcFace 0.5 by
    default); class_accuracy is the nearest-centre accuracy (no margin).
    """
    if kind not in losses.MARGIN_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {losses.MARGIN_KINDS}")

    def loss_fn(outputs, batch):
        embeddings = outputs["embeddings"]
        centres = outputs["class_centres"]
        labels = jnp.asarray(batch[label_key], jnp.int32)
        loss = losses.margin_softmax_loss(embeddings, centres, labels, kind=kind,
                                          scale=scale, margin=margin)
        cos = losses.l2_normalize(embeddings) @ losses.l2_normalize(centres).T
        accuracy = jnp.mean(jnp.argmax(cos, axis=-1) == labels)
        return loss, {"class_accuracy": accuracy}

    return loss_fn


def embedder_variables(variables: dict) -> dict:
    """The bare `FaceEmbedder`'s variables from an `EmbedderWithMargin`'s (or unchanged)."""
    out = {}
    for collection, tree in variables.items():
        if isinstance(tree, dict) and "embedder" in tree:
            out[collection] = tree["embedder"]
        elif collection == "params" and "class_centres" in tree:
            raise ValueError("params hold class_centres but no 'embedder' subtree")
        else:
            out[collection] = tree
    return out


def embedder_fns(model: FaceEmbedder, variables: dict
                 ) -> tuple[Callable, Callable, Callable]:
    """Eval-mode closures with variables bound: (features_fn, head_fn, embed_fn).

    features_fn(images [B, H, W, 3]) -> fmap [B, h, w, C];
    head_fn(fmap) -> embeddings [B, D] (what `explain.cams` differentiates,
    with `cams.cosine_target`); embed_fn(images) -> L2-normalised
    embeddings [B, D] (the black box for CorrRISE, RISE, occlusion and the
    verification metrics). Each jits its computation with the variables as
    arguments; build them once and reuse them (they are static arguments of
    the explanation functions' jits).
    """
    variables = dict(embedder_variables(variables))

    @jax.jit
    def _features(v, images):
        return model.apply(v, images, train=False, method="features")

    @jax.jit
    def _head(v, fmap):
        return model.apply(v, fmap, train=False, method="embed_from_features")

    @jax.jit
    def _embed(v, images):
        return losses.l2_normalize(model.apply(v, images, train=False)[0])

    def features_fn(images):
        return _features(variables, images)

    def head_fn(fmap):
        return _head(variables, fmap)

    def embed_fn(images):
        return _embed(variables, images)

    return features_fn, head_fn, embed_fn
