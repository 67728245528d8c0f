"""Multi-process runs (2 processes x 2 CPU devices, gloo on localhost) against one process.

One 2 x 2 job (tests/multihost_worker.py, mode "job") runs the FaceX audit,
attribute-CAM energies, the patch classifier's general map, a global array
and a CorrRISE sweep; a one-process
run of the same worker is the reference. Tolerances: per-image quantities
(CorrRISE maps, CAM energies, top-patch values) are computed on the same
chunks by the same programs and agree to 1e-5; sums over images differ by
float summation order only (relative 1e-5). Then: a sweep whose process 1
gets SIGKILL mid-way is relaunched and must end equal to the uninterrupted
job's, without recomputing a valid chunk and recomputing a truncated one;
and the start-up faults (mismatched configs, unreachable coordinator, a
missing peer) give their messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from faceaudit_jax import distributed, sweeps
from faceaudit_jax.summary import ior as ior_lib
from faceaudit_jax.summary import top_patches as top_lib
import multihost_launch as launch

RTOL = 1e-5
ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process dir, two-process dir, compilation cache dir) after both jobs ran."""
    cache = tmp_path_factory.mktemp("jax_cache")
    one = tmp_path_factory.mktemp("one_process")
    two = tmp_path_factory.mktemp("two_processes")
    # The one-process run goes first: process 0 of the 2 x 2 job then reuses
    # its compiled programs from the cache.
    codes = launch.wait_all(launch.start("job", one, 1, cache), one, "job")
    assert codes == [0], launch.log_tail(one, "job")
    codes = launch.wait_all(launch.start("job", two, 2, cache), two, "job")
    assert codes == [0, 0], launch.log_tail(two, "job")
    return one, two, cache


def _assert_equal_results(reference, result, exact=()):
    for key, value in reference.items():
        if key in exact or value.dtype.kind in "iub":
            np.testing.assert_array_equal(result[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(result[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


def test_audit_matches_one_process(runs):
    one, two, _ = runs
    reference = launch.load(one, "audit", 0)
    # 15 images: blocks of 8 and 7 over 2 processes, none dropped
    assert int(reference["num_images"]) == 15 and reference["overlay_maps"].shape == (10, 64, 64)
    for process in (0, 1):  # every process ends with the global result
        _assert_equal_results(reference, launch.load(two, "audit", process),
                              exact=("top_ids", "top_rows", "top_cols", "overlay_titles"))


def test_checkpoints_saved_by_every_process_written_once(runs):
    one, two, _ = runs
    reference = launch.load(one, "checkpoint", 0)
    assert int(reference["restored_step"]) == 2
    np.testing.assert_array_equal(reference["restored"], reference["trained"])
    np.testing.assert_array_equal(reference["loaded"], reference["trained"])
    for process in (0, 1):  # the same model on every process, as saved and read back
        _assert_equal_results(reference, launch.load(two, "checkpoint", process))
    # Process 0 alone logs: one record per step, not one per process.
    records = (two / "fit" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [1, 2]
    assert sorted(p.name for p in (two / "fit" / "checkpoints").iterdir()) == ["1", "2"]


def test_on_primary_shares_results_and_errors(runs):
    _, two, _ = runs
    results = [launch.load(two, "primary", p) for p in (0, 1)]
    for result in results:  # process 0's result and arrays on both
        assert int(result["who"]) == 0
        np.testing.assert_array_equal(result["values"], [0, 1, 2])
        np.testing.assert_array_equal(result["w"], np.zeros(3, np.float32))
    assert str(results[0]["error"]) == "ValueError: bad input seen by process 0"
    assert str(results[1]["error"]) == ("PrimaryProcessError: process 0 failed, so process 1 "
                                        "stops: ValueError: bad input seen by process 0")


def test_attribute_cam_energies_match_one_process(runs):
    one, two, _ = runs
    reference = launch.load(one, "cams", 0)
    kept = int(reference["kept"])  # faces the frontal filter kept, of 16
    assert int(reference["total"]) == 16 and 0 < kept < 16
    assert reference["energy"].shape == (kept, 3) and int(reference["count"]) == kept
    for process in (0, 1):
        _assert_equal_results(reference, launch.load(two, "cams", process))


def test_general_patch_map_matches_one_process(runs):
    one, two, _ = runs
    reference = launch.load(one, "patch_map", 0)
    general = reference["general_map"]
    assert general.shape == (64, 64) and general.min() == 0.0 and general.max() == 1.0
    for process in (0, 1):  # sums over each process's 8 faces add up to the 16-face mean
        _assert_equal_results(reference, launch.load(two, "patch_map", process))


def test_corrrise_sweep_matches_one_process(runs):
    one, two, _ = runs
    reference = launch.load(one, "corrrise", 0)
    assert reference["s_a"].shape == (6, 64, 64) and np.abs(reference["s_a"]).max() > 0.1
    np.testing.assert_allclose(reference["sum_s_a"], reference["s_a"].sum(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(reference["computed"], np.arange(6))
    results = [launch.load(two, "corrrise", p) for p in (0, 1)]
    # chunk c (one pair each) belongs to process c mod 2
    np.testing.assert_array_equal(results[0]["computed"], [0, 2, 4])
    np.testing.assert_array_equal(results[1]["computed"], [1, 3, 5])
    for result in results:
        _assert_equal_results({k: v for k, v in reference.items()
                               if k not in ("computed", "shard_error")}, result)


def test_global_array_and_uneven_shard_error(runs):
    _, two, _ = runs
    result = launch.load(two, "global", 0)
    assert float(result["global_sum"]) == float(np.arange(8).sum())
    np.testing.assert_array_equal(result["global_shape"], [8])
    np.testing.assert_array_equal(result["uneven_rows"], [[0, 0], [1, 1], [1, 1]])
    message = str(launch.load(two, "corrrise", 1)["shard_error"])
    assert "7 items cannot be split evenly over 2 processes" in message, message


def test_killed_sweep_resumes_equal_to_uninterrupted(runs):
    _, two, cache = runs
    out = two / "killed"
    out.mkdir()
    sweep_dir = out / "sweep"
    procs = launch.start("sweep", out, 2, cache, 2.5, "killed")
    try:
        deadline = time.monotonic() + 180
        # process 1 owns chunks 1, 3, 5: kill it once its first chunk is on disk
        while not sweeps.chunk_path(sweep_dir, 1).exists():
            assert time.monotonic() < deadline, launch.log_tail(out, "sweep")
            assert all(p.poll() is None for p in procs), launch.log_tail(out, "sweep")
            time.sleep(0.05)
        procs[1].send_signal(9)
        procs[1].wait()
    finally:
        launch.kill_all(procs)  # the scheduler stops the job when one process dies
    valid = {c for c in range(6) if sweeps.read_checked(sweeps.chunk_path(sweep_dir, c))}
    assert 1 in valid and not {3, 5} & valid, valid
    # A chunk file cut short (a crash while copying, a full disk) fails its checksum.
    truncated = max(valid)
    data = sweeps.chunk_path(sweep_dir, truncated).read_bytes()
    sweeps.chunk_path(sweep_dir, truncated).write_bytes(data[:len(data) // 2])

    codes = launch.wait_all(launch.start("sweep", out, 2, cache, 0.0, "resumed"), out, "sweep")
    assert codes == [0, 0], launch.log_tail(out, "sweep")
    uninterrupted = launch.load(two, "corrrise", 0)
    recomputed = set()
    for process in (0, 1):
        resumed = launch.load(out, "sweep_resumed", process)
        recomputed |= set(resumed.pop("computed").tolist())
        for key, value in resumed.items():
            np.testing.assert_array_equal(value, uninterrupted[key], err_msg=key)
    assert recomputed == (set(range(6)) - valid) | {truncated}


def test_mismatched_config_fails_on_every_process(tmp_path):
    codes = launch.wait_all(launch.start("mismatch", tmp_path, 2, tmp_path / "cache"),
                            tmp_path, "mismatch", timeout=120)
    logs = launch.log_tail(tmp_path, "mismatch")
    assert codes == [4, 4], logs
    assert "different configs" in logs and "process 1:" in logs, logs


def test_unreachable_coordinator_and_missing_peer(tmp_path):
    port = launch.free_port()
    # Process 1 of 2 with no coordinator listening; then process 0 of 2 alone.
    worker = launch.start("unreachable", tmp_path, 2, tmp_path / "cache", 3,
                          port=port, process_ids=[1])
    codes = launch.wait_all(worker, tmp_path, "unreachable", timeout=120)
    logs = launch.log_tail(tmp_path, "unreachable")
    assert codes == [3], logs
    assert f"process 1 of 2 could not reach the coordinator (process 0) at 127.0.0.1:{port}" in logs
    (tmp_path / "unreachable_log1.txt").unlink()
    lone = launch.start("unreachable", tmp_path, 2, tmp_path / "cache", 3, process_ids=[0])
    codes = launch.wait_all(lone, tmp_path, "unreachable", timeout=120)
    logs = launch.log_tail(tmp_path, "unreachable")
    assert codes == [distributed.EXIT_PEERS_MISSING], logs
    assert "process 0 of 2 waited 3 s" in logs and "waiting for process(es) 1" in logs, logs


# ---------------------------------------------------------------------------
# One-process pieces against independent references
# ---------------------------------------------------------------------------

def test_process_shard_blocks_and_errors():
    items = np.arange(10, 22)
    blocks = [distributed.process_shard(items, p, 3) for p in range(3)]
    np.testing.assert_array_equal(np.concatenate([b for b, _ in blocks]), items)
    assert [offset for _, offset in blocks] == [0, 4, 8]
    with pytest.raises(ValueError, match="12 items cannot be split evenly over 5 processes"):
        distributed.process_shard(items, 0, 5)
    with pytest.raises(ValueError, match="expected 0 <= index < count"):
        distributed.process_shard(items, 3, 3)
    local, offset = distributed.process_shard(items)  # one process: everything
    np.testing.assert_array_equal(local, items)
    assert offset == 0
    # uneven: blocks of ceil(12 / 5) = 3, the last ones shorter or empty, every item once
    blocks = [distributed.process_shard(items, p, 5, uneven=True) for p in range(5)]
    assert [b.size for b, _ in blocks] == [3, 3, 3, 3, 0]
    assert [offset for _, offset in blocks] == [0, 3, 6, 9, 12]
    np.testing.assert_array_equal(np.concatenate([b for b, _ in blocks]), items)
    blocks = [distributed.process_shard(items[:1], p, 2, uneven=True)[0] for p in range(2)]
    assert [b.tolist() for b in blocks] == [[10], []]


def test_config_fingerprint_is_order_free_and_value_sensitive():
    assert distributed.config_fingerprint({"a": 1, "b": [2, 3]}) == \
        distributed.config_fingerprint({"b": [2, 3], "a": 1})
    assert distributed.config_fingerprint({"a": 1}) != distributed.config_fingerprint({"a": 2})
    assert distributed.check_same_config({"a": 1}) == distributed.config_fingerprint({"a": 1})


def test_merged_states_equal_streaming_over_all_images():
    rng = np.random.default_rng(0)
    maps = rng.random((8, 32, 32)).astype(np.float32)
    parse = rng.integers(0, 19, (8, 32, 32)).astype(np.int32)
    groups = rng.integers(0, 2, 8).astype(np.int32)

    def ior_state(sl):
        return ior_lib.IoRAccumulator.update(ior_lib.IoRAccumulator.init(19, 2), maps[sl],
                                             parse[sl], groups[sl])

    def top_state(sl):
        return top_lib.TopPatchAccumulator.update(top_lib.TopPatchAccumulator.init(5, 19),
                                                  maps[sl], parse[sl], np.arange(8)[sl], 8)

    halves = (slice(0, 4), slice(4, 8))
    merged = ior_lib.merge_ior_states(jax.tree.map(lambda *x: jnp.stack(x),
                                                   *[ior_state(h) for h in halves]))
    whole = ior_state(slice(0, 8))
    for a, b in zip(merged, whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    top = top_lib.merge_top_patch_states(jax.tree.map(lambda *x: jnp.stack(x),
                                                      *[top_state(h) for h in halves]))
    expected = top_lib.TopPatchAccumulator.finalize(top_state(slice(0, 8)))
    got = top_lib.TopPatchAccumulator.finalize(top)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    # independent numpy reference for the values: the 5 best patch sums per region
    values = np.zeros((8, 16, 19))
    for b in range(8):
        for q in range(16):
            r0, c0 = divmod(q, 4)
            window = (slice(None), slice(r0 * 8, r0 * 8 + 8), slice(c0 * 8, c0 * 8 + 8))
            np.add.at(values[b, q], parse[b][window[1:]].ravel(), maps[b][window[1:]].ravel())
    best = -np.sort(-values.transpose(2, 0, 1).reshape(19, -1), axis=1)[:, :5]
    np.testing.assert_allclose(got.values, best, rtol=1e-5)


def test_single_process_reductions_are_identity():
    state = ior_lib.IoRAccumulator.init(19, 2)
    assert distributed.global_ior_state(state) is state
    assert distributed.global_sum(state) is state
    gathered = distributed.allgather({"x": np.arange(3)})
    np.testing.assert_array_equal(gathered["x"], [[0, 1, 2]])
    rows = np.arange(6).reshape(3, 2)
    assert distributed.allgather_rows(rows) is rows


def test_shard_batch_one_process_splits_over_local_devices():
    from faceaudit_jax.data import pipeline
    sharding = pipeline.batch_sharding(pipeline.data_mesh())
    devices = len(jax.devices())
    batch = pipeline.shard_batch({"x": np.arange(2 * devices)}, sharding)
    assert len(batch["x"].addressable_shards) == devices
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(2 * devices))
    if devices > 1:
        with pytest.raises(ValueError, match=f"batch axis of size {devices + 1} cannot be split"):
            pipeline.shard_batch({"x": np.arange(devices + 1)}, sharding)


def test_multihost_without_a_job_says_what_to_set(tmp_path):
    env = {k: v for k, v in launch.worker_env(tmp_path).items()
           if not k.startswith(("SLURM", "JAX_COORDINATOR", "OMPI", "PMI", "KUBERNETES",
                                "TPU", "CLOUD_TPU"))}
    code = ("from faceaudit_jax import distributed\n"
            "try:\n    distributed.initialize(timeout_s=30)\n"
            "except ValueError as error:\n    print('ERROR', error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=str(launch.ROOT))
    assert "no multi-process job to join" in out.stdout, out.stdout + out.stderr
    assert "JAX_COORDINATOR_ADDRESS" in out.stdout


def test_launch_script_starts_a_job_and_stops_it_when_one_process_fails(tmp_path):
    script = str(launch.ROOT / "scripts" / "launch_local_multihost.sh")
    env = launch.worker_env(tmp_path)
    code = ("from faceaudit_jax import distributed\n"
            "import jax, numpy as np\n"
            "distributed.initialize(timeout_s=60)\n"
            "total = distributed.global_sum(np.asarray([jax.process_index() + 1]))\n"
            "print('process', jax.process_index(), 'devices', jax.device_count(), 'sum', int(total[0]))\n")
    out = subprocess.run([script, "2", "2", sys.executable, "-c", code], capture_output=True,
                         text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    for process in (0, 1):
        assert f"[{process}] process {process} devices 4 sum 3" in out.stdout, out.stdout
    # Process 0 ignores SIGTERM, as a JAX process does (its preemption notifier catches it).
    failing = ("import os, signal, sys, time\n"
               "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(120)\n")
    start = time.monotonic()
    out = subprocess.run([script, "2", "1", sys.executable, "-c", failing], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 3 and time.monotonic() - start < 30, out.stdout + out.stderr
