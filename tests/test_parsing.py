"""Face parser network, its loss and IoU metrics, and the Parser interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import parsing, regions, train_lib
from faceaudit_jax.data import synthetic
from faceaudit_jax.models import parser_net


def _iou_reference(pred, target, num_regions):
    out = np.full(num_regions, np.nan)
    for r in range(num_regions):
        union = np.sum((pred == r) | (target == r))
        if union:
            out[r] = np.sum((pred == r) & (target == r)) / union
    return out


def test_per_region_iou_matches_a_numpy_loop():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 7, size=(3, 9, 11))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 7, size=target.shape))
    got = np.asarray(parser_net.per_region_iou(pred, target, 10))
    np.testing.assert_allclose(got, _iou_reference(pred, target, 10), rtol=1e-6)
    assert np.isnan(got[7:]).all()  # regions in neither map
    np.testing.assert_allclose(float(parser_net.mean_iou(pred, target, 10)),
                               np.nanmean(_iou_reference(pred, target, 10)), rtol=1e-6)
    # Unlabelled pixels (-1) in the target are left out of every count.
    masked = np.where(rng.random(target.shape) < 0.2, -1, target)
    keep = masked >= 0
    np.testing.assert_allclose(np.asarray(parser_net.per_region_iou(pred, masked, 10)),
                               _iou_reference(pred[keep], masked[keep], 10), rtol=1e-6)
    confusion = np.asarray(jax.jit(parser_net.confusion_matrix, static_argnums=2)(pred, masked, 10))
    assert confusion.sum() == keep.sum()
    np.testing.assert_array_equal(confusion[2, 5], np.sum((masked == 2) & (pred == 5)))
    perfect = np.asarray(parser_net.per_region_iou(target, target, 7))
    np.testing.assert_allclose(perfect[np.unique(target)], 1.0)


def test_cross_entropy_matches_numpy_with_ignore_and_weights():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    parse = rng.integers(-1, 6, size=(2, 4, 5))
    weights = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = parse >= 0
    nll = -np.take_along_axis(log_probs, np.where(valid, parse, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(parser_net.segmentation_cross_entropy(logits, parse)),
                               nll[valid].mean(), rtol=1e-5)
    w = weights[np.where(valid, parse, 0)] * valid
    np.testing.assert_allclose(float(parser_net.segmentation_cross_entropy(logits, parse, weights)),
                               (nll * w).sum() / w.sum(), rtol=1e-5)
    loss, metrics = parser_net.parser_loss(jnp.asarray(logits), {"parse": jnp.asarray(parse)})
    pred = logits.argmax(-1)
    np.testing.assert_allclose(float(metrics["pixel_accuracy"]), np.mean(pred[valid] == parse[valid]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mean_iou"]),
                               np.nanmean(_iou_reference(pred[valid], parse[valid], 6)), rtol=1e-5)


def test_parser_net_shapes_and_size_check():
    # Shapes only (eval_shape traces without computing): the checks run at trace time.
    model = parser_net.ParserNet(widths=(8, 16, 32))
    images = jax.ShapeDtypeStruct((2, 16, 24, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    assert jax.eval_shape(model.apply, variables, images).shape == (2, 16, 24, regions.NUM_REGIONS)
    with pytest.raises(ValueError, match="18x24 is not divisible by 4"):
        jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 18, 24, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"does not divide \[12\]"):
        jax.eval_shape(parser_net.ParserNet(widths=(8, 12)).init, jax.random.PRNGKey(0), images)


@pytest.fixture(scope="module")
def rendered():
    return synthetic.render(0, np.arange(8), resolution=64)


@pytest.fixture(scope="module")
def trained(rendered):
    """A tiny parser fitted on 8 synthetic faces (64 px) for 80 steps."""
    model = parser_net.ParserNet(widths=(8, 16, 32))
    data = rendered
    batch = {"image": data["image"], "parse": data["parse"]}
    config = train_lib.default_optimizer_config()
    config.lr, config.weight_decay, config.schedule = 5e-3, 0.0, "constant"
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), 64, train_lib.make_optimizer(config, 80))
    initial = parser_net.evaluate_parser(model, train_lib.state_variables(state), [batch])
    for _ in range(80):
        state, metrics = parser_net.train_parser_step(model, state, batch)
    return model, train_lib.state_variables(state), batch, initial, metrics


def test_training_on_synthetic_faces_raises_mean_iou(trained):
    model, variables, batch, initial, metrics = trained
    final = parser_net.evaluate_parser(model, variables, [batch])
    assert final["mean_iou"] > initial["mean_iou"] + 0.15, (initial["mean_iou"], final["mean_iou"])
    assert final["pixel_accuracy"] > 0.75, final["pixel_accuracy"]
    for name in ("background", "skin", "hair"):  # the large regions are learned first
        assert final["per_region_iou"][regions.region_id(name)] > 0.5, (name, final["per_region_iou"])
    assert np.isfinite(float(metrics["loss"])) and set(metrics) >= {"loss", "pixel_accuracy", "mean_iou"}
    # Streaming two half batches gives the same numbers as one batch.
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    split = parser_net.evaluate_parser(model, variables, halves)
    np.testing.assert_array_equal(split["confusion"], final["confusion"])
    pred = np.asarray(jnp.argmax(model.apply(variables, batch["image"]), -1))
    np.testing.assert_allclose(final["per_region_iou"], _iou_reference(pred, np.asarray(batch["parse"]), 19),
                               rtol=1e-5)


def test_network_parser_handles_any_image_size(trained):
    model, variables, batch, _, _ = trained
    parser = parsing.NetworkParser(model, variables)
    assert isinstance(parser, parsing.Parser) and parser.visible_regions.all()
    maps = parser.parse(batch["image"])
    np.testing.assert_array_equal(np.asarray(maps), np.asarray(jnp.argmax(model.apply(variables, batch["image"]), -1)))
    odd = jax.image.resize(batch["image"][:3], (3, 50, 70, 3), "linear")
    odd_maps = parser.parse(odd)  # rounded up to 52 x 72 inside, resized back
    assert odd_maps.shape == (3, 50, 70) and odd_maps.dtype == jnp.int32
    fixed = parsing.NetworkParser(model, variables, input_size=64, chunk_size=3)
    upsampled = jax.image.resize(batch["image"][:3], (3, 128, 128, 3), "linear")
    big = np.asarray(fixed.parse(upsampled))
    assert big.shape == (3, 128, 128)
    # Parsing at the training size and coming back agrees with the 64-px maps on most pixels.
    agree = np.mean(big[:, ::2, ::2] == np.asarray(maps[:3]))
    assert agree > 0.85, agree
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        parser.parse(batch["image"][0])


def test_ground_truth_parser(rendered):
    data = {k: v[:2] for k, v in rendered.items()}
    parser = parsing.GroundTruthParser()
    assert isinstance(parser, parsing.Parser)
    np.testing.assert_array_equal(np.asarray(parsing.parse_batch(parser, data)), np.asarray(data["parse"]))
    with pytest.raises(ValueError, match="pass the batch"):
        parser.parse(data["image"])
    with pytest.raises(ValueError, match=r"expected \(2, 64, 64\)"):
        parser.parse(data["image"], {"parse": data["parse"][:, :32]})
    with pytest.raises(ValueError, match="region id 19"):
        parser.parse(data["image"], {"parse": jnp.full((2, 64, 64), 19)})
    assert parsing.region_validity(parser, 3).shape == (3, 19)
    with pytest.raises(ValueError, match="no 'image' key"):
        parsing.parse_batch(parser, {"parse": data["parse"]})
