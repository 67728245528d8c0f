"""Receptive-field-aligned upsampling against networks whose receptive fields are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.explain import cams, upsampling
from faceaudit_jax.models import resnet


def _box_conv_net(layers):
    """features_fn of a chain of single-channel convs with uniform (symmetric) kernels.

    ``layers``: (kernel, stride, (pad_before, pad_after)). Every output cell
    averages a window centred on the window's middle, so an interior cell's
    input-gradient footprint is symmetric about its receptive-field centre.
    """
    def features_fn(images):
        x = jnp.mean(images, axis=-1, keepdims=True)
        for kernel, stride, pads in layers:
            w = jnp.full((kernel, kernel, 1, 1), 1.0 / kernel ** 2, x.dtype)
            x = jax.lax.conv_general_dilated(x, w, (stride, stride), (pads, pads),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return x
    return features_fn


@pytest.mark.parametrize("layers", [
    # ResNet-like: symmetric padding everywhere -> cell j at 4 j.
    [(3, 2, (1, 1)), (3, 2, (1, 1))],
    # TF "SAME" on even sizes pads (0, 1): cell j at 4 j + 3.
    [(3, 2, (0, 1)), (3, 2, (0, 1))],
    # an unpadded 5x5 stride-3 conv after a stem: cells at 6 j + 5.
    [(3, 2, (1, 1)), (5, 3, (0, 0))],
])
def test_compose_layers_matches_the_measured_receptive_field_centre(layers):
    offset, stride = upsampling.compose_layers([(k, s, p[0]) for k, s, p in layers])
    features_fn = _box_conv_net(layers)
    images = np.ones((1, 64, 64, 3), np.float32)
    h = features_fn(jnp.asarray(images)).shape[1]
    for cell in range(2, h - 2):  # interior cells: windows not clipped by the border
        centre = upsampling.measure_cell_centre(features_fn, images, (cell, cell))
        np.testing.assert_allclose(centre, offset + stride * cell, atol=1e-4)


def test_windowed_centre_ignores_gradient_far_from_the_cell():
    # A box net plus a global term (as GroupNorm adds): every pixel gets a
    # little gradient, which drags the whole-image centroid to the middle.
    box = _box_conv_net([(3, 2, (1, 1)), (3, 2, (1, 1))])

    def features_fn(images):
        return box(images) + jnp.mean(images, axis=(1, 2, 3))[:, None, None, None]

    images = np.ones((1, 64, 64, 3), np.float32)
    cell = (3, 3)  # centre at pixel 12, far from the image centre 31.5
    whole = upsampling.measure_cell_centre(features_fn, images, cell)
    windowed = upsampling.measure_cell_centre(features_fn, images, cell, window=4)
    assert np.all(whole > 18.0)
    np.testing.assert_allclose(windowed, [12.0, 12.0], atol=0.05)
    with pytest.raises(ValueError, match="window must be"):
        upsampling.measure_cell_centre(features_fn, images, cell, window=0)


def test_compose_layers_closed_forms():
    assert upsampling.compose_layers([(3, 2, 1)] * 4) == (0.0, 16.0)
    assert upsampling.compose_layers([(7, 2, 3), (3, 2, 1), (3, 2, 1)]) == (0.0, 8.0)
    # A patch embedding (kernel = stride = p, no padding) is a ViT token grid.
    assert upsampling.compose_layers([(16, 16, 0)]) == upsampling.patch_grid(16).offset[:1] + (16.0,)
    with pytest.raises(ValueError, match="kernel >= 1"):
        upsampling.compose_layers([(0, 1, 0)])


@pytest.mark.parametrize("offset, stride, n_in, n_out", [
    (0.0, 16.0, 6, 96), (3.0, 4.0, 5, 23), (7.5, 16.0, 4, 64), (-2.0, 5.0, 7, 31)])
def test_upsampling_matrix_interpolates_between_cell_centres(offset, stride, n_in, n_out):
    weights = upsampling.upsampling_matrix(n_in, n_out, offset, stride)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    # A map linear in the cell index comes out linear in the pixel, clamped to
    # the first and last cell centres (closed form).
    a, b = 0.3, 1.7
    values = a + b * np.arange(n_in)
    y = np.arange(n_out)
    expected = a + b * np.clip((y - offset) / stride, 0, n_in - 1)
    np.testing.assert_allclose(weights @ values, expected, rtol=1e-5, atol=1e-5)
    # A one-hot cell comes back as a hat of half-width ``stride`` peaking at its centre.
    for j in range(n_in):
        centre = offset + stride * j
        hat = np.clip(1 - np.abs(y - centre) / stride, 0, 1)
        inside = (y >= offset) & (y <= offset + stride * (n_in - 1))
        np.testing.assert_allclose(weights[inside, j], hat[inside], atol=1e-5)


def test_half_pixel_is_jax_image_resize():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 6, 5)).astype(np.float32)
    out = cams.upsample_maps(jnp.asarray(maps), (96, 80), grid="half_pixel")
    ref = jax.image.resize(jnp.asarray(maps), (2, 96, 80), "bilinear")
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_resnet_cell_grids_are_multiples_of_the_stride():
    small = resnet.build_model("small_resnet", 1)
    r18 = resnet.build_model("resnet18", 1)
    r50 = resnet.build_model("resnet50", 1)
    assert resnet.cell_grid(small) == upsampling.CellGrid((0, 0), (16, 16))
    assert resnet.cell_grid(r18) == upsampling.CellGrid((0, 0), (32, 32))
    assert resnet.cell_grid(r50) == upsampling.CellGrid((0, 0), (32, 32))


@pytest.mark.parametrize("stage, cell, min_half_pixel_gap", [(None, (2, 2), 5.0), (3, (4, 4), 3.0)])
def test_small_resnet_measured_centre_is_the_declared_one_not_the_half_pixel_one(
        stage, cell, min_half_pixel_gap):
    # Narrow widths keep the test cheap; the geometry (kernels, strides,
    # paddings) is small_resnet's. Stage 3 (stride 8) is the split FaceX's
    # tables explain at.
    model = resnet.build_model("small_resnet", 1, widths=(8, 8, 8, 8), stem_width=8,
                               norm_groups=4)
    grid = resnet.cell_grid(model, stage)
    # GroupNorm spreads a little gradient over the whole image, pulling the
    # centroid towards the image centre: measure the cell nearest to it.
    size = 64
    apply_features = jax.jit(lambda v, x: model.apply(v, x, False, stage, method="features"))
    variables = resnet.init_variables(model, jax.random.PRNGKey(0), size)
    images = jax.random.uniform(jax.random.PRNGKey(100), (1, size, size, 3))
    measured = upsampling.measure_cell_centre(
        lambda x: apply_features(variables, x), images, cell)
    declared = np.array([grid.offset[0] + grid.stride[0] * cell[0],
                         grid.offset[1] + grid.stride[1] * cell[1]])
    half_pixel = declared + grid.stride[0] / 2 - 0.5
    assert np.abs(measured - declared).max() <= 2.0, (measured, declared)
    assert np.abs(measured - half_pixel).min() >= min_half_pixel_gap, (measured, half_pixel)


def test_compute_cams_places_a_one_cell_head_at_its_receptive_field_centre():
    model = resnet.build_model("small_resnet", 1, widths=(8, 8, 8, 8), stem_width=8,
                               norm_groups=4)
    variables = resnet.init_variables(model, jax.random.PRNGKey(0), 64)
    features_fn, _ = resnet.classifier_fns(model, variables)
    assert features_fn.cell_grid == resnet.cell_grid(model)
    cell = (1, 2)

    def one_cell_head(fmap):  # reads one feature cell only
        return jnp.sum(jax.nn.relu(fmap[:, cell[0], cell[1], :]), axis=-1, keepdims=True)

    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3))
    target = cams.make_binary_target("positive")
    aligned = np.asarray(cams.compute_cams(features_fn, one_cell_head, images, target,
                                           method="hires_cam"))
    half = np.asarray(cams.compute_cams(features_fn, one_cell_head, images, target,
                                        method="hires_cam", upsample="half_pixel"))
    for maps, expected in ((aligned, (16, 32)), (half, (23.5, 39.5))):
        for m in maps:
            ys, xs = np.mgrid[:64, :64]
            centroid = (float((m * ys).sum() / m.sum()), float((m * xs).sum() / m.sum()))
            np.testing.assert_allclose(centroid, expected, atol=1e-3)
    # upsample=False keeps the feature grid
    grid_maps = cams.compute_cams(features_fn, one_cell_head, images, target,
                                  method="hires_cam", upsample=False)
    assert grid_maps.shape == (2, 4, 4)


def test_bad_upsample_values_are_rejected():
    with pytest.raises(ValueError, match="upsample must be"):
        upsampling.resolve_upsample("nearest")
    with pytest.raises(ValueError, match="stride must be positive"):
        upsampling.CellGrid((0, 0), (0, 16))
