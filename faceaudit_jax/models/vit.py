"""Vision Transformer face embedder (Face Transformer style) that exposes its attention.

The ViT face-verification paper (Correia, Pereira and Correia) explains a Face
Transformer (Zhong and Deng 2021): patch embedding, a CLS token, learned
position embeddings, pre-norm transformer blocks, a final LayerNorm and an
embedding read from the CLS token. Explaining it needs two things a stock
attention layer hides:

- every layer's attention probabilities, returned as ``aux["attn"]`` with
  shape [L, B, heads, T, T] (T = 1 + number of patches);
- the gradient of any scalar of the output w.r.t. those probabilities. The
  model takes an optional additive ``attn_perturbation`` [L, B, heads, T, T]
  that is added to the probabilities right where they multiply the values;
  ``jax.grad`` w.r.t. a zero perturbation is exactly dOutput/dA (the quantity
  Chefer et al. hook in PyTorch), with no change to the forward result.

``relevance_tap`` [L, B, T, T] (zeros) is a fused shortcut for Chefer et
al.'s rule: ``jax.grad`` w.r.t. it is E_h[(dOutput/dA ⊙ A)^+] per layer,
computed inside the backward pass (a custom VJP at the same point as the
perturbation), so the per-head gradients [L, B, heads, T, T] are never
written out and read back.

``lrp_detach=True`` builds the "conservative propagation" graph of Ali et al.
(2022, "XAI for Transformers: Better Explanations through Conservative
Propagation"): the LayerNorm normaliser and the attention probabilities are
treated as constants in the backward pass, so gradient x input on that graph is
an LRP relevance. ``explain.attention`` uses it for its LRP-based method; the
forward values are identical either way.

Images come in as float [B, H, W, 3] in [0, 1] and are normalised to [-1, 1]
inside the model (Face Transformer's preprocessing), so callers never handle
model-specific statistics.

Configs (``build_vit``): ``vit_tiny_face`` (112 px, patch 8 -> a 14 x 14 grid
like the paper's, width 96, 4 layers, 4 heads; trains on a CPU),
``vit_tiny_face_p16`` (the same with 16 px patches: a 7 x 7 grid, ~5x cheaper),
``vit_face_paper`` (Face Transformer ViT-P12S8: 112 px, 12 px patches at
stride 8 with 2 px padding -> 14 x 14 overlapping patches, width 512, 20
layers, 8 heads, MLP 2048) and ``vit_smoke`` (32 px, for tests).

Training goes through ``train_lib`` with ``ViTMarginClassifier`` (embedder +
cosine class head) and ``make_margin_loss_fn`` (the loss adapter).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from faceaudit_jax import losses

POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT face embedder.

    Attributes:
      image_size: side of the square input images, in pixels.
      patch_size: side of a square patch (the patch-embedding kernel).
      patch_stride: step between patches; ``None`` means ``patch_size``
        (non-overlapping). A smaller stride gives overlapping patches
        (Face Transformer's P12S8).
      patch_padding: zero padding added on every side before patching.
      hidden_dim: token width.
      num_layers: number of transformer blocks.
      num_heads: attention heads per block; must divide ``hidden_dim``.
      mlp_dim: hidden width of each block's MLP.
      embed_dim: size of the output face embedding.
      pool: "cls" (embedding from the CLS token) or "mean" (mean of the patch
        tokens, CLS excluded).
      dropout_rate: dropout on token embeddings and MLP/attention outputs
        (training only). The attention probabilities themselves are never
        dropped, so ``aux["attn"]`` is what the values are mixed with.
    """

    image_size: int = 112
    patch_size: int = 8
    patch_stride: int | None = None
    patch_padding: int = 0
    hidden_dim: int = 96
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 192
    embed_dim: int = 128
    pool: str = "cls"
    dropout_rate: float = 0.0

    @property
    def stride(self) -> int:
        return self.patch_size if self.patch_stride is None else self.patch_stride

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        side = (self.image_size + 2 * self.patch_padding - self.patch_size) // self.stride + 1
        return (side, side)

    @property
    def num_tokens(self) -> int:
        """T = 1 (CLS) + number of patches."""
        rows, cols = self.grid_shape
        return 1 + rows * cols

    def validate(self) -> "ViTConfig":
        """Raise ValueError naming the first inconsistent field; return self."""
        for name in ("image_size", "patch_size", "stride", "hidden_dim", "num_layers",
                     "num_heads", "mlp_dim", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.patch_padding < 0:
            raise ValueError(f"ViTConfig.patch_padding must be >= 0, got {self.patch_padding}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.hidden_dim={self.hidden_dim} is not divisible by "
                f"num_heads={self.num_heads}")
        span = self.image_size + 2 * self.patch_padding - self.patch_size
        if span < 0 or span % self.stride:
            raise ValueError(
                f"patches of size {self.patch_size} at stride {self.stride} with padding "
                f"{self.patch_padding} do not tile a {self.image_size}-pixel image exactly "
                f"(need (image_size + 2*padding - patch_size) to be a non-negative multiple "
                f"of the stride, got {span})")
        if self.pool not in POOLS:
            raise ValueError(f"ViTConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"ViTConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        return self


VIT_CONFIGS: dict[str, ViTConfig] = {
    # Same 14 x 14 patch grid as the paper's model, at a width that trains on 2 CPU cores.
    "vit_tiny_face": ViTConfig(image_size=112, patch_size=8, hidden_dim=96, num_layers=4,
                               num_heads=4, mlp_dim=192, embed_dim=128),
    # About 5x cheaper per image (50 tokens), at the price of a coarse 7 x 7 map grid.
    "vit_tiny_face_p16": ViTConfig(image_size=112, patch_size=16, hidden_dim=96, num_layers=4,
                                   num_heads=4, mlp_dim=192, embed_dim=128),
    # Face Transformer ViT-P12S8 (Zhong and Deng 2021): overlapping 12 px patches at stride
    # 8; 2 px padding makes the grid exactly 14 x 14 on 112 px faces.
    "vit_face_paper": ViTConfig(image_size=112, patch_size=12, patch_stride=8, patch_padding=2,
                                hidden_dim=512, num_layers=20, num_heads=8, mlp_dim=2048,
                                embed_dim=512, dropout_rate=0.1),
    # Tests and smoke runs: 4 x 4 grid, 17 tokens.
    "vit_smoke": ViTConfig(image_size=32, patch_size=8, hidden_dim=32, num_layers=2,
                           num_heads=2, mlp_dim=64, embed_dim=16),
}


class DetachableLayerNorm(nn.Module):
    """LayerNorm whose normaliser can be cut out of the backward pass.

    ``detach=False`` is an ordinary LayerNorm. ``detach=True`` keeps the
    forward value but stops the gradient through 1/std (Ali et al. 2022's
    LN-rule), which makes gradient x input conservative through the layer.
    """

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, detach: bool = False) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,))
        bias = self.param("bias", nn.initializers.zeros, (width,))
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                                + self.epsilon)
        if detach:
            inv_std = jax.lax.stop_gradient(inv_std)
        return centred * inv_std * scale + bias


@jax.custom_vjp
def relevance_tap(probs: jax.Array, tap: jax.Array) -> jax.Array:
    """Identity on probs [B, heads, T, T]; the cotangent of ``tap`` [B, T, T] is
    E_h[(g ⊙ probs)^+], g = the cotangent of the output (Chefer et al.'s A_bar).

    ``tap`` never changes the forward value; pass zeros and differentiate.
    """
    del tap
    return probs


def _relevance_tap_fwd(probs, tap):
    del tap
    return probs, probs


def _relevance_tap_bwd(probs, grad):
    weighted = jnp.mean(jnp.maximum(grad * probs, 0.0), axis=1)
    return grad, weighted.astype(probs.dtype)


relevance_tap.defvjp(_relevance_tap_fwd, _relevance_tap_bwd)


class SelfAttention(nn.Module):
    """Multi-head self-attention that returns its probabilities.

    ``__call__(tokens [B, T, C], perturbation [B, heads, T, T] | None, tap
    [B, T, T] | None)`` -> (output [B, T, C], probabilities [B, heads, T, T]).
    The perturbation is added to the probabilities where they weight the
    values, so the gradient w.r.t. a zero perturbation is the gradient w.r.t.
    the probabilities; the gradient w.r.t. a zero ``tap`` is
    E_h[(that gradient ⊙ probabilities)^+] (``relevance_tap``).
    """

    num_heads: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens, perturbation=None, tap=None, *, deterministic=True,
                 detach=False):
        batch, num_tokens, width = tokens.shape
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, name="qkv")(tokens)
        qkv = qkv.reshape(batch, num_tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, h, dh]
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(head_dim).astype(
            tokens.dtype)
        # Softmax in float32 so the probabilities (the explained quantity) sum to 1.
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        mixing = jax.lax.stop_gradient(probs) if detach else probs
        if perturbation is not None:
            mixing = mixing + perturbation
        if tap is not None:
            mixing = relevance_tap(mixing, tap)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", mixing.astype(value.dtype), value)
        out = nn.Dense(width, name="out")(mixed.reshape(batch, num_tokens, width))
        out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
        return out, probs


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens, perturbation=None, tap=None, *, deterministic=True,
                 detach=False):
        width = tokens.shape[-1]
        normed = DetachableLayerNorm(name="ln_attn")(tokens, detach=detach)
        attended, probs = SelfAttention(self.num_heads, self.dropout_rate, name="attn")(
            normed, perturbation, tap, deterministic=deterministic, detach=detach)
        tokens = tokens + attended
        normed = DetachableLayerNorm(name="ln_mlp")(tokens, detach=detach)
        hidden = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(normed))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        hidden = nn.Dense(width, name="mlp_out")(hidden)
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        return tokens + hidden, probs


class ViTFaceEmbedder(nn.Module):
    """ViT face embedder.

    ``__call__(images [B, H, W, 3] in [0, 1], train=False, attn_perturbation=None,
    lrp_detach=False, relevance_tap=None)`` -> (embeddings [B, embed_dim], aux) with
    ``aux["attn"]``: float32 [L, B, heads, T, T], every layer's attention
    probabilities (rows sum to 1), T = 1 + number of patches, token 0 = CLS,
    patch tokens in row-major grid order (``config.grid_shape``).

    ``attn_perturbation``: optional [L, B, heads, T, T] added to the
    probabilities (pass zeros and differentiate to get dOutput/dA).
    ``relevance_tap``: optional [L, B, T, T]; the gradient w.r.t. zeros is
    E_h[(dOutput/dA ⊙ A)^+] per layer (see ``relevance_tap``).
    ``lrp_detach``: stop gradients through the LayerNorm normalisers and the
    attention probabilities (conservative LRP graph; forward unchanged).
    Embeddings are not L2-normalised here.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images, train: bool = False, attn_perturbation=None,
                 lrp_detach: bool = False, relevance_tap=None):
        cfg = self.config.validate()
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}")
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]} but this ViT was built for "
                f"{cfg.image_size}x{cfg.image_size} (its position embeddings fix the size)")
        batch = images.shape[0]
        expected = (cfg.num_layers, batch, cfg.num_heads, cfg.num_tokens, cfg.num_tokens)
        if attn_perturbation is not None and tuple(attn_perturbation.shape) != expected:
            raise ValueError(f"attn_perturbation must have shape [L, B, heads, T, T] = "
                             f"{expected}, got {tuple(attn_perturbation.shape)}")
        expected_tap = (cfg.num_layers, batch, cfg.num_tokens, cfg.num_tokens)
        if relevance_tap is not None and tuple(relevance_tap.shape) != expected_tap:
            raise ValueError(f"relevance_tap must have shape [L, B, T, T] = {expected_tap}, "
                             f"got {tuple(relevance_tap.shape)}")
        deterministic = not train

        x = (images.astype(jnp.float32) - 0.5) / 0.5
        pad = cfg.patch_padding
        patches = nn.Conv(cfg.hidden_dim, (cfg.patch_size, cfg.patch_size),
                          strides=(cfg.stride, cfg.stride),
                          padding=((pad, pad), (pad, pad)), name="patch_embed")(x)
        tokens = patches.reshape(batch, -1, cfg.hidden_dim)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, cfg.hidden_dim))
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.hidden_dim)), tokens],
                                 axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02),
                         (1, cfg.num_tokens, cfg.hidden_dim))
        tokens = nn.Dropout(cfg.dropout_rate)(tokens + pos, deterministic=deterministic)

        layer_probs = []
        for layer in range(cfg.num_layers):
            perturbation = None if attn_perturbation is None else attn_perturbation[layer]
            tap = None if relevance_tap is None else relevance_tap[layer]
            tokens, probs = EncoderBlock(cfg.num_heads, cfg.mlp_dim, cfg.dropout_rate,
                                         name=f"block_{layer}")(
                tokens, perturbation, tap, deterministic=deterministic, detach=lrp_detach)
            layer_probs.append(probs)
        tokens = DetachableLayerNorm(name="ln_final")(tokens, detach=lrp_detach)
        pooled = tokens[:, 0] if cfg.pool == "cls" else jnp.mean(tokens[:, 1:], axis=1)
        embeddings = nn.Dense(cfg.embed_dim, name="embedding")(pooled)
        return embeddings, {"attn": jnp.stack(layer_probs)}


def build_vit(name: str, embed_dim: int | None = None, **overrides: Any) -> ViTFaceEmbedder:
    """A ``ViTFaceEmbedder`` from a named config.

    Args:
      name: one of ``VIT_CONFIGS`` ("vit_tiny_face", "vit_tiny_face_p16",
        "vit_face_paper", "vit_smoke").
      embed_dim: embedding size; ``None`` keeps the config's.
      **overrides: any other ``ViTConfig`` field (e.g. ``pool="mean"``).
    """
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT config {name!r}; expected one of {sorted(VIT_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ViTConfig field(s) {unknown}; expected any of {sorted(fields)}")
    if embed_dim is not None:
        overrides["embed_dim"] = embed_dim
    config = dataclasses.replace(VIT_CONFIGS[name], **overrides).validate()
    return ViTFaceEmbedder(config)


@dataclasses.dataclass(frozen=True)
class ViTApply:
    """Pure apply function of a ViT embedder for ``explain.attention``.

    ``ViTApply(model)(params, images, attn_perturbation=None, lrp_detach=False,
    relevance_tap=None)`` -> (embeddings [B, D], aux). Frozen and hashable by the model's config, so
    passing it as a static argument to ``jax.jit`` hits the compile cache across
    calls (a fresh lambda each call would recompile).
    """

    model: ViTFaceEmbedder

    def __call__(self, params, images, attn_perturbation=None, lrp_detach=False,
                 relevance_tap=None):
        return self.model.apply(params, images, train=False,
                                attn_perturbation=attn_perturbation, lrp_detach=lrp_detach,
                                relevance_tap=relevance_tap)


# ----------------------------------------------------------------------------------------
# Training adapter: embedder + cosine class head, and a margin-loss closure for train_lib.


class ViTMarginClassifier(nn.Module):
    """ViT embedder plus a cosine head over training identities (CosFace/ArcFace style).

    ``__call__(images, train=False)`` -> (cosines [B, num_identities], aux) where
    cosines are between the L2-normalised embedding and L2-normalised class
    centres (in [-1, 1]; a margin loss adds its margin and scale), and aux has
    ``"embedding"`` [B, D] (raw, before normalisation) and ``"attn"``.
    The embedder's parameters live under ``params["embedder"]``, so
    ``ViTApply(build_vit(...))`` explains a trained classifier with
    ``{"params": params["params"]["embedder"]}``.
    """

    config: ViTConfig
    num_identities: int

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.num_identities < 2:
            raise ValueError(f"num_identities must be >= 2, got {self.num_identities}")
        embeddings, aux = ViTFaceEmbedder(self.config, name="embedder")(images, train=train)
        centres = self.param("class_centres", nn.initializers.normal(0.01),
                             (self.config.embed_dim, self.num_identities))
        unit_emb = embeddings * jax.lax.rsqrt(
            jnp.sum(jnp.square(embeddings), axis=-1, keepdims=True) + 1e-12)
        unit_centres = centres * jax.lax.rsqrt(
            jnp.sum(jnp.square(centres), axis=0, keepdims=True) + 1e-12)
        cosines = unit_emb @ unit_centres
        return cosines, {"embedding": embeddings, "attn": aux["attn"]}


def make_margin_loss_fn(
    model: ViTMarginClassifier,
    margin_loss: Callable[[jax.Array, jax.Array], jax.Array],
    label_key: str = "identity",
) -> Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]:
    """Loss adapter for ``train_lib``: ``loss_fn(params, batch, rng, train=True)``.

    Args:
      model: a ``ViTMarginClassifier``.
      margin_loss: ``margin_loss(cosines [B, C], labels [B] int) -> loss`` (scalar
        or per-example [B], averaged here), e.g. CosFace from ``losses.py``
        applied to cosines.
      label_key: batch entry holding the integer identity labels.

    Returns:
      ``loss_fn(params, batch, rng, train=True) -> (loss scalar, metrics)``
      with metrics ``{"loss", "accuracy"}`` (accuracy of the arg-max cosine,
      without margin). ``params`` is the full variables dict
      (``{"params": ...}``); ``rng`` feeds dropout.
    """

    def loss_fn(params, batch, rng, train: bool = True):
        images, labels = batch["image"], batch[label_key]
        rngs = {} if rng is None else {"dropout": rng}
        cosines, _ = model.apply(params, images, train=train, rngs=rngs)
        loss = jnp.mean(margin_loss(cosines, labels))
        accuracy = jnp.mean((jnp.argmax(cosines, axis=-1) == labels).astype(jnp.float32))
        return loss, {"loss": loss, "accuracy": accuracy}

    return loss_fn


@dataclasses.dataclass(frozen=True)
class CosFaceOnCosines:
    """``loss_fn(cosines, batch) -> (loss, {"accuracy"})`` for ``train_lib.fit`` on a
    ``ViTMarginClassifier``: ``losses.cosface_loss_on_cosines`` plus the arg-max accuracy.

    Frozen and hashable, so ``train_lib.make_train_step`` memoises the
    compiled update on it.
    """

    scale: float = 64.0
    margin: float = 0.35
    label_key: str = "identity"

    def __call__(self, cosines, batch):
        labels = batch[self.label_key]
        loss = losses.cosface_loss_on_cosines(cosines, labels, self.scale, self.margin)
        accuracy = jnp.mean((jnp.argmax(cosines, axis=-1) == labels).astype(jnp.float32))
        return loss, {"accuracy": accuracy}
