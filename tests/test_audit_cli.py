"""train.py -> checkpoint -> explain.py --config configs/audit.py, and the audit's bad-input errors.

One small classifier is trained by train.py's own path (``registry.run_training``
on ``configs/facex.py:smoke``) and shared by the tests of this module. The
audit is run on it in-process; the torchvision case runs the real script with
the issue's command line on a CelebAMask-HQ-layout fixture folder. Results are
checked against independent references: the reloaded model's logits against
the in-memory model's, the ranking against the IoR table it claims to sort,
the confounder RP against the rank of its regions.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from faceaudit_jax import cli, regions
from faceaudit_jax.data import fixtures
from faceaudit_jax.experiments import registry
from faceaudit_jax.models import sources as model_sources

ROOT = Path(__file__).resolve().parents[1]
FACEX = str(ROOT / "configs" / "facex.py")
AUDIT = str(ROOT / "configs" / "audit.py")


def _foreign_faces():
    """scripts/make_foreign_faces.py as a module (faces the project's renderer did not draw)."""
    spec = importlib.util.spec_from_file_location("make_foreign_faces",
                                                  ROOT / "scripts" / "make_foreign_faces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = cli.load_config(FACEX + ":smoke")
    config.train.baseline = False
    config.train.size = 32
    config.train.batch_size = 16
    config.test.size = 16
    config.test.batch_size = 16
    workdir = tmp_path_factory.mktemp("train")
    out = registry.run_training(config, str(workdir))
    return out["models"]["biased"], workdir


def _audit_config(**overrides):
    config = cli.load_config(AUDIT + ":smoke")
    config.test.size = 16  # one batch: the CAM compiles once
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def test_checkpoint_reloads_the_trained_model(trained):
    clf, workdir = trained
    assert (workdir / "classifier_results.json").exists()
    cfg = _audit_config(**{"model.path": str(workdir / "biased")}).model
    loaded = model_sources.load_classifier(cfg)
    assert loaded.arch == "small_resnet" and loaded.model.num_outputs == 1
    images = np.random.default_rng(0).random((3, 64, 64, 3)).astype(np.float32)
    got = [np.asarray(h(f(images))) for f, h in (loaded.fns(), clf.fns())]
    np.testing.assert_allclose(got[0], got[1], atol=1e-5, rtol=0)
    assert model_sources.read_record(workdir / "biased")["outputs"] == ["Male"]


def test_checkpoint_checked_against_config(trained):
    _, workdir = trained
    path = str(workdir / "biased")
    with pytest.raises(ValueError, match=r"holds a small_resnet model; model.arch='resnet18'"):
        model_sources.load_classifier(_audit_config(**{"model.path": path, "model.arch": "resnet18"}).model)
    with pytest.raises(ValueError, match=r"model.output_index=1, but .* has 1 output"):
        model_sources.load_classifier(_audit_config(**{"model.path": path, "model.output_index": 1}).model)
    with pytest.raises(ValueError, match=r"has 1 output\(s\) \(fc\); model.num_outputs=2"):
        model_sources.load_classifier(_audit_config(**{"model.path": path, "model.num_outputs": 2}).model)


def _check_results(workdir: Path, confounder: str = "Wearing_Lipstick") -> dict:
    results = json.loads((workdir / "results.json").read_text())
    assert (workdir / "report.md").exists()
    for figure in ("prototype_heatmap.png", "cam_overlays.png", "patch_gallery.png"):
        assert (workdir / figure).stat().st_size > 0
    assert set(results["ior"]) == set(regions.REGIONS)
    ranked = [r["region"] for r in results["ranking"]]
    finite = {k: v for k, v in results["ior"].items() if v is not None and k != "background"}
    assert set(ranked) <= set(finite)
    # The ranking sorts the IoR table, best first.
    assert [results["ior"][r] for r in ranked] == sorted((results["ior"][r] for r in ranked), reverse=True)
    rp = results["extra"]["confounder_rp"][0]
    assert rp == min(ranked.index(r) + 1 for r in regions.regions_of(confounder) if r in ranked)
    return results


def test_audit_of_the_train_py_checkpoint(trained, tmp_path):
    _, workdir = trained
    out = tmp_path / "audit"
    registry.run_experiment(_audit_config(**{"model.path": str(workdir / "biased")}), str(out))
    results = _check_results(out)
    extra = results["extra"]
    assert extra["model"]["arch"] == "small_resnet" and extra["model"]["source"] == "checkpoint"
    assert extra["num_images"] == 16 and extra["group_accuracy"]["num_images"] == 16
    # Synthetic faces: the renderer's CelebA-like link, women wear lipstick.
    assert extra["confounder_values"] == [0] and "aligned_accuracy" in extra["group_accuracy"]


def test_bad_input_fails_before_any_work(trained, tmp_path):
    _, workdir = trained
    make = _foreign_faces()
    lipstick_only_on_women = tmp_path / "linked"
    make.write_folder(str(lipstick_only_on_women), 16, link=1.0, seed=0, size=64, workers=1)
    no_masks = fixtures.write_layout("celeba", str(tmp_path / "celeba"),
                                     fixtures.render_faces(4, 64, balance=("Male", "Wearing_Lipstick")))
    cases = [
        ({"data.source": "celeba", "data.root": no_masks, "data.test_root": no_masks},
         r"has no parse maps, which FaceX's region IoR"),
        ({"data.source": "celebamask_hq", "data.root": str(lipstick_only_on_women)},
         r"no image in cell\(s\) \(Male=0, Wearing_Lipstick=0\), \(Male=1, Wearing_Lipstick=1\)"),
        ({"data.source": "celebamask_hq", "data.root": str(lipstick_only_on_women), "target": "Smiling"},
         r"Smiling.*does not annotate it"),
        ({"data.source": "celebamask_hq", "data.root": str(tmp_path / "missing")}, r"data.root=.*does not exist"),
        ({"data.source": "celebamask_hq", "data.root": str(lipstick_only_on_women),
          "model.path": str(tmp_path)}, r"has no model.json"),
        ({"model.path": ""}, r"needs --config.model.path"),
    ]
    for i, (overrides, message) in enumerate(cases):
        overrides.setdefault("model.path", str(workdir / "biased"))
        out = tmp_path / f"bad{i}"
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            registry.run_experiment(_audit_config(**overrides), str(out))
        assert not (out / "report.md").exists()


def test_issue_command_line_on_a_torchvision_resnet18(tmp_path):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_torch_import import _torchvision_like  # plain-torch ResNet in torchvision's layout

    torch.manual_seed(0)
    state = _torchvision_like("basic", (2, 2, 2, 2), num_classes=2).state_dict()
    torch.save(state, tmp_path / "clf.pt")
    faces = fixtures.render_faces(8, 64, balance=("Male", "Wearing_Lipstick"))
    data = fixtures.write_layout("celebamask_hq", str(tmp_path / "hq"), faces)
    work = tmp_path / "W"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "explain.py"), f"--config={AUDIT}:smoke", f"--workdir={work}",
         "--config.model.source=torchvision", f"--config.model.path={tmp_path / 'clf.pt'}",
         "--config.model.arch=resnet18", "--config.model.output_index=1",
         "--config.data.source=celebamask_hq", f"--config.data.root={data}",
         f"--config.data.test_root={data}", "--config.target=Male", "--config.test.size=0",
         "--config.test.batch_size=8"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _check_results(work)
    model = results["extra"]["model"]
    assert model == {"source": "torchvision", "path": str(tmp_path / "clf.pt"), "arch": "resnet18",
                     "num_outputs": 2, "output_index": 1}
    assert results["extra"]["num_images"] == 8
    # A balanced folder has no Male x Wearing_Lipstick link: the direction falls back to
    # CelebA's (lipstick goes with Male = 0), and every cell is reported too.
    accuracy = results["extra"]["group_accuracy"]
    assert results["extra"]["confounder_values"] == [0] and "aligned_accuracy" in accuracy
    assert sum(k.startswith("Male=") for k in accuracy) == 4
