"""Training library: schedules and optimisers against closed forms, compile count, learning,
checkpoint resume equality, metrics log, evaluation helpers, bad workdirs."""

import json
import re
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from faceaudit_jax import losses, train_lib
from faceaudit_jax.models import build_model

IMAGE_SIZE = 16
BATCH = 8


def _config(**overrides):
    config = train_lib.default_optimizer_config()
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- schedules / optimisers


def test_default_recipe_is_facex():
    config = train_lib.default_optimizer_config()
    assert (config.optimizer, config.lr, config.weight_decay, config.schedule) == ("adam", 1e-3, 1e-4, "step")
    assert tuple(config.decay_boundaries) == pytest.approx((1 / 3, 2 / 3))
    assert (config.decay_factor, config.batch_size, config.num_epochs) == (0.1, 128, 20)


def test_step_schedule_decays_by_10_at_thirds():
    schedule = train_lib.make_schedule(train_lib.default_optimizer_config(), 30)
    values = np.array([float(schedule(i)) for i in range(30)])
    expected = np.array([1e-3] * 10 + [1e-4] * 10 + [1e-5] * 10)
    np.testing.assert_allclose(values, expected, rtol=1e-5)


def test_cosine_exponential_constant_and_warmup_schedules():
    cosine = train_lib.make_schedule(_config(schedule="cosine", lr=0.1), 100)
    for step in (0, 25, 50, 100):
        np.testing.assert_allclose(float(cosine(step)), 0.05 * (1 + np.cos(np.pi * step / 100)), rtol=1e-5, atol=1e-9)
    exponential = train_lib.make_schedule(_config(schedule="exponential", lr=0.1, exp_decay_rate=0.5,
                                                  exp_decay_steps=10), 100)
    np.testing.assert_allclose([float(exponential(s)) for s in (0, 10, 15)], [0.1, 0.05, 0.1 * 0.5 ** 1.5],
                               rtol=1e-5)
    constant = train_lib.make_schedule(_config(schedule="constant", lr=0.3, warmup_steps=4), 10)
    np.testing.assert_allclose([float(constant(s)) for s in (0, 2, 4, 9)], [0.0, 0.15, 0.3, 0.3], rtol=1e-5)


def test_bad_optimizer_configs_raise():
    with pytest.raises(ValueError, match="'rmsprop'.*adam"):
        train_lib.make_optimizer(_config(optimizer="rmsprop"), 10)
    with pytest.raises(ValueError, match="'linear'.*step"):
        train_lib.make_optimizer(_config(schedule="linear"), 10)
    with pytest.raises(ValueError, match="total_steps"):
        train_lib.make_optimizer(_config(), 0)
    with pytest.raises(ValueError, match="decay_boundaries"):
        train_lib.make_optimizer(_config(decay_boundaries=(0.6, 0.3)), 10)


def _numpy_adam(params, grads_fn, lr, wd, steps, decoupled, b1=0.9, b2=0.999, eps=1e-8):
    p = params.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, steps + 1):
        g = grads_fn(p)
        if not decoupled:
            g = g + wd * p  # L2, as torch.optim.Adam(weight_decay=wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        update = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        if decoupled:
            update = update + wd * p
        p = p - lr * update
    return p


@pytest.mark.parametrize("name, decoupled", [("adam", False), ("adamw", True)])
def test_adam_weight_decay_matches_numpy(name, decoupled):
    target = np.array([1.0, -2.0, 0.5])
    params = np.array([0.3, 0.1, -0.4])
    tx = train_lib.make_optimizer(_config(optimizer=name, schedule="constant", lr=0.05, weight_decay=0.1), 5)

    @jax.jit
    def step(p, state):
        g = jax.grad(lambda p: 0.5 * jnp.sum((p - target) ** 2))(p)
        updates, state = tx.update(g, state, p)
        return p + updates, state

    p, state = jnp.asarray(params, jnp.float32), tx.init(jnp.asarray(params, jnp.float32))
    for _ in range(5):
        p, state = step(p, state)
    expected = _numpy_adam(params, lambda p: p - target, 0.05, 0.1, 5, decoupled)
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)
    assert float(train_lib.current_lr(state)) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="module")
def model():
    # BatchNorm so that batch_stats go through the update and the checkpoints.
    return build_model("small_resnet", 1, norm="batch", widths=(8, 8, 8, 8), stem_width=8)


@pytest.fixture(scope="module")
def recipe_tx():
    """The FaceX recipe over 8 steps; shared so the fit tests reuse one compiled update."""
    return train_lib.make_optimizer(train_lib.default_optimizer_config(), 8)


def _bright_dark_batch(step):
    """Deterministic in the step: label 1 for bright images, 0 for dark ones."""
    key = jax.random.fold_in(jax.random.PRNGKey(1234), step)
    k_label, k_image = jax.random.split(key)
    label = jax.random.bernoulli(k_label, 0.5, (BATCH,)).astype(jnp.float32)
    noise = jax.random.uniform(k_image, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3))
    image = 0.5 * noise + 0.5 * label[:, None, None, None]
    return {"image": image, "label": label}


def _bce_on_label(logits, batch):
    return losses.sigmoid_bce(logits, batch["label"])


@pytest.fixture(scope="module")
def learned(model):
    """30 updates with a trace-counting loss: (per-step losses, traces, cache size, state)."""
    traces = []

    def counting_loss(logits, batch):
        traces.append(1)  # runs only while tracing
        return _bce_on_label(logits, batch)

    tx = train_lib.make_optimizer(_config(schedule="constant", lr=1e-2, weight_decay=0.0), 30)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), IMAGE_SIZE, tx)
    train_step = train_lib.make_train_step(model, counting_loss)
    step_losses = []
    for step in range(30):
        state, metrics = train_step(state, _bright_dark_batch(step))
        step_losses.append(metrics["loss"])
    return np.asarray(jax.device_get(step_losses)), len(traces), train_step._cache_size(), state


def test_train_step_compiles_once(learned):
    _, traces, cache_size, state = learned
    assert traces == 1
    assert cache_size == 1
    assert int(state.step) == 30


def test_tiny_model_learns_separable_task(learned, model):
    step_losses, _, _, state = learned
    assert step_losses[-5:].mean() < 0.5 * step_losses[:5].mean()
    test = _bright_dark_batch(10_000)
    logits = train_lib.predict(model, train_lib.state_variables(state), [test["image"]])
    assert float(jnp.mean((logits[:, 0] > 0) == (test["label"] > 0.5))) >= 0.75


class _Killed(Exception):
    pass


def test_checkpoint_resume_equals_uninterrupted_run(model, recipe_tx, tmp_path):
    total = 8
    tx = recipe_tx

    def fresh_state():
        return train_lib.create_train_state(model, jax.random.PRNGKey(7), IMAGE_SIZE, tx)

    def killing_batch_fn(step):
        if step == 5:  # killed after 5 updates; the last checkpoint is at step 3
            raise _Killed
        return _bright_dark_batch(step)

    resumed_dir, straight_dir = tmp_path / "resumed", tmp_path / "straight"
    kw = dict(loss_fn=_bce_on_label, ckpt_every=3, log_every=1, progress=False)
    with pytest.raises(_Killed):
        train_lib.fit(model, fresh_state(), killing_batch_fn, total, str(resumed_dir), **kw)
    assert sorted(os.listdir(resumed_dir / "checkpoints")) == ["3"]

    seen = []

    def recording_batch_fn(step):
        seen.append(step)
        return _bright_dark_batch(step)

    resumed = train_lib.fit(model, fresh_state(), recording_batch_fn, total, str(resumed_dir), **kw)
    assert seen == list(range(3, total))  # continued from the checkpoint, not from scratch
    straight = train_lib.fit(model, fresh_state(), _bright_dark_batch, total, str(straight_dir), **kw)

    assert int(resumed.step) == int(straight.step) == total
    assert jax.tree.structure(resumed.checkpoint_tree()) == jax.tree.structure(straight.checkpoint_tree())
    for a, b in zip(jax.tree.leaves(resumed.checkpoint_tree()), jax.tree.leaves(straight.checkpoint_tree())):
        np.testing.assert_array_equal(a, b)  # exactly equal on CPU
    assert resumed.batch_stats  # BatchNorm statistics went through the checkpoint too

    # The metrics log has each step once (records past the checkpoint were dropped on resume),
    # with the learning rate of the FaceX step schedule.
    records = [json.loads(line) for line in open(resumed_dir / "metrics.jsonl")]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, total + 1))
    expected_lr = [1e-3 * 0.1 ** ((s >= 3) + (s >= 5)) for s in range(total)]  # round(8/3)=3, round(16/3)=5
    np.testing.assert_allclose([r["lr"] for r in train_records], expected_lr, rtol=1e-5)
    assert all(np.isfinite(r["loss"]) for r in train_records)
    assert np.isfinite(train_records[-1]["images_per_s"])
    straight_losses = [json.loads(line)["loss"] for line in open(straight_dir / "metrics.jsonl")]
    np.testing.assert_allclose([r["loss"] for r in train_records], straight_losses, rtol=1e-6)

    # A finished run is not trained further, and keeps its last checkpoints.
    again = train_lib.fit(model, fresh_state(), lambda s: pytest.fail("no batch expected"), total,
                          str(resumed_dir), **kw)
    assert int(again.step) == total
    assert sorted(int(d) for d in os.listdir(resumed_dir / "checkpoints")) == [3, 6, 8]


def test_fit_writes_eval_records(model, recipe_tx, tmp_path):
    state = train_lib.create_train_state(model, jax.random.PRNGKey(3), IMAGE_SIZE, recipe_tx)
    calls = []

    def eval_fn(state):
        calls.append(int(state.step))
        return {"accuracy": 0.5}

    train_lib.fit(model, state, _bright_dark_batch, 2, str(tmp_path), loss_fn=_bce_on_label, eval_fn=eval_fn,
                  eval_every=1, log_every=5, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert calls == [1, 2]
    assert [r for r in records if r["kind"] == "eval"] == [
        {"kind": "eval", "step": 1, "accuracy": 0.5}, {"kind": "eval", "step": 2, "accuracy": 0.5}]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2]  # the last step is always logged


def test_unwritable_workdir_fails_before_training(model, recipe_tx, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = blocker / "run"
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), IMAGE_SIZE, recipe_tx)
    with pytest.raises(ValueError, match=re.escape(str(workdir))):
        train_lib.fit(model, state, lambda s: pytest.fail("trained despite a bad workdir"), 4, str(workdir),
                      loss_fn=_bce_on_label, progress=False)
    assert int(state.step) == 0  # state untouched (not donated)


# ----------------------------------------------------------------------------- evaluation helpers


def test_predict_pads_the_last_batch_and_compiles_once(learned, model):
    *_, state = learned
    variables = train_lib.state_variables(state)
    images = _bright_dark_batch(77)["image"][:7]
    whole = jax.jit(lambda v, x: model.apply(v, x)[0])(variables, images)
    streamed = train_lib.predict(model, variables, [{"image": images[:3]}, {"image": images[3:6]},
                                                    {"image": images[6:]}])
    assert streamed.shape == (7, 1)
    np.testing.assert_allclose(streamed, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        train_lib.predict(model, variables, [])


def test_group_accuracy_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    groups = np.array([1, 1, 1, 0, 0, 0, 0, 1, 1, 0])
    preds = np.array([1, 1, 0, 0, 0, 0, 1, 1, 1, 0])
    report = train_lib.group_accuracy(preds, labels, groups)
    assert report["overall"] == pytest.approx(6 / 10)
    assert report["y=1,a=1"] == pytest.approx(3 / 4) and report["n_y=1,a=1"] == 4
    assert report["y=1,a=0"] == pytest.approx(0.0) and report["n_y=1,a=0"] == 1
    assert report["y=0,a=0"] == pytest.approx(3 / 4) and report["n_y=0,a=0"] == 4
    assert report["y=0,a=1"] == pytest.approx(0.0)
    assert report["aligned"] == pytest.approx(6 / 8) and report["conflicting"] == pytest.approx(0 / 2)
    assert report["worst_group"] == 0.0 and report["gap"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same length"):
        train_lib.group_accuracy(preds[:3], labels, groups)


def test_config_may_be_a_plain_mapping():
    tx = train_lib.make_optimizer({"optimizer": "sgd", "lr": 0.1, "schedule": "constant"}, 3)
    state = tx.init(jnp.ones(2))
    updates, _ = tx.update(jnp.ones(2), state, jnp.ones(2))
    # sgd with momentum 0.9 and L2 1e-4: first update = -lr * (g + wd * p)
    np.testing.assert_allclose(updates, -0.1 * (1 + 1e-4) * np.ones(2), rtol=1e-6)
    assert isinstance(train_lib.default_optimizer_config(), ml_collections.ConfigDict)


# ----------------------------------------------------------------------------- hooks: augmentation, window means, BN recalibration


def _small_bn_net():
    from faceaudit_jax.models import patch_net
    return patch_net.SmallConvNet(num_classes=2, widths=(2, 2, 2), conv_dropout=0.2, head_dropout=0.2)


def _grey_where_flagged(key, batch):
    """An augmentation that greys the top half of the flagged images (ignores its key)."""
    flag = batch["flag"][:, None, None, None]
    top = (jnp.arange(batch["image"].shape[1]) < batch["image"].shape[1] // 2)[None, :, None, None]
    return {**batch, "image": jnp.where(flag & top, 0.5, batch["image"])}


def test_augment_fn_runs_inside_the_step_with_split_keys():
    """Augmenting inside the step equals feeding pre-augmented images, and the dropout
    key is the second half of split(fold_in(rng, step)) (reference: a hand-written forward)."""
    model = _small_bn_net()
    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    labels = jnp.array([0, 1, 0, 1])
    variables = train_lib.init_model_variables(model, jax.random.key(1), (images[:1],))
    rng, tx = jax.random.key(7), optax.sgd(0.1)
    loss_fn = losses.SoftmaxClassificationLoss()
    step = train_lib.make_train_step(model, loss_fn, augment_fn=_grey_where_flagged)
    fresh = lambda: train_lib.train_state_from_variables(  # noqa: E731  donated: one per call
        jax.tree.map(jnp.copy, variables), tx, rng)
    greyed = _grey_where_flagged(None, {"image": images, "flag": jnp.ones(4, bool)})["image"]
    inside, m_inside = step(fresh(), {"image": images, "label": labels, "flag": jnp.ones(4, bool)})
    outside, m_outside = step(fresh(), {"image": greyed, "label": labels, "flag": jnp.zeros(4, bool)})
    assert float(m_inside["loss"]) == float(m_outside["loss"])
    for a, b in zip(jax.tree.leaves(inside.params), jax.tree.leaves(outside.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dropout_key = jax.random.split(jax.random.fold_in(jax.random.key_data(rng), 0))[1]
    logits, _ = model.apply(variables, greyed, train=True, rngs={"dropout": dropout_key},
                            mutable=["batch_stats"])
    assert float(m_inside["loss"]) == pytest.approx(float(loss_fn(logits, {"label": labels})[0]), rel=1e-6)
    assert int(inside.step) == 1 and step._cache_size() == 1


def test_fit_window_mean_logs_the_mean_of_each_window(model, recipe_tx, tmp_path):
    """log_window_mean: each train record holds the mean loss of the steps since the last one
    (reference: the same updates by hand with make_train_step, the same compiled step)."""
    fresh = lambda: train_lib.create_train_state(model, jax.random.PRNGKey(3), IMAGE_SIZE, recipe_tx)  # noqa: E731
    train_lib.fit(model, fresh(), _bright_dark_batch, 4, str(tmp_path), loss_fn=_bce_on_label,
                  log_every=2, log_window_mean=True, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    step, state, by_hand = train_lib.make_train_step(model, _bce_on_label), fresh(), []
    for i in range(4):
        state, metrics = step(state, _bright_dark_batch(i))
        by_hand.append((float(metrics["loss"]), float(metrics["lr"])))
    assert [r["step"] for r in records] == [2, 4]
    for record, window in zip(records, (by_hand[:2], by_hand[2:])):
        assert record["loss"] == pytest.approx(np.mean([v[0] for v in window]), rel=1e-6)
        assert record["lr"] == pytest.approx(np.mean([v[1] for v in window]), rel=1e-6)
    assert by_hand[0][0] != by_hand[1][0]  # a window of different values, not a copy


def test_recalibrated_statistics_are_the_batch_statistics():
    """PooledSmallConvNet = SmallConvNet on 2 x 2 block means; and with the whole data set
    in one batch, re-estimated running statistics equal the batch statistics, so
    eval-mode logits equal train-mode ones (no dropout)."""
    from faceaudit_jax.data import pipeline
    from faceaudit_jax.models import patch_net as pn
    model = pn.PooledSmallConvNet(widths=(3, 4, 5), conv_dropout=0.0, head_dropout=0.0,
                                  input_pool=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    x = pipeline.uint8_to_float(images)
    # Random weights, running statistics at their initial values (mean 0, variance 1).
    shapes = train_lib.variables_template(model, (x,))
    variables = {
        "params": jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), jnp.float32),
                               shapes["params"]),
        "batch_stats": jax.tree_util.tree_map_with_path(
            lambda path, s: jnp.ones(s.shape) if path[-1].key == "var" else jnp.zeros(s.shape),
            shapes["batch_stats"])}
    evaluate = jax.jit(model.apply)
    train_mode = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    pooled = x.reshape(8, 8, 2, 8, 2, 3).mean(axis=(2, 4))
    reference = jax.jit(pn.SmallConvNet(widths=(3, 4, 5), conv_dropout=0.0, head_dropout=0.0).apply)(
        {"params": variables["params"]["net"], "batch_stats": variables["batch_stats"]["net"]}, pooled)
    before = evaluate(variables, x)
    np.testing.assert_allclose(np.asarray(before), np.asarray(reference), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(before), np.asarray(train_mode(variables)), atol=1e-3)
    batch_fn = pipeline.array_batch_fn(images, 8, 0)
    recalibrated = train_lib.recalibrate_batch_stats(model, variables, batch_fn, 150, jax.random.key(3))
    np.testing.assert_allclose(np.asarray(evaluate(recalibrated, x)),
                               np.asarray(train_mode(variables)), rtol=1e-3, atol=1e-3)
    assert recalibrated["params"] is variables["params"]
    # No steps leaves the statistics alone.
    unchanged = train_lib.recalibrate_batch_stats(model, variables, batch_fn, 0, jax.random.key(3))
    assert unchanged["batch_stats"] is variables["batch_stats"]
