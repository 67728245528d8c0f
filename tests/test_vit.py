"""Tests for models/vit.py: shapes, attention semantics, configs, bad input, training adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from faceaudit_jax.models import vit


@pytest.fixture(scope="module")
def smoke():
    model = vit.build_vit("vit_smoke")
    images = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(1), images)
    return model, params, images


def test_shapes_and_attention_rows_sum_to_one(smoke):
    model, params, images = smoke
    cfg = model.config
    emb, aux = model.apply(params, images)
    assert emb.shape == (3, cfg.embed_dim)
    attn = np.asarray(aux["attn"])
    assert attn.shape == (cfg.num_layers, 3, cfg.num_heads, 17, 17)
    assert attn.dtype == np.float32
    assert (attn >= 0).all()
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)


def test_first_layer_attention_matches_numpy(smoke):
    """Patch embedding + LN + QK^T softmax of block 0, recomputed in numpy from the params."""
    model, params, images = smoke
    cfg = model.config
    p = jax.tree.map(np.asarray, params["params"])
    x = (np.asarray(images, np.float64) - 0.5) / 0.5
    b, size, k = x.shape[0], cfg.image_size, cfg.patch_size
    g = size // k
    # non-overlapping patches in row-major order, each flattened as (row, col, channel)
    patches = x.reshape(b, g, k, g, k, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    kernel = p["patch_embed"]["kernel"].reshape(-1, cfg.hidden_dim)
    tokens = patches @ kernel + p["patch_embed"]["bias"]
    cls = np.broadcast_to(p["cls"], (b, 1, cfg.hidden_dim))
    tokens = np.concatenate([cls, tokens], 1) + p["pos_embed"]
    ln = p["block_0"]["ln_attn"]
    mu = tokens.mean(-1, keepdims=True)
    var = ((tokens - mu) ** 2).mean(-1, keepdims=True)
    normed = (tokens - mu) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]
    qkv = normed @ p["block_0"]["attn"]["qkv"]["kernel"] + p["block_0"]["attn"]["qkv"]["bias"]
    dh = cfg.hidden_dim // cfg.num_heads
    qkv = qkv.reshape(b, -1, 3, cfg.num_heads, dh)
    q, kk = qkv[:, :, 0], qkv[:, :, 1]
    expected = np.zeros((b, cfg.num_heads, 17, 17))
    for i in range(b):
        for h in range(cfg.num_heads):
            logits = q[i, :, h] @ kk[i, :, h].T / np.sqrt(dh)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            expected[i, h] = e / e.sum(-1, keepdims=True)
    _, aux = model.apply(params, images)
    np.testing.assert_allclose(np.asarray(aux["attn"][0]), expected, atol=2e-5)


def test_zero_perturbation_and_lrp_detach_keep_forward(smoke):
    model, params, images = smoke
    emb, aux = model.apply(params, images)
    zeros = jnp.zeros_like(aux["attn"])
    emb_p, _ = model.apply(params, images, attn_perturbation=zeros)
    emb_d, aux_d = model.apply(params, images, lrp_detach=True)
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(emb_p))
    np.testing.assert_allclose(np.asarray(emb), np.asarray(emb_d), atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["attn"]), np.asarray(aux_d["attn"]), atol=1e-6)


def test_perturbation_gradient_equals_finite_differences(smoke):
    """d output / d attention via the perturbation input vs central differences."""
    model, params, images = smoke
    _, aux = model.apply(params, images)
    direction = jax.random.normal(jax.random.key(3), (8,))

    @jax.jit
    def score(pert):
        emb, _ = model.apply(params, images, attn_perturbation=pert)
        return jnp.sum(emb[:, :8] @ direction)

    zeros = jnp.zeros_like(aux["attn"])
    grads = np.asarray(jax.grad(score)(zeros))
    assert np.abs(grads).max() > 0
    # probe the largest-gradient entries of both layers (well above float32 noise)
    eps = 1e-2
    for layer in range(model.config.num_layers):
        flat = np.abs(grads[layer]).ravel()
        for idx in np.argsort(flat)[-3:]:
            pos = (layer,) + np.unravel_index(idx, grads.shape[1:])
            bump = zeros.at[pos].set(eps)
            fd = (score(bump) - score(-bump)) / (2 * eps)
            np.testing.assert_allclose(float(fd), grads[pos], rtol=2e-2, atol=1e-4)


def test_paper_and_tiny_configs_geometry():
    tiny = vit.VIT_CONFIGS["vit_tiny_face"].validate()
    paper = vit.VIT_CONFIGS["vit_face_paper"].validate()
    assert tiny.grid_shape == (14, 14) and tiny.num_tokens == 197
    assert vit.VIT_CONFIGS["vit_tiny_face_p16"].validate().grid_shape == (7, 7)
    assert paper.grid_shape == (14, 14) and paper.num_tokens == 197
    assert paper.patch_size == 12 and paper.stride == 8
    assert (paper.hidden_dim, paper.num_layers, paper.num_heads) == (512, 20, 8)


def test_paper_config_parameter_count():
    """Shape-only init of the paper-scale model equals the closed-form ViT-P12S8 count."""
    model = vit.build_vit("vit_face_paper")
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    c, m, layers, t = 512, 2048, 20, 197
    per_block = 2 * (2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + (c * m + m) + (m * c + c)
    expected = (12 * 12 * 3 * c + c) + c + t * c + layers * per_block + 2 * c + (c * c + c)
    assert count == expected


def test_mean_pooling_and_embed_dim_override():
    model = vit.build_vit("vit_smoke", embed_dim=5, pool="mean")
    images = jnp.full((2, 32, 32, 3), 0.5)
    emb, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), images)[0]
    assert emb.shape == (2, 5)


def test_overlapping_patches_grid():
    model = vit.build_vit("vit_smoke", patch_size=12, patch_stride=8, patch_padding=2)
    assert model.config.grid_shape == (4, 4)
    images = jnp.zeros((1, 32, 32, 3))
    (_, aux), _ = jax.eval_shape(model.init_with_output, jax.random.key(0), images)
    assert aux["attn"].shape == (2, 1, 2, 17, 17)


def test_bad_inputs(smoke):
    model, params, _ = smoke
    with pytest.raises(ValueError, match="built for 32x32"):
        model.apply(params, jnp.zeros((1, 40, 40, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.apply(params, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="attn_perturbation"):
        model.apply(params, jnp.zeros((1, 32, 32, 3)), attn_perturbation=jnp.zeros((2, 1, 2, 5, 5)))
    with pytest.raises(ValueError, match="relevance_tap"):
        model.apply(params, jnp.zeros((1, 32, 32, 3)), relevance_tap=jnp.zeros((2, 1, 5, 5)))
    with pytest.raises(ValueError, match="unknown ViT config"):
        vit.build_vit("vit_huge")
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        vit.build_vit("vit_smoke", depth=3)
    with pytest.raises(ValueError, match="not divisible"):
        vit.build_vit("vit_smoke", num_heads=3)
    with pytest.raises(ValueError, match="do not tile"):
        vit.build_vit("vit_smoke", patch_size=7)
    with pytest.raises(ValueError, match="pool"):
        vit.build_vit("vit_smoke", pool="max")


def test_vit_apply_is_hashable_by_config():
    a = vit.ViTApply(vit.build_vit("vit_smoke"))
    b = vit.ViTApply(vit.build_vit("vit_smoke"))
    assert a == b and hash(a) == hash(b)
    assert a != vit.ViTApply(vit.build_vit("vit_smoke", embed_dim=7))


def _cosface(cosines, labels, scale=16.0, margin=0.2):
    """CosFace (Wang et al. 2018) on cosines, written here as the test's own reference."""
    onehot = jax.nn.one_hot(labels, cosines.shape[-1])
    return optax.softmax_cross_entropy(scale * (cosines - margin * onehot), onehot)


def test_margin_classifier_loss_adapter_learns():
    cfg = vit.VIT_CONFIGS["vit_smoke"]
    model = vit.ViTMarginClassifier(cfg, num_identities=4)
    keys = jax.random.split(jax.random.key(0), 4)
    # 4 identities = 4 colour prototypes plus noise, 2 images each
    protos = jax.random.uniform(keys[0], (4, 1, 1, 3))
    labels = jnp.repeat(jnp.arange(4), 2)
    images = jnp.clip(protos[labels] + 0.05 * jax.random.normal(keys[1], (8, 32, 32, 3)), 0, 1)
    batch = {"image": images, "identity": labels}
    params = model.init(keys[2], images)
    cosines, aux = model.apply(params, images)
    assert cosines.shape == (8, 4) and aux["embedding"].shape == (8, cfg.embed_dim)
    assert float(jnp.abs(cosines).max()) <= 1.0 + 1e-5
    loss_fn = vit.make_margin_loss_fn(model, _cosface)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, metrics

    first = None
    for i in range(25):
        params, state, metrics = step(params, state, jax.random.fold_in(keys[3], i))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.5 * first
    assert float(metrics["accuracy"]) == 1.0
    # the embedder sub-tree explains with ViTApply
    emb, _ = vit.ViTApply(vit.ViTFaceEmbedder(cfg))({"params": params["params"]["embedder"]},
                                                    images)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(model.apply(params, images)[1]
                                                            ["embedding"]), atol=1e-5)


def test_cosface_on_cosines_loss_fn_is_the_library_loss_and_hashable():
    from faceaudit_jax import losses

    cosines = jnp.tanh(jax.random.normal(jax.random.key(0), (6, 5)))
    labels = jnp.asarray([0, 1, 4, 2, 2, 3])
    loss_fn = vit.CosFaceOnCosines(16.0, 0.3)
    loss, metrics = loss_fn(cosines, {"identity": labels})
    assert float(loss) == float(losses.cosface_loss_on_cosines(cosines, labels, 16.0, 0.3))
    assert float(metrics["accuracy"]) == pytest.approx(
        np.mean(np.argmax(np.asarray(cosines), 1) == np.asarray(labels)))
    assert hash(loss_fn) == hash(vit.CosFaceOnCosines(16.0, 0.3))
