"""Checkpoint integrity: real Orbax checkpoints written by a tiny training run, then damaged.

One module fixture trains 4 updates (checkpoints at steps 2 and 4); each test
copies that workdir, damages the newest step the way a disk, a kill or a user
does, and resumes. A damaged newest step must be reported by number and the
run must replay from step 2 to the same final arrays; with no intact step,
one error naming the folder.
"""

import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from faceaudit_jax import losses, train_lib
from faceaudit_jax.models import build_model

# When a damaged step fails to restore, Orbax's async reader can call back into
# its already-closed event loop; Python reports that as "Exception ignored".
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

IMAGE_SIZE = 16
BATCH = 4
TOTAL = 4


@pytest.fixture(scope="module")
def model():
    return build_model("small_resnet", 1, norm="batch", widths=(4, 4, 4, 4), stem_width=4)


@pytest.fixture(scope="module")
def tx():
    return train_lib.make_optimizer(train_lib.default_optimizer_config(), TOTAL)


def _batch(step):
    key = jax.random.fold_in(jax.random.PRNGKey(7), step)
    k_label, k_image = jax.random.split(key)
    label = jax.random.bernoulli(k_label, 0.5, (BATCH,)).astype(jnp.float32)
    image = 0.5 * jax.random.uniform(k_image, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)) + 0.5 * label[:, None, None, None]
    return {"image": image, "label": label}


def _loss(logits, batch):
    return losses.sigmoid_bce(logits, batch["label"])


def _fresh(model, tx):
    return train_lib.create_train_state(model, jax.random.PRNGKey(0), IMAGE_SIZE, tx)


def _fit(model, tx, workdir, batch_fn=_batch):
    return train_lib.fit(model, _fresh(model, tx), batch_fn, TOTAL, str(workdir), loss_fn=_loss,
                         ckpt_every=2, log_every=1, progress=False)


@pytest.fixture(scope="module")
def trained(model, tx, tmp_path_factory):
    """(workdir with checkpoints at steps 2 and 4, the final arrays as numpy)."""
    workdir = tmp_path_factory.mktemp("trained")
    state = _fit(model, tx, workdir)
    return workdir, jax.tree.map(np.asarray, state.checkpoint_tree())


def _copy(trained, tmp_path):
    src, _ = trained
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _data_files(step_dir):
    """The array data files of a step: OCDBT data under default/ (d/ and ocdbt.process_*/d/, which
    may hold copies of the same bytes), those over 1 KB (the arrays, not the b-tree nodes)."""
    return [os.path.join(root, f) for root, _, names in os.walk(step_dir / "default")
            if os.path.basename(root) == "d" for f in names
            if os.path.getsize(os.path.join(root, f)) > 1024]


def _flip_bytes(path, count=16):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _damage(step_dir, how):
    if how == "flip_data_bytes":
        for path in _data_files(step_dir):
            _flip_bytes(path)
    elif how == "truncate_data_file":
        for path in _data_files(step_dir):
            _truncate(path)
    elif how == "delete_default":
        shutil.rmtree(step_dir / "default")
    elif how == "garble_metadata":
        (step_dir / "default" / "_METADATA").write_text("{not json")
    elif how == "garble_step_metadata":
        (step_dir / "_CHECKPOINT_METADATA").write_text("\x00garbage")
    else:
        raise AssertionError(how)


DAMAGES = ["flip_data_bytes", "truncate_data_file", "delete_default", "garble_metadata",
           "garble_step_metadata"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_step_falls_back_to_the_intact_one(trained, model, tx, tmp_path, how):
    workdir = _copy(trained, tmp_path)
    _damage(workdir / "checkpoints" / "4", how)
    replayed = []

    def recording(step):
        replayed.append(step)
        return _batch(step)

    with pytest.warns(UserWarning, match=r"step 4 is damaged .*Resuming from step 2"):
        state = _fit(model, tx, workdir, recording)
    assert replayed == [2, 3]  # the updates after the intact step, replayed
    _, final = trained
    for a, b in zip(jax.tree.leaves(state.checkpoint_tree()), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # step 4 saved anew
    assert len(os.listdir(workdir / train_lib.DAMAGED_DIR)) == 1  # the damaged one, kept aside
    # Verified again on the next restore: no warning, nothing to train.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _fit(model, tx, workdir, lambda s: pytest.fail("retrained an intact run"))
    assert int(again.step) == TOTAL


def test_no_intact_step_is_one_error_naming_the_folder(trained, model, tx, tmp_path):
    workdir = _copy(trained, tmp_path)
    _damage(workdir / "checkpoints" / "4", "flip_data_bytes")
    _damage(workdir / "checkpoints" / "2", "delete_default")
    with pytest.raises(train_lib.CheckpointError) as info:
        _fit(model, tx, workdir, lambda s: pytest.fail("trained over damaged checkpoints"))
    message = str(info.value)
    assert str(workdir / "checkpoints") in message
    assert "step 4:" in message and "step 2:" in message and f"Delete {workdir} to train" in message
    assert len(message.splitlines()) == 1


def test_restore_latest_verifies_too(trained, model, tx, tmp_path):
    workdir = _copy(trained, tmp_path)
    _damage(workdir / "checkpoints" / "4", "truncate_data_file")
    with pytest.warns(UserWarning, match="step 4 is damaged"):
        state = train_lib.restore_latest(_fresh(model, tx), str(workdir))
    assert int(state.step) == 2


def _save_unverified(workdir, tree, step):
    """A step written as before checksums existed (plain Orbax save, no custom metadata)."""
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))


def test_unverified_step_with_nan_or_absurd_moments_is_damaged(trained, model, tx, tmp_path):
    workdir = _copy(trained, tmp_path)
    _, final = trained
    shutil.rmtree(workdir / "checkpoints" / "4")
    for step, bad in ((4, np.nan), (6, 3e38)):  # NaN, and what a flipped exponent bit gives
        tree = jax.tree.map(np.copy, final)
        moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree["opt_state"])[0]
                   if ".mu" in jax.tree_util.keystr(path)]  # adam's first moments
        moments[0].flat[0] = bad
        tree["step"] = np.asarray(step, np.int32)
        _save_unverified(workdir, tree, step)
    with pytest.warns(UserWarning, match=r"step 6 is damaged \(no checksum, and NaN/Inf or \|value\|.*"
                                         r"step 4 is damaged .*Resuming from step 2"):
        state = train_lib.restore_latest(_fresh(model, tx), str(workdir))
    assert int(state.step) == 2


def test_unverified_finite_step_restores_with_a_warning(trained, model, tx, tmp_path):
    workdir = tmp_path / "legacy"
    _, final = trained
    _save_unverified(workdir, final, TOTAL)
    with pytest.warns(UserWarning, match="step 4 .* has no checksum"):
        state = train_lib.restore_latest(_fresh(model, tx), str(workdir))
    for a, b in zip(jax.tree.leaves(state.checkpoint_tree()), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_stale_orbax_tmp_folder_is_removed(trained, model, tx, tmp_path):
    workdir = _copy(trained, tmp_path)
    stale = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    shutil.copytree(workdir / "checkpoints" / "4", stale)
    _fit(model, tx, workdir, lambda s: pytest.fail("retrained an intact run"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_half_written_metrics_line_is_dropped_with_a_warning(trained, model, tx, tmp_path):
    workdir = _copy(trained, tmp_path)
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines) + '{"kind": "train", "step": 5, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped its last line"):
        _fit(model, tx, workdir, lambda s: pytest.fail("retrained an intact run"))
    assert metrics.read_text() == "".join(lines)


def test_saved_variables_round_trip_and_refuse_damage(tmp_path):
    """save_variables / load_variables: the final variables of a model trained outside
    fit, in fit's format and with its checksum check."""
    rng = np.random.default_rng(0)
    variables = {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.normal(size=32), jnp.float32)}}
    template = jax.eval_shape(lambda: variables)
    folder = tmp_path / "model"
    assert train_lib.load_variables(str(folder), template) is None
    train_lib.save_variables(str(folder), variables)
    loaded = train_lib.load_variables(str(folder), template)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        found = loaded
        for key in path:
            found = found[key.key]
        np.testing.assert_array_equal(np.asarray(found), np.asarray(leaf))
    # Saving again replaces the variables.
    train_lib.save_variables(str(folder), {**variables, "params": {"w": jnp.zeros((64, 32))}})
    assert float(jnp.abs(train_lib.load_variables(str(folder), template)["params"]["w"]).sum()) == 0
    train_lib.save_variables(str(folder), variables)
    _damage(folder / "0", "flip_data_bytes")
    with pytest.raises(train_lib.CheckpointError, match="cannot be used"):
        train_lib.load_variables(str(folder), template)
