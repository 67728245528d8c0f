"""Attribution-guided mask / noise augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.mitigation import debias_runs
from faceaudit_jax.mitigation import noise as N

H, W = 16, 20


def random_images(seed, batch=3):
    rng = np.random.default_rng(seed)
    # Away from 0, 1 and the 0.5 fill so every altered value is visibly changed.
    images = rng.uniform(0.05, 0.95, (batch, H, W, 3)).astype(np.float32)
    images[np.isclose(images, 0.5, atol=1e-3)] = 0.3
    return jnp.asarray(images)


@pytest.mark.parametrize("q", [0.6, 0.7, 0.8, 0.95, 1.0, 0.01])
def test_quantile_mask_selects_exact_top_share(q):
    rng = np.random.default_rng(0)
    attribution = rng.uniform(0, 1, (4, H, W)).astype(np.float32)
    sel = np.asarray(N.quantile_mask(attribution, q))
    expected = int(round((1 - q) * H * W))
    for b in range(4):
        assert sel[b].sum() == expected
        if 0 < expected < H * W:
            # Every selected pixel is attributed at least as much as every other one.
            assert attribution[b][sel[b]].min() >= attribution[b][~sel[b]].max()
            # The released code's rule (strictly above the q-quantile) agrees up to one pixel.
            released = attribution[b] > np.quantile(attribution[b], q)
            assert abs(int(released.sum()) - expected) <= 1
            assert (released & ~sel[b]).sum() == 0


def test_quantile_mask_exact_share_with_ties():
    # A map with large flat plateaus: a threshold rule would select 0% or 50%.
    attribution = np.zeros((H, W), np.float32)
    attribution[:, W // 2:] = 1.0
    attribution[0, 0] = 0.5
    for q in (0.6, 0.7, 0.8, 0.95):
        sel = np.asarray(N.quantile_mask(attribution, q))
        assert sel.sum() == round((1 - q) * H * W)
        # Highest values first: the plateau of ones fills before anything else.
        n_ones = int((attribution == 1).sum())
        assert sel[attribution == 1].sum() == min(sel.sum(), n_ones)
    constant = np.asarray(N.quantile_mask(np.ones((H, W)), 0.75))
    assert constant.sum() == 80


def test_mask_changes_exactly_the_selection():
    images = random_images(1)
    attribution = jax.random.uniform(jax.random.PRNGKey(0), (3, H, W))
    q = 0.7
    out = np.asarray(N.augment(jax.random.PRNGKey(1), images, attribution, q, "mask", "specific"))
    changed = np.any(out != np.asarray(images), axis=-1)
    sel = np.asarray(N.quantile_mask(attribution, q))
    np.testing.assert_array_equal(changed, sel)
    assert changed.sum(axis=(1, 2)).tolist() == [round(0.3 * H * W)] * 3
    assert np.all(out[sel] == 0.5)


def test_noise_changes_only_within_selection():
    images = random_images(2)
    attribution = jax.random.uniform(jax.random.PRNGKey(3), (H, W))
    q = 0.8
    out = np.asarray(N.augment(jax.random.PRNGKey(4), images, attribution, q, "noise", "general"))
    sel = np.asarray(N.quantile_mask(attribution, q))
    changed = np.any(out != np.asarray(images), axis=-1)
    assert not np.any(changed[:, ~sel])              # nothing outside the selection
    assert changed[:, sel].mean() > 0.99             # (almost) everything inside it
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_noise_statistics():
    images = jnp.full((8, H, W, 3), 0.5)
    sel = jnp.ones((H, W), bool)
    out = np.asarray(N.apply_noise(jax.random.PRNGKey(5), images, sel, std=0.05))
    delta = out - 0.5
    assert abs(delta.mean()) < 0.003
    assert delta.std() == pytest.approx(0.05, rel=0.05)
    # std 0.5 clips to [0, 1].
    big = np.asarray(N.apply_noise(jax.random.PRNGKey(6), images, sel, std=0.5))
    assert big.min() == 0.0 and big.max() == 1.0


def test_general_vs_specific_scope():
    images = random_images(3)
    maps = np.zeros((3, H, W), np.float32)
    maps[0, :4] = 1.0    # top rows
    maps[1, -4:] = 1.0   # bottom rows
    maps[2, :, :2] = 1.0
    q = 1 - 4 * W / (H * W)   # exactly the 4 rows
    specific = np.asarray(N.augment(jax.random.PRNGKey(0), images, maps, q, "mask", "specific"))
    changed = np.any(specific != np.asarray(images), axis=-1)
    np.testing.assert_array_equal(changed[0], maps[0] == 1)
    np.testing.assert_array_equal(changed[1], maps[1] == 1)
    general_map = maps.mean(0)
    general = np.asarray(N.augment(jax.random.PRNGKey(0), images, general_map, q, "mask", "general"))
    changed_general = np.any(general != np.asarray(images), axis=-1)
    want = np.asarray(N.quantile_mask(general_map, q))
    for b in range(3):
        np.testing.assert_array_equal(changed_general[b], want)


def test_augment_runs_inside_jit_and_compiles_once():
    augment_fn = N.make_augment_fn(0.7, "noise", "specific")
    traces = []

    @jax.jit
    def step(key, images, attribution):
        traces.append(1)
        return augment_fn(key, images, attribution).sum()

    images = random_images(4)
    for seed in range(3):
        attribution = jax.random.uniform(jax.random.PRNGKey(seed), (3, H, W))
        step(jax.random.PRNGKey(seed), images, attribution)
    assert len(traces) == 1


def test_bad_inputs():
    images = random_images(5)
    attribution = jnp.ones((H, W))
    for q in (0.0, -0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            N.augment(jax.random.PRNGKey(0), images, attribution, q)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            N.quantile_mask(attribution, q)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            N.make_augment_fn(q)
    with pytest.raises(ValueError, match="general"):
        N.augment(jax.random.PRNGKey(0), images, jnp.ones((3, H, W)), 0.7, "noise", "general")
    with pytest.raises(ValueError, match="specific"):
        N.augment(jax.random.PRNGKey(0), images, attribution, 0.7, "mask", "specific")
    with pytest.raises(ValueError, match="mode"):
        N.augment(jax.random.PRNGKey(0), images, attribution, 0.7, "blur")
    with pytest.raises(ValueError, match="scope"):
        N.make_augment_fn(0.7, "mask", "global")
    with pytest.raises(ValueError, match="selection"):
        N.apply_mask(images, jnp.ones((H + 1, W), bool))


# ----------------------------------------------------------------------------- runtime selection


_augment_fn = jax.jit(N.make_selection_augment_fn(fill=0.5, std=0.5))  # compiled once


@pytest.mark.parametrize("method", debias_runs.METHODS)
def test_selection_augmentation_equals_the_library(method):
    key = jax.random.key(3)
    images = jax.random.uniform(jax.random.key(1), (3, 12, 10, 3))
    specific = np.asarray(jax.random.uniform(jax.random.key(2), (3, 12, 10)))
    general = specific[0]
    scope, mode = debias_runs.method_spec(method)
    q = 0.7
    augment_fn = _augment_fn
    if scope == "general":
        selection = np.broadcast_to(N.quantile_selections(general, q), specific.shape)
    else:
        selection = N.quantile_selections(specific, q, batch_size=2)  # padded last batch
    spec = {"selection": jnp.asarray(selection), "mode": jnp.int32(debias_runs.augment_code(method))}
    ours = augment_fn(key, images, spec)
    reference = N.augment(key, images, general if scope == "general" else specific, q,
                              mode, scope, fill=0.5, std=0.5)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-6)
    # Exactly the top 30% of each map is selected: the highest values of the map.
    expected = round(0.3 * 12 * 10)
    assert np.all(selection.sum(axis=(1, 2)) == expected)
    maps = np.broadcast_to(general, specific.shape) if scope == "general" else specific
    for m, sel in zip(maps, selection):
        assert m[sel].min() >= m[~sel].max()
    changed = np.any(np.asarray(ours) != np.asarray(images), axis=-1)
    assert not np.any(changed & ~selection)
    if mode == "mask":
        assert np.array_equal(changed, selection)  # random images are never exactly grey
    unchanged = augment_fn(key, images, {"selection": spec["selection"],
                                         "mode": jnp.int32(N.AUGMENT_NONE)})
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(images))


# ----------------------------------------------------------------------------- batches of one run for train_lib.fit


def test_selection_batches_reject_bad_selections():
    images = np.zeros((8, 16, 16, 3), np.uint8)
    labels = np.zeros(8, np.int32)
    with pytest.raises(ValueError, match="needs a pixel selection"):
        N.selection_batch_fn(images, labels, N.AUGMENT_NOISE, None, 4, 0)
    with pytest.raises(ValueError, match=r"\[H, W\] or \[N, H, W\]"):
        N.selection_batch_fn(images, labels, N.AUGMENT_MASK, np.zeros((8, 16), bool), 4, 0)
    with pytest.raises(ValueError, match="must be bool"):
        N.selection_batch_fn(images, labels, N.AUGMENT_MASK, np.zeros((16, 16), np.float32), 4, 0)
    with pytest.raises(ValueError, match="mode=7"):
        N.selection_batch_fn(images, labels, 7, None, 4, 0)


def test_selection_batches_follow_the_step_order():
    from faceaudit_jax.data import pipeline
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    selection = np.zeros((8, 16, 16), bool)
    selection[np.arange(8), np.arange(8)] = True  # row i selected in image i only
    per_image = N.selection_batch_fn(images, np.arange(8), N.AUGMENT_MASK, selection, 4, seed=5)
    shared = N.selection_batch_fn(images, np.arange(8), N.AUGMENT_NOISE, selection[3], 4, seed=5)
    for step in range(4):
        idx = pipeline.step_indices(np.arange(8), 4, 5, step)
        batch = per_image(step)
        np.testing.assert_array_equal(np.asarray(batch["label"]), idx)
        np.testing.assert_allclose(np.asarray(batch["image"]), images[idx] / 255.0, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(batch["selection"]), selection[idx])
        assert int(batch["mode"]) == N.AUGMENT_MASK
        np.testing.assert_array_equal(np.asarray(shared(step)["selection"]),
                                      np.broadcast_to(selection[3], (4, 16, 16)))


def test_selection_augment_reads_the_batch():
    """The batch-level hook is make_selection_augment_fn on the batch's own fields."""
    images = random_images(0)
    selection = np.asarray(N.quantile_mask(jnp.asarray(np.random.default_rng(1).random((H, W))), 0.7))
    batch = {"image": images, "selection": jnp.broadcast_to(selection, (3, H, W)),
             "mode": jnp.asarray(N.AUGMENT_NOISE, jnp.int32), "label": jnp.zeros(3)}
    key = jax.random.key(4)
    out = N.SelectionAugment(fill=0.5, std=0.5)(key, batch)
    # Eager reference vs the switch's compiled branch: equal up to float rounding.
    np.testing.assert_allclose(np.asarray(out["image"]),
                               np.asarray(N.apply_noise(key, images, jnp.asarray(selection), 0.5)),
                               rtol=0, atol=1e-6)
    assert out["label"] is batch["label"]
