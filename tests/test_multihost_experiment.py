"""A whole experiment through ``explain.py --multihost`` on 2 local processes equals one process.

The FaceX main job (``configs/facex.py:smoke``, cut to 2 training steps and 16
test images) runs once as one process and once as a 2-process job started by
``scripts/launch_local_multihost.sh`` (gloo on localhost, one CPU device per
process). Every process trains the same model (process 0's copy is broadcast),
each explains its half of the test images, and process 0 alone writes the
fingerprint, model.json, metrics.jsonl, reports and JSON (Orbax's checkpoint
save is collective; process 0 writes the files). (Uneven blocks, a job's
checkpoint read back by ``configs/audit.py``'s loader, and ``on_primary``'s
error sharing are checked in tests/test_distributed.py, where they cost no
extra compile of a ResNet.)

Tolerance: IoR values are sums over images reduced in another order (per
process, then across processes), so they agree to 1e-5 absolute (measured:
1.2e-7); counts, image numbers, accuracies and confounder RPs are equal, and
the region rankings are equal wherever the IoRs of two regions differ by more
than that tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from faceaudit_jax.models import sources as model_sources
import multihost_launch as launch

pytestmark = pytest.mark.slow

ROOT = launch.ROOT
SCRIPT = str(ROOT / "scripts" / "launch_local_multihost.sh")
TOL = 1e-5
FACEX = ["--config=configs/facex.py:smoke", "--config.train.baseline=False",
         "--config.train.size=32", "--config.train.batch_size=16", "--config.test.size=16",
         "--config.test.batch_size=8"]


def _explain(args, workdir: Path, cache: Path, processes: int) -> str:
    """Run explain.py as one process, or as ``processes`` through the launch script; its output."""
    env = launch.worker_env(cache)
    env["JAX_PLATFORMS"] = "cpu"
    command = ["python", "explain.py", *args, f"--workdir={workdir}"]
    if processes > 1:
        command = ["bash", SCRIPT, str(processes), "1", *command, "--multihost"]
    done = subprocess.run(command, cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _ior(results: dict) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in results["ior"].values()], float)


def _assert_same_audit(one: dict, two: dict) -> None:
    assert list(one["ior"]) == list(two["ior"])
    np.testing.assert_allclose(_ior(two), _ior(one), rtol=0, atol=TOL)
    assert two["counts"] == one["counts"]
    for key in ("num_images", "accuracy_at_explained_resolution", "confounder_rp",
                "group_accuracy"):
        assert two["extra"][key] == one["extra"][key], key
    ranked_one = [r["region"] for r in one["ranking"]]
    ranked_two = [r["region"] for r in two["ranking"]]
    assert sorted(ranked_one) == sorted(ranked_two)
    for a, b in zip(ranked_one, ranked_two):  # a swap only between regions tied within TOL
        assert a == b or abs(one["ior"][a] - one["ior"][b]) <= TOL, (ranked_one, ranked_two)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_facex_on_two_processes_equals_one_process(tmp_path):
    cache = tmp_path / "jax_cache"
    one, two = tmp_path / "one", tmp_path / "two"
    _explain(FACEX, one, cache, 1)
    log = _explain(FACEX, two, cache, 2)

    _assert_same_audit(_read(one / "report_biased" / "results.json"),
                       _read(two / "report_biased" / "results.json"))
    assert _read(two / "classifier_results.json") == _read(one / "classifier_results.json")
    # The job saved the very model one process trains (same keys, same batches).
    weights = [jax.tree.leaves(model_sources.restore_variables(run / "biased")) for run in (one, two)]
    for a, b in zip(*weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Both processes ended with the same (global) ranking; each printed it.
    assert "[0] " in log and "[1] " in log
    lines = [line for line in log.split("\n") if "FaceX ranking" in line]
    assert len(lines) == 2 and len({line[line.index("FaceX ranking"):] for line in lines}) == 1, lines
    # One writer: one metrics record per log step, one checkpoint step, no temporary
    # files left; reports and config.json written.
    records = [[json.loads(line) for line in (run / "biased" / "metrics.jsonl").read_text().split("\n")
                if line] for run in (one, two)]
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[0]] == [2]
    assert sorted(os.listdir(two / "biased" / "checkpoints")) == ["2"]
    assert not [p for p in two.rglob("*") if ".tmp-" in p.name or "orbax-checkpoint-tmp" in p.name]
    for name in ("report_biased/cam_overlays.png", "report_biased/report.md", "summary.md",
                 "config.json"):
        assert (two / name).stat().st_size > 0, name
