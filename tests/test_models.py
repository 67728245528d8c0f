"""ResNets: torchvision parameter counts and output sizes, features/head split, any input size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.models import build_backbone, build_model, classifier_fns, init_variables
from faceaudit_jax.models import resnet
from faceaudit_jax.explain.upsampling import CellGrid

# Parameter counts torchvision reports for its ImageNet models (1000 classes).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def _abstract_init(model, size):
    return jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))
    )


def _numpy_variables(abstract, seed=0):
    """Random weights of the right shapes (BatchNorm variances positive), without compiling an initialiser.

    Compiling the real initialisers (threefry draws for every tensor) is the
    slowest part of these tests on a small CPU; ``init_variables`` itself is
    tested once, on the shared small model.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        values = rng.uniform(0.5, 1.5, leaf.shape) if name in ("var", "scale") else rng.normal(size=leaf.shape) * 0.1
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _torch_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def _torchvision_fmap_size(n):
    """Spatial size of torchvision ResNet's layer4 output, from torch's conv/pool size formula."""
    n = _torch_out(n, 7, 2, 3)  # stem conv
    n = _torch_out(n, 3, 2, 1)  # max pool
    for _ in range(3):  # stride-2 first blocks of layer2..4 (3x3, padding 1)
        n = _torch_out(n, 3, 2, 1)
    return n


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_parameter_counts(name):
    variables = _abstract_init(build_model(name, 1000), 64)
    assert _count(variables["params"]) == TORCHVISION_PARAMS[name]
    assert "batch_stats" in variables  # default norm is BatchNorm, as torchvision


@pytest.mark.parametrize("name", ["small_resnet", "resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("size", [64, 112, 128, 75])
def test_output_shapes(name, size):
    model = build_model(name, 3)
    variables = _abstract_init(model, 64)
    logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((2, size, size, 3)))
    channels = 128 if name == "small_resnet" else (2048 if name == "resnet50" else 512)
    if name == "small_resnet":
        spatial = size
        for _ in range(4):  # stride-2 stem and three stride-2 stages, 3x3 padding 1
            spatial = _torch_out(spatial, 3, 2, 1)
    else:
        spatial = _torchvision_fmap_size(size)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert aux["fmap"].shape == (2, spatial, spatial, channels)
    assert aux["pooled"].shape == (2, channels)


def test_small_resnet_has_8x8_map_at_128px_and_group_norm():
    model = build_model("small_resnet", 1)
    assert model.backbone.total_stride == 16
    variables = _abstract_init(model, 128)
    assert "batch_stats" not in variables
    fmap = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), variables, jnp.zeros((1, 128, 128, 3)))
    assert fmap.shape == (1, 8, 8, 128)


@pytest.fixture(scope="module")
def small():
    model = build_model("small_resnet", 2)
    variables = init_variables(model, jax.random.PRNGKey(0), 64)
    return model, variables


def test_features_head_compose_to_call_at_several_sizes(small):
    model, variables = small
    features_fn, head_fn = classifier_fns(model, variables)
    apply = jax.jit(model.apply)
    for shape in [(2, 64, 64, 3), (1, 40, 56, 3)]:  # any size, also non-square
        x = jax.random.uniform(jax.random.PRNGKey(shape[1]), shape)
        logits, aux = apply(variables, x)
        fmap = features_fn(x)
        np.testing.assert_allclose(fmap, aux["fmap"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(head_fn(fmap), logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(aux["pooled"], np.asarray(fmap).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        assert logits.shape == (shape[0], 2)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_split_after_any_stage_composes_to_the_whole_network(small, stage):
    model, variables = small
    features_fn, head_fn = classifier_fns(model, variables, stage=stage)
    x = jax.random.uniform(jax.random.PRNGKey(7), (2, 64, 64, 3))
    logits, _ = jax.jit(model.apply)(variables, x)
    fmap = features_fn(x)
    # small_resnet: stem stride 2, stages 1..4 strides 1, 2, 2, 2, widths 16..128.
    side = 64 // (2, 4, 8, 16)[stage - 1]
    assert fmap.shape == (2, side, side, (16, 32, 64, 128)[stage - 1])
    np.testing.assert_allclose(head_fn(fmap), logits, rtol=1e-5, atol=1e-5)
    stride = 64 / side
    assert features_fn.cell_grid == resnet.cell_grid(model, stage) == \
        CellGrid((0.0, 0.0), (stride, stride))


def test_split_rejects_a_stage_the_network_does_not_have(small):
    model, variables = small
    for bad in (0, 5, 2.0, True, "layer3"):
        with pytest.raises(ValueError, match=r"stage=.*expected a ResNet stage 1\.\.4"):
            classifier_fns(model, variables, stage=bad)


def test_split_narrows_a_multi_output_head_to_the_explained_logit(small):
    model, variables = small            # two outputs
    features_fn, head_fn = classifier_fns(model, variables, stage=3)
    _, second = classifier_fns(model, variables, stage=3, output_index=1)
    fmap = features_fn(jax.random.uniform(jax.random.PRNGKey(3), (2, 64, 64, 3)))
    both = np.asarray(head_fn(fmap))
    np.testing.assert_array_equal(np.asarray(second(fmap)), both[:, 1:2])
    for bad in (2, -1, True):
        with pytest.raises(ValueError, match=r"output_index=.*expected an int in \[0, 2\)"):
            classifier_fns(model, variables, output_index=bad)


def test_head_is_differentiable_wrt_fmap(small):
    model, variables = small
    features_fn, head_fn = classifier_fns(model, variables)
    fmap = features_fn(jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3)))
    logits, vjp = jax.vjp(head_fn, fmap)
    (grad,) = vjp(jnp.ones_like(logits))
    # head = GAP + Dense: d sum(logits) / d fmap = sum_k W[:, k] / (h * w) at every position
    kernel = variables["params"]["fc"]["kernel"]
    expected = jnp.broadcast_to(kernel.sum(1) / (fmap.shape[1] * fmap.shape[2]), fmap.shape)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_input_normalisation_is_inside_the_model(small):
    """A model with mean m / std s on x equals a (0, 1)-normalised model on (x - m) / s, same params."""
    model, variables = small
    plain = build_model("small_resnet", 2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 64, 64, 3))
    mean, std = np.array(resnet.IMAGENET_MEAN), np.array(resnet.IMAGENET_STD)
    np.testing.assert_allclose(
        jax.jit(model.apply)(variables, x)[0], jax.jit(plain.apply)(variables, (x - mean) / std)[0],
        rtol=1e-4, atol=1e-5,
    )


def test_batch_norm_variant_updates_stats_in_training():
    model = build_model("small_resnet", 1, norm="batch", widths=(8, 8, 8, 8), stem_width=8)
    variables = _numpy_variables(_abstract_init(model, 32))
    assert set(variables) == {"params", "batch_stats"}
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 32, 32, 3))
    train_apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    (logits, _), updates = train_apply(variables, x)
    before = variables["batch_stats"]["backbone"]["norm1"]["mean"]
    after = updates["batch_stats"]["backbone"]["norm1"]["mean"]
    assert logits.shape == (4, 1)
    assert not np.allclose(before, after)
    # eval mode uses the running statistics: an image's logit does not depend on the rest of its batch
    eval_apply = jax.jit(model.apply)
    shuffled = eval_apply(variables, x[::-1])[0][::-1]
    np.testing.assert_allclose(eval_apply(variables, x)[0], shuffled, rtol=1e-5, atol=1e-6)
    (train_logits, _), _ = train_apply(variables, x.at[1:].set(0.0))
    assert not np.allclose(train_logits[0], logits[0])  # training mode: batch statistics do


def test_resnet50_single_tiny_forward():
    model = build_model("resnet50", 3)
    abstract = _abstract_init(model, 32)
    assert set(abstract) == {"params", "batch_stats"}
    variables = _numpy_variables(abstract)
    x = jax.random.uniform(jax.random.PRNGKey(4), (1, 32, 32, 3))
    logits, aux = jax.jit(model.apply)(variables, x)
    assert logits.shape == (1, 3) and aux["fmap"].shape == (1, 1, 1, 2048)
    assert np.all(np.isfinite(logits))


def test_backbone_is_reusable():
    backbone = build_backbone("resnet18", norm="group")
    assert backbone.out_channels == 512 and backbone.total_stride == 32
    variables = jax.eval_shape(
        functools.partial(backbone.init, train=False), jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))
    )
    assert "batch_stats" not in variables
    assert {"conv1", "norm1", "layer1_0", "layer4_1"} <= set(variables["params"])
    layer = variables["params"]["layer2_0"]
    assert set(layer) == {"conv1", "norm1", "conv2", "norm2", "downsample_conv", "downsample_norm"}
    assert layer["conv1"]["kernel"].shape == (3, 3, 64, 128)  # HWIO


def test_bad_inputs_raise_clear_errors(small):
    with pytest.raises(ValueError, match=r"'resnet101'.*small_resnet.*resnet18.*resnet34.*resnet50"):
        build_model("resnet101", 1)
    with pytest.raises(ValueError, match="norm"):
        build_model("resnet18", 1, norm="layer")
    with pytest.raises(ValueError, match="norm_groups=32"):
        build_model("small_resnet", 1, norm_groups=32)
    with pytest.raises(ValueError, match="num_outputs"):
        build_model("resnet18", 0)
    with pytest.raises(ValueError, match="image_size"):
        init_variables(build_model("small_resnet", 1), jax.random.PRNGKey(0), (64,))
    model, variables = small
    with pytest.raises(ValueError, match="uint8"):
        model.apply(variables, jnp.zeros((1, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.apply(variables, jnp.zeros((1, 64, 64, 1)))
