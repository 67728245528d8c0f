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


@pytest.fixture(scope="module")
def group_model():
    """GroupNorm embedder (small_resnet's default head) at 112 px, flatten pooling."""
    model = E.build_embedder("small_resnet", 32, **TINY)
    return model, resnet.init_variables(model, jax.random.PRNGKey(0), 112)


def test_small_embedder_at_112_and_split(group_model):
    model, variables = group_model
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 112, 112, 3))
    emb, aux = jitted_apply(model)(variables, x)
    assert emb.shape == (2, 32) and aux["fmap"].shape == (2, 7, 7, 16)
    assert "batch_stats" not in variables
    features_fn, head_fn, embed_fn = E.embedder_fns(model, variables)
    np.testing.assert_allclose(head_fn(features_fn(x)), emb, rtol=1e-4, atol=1e-4)
    unit = embed_fn(x)
    np.testing.assert_allclose(jnp.linalg.norm(unit, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, emb / jnp.linalg.norm(emb, axis=-1, keepdims=True),
                               atol=1e-4)
    # Grad-CAM on the cosine score through the head only.
    cam_a, cam_b = cr.similarity_cam(features_fn, head_fn, x, x[::-1])
    assert cam_a.shape == (2, 112, 112) and cam_b.shape == (2, 112, 112)
    assert np.all(np.isfinite(cam_a)) and float(cam_a.max()) <= 1.0


def test_margin_training_with_batchnorm_head():
    model = E.build_embedder_with_margin(4, "small_resnet", 16, head_norm="batch",
                                         pooling="avg", **TINY)
    tx = train_lib.make_optimizer(train_lib.default_optimizer_config(), 10)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), 32, tx)
    assert state.params["class_centres"].shape == (4, 16)
    assert state.batch_stats
    images = jax.random.uniform(jax.random.PRNGKey(3), (8, 32, 32, 3))
    batch = {"image": images, "identity": jnp.arange(8) % 4}
    loss_fn = E.margin_loss_fn("arcface", scale=16.0)
    apply = jitted_apply(model)
    # Training mode normalises the embeddings over the batch (final BatchNorm).
    (train_out, _), _ = apply(train_lib.state_variables(state), images, train=True,
                              mutable=("batch_stats",))
    np.testing.assert_allclose(np.asarray(train_out["embeddings"]).mean(axis=0), 0.0,
                               atol=1e-4)
    outputs, _ = apply(train_lib.state_variables(state), images)
    loss0, extras = loss_fn(outputs, batch)
    assert float(loss0) == pytest.approx(float(losses.margin_softmax_loss(
        outputs["embeddings"], outputs["class_centres"], batch["identity"], kind="arcface",
        scale=16.0)))
    assert 0.0 <= float(extras["class_accuracy"]) <= 1.0
    stats0 = jax.tree.map(np.asarray, state.batch_stats)  # the step donates the state
    step = train_lib.make_train_step(model, loss_fn)
    for _ in range(6):
        state, metrics = step(state, batch)
    changed = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), state.batch_stats, stats0)
    assert all(jax.tree.leaves(changed))
    outputs, _ = apply(train_lib.state_variables(state), images)
    assert float(loss_fn(outputs, batch)[0]) < float(loss0)
    # The bare embedder with the trained variables gives the same embeddings,
    # and average pooling accepts another input size.
    bare = E.build_embedder("small_resnet", 16, head_norm="batch", pooling="avg", **TINY)
    bare_vars = E.embedder_variables(train_lib.state_variables(state))
    assert "class_centres" not in bare_vars["params"]
    bare_apply = jitted_apply(bare)
    emb, _ = bare_apply(bare_vars, images)
    np.testing.assert_allclose(emb, outputs["embeddings"], atol=1e-5)
    emb64, aux = bare_apply(bare_vars, jnp.ones((1, 64, 64, 3)))
    assert emb64.shape == (1, 16) and aux["fmap"].shape == (1, 4, 4, 16)


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
