"""Tests for explain/attention.py against numpy transcriptions on a tiny ViT's real attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.explain import attention
from faceaudit_jax.models import vit


@pytest.fixture(scope="module")
def tiny():
    model = vit.build_vit("vit_smoke")
    images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(1), images)
    apply_fn = vit.ViTApply(model)
    _, aux = jax.jit(apply_fn)(params, images)
    return model, params, images, apply_fn, np.asarray(aux["attn"], np.float64)


# ---------------------------------------------------------------- numpy transcriptions


def np_rollout(attn, head_fusion="mean", discard_ratio=0.0, readout="cls"):
    """Abnar & Zuidema rollout, one image and one layer at a time, full matrix products."""
    num_layers, batch, _, t, _ = attn.shape
    out = []
    for b in range(batch):
        result = np.eye(t)
        for layer in range(num_layers):
            a = attn[layer, b]
            fused = {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[head_fusion].copy()
            k = int(t * t * discard_ratio)
            if k:
                flat = fused.reshape(-1)
                lowest = np.argsort(flat, kind="stable")[:k]
                lowest = lowest[lowest != 0]
                flat[lowest] = 0.0
            m = 0.5 * fused + 0.5 * np.eye(t)
            m = m / m.sum(axis=1, keepdims=True)
            result = m @ result
        row = result[0] if readout == "cls" else result[1:].mean(0)
        out.append(row[1:])
    return np.stack(out)


def np_chefer(attn, grads, readout="cls"):
    """Chefer et al. generic rule: R = I; R += E_h[(grad*A)^+] @ R, layer by layer."""
    num_layers, batch, _, t, _ = attn.shape
    out = []
    for b in range(batch):
        r = np.eye(t)
        for layer in range(num_layers):
            cam = np.clip(grads[layer, b] * attn[layer, b], 0, None).mean(0)
            r = r + cam @ r
        row = r[0] if readout == "cls" else r[1:].mean(0)
        out.append(row[1:])
    return np.stack(out)


# ---------------------------------------------------------------- rollout


@pytest.mark.parametrize("head_fusion,discard_ratio,readout",
                         [("mean", 0.0, "cls"), ("max", 0.0, "cls"), ("min", 0.3, "cls"),
                          ("mean", 0.9, "cls"), ("mean", 0.0, "mean")])
def test_rollout_matches_numpy(tiny, head_fusion, discard_ratio, readout):
    *_, attn = tiny
    got = attention.attention_rollout(jnp.asarray(attn, jnp.float32), head_fusion,
                                      discard_ratio, readout=readout)
    expected = np_rollout(attn, head_fusion, discard_ratio, readout)
    assert got.shape == (3, 4, 4)
    np.testing.assert_allclose(np.asarray(got).reshape(3, -1), expected, rtol=1e-4, atol=1e-7)


def test_rollout_on_identity_attention_is_uniform_zero():
    """Every token attending only to itself: rollout is the identity, CLS row over patches 0."""
    attn = jnp.broadcast_to(jnp.eye(5), (2, 1, 1, 5, 5))
    np.testing.assert_allclose(np.asarray(attention.attention_rollout(attn)), 0.0)
    # CLS attending uniformly in one layer spreads 0.5/5 on every patch
    uniform = jnp.broadcast_to(jnp.full((5, 5), 0.2), (1, 1, 1, 5, 5))
    np.testing.assert_allclose(np.asarray(attention.attention_rollout(uniform)), 0.1, rtol=1e-6)


def test_nograd_equals_scaled_rollout(tiny):
    *_, attn = tiny
    attn32 = jnp.asarray(attn, jnp.float32)
    nograd = np.asarray(attention.nograd_rollout(attn32))
    rollout = np.asarray(attention.attention_rollout(attn32))
    np.testing.assert_allclose(nograd, 2 ** attn.shape[0] * rollout, rtol=1e-5)


# ---------------------------------------------------------------- gradients


def _neg_dist_to(embeddings, others):
    return attention.similarity(embeddings, others)


def test_grad_rollout_matches_numpy_and_gradients_are_real(tiny):
    model, params, images, apply_fn, _ = tiny
    others = jax.random.normal(jax.random.key(7), (3, model.config.embed_dim))
    attn, grads, emb = attention.attention_and_grads(apply_fn, params, images, _neg_dist_to,
                                                     others)
    grads_np = np.asarray(grads, np.float64)
    assert np.abs(grads_np).max() > 1e-4
    # gradient == jax.grad of the explicit function of a perturbation of one layer
    layer = attn.shape[0] - 1

    def explicit(pert_layer):
        pert = jnp.zeros_like(attn).at[layer].set(pert_layer)
        e, _ = apply_fn(params, images, attn_perturbation=pert)
        return jnp.sum(attention.similarity(e, others))

    value_and_grad = jax.jit(jax.value_and_grad(explicit))
    _, direct = value_and_grad(jnp.zeros_like(attn[layer]))
    np.testing.assert_allclose(np.asarray(direct), grads_np[layer], rtol=1e-4,
                               atol=1e-5 * np.abs(grads_np).max())
    # and a central finite difference on the largest entry
    pos = np.unravel_index(np.argmax(np.abs(grads_np[layer])), grads_np[layer].shape)
    eps = 1e-2
    bump = jnp.zeros_like(attn[layer]).at[pos].set(eps)
    fd = (value_and_grad(bump)[0] - value_and_grad(-bump)[0]) / (2 * eps)
    np.testing.assert_allclose(float(fd), grads_np[layer][pos], rtol=2e-2)

    # the fused path (custom VJP inside the model) gives the same head-fused relevance
    fused, _ = jax.jit(attention.fused_relevance, static_argnums=(0, 3))(
        apply_fn, params, images, _neg_dist_to, others)
    explicit_weighted = np.clip(grads_np * np.asarray(attn, np.float64), 0, None).mean(2)
    np.testing.assert_allclose(np.asarray(fused), explicit_weighted, rtol=1e-4,
                               atol=1e-6 * explicit_weighted.max())

    got = attention.grad_weighted_rollout(attn, grads)
    expected = np_chefer(np.asarray(attn, np.float64), grads_np)
    np.testing.assert_allclose(np.asarray(got).reshape(3, -1), expected, rtol=1e-4, atol=1e-9)
    got_mean = attention.grad_weighted_rollout(attn, grads, readout="mean")
    np.testing.assert_allclose(np.asarray(got_mean).reshape(3, -1),
                               np_chefer(np.asarray(attn, np.float64), grads_np, "mean"),
                               rtol=1e-4, atol=1e-9)


def test_nograd_lrp_uses_detached_gradient(tiny):
    model, params, images, apply_fn, _ = tiny
    others = jax.random.normal(jax.random.key(8), (3, model.config.embed_dim))
    attn, plain, _ = attention.attention_and_grads(apply_fn, params, images, _neg_dist_to,
                                                   others)
    _, detached, _ = attention.attention_and_grads(apply_fn, params, images, _neg_dist_to,
                                                   others, lrp_detach=True)
    # last layer: nothing downstream is detached except the final LayerNorm's scale
    assert not np.allclose(np.asarray(plain), np.asarray(detached))
    maps = attention.attention_maps(apply_fn, params, images, "nograd_lrp", _neg_dist_to,
                                    target_args=others)
    grid = attention.grad_weighted_rollout(attn, detached)
    ref = jax.image.resize(grid, (3, 32, 32), "bilinear")
    np.testing.assert_allclose(np.asarray(maps), np.asarray(attention.normalize_maps(ref)),
                               atol=1e-5)


# ---------------------------------------------------------------- maps from a model


@pytest.mark.parametrize("method", attention.METHODS)
def test_attention_maps_batched_equals_single(tiny, method):
    model, params, images, apply_fn, _ = tiny
    others = jax.random.normal(jax.random.key(9), (3, model.config.embed_dim))
    kwargs = dict(target_fn=_neg_dist_to, target_args=others)
    maps = np.asarray(attention.attention_maps(apply_fn, params, images, method, **kwargs))
    assert maps.shape == (3, 32, 32)
    assert maps.min() == 0.0 and np.allclose(maps.max(axis=(1, 2)), 1.0)
    # each image's map depends on that image (and its target) only: permuting the batch
    # permutes the maps (same shape, so no recompilation)
    order = np.array([2, 0, 1])
    permuted = attention.attention_maps(apply_fn, params, images[order], method,
                                        target_fn=_neg_dist_to, target_args=others[order])
    np.testing.assert_allclose(np.asarray(permuted), maps[order], atol=1e-5)


def test_rollout_map_is_upsampled_numpy_rollout(tiny):
    _, params, images, apply_fn, attn = tiny
    maps = attention.attention_maps(apply_fn, params, images, "rollout")
    grid = np_rollout(attn).reshape(3, 4, 4)
    up = np.asarray(jax.image.resize(jnp.asarray(grid, jnp.float32), (3, 32, 32), "bilinear"))
    lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(maps), (up - lo) / (hi - lo), atol=1e-4)


def test_pair_maps_explain_similarity_to_partner(tiny):
    _, params, images, apply_fn, _ = tiny
    probes, galleries = images, images[::-1] + 0.1 * (images[::-1] < 0.5)
    maps_p, maps_g = attention.pair_attention_maps(apply_fn, params, probes, galleries,
                                                   "grad_rollout")
    embed = jax.jit(apply_fn)
    emb_p, emb_g = embed(params, probes)[0], embed(params, galleries)[0]
    ref_p = attention.attention_maps(apply_fn, params, probes, "grad_rollout", _neg_dist_to,
                                     target_args=emb_g)
    ref_g = attention.attention_maps(apply_fn, params, galleries, "grad_rollout", _neg_dist_to,
                                     target_args=emb_p)
    np.testing.assert_allclose(np.asarray(maps_p), np.asarray(ref_p), atol=1e-5)
    np.testing.assert_allclose(np.asarray(maps_g), np.asarray(ref_g), atol=1e-5)


def _cosine_to_column(embeddings, centre):
    unit = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
    return unit @ (centre / jnp.linalg.norm(centre))


def test_predicted_class_target_is_the_top_cosine_and_maps_ignore_the_partner(tiny):
    _, params, images, apply_fn, _ = tiny
    emb = np.asarray(jax.jit(apply_fn)(params, images)[0], np.float64)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(emb.shape[1], 5))
    unit_e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit_e @ (centres / np.linalg.norm(centres, axis=0, keepdims=True))
    target = attention.PredictedClassTarget()
    np.testing.assert_allclose(np.asarray(target(jnp.asarray(emb), jnp.asarray(centres))),
                               cos.max(1), rtol=1e-5)
    # Per image: each map is the gradient map of its own top class's cosine.
    maps = attention.image_attention_maps(apply_fn, params, images, centres, "grad_rollout")
    for b, k in enumerate(cos.argmax(1)):
        ref = attention.attention_maps(apply_fn, params, images[b:b + 1], "grad_rollout",
                                       _cosine_to_column,
                                       target_args=jnp.asarray(centres[:, k], jnp.float32))
        np.testing.assert_allclose(np.asarray(maps[b]), np.asarray(ref[0]), atol=1e-5)
    with pytest.raises(ValueError, match="centres must be"):
        attention.image_attention_maps(apply_fn, params, images, centres[0], "grad_rollout")


def test_targeted_pair_maps_dispatches_on_the_target(tiny):
    _, params, images, apply_fn, _ = tiny
    probes, galleries = images[:1], images[1:2]
    centres = np.random.default_rng(1).normal(size=(int(apply_fn(params, images)[0].shape[1]), 3))
    per_image = attention.image_attention_maps(apply_fn, params, images[:2], centres, "grad_rollout")
    maps_p, maps_g = attention.targeted_pair_maps(apply_fn, params, probes, galleries, "grad_rollout",
                                                  "image", centres)
    np.testing.assert_allclose(np.asarray(maps_p), np.asarray(per_image[:1]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(maps_g), np.asarray(per_image[1:]), atol=1e-6)
    pair = attention.pair_attention_maps(apply_fn, params, probes, galleries, "grad_rollout")
    got = attention.targeted_pair_maps(apply_fn, params, probes, galleries, "grad_rollout")
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(pair[0]), atol=1e-6)
    with pytest.raises(ValueError, match="explain.target='both'"):
        attention.targeted_pair_maps(apply_fn, params, probes, galleries, "rollout", "both")
    with pytest.raises(ValueError, match="class centres"):
        attention.targeted_pair_maps(apply_fn, params, probes, galleries, "rollout", "image")


@dataclasses.dataclass(frozen=True)
class CountingApply:
    """apply_fn wrapper that counts how often it is traced (once per compilation)."""

    inner: vit.ViTApply
    counter: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def __call__(self, *args, **kwargs):
        self.counter.append(1)
        return self.inner(*args, **kwargs)


def test_attention_maps_compile_once_per_shape(tiny):
    _, params, images, apply_fn, _ = tiny
    counting = CountingApply(apply_fn)
    attention.attention_maps(counting, params, images, "grad_rollout", _neg_dist_to,
                             target_args=jnp.ones((3, 16)))
    traced = len(counting.counter)
    attention.attention_maps(counting, params, images[::-1], "grad_rollout", _neg_dist_to,
                             target_args=jnp.zeros((3, 16)))
    assert len(counting.counter) == traced


def test_normalize_maps_constant_is_zero():
    maps = jnp.stack([jnp.full((4, 4), 3.0), jnp.arange(16.0).reshape(4, 4)])
    out = np.asarray(attention.normalize_maps(maps))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], np.arange(16.0).reshape(4, 4) / 15.0)


def test_similarity_zero_norm_is_finite():
    zero = jnp.zeros((1, 4))
    unit = jnp.ones((1, 4)) / 2
    assert float(attention.similarity(zero, unit)[0]) == -1.0
    assert float(attention.similarity(zero, unit, "cosine")[0]) == 0.0


# ---------------------------------------------------------------- bad input


def test_bad_inputs(tiny):
    _, params, images, apply_fn, attn = tiny
    with pytest.raises(ValueError, match="same shape"):
        attention.pair_attention_maps(apply_fn, params, images[:1],
                                      jnp.zeros((1, 40, 40, 3)))
    with pytest.raises(ValueError, match="built for 32x32"):
        attention.attention_maps(apply_fn, params, jnp.zeros((1, 40, 40, 3)))
    with pytest.raises(ValueError, match="method"):
        attention.attention_maps(apply_fn, params, images, "lime")
    with pytest.raises(ValueError, match="needs a target_fn"):
        attention.attention_maps(apply_fn, params, images, "grad_rollout")
    with pytest.raises(ValueError, match="head_fusion"):
        attention.attention_rollout(jnp.asarray(attn), "median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention.attention_rollout(jnp.asarray(attn), discard_ratio=1.0)
    with pytest.raises(ValueError, match="square grid"):
        attention.attention_rollout(jnp.ones((1, 1, 1, 7, 7)) / 7)
    with pytest.raises(ValueError, match="grid_shape"):
        attention.attention_rollout(jnp.asarray(attn), grid_shape=(2, 4))
    with pytest.raises(ValueError, match=r"\[L, B, heads, T, T\]"):
        attention.attention_rollout(jnp.ones((2, 3, 5, 5)))
    with pytest.raises(ValueError, match="grads"):
        attention.grad_weighted_rollout(jnp.asarray(attn), jnp.asarray(attn)[:1])
    with pytest.raises(ValueError, match=r"\[L, B, T, T\]"):
        attention.relevance_rollout(jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="one score per image"):
        attention.attention_maps(apply_fn, params, images, "grad_rollout",
                                 lambda e: jnp.sum(e))
