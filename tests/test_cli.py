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


def _explain(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "explain.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_missing_config_file_is_one_line_and_debug_shows_the_traceback(tmp_path):
    proc = _explain(f"--config={ROOT / 'configs' / 'nope.py'}", f"--workdir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --config='{ROOT / 'configs' / 'nope.py'}': no config file at "
        f"'{ROOT / 'configs' / 'nope.py'}' (rerun with --debug for the traceback)"]
    debug = _explain(f"--config={ROOT / 'configs' / 'nope.py'}", f"--workdir={tmp_path}", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_unknown_variant_and_bad_overwrite_value_are_one_line(tmp_path):
    proc = _explain(f"--config={CONFIG}:smok", f"--workdir={tmp_path}")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "unknown config variant 'smok'" in proc.stderr
    proc = _explain(f"--config={CONFIG}:smoke", f"--workdir={tmp_path}", "--config.overwrite=maybe")
    assert proc.returncode == 1 and "--config.overwrite='maybe'; expected True or False" in proc.stderr


def test_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _explain(f"--config={CONFIG}:smoke", f"--workdir={blocker / 'run'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: workdir '{blocker / 'run'}' is not writable")
    assert "Traceback" not in proc.stderr


def test_fingerprint_mismatch_is_one_line_and_keeps_config_json(tmp_path):
    # A run directory recorded with lr 0.5: this run (lr 0.001) must stop before training.
    run_dir = tmp_path / "biased"
    run_dir.mkdir()
    (run_dir / "fingerprint.json").write_text('{"train.lr": 0.5}\n')
    (tmp_path / "config.json").write_text("{}\n")
    proc = _explain(f"--config={CONFIG}:smoke", f"--workdir={tmp_path}", timeout=240)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run_dir} holds a model made with other settings")
    assert "train.lr: 0.5 -> 0.001" in last and "--config.overwrite=True" in last
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["fingerprint.json"]  # nothing trained
    assert (tmp_path / "config.json").read_text() == "{}\n"  # not rewritten by a run that did not happen


def test_overwrite_is_accepted_for_every_config():
    from faceaudit_jax.cli import split_overwrite
    for name in ("facex", "vit_fv", "corrrise", "attribute_cams", "debias_noise", "face_parser"):
        argv = [f"--config={ROOT / 'configs' / name}.py:smoke", "--config.overwrite=True"]
        assert cli.unknown_override(argv) is None
    assert split_overwrite(["x", "--config.overwrite", "--workdir=w"]) == (["x", "--workdir=w"], True)
    assert split_overwrite(["x", "--config.overwrite", "false"]) == (["x"], False)
    assert split_overwrite(["x", "--config.seed=1"]) == (["x", "--config.seed=1"], None)


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
