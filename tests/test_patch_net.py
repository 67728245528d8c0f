"""Patch region classifier, confounded classifier and their training recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from faceaudit_jax.data import pipeline
from faceaudit_jax.mitigation import noise
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
    # Label 1 images carry a bright top-left quadrant; the rest is noise.
    size, k, grid = 16, 4, 4
    key = jax.random.PRNGKey(0)
    labels = jnp.arange(64) % 2
    images = 0.5 * jax.random.uniform(key, (64, size, size, 3))
    images = images.at[:, :8, :8].add(0.5 * labels[:, None, None, None])
    positions = pn.grid_positions(size, k, grid)
    model = pn.PatchNet(num_classes=2, num_positions=grid * grid, patch_size=k, widths=(8, 16))
    state = pn.create_train_state(key, model, (jnp.zeros((1, k, k, 3)), jnp.zeros(1, jnp.int32)),
                                  optax.adam(1e-2))
    step = pn.make_patch_train_step(positions, k, label_smoothing=0.1)
    losses = []
    for i in range(60):
        state, metrics = step(state, images, labels, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert state.batch_stats  # batch-norm statistics were updated in the step
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
    # Patches in the cue's quadrant are classified far better than the rest.
    from faceaudit_jax.explain import patches as P
    conf, pred = P.confidence_maps(pn.make_patch_apply_fn(model), images, k, positions,
                                   variables=pn.state_variables(state))
    accuracy = np.mean(np.asarray(pred) == np.asarray(labels)[:, None, None], axis=0)
    assert accuracy[:2, :2].mean() > 0.9 and accuracy[:2, :2].mean() > accuracy[2:, 2:].mean() + 0.2


def test_classifier_step_applies_augmentation_inside():
    model = pn.SmallConvNet(num_classes=2, widths=(4, 8, 8))
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
    labels = jnp.array([0, 1, 0, 1])
    state = pn.create_train_state(jax.random.PRNGKey(1), model, (images[:1],),
                                  pn.confounded_classifier_optimizer(5, learning_rate=1e-2))
    # An augmentation that greys the pixels where attribution > 0. One compiled
    # step serves both calls: augmenting inside the step (attribution 1) must
    # equal feeding already-greyed images with the augmentation off (0).
    grey_out = lambda key, x, attribution: jnp.where(attribution[None, :, :, None] > 0, 0.5, x)
    step = pn.make_classifier_train_step(grey_out)
    key = jax.random.PRNGKey(7)
    new_state, metrics = step(state, images, labels, key, jnp.ones((16, 16)))
    pre_greyed, metrics_pre = step(state, jnp.full_like(images, 0.5), labels, key, jnp.zeros((16, 16)))
    _, metrics_kept = step(state, images, labels, key, jnp.zeros((16, 16)))
    assert float(metrics["loss"]) == pytest.approx(float(metrics_pre["loss"]), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(pre_greyed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert abs(float(metrics_kept["loss"]) - float(metrics["loss"])) > 1e-4
    assert int(new_state.step) == 1
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     state.batch_stats, new_state.batch_stats)
    assert any(jax.tree_util.tree_leaves(changed))     # running statistics moved


def test_smoothed_cross_entropy_closed_form():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 0])
    logp = np.asarray(jax.nn.log_softmax(logits))
    eps = 0.1
    target = np.array([[1 - eps / 2, eps / 2]] * 2)
    want = -(target * logp).sum(-1).mean()
    assert float(pn.smoothed_cross_entropy(logits, labels, eps)) == pytest.approx(want, 1e-6)


# ----------------------------------------------------------------------------- training loops over uint8 arrays


def test_batches_reject_bad_selections():
    images = np.zeros((8, 16, 16, 3), np.uint8)
    labels = np.zeros(8, np.int32)
    with pytest.raises(ValueError, match="needs a pixel selection"):
        pn.train_classifier(None, None, images, labels, noise.AUGMENT_NOISE, None, batch_size=4,
                            epochs=1, seed=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[H, W\] or \[N, H, W\]"):
        pn.train_classifier(None, None, images, labels, noise.AUGMENT_MASK,
                            np.zeros((8, 16), bool), batch_size=4, epochs=1, seed=0,
                            key=jax.random.key(0))
    with pytest.raises(ValueError, match="must be bool"):
        pn.train_classifier(None, None, images, labels, noise.AUGMENT_MASK,
                            np.zeros((16, 16), np.float32), batch_size=4, epochs=1, seed=0,
                            key=jax.random.key(0))
    with pytest.raises(ValueError, match="mode=7"):
        pn.train_classifier(None, None, images, labels, 7, None, batch_size=4, epochs=1,
                            seed=0, key=jax.random.key(0))


def test_batches_follow_the_step_order():
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    selection = np.zeros((8, 16, 16), bool)
    selection[:, :4] = True
    batches = pn.AugmentedBatches(images, np.arange(8), noise.AUGMENT_MASK, selection, 4, seed=5)
    for step in range(4):
        x, y, spec = batches(step)
        idx = pipeline.step_indices(np.arange(8), 4, 5, step)
        np.testing.assert_array_equal(np.asarray(y), idx)
        np.testing.assert_allclose(np.asarray(x), images[idx] / 255.0, atol=1e-7)
        assert spec["selection"].shape == (4, 16, 16) and int(spec["mode"]) == noise.AUGMENT_MASK


def test_every_augmentation_shares_one_compiled_step():
    model = pn.PooledSmallConvNet(widths=(2, 2, 2), input_pool=2)
    optimizer = pn.confounded_classifier_optimizer(2, 1e-2)
    state0 = pn.with_array_step(pn.create_train_state(
        jax.random.key(0), model, (jnp.zeros((1, 16, 16, 3)),), optimizer))
    step = pn.make_classifier_train_step(noise.make_selection_augment_fn())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 8).astype(np.int32)
    maps = rng.random((8, 16, 16)).astype(np.float32)
    runs = [(noise.AUGMENT_NONE, None, 0.7), (noise.AUGMENT_NOISE, maps[0], 0.7),
            (noise.AUGMENT_MASK, maps, 0.7), (noise.AUGMENT_NOISE, maps[0], 0.95)]
    for mode, m, q in runs:
        selection = None if m is None else noise.quantile_selections(m, q)
        state, history = pn.train_classifier(step, state0, images, labels, mode, selection,
                                             batch_size=4, epochs=2, seed=0,
                                             key=jax.random.key(1))
        assert len(history) == 2 and int(state.step) == 4
    assert step._cache_size() == 1


def test_pooled_classifier_and_batch_stat_recalibration():
    """PooledSmallConvNet = SmallConvNet on 2 x 2 block means; and with the whole data set
    in one batch, re-estimated running statistics equal the batch statistics, so
    eval-mode logits equal train-mode ones (no dropout)."""
    model = pn.PooledSmallConvNet(widths=(3, 4, 5), conv_dropout=0.0, head_dropout=0.0,
                                  input_pool=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    x = pipeline.uint8_to_float(images)
    # Random weights from the variables' shapes (eval_shape: no initialiser to compile),
    # running statistics at their initial values (mean 0, variance 1).
    shapes = jax.eval_shape(model.init, jax.random.key(1), x)
    variables = {
        "params": jax.tree_util.tree_map(
            lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), jnp.float32), shapes["params"]),
        "batch_stats": jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape) if len(s.shape) else s, shapes["batch_stats"])}
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else v,
        variables["batch_stats"])
    evaluate = jax.jit(model.apply)
    train_mode = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])[0])

    pooled = x.reshape(8, 8, 2, 8, 2, 3).mean(axis=(2, 4))
    reference = jax.jit(pn.SmallConvNet(widths=(3, 4, 5), conv_dropout=0.0,
                                        head_dropout=0.0).apply)(
        {"params": variables["params"]["net"], "batch_stats": variables["batch_stats"]["net"]},
        pooled)
    before = evaluate(variables, x)
    np.testing.assert_allclose(np.asarray(before), np.asarray(reference), rtol=1e-5, atol=1e-5)

    assert not np.allclose(np.asarray(before), np.asarray(train_mode(variables)), atol=1e-3)
    stats_step = pn.make_batch_stats_step(model, noise.make_selection_augment_fn())
    labels = np.zeros(8, np.int32)
    recalibrated = pn.recalibrate_batch_stats(
        stats_step, variables, images, labels, noise.AUGMENT_NONE, None, batch_size=8,
        passes=150, seed=0, key=jax.random.key(3))
    np.testing.assert_allclose(np.asarray(evaluate(recalibrated, x)),
                               np.asarray(train_mode(variables)), rtol=1e-3, atol=1e-3)
    assert recalibrated["params"] is variables["params"]
    # passes = 0 leaves the variables alone.
    assert pn.recalibrate_batch_stats(stats_step, variables, images, labels, noise.AUGMENT_NONE,
                                      None, batch_size=8, passes=0, seed=0,
                                      key=jax.random.key(3)) is variables
