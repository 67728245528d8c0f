"""Face embedder: shapes, the features/head split, margin training, closures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import losses, train_lib
from faceaudit_jax.explain import corrrise as cr
from faceaudit_jax.models import embedder as E
from faceaudit_jax.models import resnet

TINY = dict(widths=(8, 8, 16, 16), stem_width=8)


def jitted_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


def test_small_embedder_at_112_and_split():
    model = E.build_embedder("small_resnet", 32, **TINY)
    variables = resnet.init_variables(model, jax.random.PRNGKey(0), 112)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 112, 112, 3))
    emb, aux = jitted_apply(model)(variables, x)
    assert emb.shape == (2, 32) and aux["fmap"].shape == (2, 7, 7, 16)
    features_fn, head_fn, embed_fn = E.embedder_fns(model, variables)
    np.testing.assert_allclose(head_fn(features_fn(x)), emb, rtol=1e-4, atol=1e-4)
    unit = embed_fn(x)
    np.testing.assert_allclose(jnp.linalg.norm(unit, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, emb / jnp.linalg.norm(emb, axis=-1, keepdims=True),
                               atol=1e-4)


def test_batchnorm_head_and_avg_pooling():
    model = E.build_embedder("small_resnet", 16, head_norm="batch", pooling="avg", **TINY)
    variables = resnet.init_variables(model, jax.random.PRNGKey(0), 32)
    assert "batch_stats" in variables
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 32, 32, 3))
    apply = jitted_apply(model)
    (emb, _), updates = apply(variables, x, train=True, mutable=("batch_stats",))
    # Training mode normalises the embedding over the batch.
    np.testing.assert_allclose(np.asarray(emb).mean(axis=0), 0.0, atol=1e-4)
    changed = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), updates["batch_stats"],
                           variables["batch_stats"])
    assert any(jax.tree.leaves(changed))
    # Average pooling accepts another input size.
    emb64, aux = apply(variables, jnp.ones((1, 64, 64, 3)))
    assert emb64.shape == (1, 16) and aux["fmap"].shape == (1, 4, 4, 16)


def test_margin_training_reduces_loss_and_strips_to_embedder():
    model = E.build_embedder_with_margin(4, "small_resnet", 16, **TINY)
    tx = train_lib.make_optimizer(train_lib.default_optimizer_config(), 10)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), 32, tx)
    assert state.params["class_centres"].shape == (4, 16)
    images = jax.random.uniform(jax.random.PRNGKey(3), (8, 32, 32, 3))
    batch = {"image": images, "identity": jnp.arange(8) % 4}
    loss_fn = E.margin_loss_fn("cosface", scale=16.0)
    apply = jitted_apply(model)
    outputs, _ = apply(train_lib.state_variables(state), images)
    loss0, extras = loss_fn(outputs, batch)
    assert float(loss0) == pytest.approx(float(losses.margin_softmax_loss(
        outputs["embeddings"], outputs["class_centres"], batch["identity"], kind="cosface",
        scale=16.0)))
    assert 0.0 <= float(extras["class_accuracy"]) <= 1.0
    step = train_lib.make_train_step(model, loss_fn)
    for _ in range(6):
        state, metrics = step(state, batch)
    outputs, _ = apply(train_lib.state_variables(state), images)
    assert float(loss_fn(outputs, batch)[0]) < float(loss0)
    bare = E.build_embedder("small_resnet", 16, **TINY)
    bare_vars = E.embedder_variables(train_lib.state_variables(state))
    assert "class_centres" not in bare_vars["params"]
    emb, _ = jitted_apply(bare)(bare_vars, images)
    np.testing.assert_allclose(emb, outputs["embeddings"], atol=1e-5)


def test_similarity_cam_on_the_embedder_head():
    model = E.build_embedder("small_resnet", 16, **TINY)
    variables = resnet.init_variables(model, jax.random.PRNGKey(0), 32)
    features_fn, head_fn, _ = E.embedder_fns(model, variables)
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 32, 32, 3))
    cam_a, cam_b = cr.similarity_cam(features_fn, head_fn, x, x[::-1])
    assert cam_a.shape == (2, 32, 32) and cam_b.shape == (2, 32, 32)
    assert np.all(np.isfinite(cam_a)) and float(cam_a.max()) <= 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="pooling="):
        E.build_embedder(pooling="max")
    with pytest.raises(ValueError, match="embedding_dim=0"):
        E.build_embedder(embedding_dim=0)
    with pytest.raises(ValueError, match="head_norm="):
        E.build_embedder(head_norm="layer")
    with pytest.raises(ValueError, match="head_groups=5"):
        E.build_embedder(head_norm="group", head_groups=5)
    with pytest.raises(ValueError, match="num_classes=1"):
        E.build_embedder_with_margin(1)
    with pytest.raises(ValueError, match="kind="):
        E.margin_loss_fn("sphereface")
    with pytest.raises(ValueError, match="unknown model name"):
        E.build_embedder("vgg")
