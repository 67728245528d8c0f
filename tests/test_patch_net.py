"""Patch region classifier, confounded classifier, their optimiser recipes and the patch sampling hook."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from faceaudit_jax import losses, train_lib
from faceaudit_jax.models import patch_net as pn


# ---------------------------------------------------------------------------
# Grid positions and patch sampling
# ---------------------------------------------------------------------------

def test_grid_positions_paper_setting():
    pos = pn.grid_positions(128, 32, 49)
    assert pos.shape == (2401, 2) and pos.dtype == np.int32
    xs = np.unique(pos[:, 0])
    np.testing.assert_array_equal(xs, np.arange(0, 97, 2))   # stride 2, last patch touches the edge
    np.testing.assert_array_equal(pos[0], [0, 0])
    np.testing.assert_array_equal(pos[-1], [96, 96])
    # Row-major: id = row * grid + col, rows along y.
    np.testing.assert_array_equal(pos[1], [2, 0])
    np.testing.assert_array_equal(pos[49], [0, 2])
    assert len({tuple(p) for p in pos}) == 2401


def test_grid_positions_non_square_and_single():
    pos = pn.grid_positions((20, 30), 10, 3)
    np.testing.assert_array_equal(np.unique(pos[:, 0]), [0, 10, 20])
    np.testing.assert_array_equal(np.unique(pos[:, 1]), [0, 5, 10])
    np.testing.assert_array_equal(pn.grid_positions(16, 8, 1), [[4, 4]])
    # The densest grid: every offset.
    np.testing.assert_array_equal(np.unique(pn.grid_positions(10, 4, 7)[:, 0]), np.arange(7))


def test_grid_positions_bad_inputs():
    with pytest.raises(ValueError, match="larger than the image"):
        pn.grid_positions(16, 17, 2)
    with pytest.raises(ValueError, match="does not fit"):
        pn.grid_positions(16, 8, 10)          # only 9 distinct offsets
    with pytest.raises(ValueError, match="does not fit"):
        pn.grid_positions((40, 12), 8, 6)     # fits along y, not along x
    with pytest.raises(ValueError, match="grid"):
        pn.grid_positions(16, 8, 0)
    with pytest.raises(ValueError, match=">= 1"):
        pn.grid_positions(16, 0, 2)


def test_sample_patches_are_image_crops():
    images = jax.random.uniform(jax.random.PRNGKey(0), (6, 12, 14, 3))
    positions = pn.grid_positions((12, 14), 5, 4)
    sample = jax.jit(pn.sample_patches, static_argnums=2)
    patches, ids = sample(jax.random.PRNGKey(1), images, 5, positions)
    assert patches.shape == (6, 5, 5, 3) and ids.shape == (6,)
    ids = np.asarray(ids)
    assert ids.min() >= 0 and ids.max() < 16
    for b in range(6):
        x, y = positions[ids[b]]
        np.testing.assert_array_equal(np.asarray(patches[b]), np.asarray(images[b, y:y + 5, x:x + 5]))
    # Different keys draw different positions (36 draws from 16: equal with prob ~0).
    _, other = sample(jax.random.PRNGKey(2), jnp.tile(images, (6, 1, 1, 1)), 5, positions)
    _, again = sample(jax.random.PRNGKey(3), jnp.tile(images, (6, 1, 1, 1)), 5, positions)
    assert not np.array_equal(np.asarray(other), np.asarray(again))


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------

def test_patch_net_uses_position_channel():
    model = pn.PatchNet(num_classes=2, num_positions=9, patch_size=6, widths=(4, 8))
    patches = jax.random.uniform(jax.random.PRNGKey(0), (3, 6, 6, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), patches, jnp.zeros(3, jnp.int32))
    assert variables["params"]["position_embedding"]["embedding"].shape == (9, 36)
    same_patch = jnp.tile(patches[:1], (3, 1, 1, 1))
    logits = jax.jit(model.apply)(variables, same_patch, jnp.array([0, 4, 8]))
    assert logits.shape == (3, 2)
    # The same pixels at different grid positions get different outputs.
    assert not np.allclose(logits[0], logits[1]) and not np.allclose(logits[1], logits[2])
    with pytest.raises(ValueError, match="patches must be"):
        model.apply(variables, jnp.zeros((1, 5, 5, 3)), jnp.zeros(1, jnp.int32))


def test_patch_net_resnet18_backbone():
    model = pn.PatchNet(num_classes=2, num_positions=4, patch_size=32, backbone="resnet18")
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros(2, jnp.int32)))
    params = variables["params"]["net"]
    assert params["conv1"]["kernel"].shape == (7, 7, 4, 64)       # 4 input channels
    assert params["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
    n_params = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
    assert 11.0e6 < n_params < 11.4e6                              # ResNet-18 size
    out = jax.eval_shape(lambda v: model.apply(v, x, jnp.zeros(2, jnp.int32)), variables)
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="unknown backbone"):
        pn.PatchNet(backbone="vgg").init(jax.random.PRNGKey(0), x, jnp.zeros(2, jnp.int32))


def test_small_conv_net_dropout_and_batch_norm():
    model = pn.SmallConvNet(num_classes=2, widths=(4, 8, 8))
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
    assert set(variables) == {"params", "batch_stats"}
    assert len([k for k in variables["params"] if k.startswith("conv")]) == 3

    @jax.jit
    def outputs(variables, images):
        # One compiled program for all four calls (compiles dominate on CPU).
        train = lambda seed: model.apply(variables, images, train=True, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.PRNGKey(seed)})[0]
        return model.apply(variables, images), model.apply(variables, images), train(2), train(3)

    eval_a, eval_b, train_a, train_b = outputs(variables, images)
    assert eval_a.shape == (4, 2)
    np.testing.assert_array_equal(eval_a, eval_b)       # eval mode: deterministic
    assert not np.allclose(train_a, train_b)            # train mode: dropout


# ---------------------------------------------------------------------------
# Training recipe
# ---------------------------------------------------------------------------

def test_schedules():
    spe = 10
    schedule = pn.patch_net_schedule(spe)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(40 * spe - 1)) == pytest.approx(1e-3)
    assert float(schedule(40 * spe + 1)) == pytest.approx(1e-4)
    assert float(schedule(80 * spe + 1)) == pytest.approx(1e-5)
    assert float(schedule(89 * spe)) == pytest.approx(1e-5)
    opt = pn.confounded_classifier_optimizer(spe)
    params = {"w": jnp.ones(())}
    state = opt.init(params)
    assert isinstance(opt, optax.GradientTransformation) and state is not None
    with pytest.raises(ValueError, match="steps_per_epoch"):
        pn.patch_net_schedule(0)


def test_patch_training_learns_a_regional_cue():
    """PatchNet through train_lib's step: PatchSampler draws the patches inside the jit."""
    # Label 1 images carry a bright top-left quadrant; the rest is noise.
    size, k, grid = 16, 4, 4
    key = jax.random.PRNGKey(0)
    labels = jnp.arange(64) % 2
    images = 0.5 * jax.random.uniform(key, (64, size, size, 3))
    images = images.at[:, :8, :8].add(0.5 * labels[:, None, None, None])
    positions = pn.grid_positions(size, k, grid)
    model = pn.PatchNet(num_classes=2, num_positions=grid * grid, patch_size=k, widths=(8, 16))
    variables = train_lib.init_model_variables(
        model, key, (jnp.zeros((1, k, k, 3)), jnp.zeros(1, jnp.int32)))
    state = train_lib.train_state_from_variables(variables, optax.adam(1e-2), jax.random.key(1))
    step = train_lib.make_train_step(model, losses.SoftmaxClassificationLoss(0.1),
                                     input_key=("patches", "position_ids"),
                                     augment_fn=pn.PatchSampler(size, k, grid))
    step_losses = []
    for _ in range(60):
        state, metrics = step(state, {"image": images, "label": labels})
        step_losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert np.mean(step_losses[-10:]) < np.mean(step_losses[:10]) - 0.05
    # Patches in the cue's quadrant are classified far better than the rest.
    from faceaudit_jax.explain import patches as P
    conf, pred = P.confidence_maps(pn.make_patch_apply_fn(model), images, k, positions,
                                   variables=train_lib.state_variables(state))
    accuracy = np.mean(np.asarray(pred) == np.asarray(labels)[:, None, None], axis=0)
    assert accuracy[:2, :2].mean() > 0.9 and accuracy[:2, :2].mean() > accuracy[2:, 2:].mean() + 0.2


def test_patch_sampler_crops_the_batch_images():
    """The hook adds one grid patch per image: the crop at the drawn position."""
    images = jax.random.uniform(jax.random.key(0), (5, 12, 12, 3))
    batch = {"image": images, "label": jnp.zeros(5, jnp.int32)}
    out = pn.PatchSampler(12, 4, 3)(jax.random.key(1), batch)
    assert set(out) == {"image", "label", "patches", "position_ids"}
    positions = pn.grid_positions(12, 4, 3)
    patches_ref, ids_ref = pn.sample_patches(jax.random.key(1), images, 4, positions)
    np.testing.assert_array_equal(np.asarray(out["position_ids"]), np.asarray(ids_ref))
    for b, i in enumerate(np.asarray(out["position_ids"])):
        x, y = positions[i]
        np.testing.assert_array_equal(np.asarray(out["patches"][b]),
                                      np.asarray(images[b, y:y + 4, x:x + 4]))
    assert hash(pn.PatchSampler(12, 4, 3)) == hash(pn.PatchSampler(12, 4, 3))
