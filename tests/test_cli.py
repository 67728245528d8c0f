import subprocess
import sys
from pathlib import Path

from faceaudit_jax import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "facex.py")


def test_known_overrides_pass():
    argv = [f"--config={CONFIG}:smoke", "--workdir", "/tmp/x", "--config.train.lr=0.1",
            "--config.bias.confounders=('Wearing_Hat',)", "--config.seed", "3"]
    assert cli.unknown_override(argv) is None


def test_unknown_key_names_the_key_and_the_valid_ones():
    message = cli.unknown_override([f"--config={CONFIG}", "--config.train.nonexistent=1"])
    assert "config.train has no key 'nonexistent'" in message
    assert "batch_size" in message and "num_epochs" in message


def test_unknown_top_level_key_with_separate_config_argument():
    message = cli.unknown_override(["--config", f"{CONFIG}:smoke", "--config.trian.lr=1"])
    assert "config has no key 'trian'" in message and "train" in message


def test_override_below_a_leaf_is_refused():
    message = cli.unknown_override([f"--config={CONFIG}", "--config.seed.value=1"])
    assert "config.seed has no key 'value'" in message


def test_script_exits_with_the_message_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "explain.py"), f"--config={CONFIG}:smoke",
         f"--workdir={workdir}", "--config.train.nonexistent=1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "config.train has no key 'nonexistent'" in proc.stderr
    assert not workdir.exists()


AUDIT = str(ROOT / "configs" / "audit.py")


def test_the_documented_audit_command_line_names_existing_keys():
    # The command of README's "Audit your own model" and of issue 13.
    argv = [f"--config={AUDIT}", "--workdir", "W", "--config.model.source=torchvision",
            "--config.model.path=clf.pt", "--config.model.arch=resnet18",
            "--config.data.source=celebamask_hq", "--config.data.root=DIR",
            "--config.data.test_root=TEST", "--config.target=Male", "--config.model.output_index=0"]
    assert cli.unknown_override(argv) is None
    message = cli.unknown_override([f"--config={AUDIT}", "--config.model.pth=clf.pt"])
    assert "config.model has no key 'pth'" in message and "path" in message


def test_train_py_refuses_an_experiment_without_a_training_step(tmp_path):
    import pytest
    from faceaudit_jax.experiments import registry
    with pytest.raises(ValueError, match="no separate training step"):
        registry.run_training(cli.load_config(AUDIT), str(tmp_path / "w"))
