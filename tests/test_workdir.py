"""Workdirs that never lie: fingerprints, atomic JSON, JSON lines cut by a kill.

The classifier run directories guarded by these fingerprints are checked against
real trainings in test_classifiers.py."""

import json
import math
import os

import numpy as np
import pytest

from faceaudit_jax import cli, workdir

# ----------------------------------------------------------------------------- fingerprints


def test_mismatch_names_every_differing_field_old_and_new(tmp_path):
    workdir.check_fingerprint(tmp_path, {"train.lr": 0.001, "model.name": "small_resnet", "seed": 0})
    with pytest.raises(workdir.FingerprintMismatch) as info:
        workdir.check_fingerprint(tmp_path, {"train.lr": 0.01, "model.name": "resnet18", "seed": 0,
                                             "train.size": 8})
    message = str(info.value)
    assert "3 field(s) differ" in message
    assert "train.lr: 0.001 -> 0.01" in message
    assert "model.name: 'small_resnet' -> 'resnet18'" in message
    assert "train.size: '<absent>' -> 8" in message
    assert "seed" not in message.split("differ:")[1]  # unchanged fields are not listed
    assert "--config.overwrite=True" in message and "--workdir" in message
    assert isinstance(info.value, ValueError)  # a user error for the CLI


def test_nested_settings_are_named_by_the_leaf_that_changed(tmp_path):
    workdir.check_fingerprint(tmp_path, {"model": "m", "train": {"lr": 0.1, "batch_size": 8}})
    with pytest.raises(workdir.FingerprintMismatch, match=r"1 field\(s\) differ: train.lr: 0.1 -> 0.2\);"):
        workdir.check_fingerprint(tmp_path, {"model": "m", "train": {"lr": 0.2, "batch_size": 8}})


def test_tuples_and_arrays_match_their_json_form(tmp_path):
    settings = {"train.decay_boundaries": (1 / 3, 2 / 3), "shape": np.asarray([2, 3])}
    workdir.check_fingerprint(tmp_path, settings)
    workdir.check_fingerprint(tmp_path, settings)  # no mismatch after the JSON round trip


def test_overwrite_empties_the_run_dir_and_records_the_new_settings(tmp_path):
    workdir.check_fingerprint(tmp_path, {"lr": 1})
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.warns(UserWarning, match=r"overwrite: removing .*lr: 1 -> 2"):
        workdir.check_fingerprint(tmp_path, {"lr": 2}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["fingerprint.json"]
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == {"lr": 2}
    # Same settings with overwrite: nothing is removed.
    (tmp_path / "keep").write_text("x")
    workdir.check_fingerprint(tmp_path, {"lr": 2}, overwrite=True)
    assert (tmp_path / "keep").exists()


def test_run_dir_made_before_fingerprints_is_adopted_with_a_warning(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.warns(UserWarning, match="cannot be verified"):
        workdir.check_fingerprint(tmp_path, {"lr": 1})
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == {"lr": 1}


def test_config_fields_flatten_sub_configs():
    config = cli.load_config("configs/facex.py:smoke")
    fields = workdir.config_fields(config, ["seed", "model", "train.lr", "nope.x"])
    assert fields == {"seed": 0, "model.name": "small_resnet", "model.source": "train",
                      "train.lr": 0.001, "nope.x": None}


def test_array_digest_sees_values_dtypes_and_absence():
    a = np.arange(4)
    assert workdir.array_digest(a) == workdir.array_digest(a.copy())
    assert workdir.array_digest(a) != workdir.array_digest(a[::-1])
    assert workdir.array_digest(a) != workdir.array_digest(a.astype(np.int32))
    assert workdir.array_digest(a, None) != workdir.array_digest(a)


# ----------------------------------------------------------------------------- files


def test_write_json_is_atomic_and_writes_nan_as_null(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    workdir.write_json(path, {"a": math.nan, "b": np.float32(1.5), "c": (1, 2)})
    assert json.loads(path.read_text()) == {"a": None, "b": 1.5, "c": [1, 2]}

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        workdir.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text())["b"] == 1.5  # the old file, whole
    assert os.listdir(tmp_path) == ["r.json"]


def test_cached_records_are_read_back_only_under_their_fingerprint(tmp_path):
    record, cache = tmp_path / "run.json", tmp_path / "maps.npz"
    assert workdir.read_json_if(record, "abc") is None and workdir.read_npz_if(cache, "abc") is None
    workdir.write_json(record, {"fingerprint": "abc", "gap": 0.25})
    np.savez(cache, fingerprint=np.asarray("abc"), general_map=np.eye(3, dtype=np.float32))
    assert workdir.read_json_if(record, "abc") == {"fingerprint": "abc", "gap": 0.25}
    loaded = workdir.read_npz_if(cache, "abc")
    assert sorted(loaded) == ["fingerprint", "general_map"]
    np.testing.assert_array_equal(loaded["general_map"], np.eye(3, dtype=np.float32))
    assert workdir.read_json_if(record, "other") is None and workdir.read_npz_if(cache, "other") is None
    np.savez(cache, general_map=np.eye(3))  # no fingerprint recorded: cannot be verified
    assert workdir.read_npz_if(cache, "abc") is None


def test_prepare_workdir_removes_stale_tmp_files_and_refuses_unwritable(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / "summary.json.tmp-123-0"
    stale.write_text("{half")
    os.utime(stale, (0, 0))  # old: left by a killed run
    in_flight = tmp_path / "sub" / "summary.json.tmp-456-0"
    in_flight.write_text("{being written")
    (tmp_path / "notes.tmp").write_text("not ours")
    with pytest.warns(UserWarning, match="removed 1 temporary file"):
        workdir.prepare_workdir(tmp_path)
    assert not stale.exists() and in_flight.exists() and (tmp_path / "notes.tmp").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(workdir.WorkdirError, match="a_file/run' is not writable"):
        workdir.prepare_workdir(blocker / "run")


def test_read_jsonl_drops_a_half_written_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"m.jsonl: dropped its last line 3"):
        assert workdir.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_bytes(b'{"step": 1}\n{"st\xe9p": 2}\n')  # a bad byte in the last line
    with pytest.warns(UserWarning, match="dropped its last line 2"):
        assert workdir.read_jsonl(path) == [{"step": 1}]
    assert workdir.read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_jsonl_refuses_a_bad_line_before_the_last(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(workdir.WorkdirError, match=r"m.jsonl: line 2 is not valid JSON"):
        workdir.read_jsonl(path)


def test_keep_jsonl_rewrites_only_when_something_is_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    before = os.stat(path).st_mtime_ns
    workdir.keep_jsonl(path, lambda r: r["step"] <= 2)
    assert os.stat(path).st_mtime_ns == before
    workdir.keep_jsonl(path, lambda r: r["step"] <= 1)
    assert path.read_text() == '{"step": 1}\n'


def test_facex_summary_links_the_heatmap_inside_its_workdir(tmp_path):
    from faceaudit_jax.experiments import facex
    config = cli.load_config("configs/facex.py:smoke")
    outside = facex.summary_markdown(config, {"classifier": {"biased": {"num_images": 8}}}, 1.0,
                                     link_prefix=workdir.readme_link_prefix(tmp_path))
    assert "](report_biased/prototype_heatmap.png)" in outside
    inside = facex.summary_markdown(config, {"classifier": {"biased": {"num_images": 8}}}, 1.0,
                                    link_prefix=workdir.readme_link_prefix(workdir.REPO_ROOT / "results" / "x"))
    assert "](results/x/report_biased/prototype_heatmap.png)" in inside
