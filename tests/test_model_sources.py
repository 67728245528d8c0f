"""models.sources: a torchvision state_dict file as the audited model, and the embedder spec.

Reference: PyTorch's own forward pass of a torchvision-layout ResNet-18 with
the configured normalisation and output index; plus the bad-input errors,
each naming the field or file. The train.py run-dir source is tested with
the checkpoint train.py writes, in test_audit_cli.py.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import jax
import ml_collections

from faceaudit_jax import classifiers
from faceaudit_jax.experiments import facex
from faceaudit_jax.models import sources as model_sources



def _model_cfg(**fields):
    base = dict(source="checkpoint", path="", arch="", num_outputs=0, output_index=0,
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    base.update(fields)
    return ml_collections.ConfigDict(base)


def _logits(clf, images):
    features_fn, head_fn = clf.fns()
    return np.asarray(head_fn(features_fn(images)))


def test_run_dir_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"needs --config.model.path"):
        model_sources.load_classifier(_model_cfg())
    with pytest.raises(ValueError, match=r"does not exist"):
        model_sources.load_classifier(_model_cfg(path=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"has no model.json"):
        model_sources.load_classifier(_model_cfg(path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"model.source='hub'"):
        model_sources.load_classifier(_model_cfg(source="hub"))


def test_train_refuses_a_model_source_other_than_train():
    config = ml_collections.ConfigDict({"model": {"source": "checkpoint", "name": "small_resnet"}})
    with pytest.raises(ValueError, match="configs/audit.py"):
        facex.train(config, "/nonexistent")


@pytest.fixture(scope="module")
def torch_resnet18(tmp_path_factory):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_torch_import import _torchvision_like  # noqa: PLC0415 (plain-torch torchvision layout)
    torch.manual_seed(0)
    reference = _torchvision_like("basic", (2, 2, 2, 2), num_classes=3)
    path = tmp_path_factory.mktemp("torch") / "clf.pt"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_torchvision_file_with_output_index_and_normalisation(torch_resnet18):
    import torch
    reference, path = torch_resnet18
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = _model_cfg(source="torchvision", path=str(path), arch="resnet18", output_index=2,
                     mean=mean, std=std)
    clf = model_sources.load_classifier(cfg)
    images = np.random.default_rng(1).random((2, 64, 64, 3)).astype(np.float32)
    normalised = (images - np.array(mean, np.float32)) / np.array(std, np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
    got = _logits(clf, images)
    assert got.shape == (2, 1)
    np.testing.assert_allclose(got[:, 0], expected[:, 2], atol=1e-4, rtol=0)
    assert abs(expected[:, 2] - expected[:, 0]).max() > 1e-3  # output 2 is not output 0
    np.testing.assert_allclose(
        classifiers.predict_logits(clf, _ArraySource(images), np.arange(2), 2), expected[:, 2],
        atol=1e-4, rtol=0)


def test_torchvision_errors_name_the_file(torch_resnet18, tmp_path):
    _, path = torch_resnet18
    with pytest.raises(ValueError, match=r"clf.pt holds a resnet18 model; model.arch='resnet50'"):
        model_sources.load_classifier(_model_cfg(source="torchvision", path=str(path), arch="resnet50"))
    with pytest.raises(ValueError, match=r"clf.pt has 3 output\(s\) \(fc\); model.num_outputs=1"):
        model_sources.load_classifier(_model_cfg(source="torchvision", path=str(path), num_outputs=1))
    with pytest.raises(ValueError, match=r"is a directory"):
        model_sources.load_classifier(_model_cfg(source="torchvision", path=str(tmp_path)))
    import torch
    state = torch.load(path, weights_only=True)
    backbone_only = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(backbone_only, tmp_path / "backbone.pt")
    with pytest.raises(ValueError, match=r"backbone.pt has no fc.weight"):
        model_sources.load_classifier(_model_cfg(source="torchvision", path=str(tmp_path / "backbone.pt")))
    shallow = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    torch.save({"module." + k: v for k, v in shallow.items()}, tmp_path / "shallow.pt")
    with pytest.raises(ValueError, match=r"shallow.pt: state dict has \(2, 2, 2, 1\) basic blocks"):
        model_sources.load_classifier(_model_cfg(source="torchvision", path=str(tmp_path / "shallow.pt")))


class _ArraySource:
    """Images held in memory, in the batch format predict_logits reads."""

    def __init__(self, images):
        self.images = images
        self.resolution = images.shape[1]

    def batch(self, indices):
        return {"image": jax.numpy.asarray(self.images[np.asarray(indices)])}


def test_embedder_spec():
    fn = model_sources.load_embedder("numpy:mean")
    assert fn is np.mean
    for bad, message in [("numpy.mean", "expected 'module:function'"),
                         ("no_such_module_xyz:f", "cannot import"),
                         ("numpy:no_such_fn", "has no 'no_such_fn'"),
                         ("numpy:pi", "expected a callable")]:
        with pytest.raises(ValueError, match=message):
            model_sources.load_embedder(bad)


def test_check_embedder_config_names_the_field_before_any_data_is_read(tmp_path):
    def cfg(**fields):
        return ml_collections.ConfigDict({"source": "train", "path": "", "function": "", **fields})

    assert model_sources.check_embedder_config(cfg()) is None  # nothing to check for training
    assert model_sources.check_embedder_config(cfg(source="callable", function="numpy:mean")) is None
    with pytest.raises(ValueError, match="model.source='hub'"):
        model_sources.check_embedder_config(cfg(source="hub"))
    with pytest.raises(FileNotFoundError, match="model.path"):
        model_sources.check_embedder_config(cfg(source="checkpoint", path=str(tmp_path / "absent")))
    with pytest.raises(FileNotFoundError, match="no fingerprint.json"):
        model_sources.check_embedder_config(cfg(source="checkpoint", path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"^model.function: .*cannot import"):
        model_sources.check_embedder_config(cfg(source="callable", function="no_such_module_xyz:f"))
