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
    """A tiny parser fitted on 8 synthetic faces (64 px) for 40 steps."""
    model = parser_net.ParserNet(widths=(8, 16))
    data = rendered
    batch = {"image": data["image"], "parse": data["parse"]}
    config = train_lib.default_optimizer_config()
    config.lr, config.weight_decay, config.schedule = 1e-2, 0.0, "constant"
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), 64, train_lib.make_optimizer(config, 40))
    initial = parser_net.evaluate_parser(model, train_lib.state_variables(state), [batch])
    for _ in range(40):
        state, metrics = parser_net.train_parser_step(model, state, batch)
    return model, train_lib.state_variables(state), batch, initial, metrics


def test_training_on_synthetic_faces_raises_mean_iou(trained):
    model, variables, batch, initial, metrics = trained
    final = parser_net.evaluate_parser(model, variables, [batch])
    assert final["mean_iou"] > initial["mean_iou"] + 0.15, (initial["mean_iou"], final["mean_iou"])
    assert final["pixel_accuracy"] > 0.75, final["pixel_accuracy"]
    # The large regions (>= 5% of the pixels: background, skin, and hair or cloth when drawn) are learned first.
    share = np.bincount(np.asarray(batch["parse"]).ravel(), minlength=19) / np.asarray(batch["parse"]).size
    large = np.flatnonzero(share >= 0.05)
    assert {0, 1} <= set(large.tolist())
    assert (final["per_region_iou"][large] > 0.5).all(), (large, final["per_region_iou"])
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
    odd = jax.image.resize(batch["image"][:3], (3, 51, 69, 3), "linear")
    odd_maps = parser.parse(odd)  # run at 52 x 70 (multiples of the stride, 2), resized back
    assert odd_maps.shape == (3, 51, 69) and odd_maps.dtype == jnp.int32
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


# ---------------------------------------------------------------------------
# Landmark parser
# ---------------------------------------------------------------------------


def _pixel_centres(height, width):
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)


def test_rasterize_polygons_matches_matplotlib_paths():
    from matplotlib.path import Path

    rng = np.random.default_rng(2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=(3, 11)), axis=1)
    radii = rng.uniform(3, 12, size=(3, 11))
    centres = rng.uniform(10, 20, size=(3, 1, 2))
    polygons = centres + radii[..., None] * np.stack([np.cos(angles), np.sin(angles)], -1)  # star shapes
    masks = np.asarray(parsing.rasterize_polygons(polygons, 30, 33))
    assert masks.shape == (3, 30, 33)
    for p in range(3):
        expected = Path(polygons[p]).contains_points(_pixel_centres(30, 33)).reshape(30, 33)
        np.testing.assert_array_equal(masks[p], expected)
    # A padded polygon (last vertex repeated) fills the same pixels.
    padded = np.concatenate([polygons[0], np.repeat(polygons[0][-1:], 4, 0)])
    np.testing.assert_array_equal(np.asarray(parsing.rasterize_polygons(padded, 30, 33)), masks[0])


def _ellipse(centre, radii, start, stop, count):
    t = np.linspace(start, stop, count)
    return np.stack([centre[0] + radii[0] * np.cos(t), centre[1] - radii[1] * np.sin(t)], -1)


def cartoon_mesh(size=64):
    """A 468-point mesh whose region polygons are ellipses at known places (image-left eye first)."""
    s = size / 64.0
    mesh = np.full((parsing.MESH_SIZE, 2), -100.0)
    polys = parsing.MESH_POLYGONS

    def put(indices, points):
        mesh[list(indices)] = points * s

    put(polys["face_oval"], _ellipse((32, 32), (24, 28), 0.3, 0.3 + 2 * np.pi, 37)[:-1])
    put(polys["nose"], _ellipse((32.2, 34.1), (3.1, 6.3), 0.1, 0.1 + 2 * np.pi, 17)[:-1])
    put(polys["eye_subject_right"], _ellipse((22.3, 26.2), (3.6, 2.1), 0.2, 0.2 + 2 * np.pi, 17)[:-1])
    put(polys["eye_subject_left"], _ellipse((42.1, 26.3), (3.7, 2.2), 0.2, 0.2 + 2 * np.pi, 17)[:-1])
    put(polys["brow_subject_right"], _ellipse((22.4, 19.2), (5.2, 1.6), 0.2, 0.2 + 2 * np.pi, 11)[:-1])
    put(polys["brow_subject_left"], _ellipse((42.3, 19.1), (5.1, 1.7), 0.2, 0.2 + 2 * np.pi, 11)[:-1])
    # Lips: outer contour on one ellipse, inner on a flatter one; corners at angles pi and 0.
    u_lip, l_lip = polys["u_lip"], polys["l_lip"]
    put(u_lip[:11], _ellipse((32.1, 46.2), (8.3, 4.4), np.pi, 0, 11))            # outer upper 61 .. 291
    put(l_lip[:11], _ellipse((32.1, 46.2), (8.3, 4.4), -np.pi, 0, 11))           # outer lower 61 .. 291
    put(u_lip[11:][::-1], _ellipse((32.1, 46.2), (6.2, 1.6), np.pi, 0, 11))      # inner upper 78 .. 308
    put(l_lip[11:][::-1], _ellipse((32.1, 46.2), (6.2, 1.6), -np.pi, 0, 11))     # inner lower 78 .. 308
    return mesh.astype(np.float32)


def _reference_parse(mesh, height, width):
    from matplotlib.path import Path

    centres = _pixel_centres(height, width)
    inside = {name: Path(mesh[list(idx)]).contains_points(centres).reshape(height, width)
              for name, idx in parsing.MESH_POLYGONS.items()}
    # the mesh above puts the subject's right eye / brow on the image's left
    order = [("skin", "face_oval"), ("nose", "nose"), ("l_eye", "eye_subject_right"),
             ("r_eye", "eye_subject_left"), ("l_brow", "brow_subject_right"), ("r_brow", "brow_subject_left"),
             ("mouth", "mouth"), ("u_lip", "u_lip"), ("l_lip", "l_lip")]
    parse = np.zeros((height, width), np.int32)
    for region, polygon in order:
        parse[inside[polygon]] = regions.region_id(region)
    return parse


def test_mesh_to_parse_paints_regions_in_id_order_and_mirrors():
    mesh = cartoon_mesh()
    parse = np.asarray(parsing.mesh_to_parse(mesh[None], 64, 64))[0]
    np.testing.assert_array_equal(parse, _reference_parse(mesh, 64, 64))
    assert set(np.unique(parse)) == {0} | set(regions.region_ids(parsing.LANDMARK_VISIBLE_REGIONS))
    # A mirrored face gives the mirrored map with l_ / r_ swapped: they follow the image, not the person.
    mirrored = mesh.copy()
    mirrored[:, 0] = 63 - mirrored[:, 0]
    flipped = np.asarray(parsing.mesh_to_parse(mirrored[None], 64, 64))[0]
    swap = np.arange(regions.NUM_REGIONS)
    for a, b in (("l_eye", "r_eye"), ("l_brow", "r_brow")):
        swap[regions.region_id(a)], swap[regions.region_id(b)] = regions.region_id(b), regions.region_id(a)
    assert np.mean(flipped == swap[parse[:, ::-1]]) > 0.995  # pixels on an edge may round either way
    assert flipped[26, 22] == regions.region_id("l_eye") and flipped[26, 42] == regions.region_id("r_eye")
    points = np.asarray(parsing.mesh_five_points(np.stack([mesh, mirrored])))
    np.testing.assert_allclose(points[0, 0], mesh[list(parsing.MESH_POLYGONS["eye_subject_right"])].mean(0), atol=1e-5)
    assert (points[:, 0, 0] < points[:, 1, 0]).all() and (points[:, 3, 0] < points[:, 4, 0]).all()
    np.testing.assert_allclose(points[0, 3], mesh[61], atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[B, 468, 2\]"):
        parsing.mesh_to_parse(mesh[None, :100], 64, 64)


def test_landmark_parser_marks_unseen_regions_and_missed_faces():
    mesh = cartoon_mesh()

    def landmarker(images):
        assert images.shape == (2, 64, 64, 3)
        return np.stack([mesh, mesh]), np.array([True, False])

    parser = parsing.LandmarkParser(landmarker)
    assert isinstance(parser, parsing.Parser)
    visible = {regions.REGIONS[r] for r in np.flatnonzero(parser.visible_regions)}
    assert visible == set(parsing.LANDMARK_VISIBLE_REGIONS)  # no hair, hat, ears, background
    with pytest.warns(UserWarning, match=r"no face found in image\(s\) \[1\]"):
        maps = np.asarray(parser.parse(np.zeros((2, 64, 64, 3), np.float32)))
    np.testing.assert_array_equal(maps[0], _reference_parse(mesh, 64, 64))
    assert (maps[1] == 0).all()
    np.testing.assert_array_equal(parser.last_found, [True, False])


def test_mediapipe_mesh_needs_its_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("ai_edge_litert"):
            raise ImportError("No module named 'ai_edge_litert'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"faceaudit_jax\[landmarks\]"):
        parsing.MediaPipeFaceMesh("anything.whl")


def test_mediapipe_mesh_on_a_real_photo():
    """Runs only where ai-edge-litert is installed and FACEAUDIT_MEDIAPIPE_WHEEL names a
    mediapipe<=0.10.21 wheel (or package root) holding the face models."""
    import os

    pytest.importorskip("ai_edge_litert")
    source = os.environ.get("FACEAUDIT_MEDIAPIPE_WHEEL")
    if not source or not os.path.exists(source):
        pytest.skip("set FACEAUDIT_MEDIAPIPE_WHEEL to a mediapipe 0.10.21 wheel to run")
    import matplotlib
    from PIL import Image

    photo = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    image = np.asarray(photo, np.float32)[None] / 255.0
    landmarker = parsing.MediaPipeFaceMesh(source)
    mesh, found, score = landmarker(image)
    assert found[0] and score[0] > 0.9
    maps = np.asarray(parsing.LandmarkParser(landmarker).parse(image))[0]
    rows = {name: np.nonzero(maps == regions.region_id(name))[0].mean() for name in
            ("l_brow", "l_eye", "nose", "u_lip", "l_lip")}
    assert rows["l_brow"] < rows["l_eye"] < rows["nose"] < rows["u_lip"] < rows["l_lip"]
    cols = {name: np.nonzero(maps == regions.region_id(name))[1].mean() for name in ("l_eye", "r_eye")}
    assert cols["l_eye"] < cols["r_eye"]
    skin_fraction = np.mean(maps == regions.region_id("skin"))
    assert 0.03 < skin_fraction < 0.3
    # The mesh gives the 5 alignment points; the aligned crop puts them on the template.
    from faceaudit_jax.data import align

    five = np.asarray(parsing.mesh_five_points(mesh))[0]
    crop, matrix = align.align_photo(image[0], five)
    assert crop.shape == (112, 112, 3)
    residual = np.asarray(align.apply_transform(matrix, five)) - align.ARCFACE_TEMPLATE_112
    assert np.abs(residual).max() < 8.0
