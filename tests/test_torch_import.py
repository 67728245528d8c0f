"""torchvision ResNet state dicts -> Flax ResNet, checked against PyTorch's own logits.

torchvision itself cannot be installed cheaply here (its wheel needs a matching
multi-GB torch build), so the reference below is a plain-torch ResNet written
to torchvision's module layout: its ``state_dict()`` keys and shapes are
exactly torchvision's ``resnet18()`` / ``resnet50()`` ones. The torch tests
are skipped when torch is missing; the conversion tests run without it.
"""

import jax
import numpy as np
import pytest

from faceaudit_jax.models import resnet, torch_import

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _torchvision_like(block_kind, stage_sizes, num_classes):
    """A torchvision-layout ResNet in plain torch (same module names, same forward)."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on the 3x3
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    block = BasicBlock if block_kind == "basic" else Bottleneck

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(64, stage_sizes[0], 1)
            self.layer2 = self._make_layer(128, stage_sizes[1], 2)
            self.layer3 = self._make_layer(256, stage_sizes[2], 2)
            self.layer4 = self._make_layer(512, stage_sizes[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)

        def _make_layer(self, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    model = ResNet()
    # Non-trivial BatchNorm statistics and affine terms, so a swapped field would show.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(1 + 0.3 * torch.rand(c, generator=generator))
    return model.eval()


@pytest.mark.parametrize("name, kind, stages, size", [
    ("resnet18", "basic", (2, 2, 2, 2), 64),
    ("resnet50", "bottleneck", (3, 4, 6, 3), 40),  # odd intermediate sizes check torch's rounding too
])
def test_imported_logits_match_pytorch(name, kind, stages, size):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = _torchvision_like(kind, stages, num_classes=7)
    rng = np.random.default_rng(0)
    images = rng.random((2, size, size, 3)).astype(np.float32)  # [0, 1], what the Flax model takes
    # torchvision models take normalised NCHW input; the Flax model normalises inside.
    torch_input = torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = reference(torch_input).numpy()
    model, variables = torch_import.load_torchvision_resnet(reference.state_dict())
    assert torch_import.infer_architecture(reference.state_dict()) == name
    logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1e-2  # the comparison is not between near-zero outputs


def test_state_dict_file_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    reference = _torchvision_like("basic", (2, 2, 2, 2), num_classes=3)
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = torch_import.load_state_dict_file(tmp_path / "ckpt.pt")
    assert set(loaded) == set(reference.state_dict())
    np.testing.assert_array_equal(loaded["fc.weight"], reference.fc.weight.detach().numpy())
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        torch_import.load_state_dict_file(tmp_path / "nothing.pt")


def _numpy_state_dict_from_flax(variables):
    """Inverse mapping written independently of the module: Flax variables -> torchvision keys."""
    params, stats = variables["params"], variables["batch_stats"]
    out = {}

    def bn(prefix, p, s):
        out[f"{prefix}.weight"] = np.asarray(p["scale"])
        out[f"{prefix}.bias"] = np.asarray(p["bias"])
        out[f"{prefix}.running_mean"] = np.asarray(s["mean"])
        out[f"{prefix}.running_var"] = np.asarray(s["var"])
        out[f"{prefix}.num_batches_tracked"] = np.array(5)

    backbone, backbone_stats = params["backbone"], stats["backbone"]
    out["conv1.weight"] = np.asarray(backbone["conv1"]["kernel"]).transpose(3, 2, 0, 1)
    bn("bn1", backbone["norm1"], backbone_stats["norm1"])
    for module, p in backbone.items():
        if not module.startswith("layer"):
            continue
        stage, block = module[len("layer"):].split("_")
        prefix = f"layer{stage}.{block}"
        for sub, q in p.items():
            if sub.startswith("conv"):
                out[f"{prefix}.{sub}.weight"] = np.asarray(q["kernel"]).transpose(3, 2, 0, 1)
            elif sub.startswith("norm"):
                bn(f"{prefix}.bn{sub[-1]}", q, backbone_stats[module][sub])
            elif sub == "downsample_conv":
                out[f"{prefix}.downsample.0.weight"] = np.asarray(q["kernel"]).transpose(3, 2, 0, 1)
            elif sub == "downsample_norm":
                bn(f"{prefix}.downsample.1", q, backbone_stats[module][sub])
    out["fc.weight"] = np.asarray(params["fc"]["kernel"]).T
    out["fc.bias"] = np.asarray(params["fc"]["bias"])
    return out


@pytest.fixture(scope="module")
def flax_resnet18():
    model = resnet.build_model("resnet18", 5)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    return model, variables


def test_conversion_is_exact_without_torch(flax_resnet18):
    _, variables = flax_resnet18
    state = _numpy_state_dict_from_flax(variables)
    assert len(state) == 122  # torchvision resnet18().state_dict() has 122 entries
    model, imported = torch_import.load_torchvision_resnet(state)
    assert model.num_outputs == 5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), imported,
                           jax.tree_util.tree_map(np.asarray, variables))
    # DataParallel's "module." prefix is removed.
    _, again = torch_import.load_torchvision_resnet({"module." + k: v for k, v in state.items()})
    np.testing.assert_array_equal(np.asarray(again["params"]["fc"]["kernel"]), variables["params"]["fc"]["kernel"])


def test_bad_state_dicts_are_named(flax_resnet18):
    _, variables = flax_resnet18
    state = _numpy_state_dict_from_flax(variables)
    broken = {k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing \['batch_stats/backbone/layer2_0/norm1/var'\]"):
        torch_import.load_torchvision_resnet(broken)
    wrong = dict(state, **{"layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"wrong shapes \['params/backbone/layer1_0/conv1/kernel: got \(1, 1, 64, 64\)"):
        torch_import.load_torchvision_resnet(wrong)
    with pytest.raises(ValueError, match="'layer1.0.se.weight' is not part of a torchvision ResNet"):
        torch_import.load_torchvision_resnet(dict(state, **{"layer1.0.se.weight": np.zeros(3)}))
    odd = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    with pytest.raises(ValueError, match=r"\(2, 2, 2, 1\) basic blocks per stage"):
        torch_import.load_torchvision_resnet(odd)
    with pytest.raises(ValueError, match="no fc.weight"):
        torch_import.load_torchvision_resnet({k: v for k, v in state.items() if not k.startswith("fc.")})
