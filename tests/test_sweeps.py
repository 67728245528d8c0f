"""Chunk-level resumable sweeps (faceaudit_jax.sweeps), one process.

The multi-process kill-and-resume run is in tests/test_distributed.py; here
a crash is an exception raised inside compute_chunk, and the reference is
the same sweep run without interruption.
"""

from __future__ import annotations

import numpy as np
import pytest

from faceaudit_jax import sweeps


def square_chunk(indices):
    """Per-item outputs of two shapes; float values whose sum depends on the order."""
    x = np.sqrt(indices.astype(np.float32) + 0.1)
    return {"root": x, "outer": x[:, None] * np.linspace(0.1, 1.0, 3, dtype=np.float32)}


def summarize(outputs):
    return {"total": outputs["root"].sum(keepdims=True), "count": np.asarray([len(outputs["root"])])}


def run(directory, compute=square_chunk, **kwargs):
    return sweeps.run_sweep(compute, 11, 3, directory, config={"sweep": "squares"},
                            summarize=summarize, **kwargs)


def test_uninterrupted_sweep_outputs_and_summary(tmp_path):
    result = run(tmp_path)
    indices = np.arange(11, dtype=np.float32)
    np.testing.assert_allclose(result.outputs["root"], np.sqrt(indices + 0.1), rtol=1e-6)
    assert result.outputs["outer"].shape == (11, 3)
    assert result.num_chunks == 4 and result.computed == (0, 1, 2, 3)
    assert int(result.summary["count"][0]) == 11  # the padded rows of the last chunk are dropped
    np.testing.assert_allclose(result.summary["total"], np.sqrt(indices + 0.1).sum(), rtol=1e-6)
    in_memory = sweeps.run_sweep(square_chunk, 11, 3, None, summarize=summarize)
    np.testing.assert_array_equal(in_memory.outputs["root"], result.outputs["root"])


def test_last_chunk_is_padded_to_one_shape(tmp_path):
    seen = []

    def compute(indices):
        seen.append(indices.copy())
        return square_chunk(indices)

    run(tmp_path, compute)
    assert all(s.shape == (3,) for s in seen)
    np.testing.assert_array_equal(seen[-1], [9, 10, 10])


def test_crashed_sweep_resumes_without_recomputing(tmp_path):
    reference = run(tmp_path / "reference")
    calls = []

    def crash_at_chunk_2(indices):
        if indices[0] == 6:
            raise KeyboardInterrupt("killed")
        calls.append(int(indices[0]) // 3)
        return square_chunk(indices)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "sweep", crash_at_chunk_2)
    assert calls == [0, 1]
    resumed = run(tmp_path / "sweep")
    assert resumed.computed == (2, 3)
    for key in reference.outputs:
        np.testing.assert_array_equal(resumed.outputs[key], reference.outputs[key])
    for key in reference.summary:  # same chunks folded in the same order: bit-equal
        np.testing.assert_array_equal(resumed.summary[key], reference.summary[key])
    assert run(tmp_path / "sweep").computed == ()  # a finished sweep computes nothing


def test_truncated_or_altered_chunk_is_recomputed(tmp_path):
    reference = run(tmp_path)
    path = sweeps.chunk_path(tmp_path, 1)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 7])
    assert sweeps.read_checked(path) is None
    assert run(tmp_path).computed == (1,)
    data = bytearray(sweeps.chunk_path(tmp_path, 2).read_bytes())
    data[100] ^= 0xFF  # a flipped bit inside the npz payload
    sweeps.chunk_path(tmp_path, 2).write_bytes(bytes(data))
    again = run(tmp_path)
    assert again.computed == (2,)
    np.testing.assert_array_equal(again.outputs["outer"], reference.outputs["outer"])


def test_lost_summary_is_refolded_from_chunk_files(tmp_path):
    reference = run(tmp_path)
    sweeps.summary_path(tmp_path, 0, 1).write_bytes(b"garbage")
    refolded = run(tmp_path)
    assert refolded.computed == ()
    np.testing.assert_array_equal(refolded.summary["total"], reference.summary["total"])


def test_resuming_another_sweep_in_the_same_directory_fails(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match="holds a different sweep.*chunk_size: 3 on disk, 4 now"):
        sweeps.run_sweep(square_chunk, 11, 4, tmp_path, config={"sweep": "squares"})
    with pytest.raises(ValueError, match="holds a different sweep.*config"):
        sweeps.run_sweep(square_chunk, 11, 3, tmp_path, config={"sweep": "cubes"})


def test_bad_arguments_and_outputs(tmp_path):
    with pytest.raises(ValueError, match="num_items=0; expected an integer >= 1"):
        sweeps.run_sweep(square_chunk, 0, 3)
    with pytest.raises(ValueError, match="chunk_size=2.5; expected an integer >= 1"):
        sweeps.run_sweep(square_chunk, 4, 2.5)
    with pytest.raises(ValueError, match="output 'x' has shape \\(2,\\) for chunk 0; expected a "
                                         "leading axis of 3"):
        sweeps.run_sweep(lambda i: {"x": np.zeros(2)}, 4, 3)
    with pytest.raises(ValueError, match="expected a non-empty dict of arrays"):
        sweeps.run_sweep(lambda i: [1, 2, 3], 4, 3)


def test_encoding_round_trip_and_footer():
    arrays = {"a": np.arange(5), "b": np.eye(2, dtype=np.float32)}
    data = sweeps.encode_arrays(arrays)
    assert data[-40:-32] == sweeps.FOOTER_MAGIC
    decoded = sweeps.decode_arrays(data)
    for key, value in arrays.items():
        np.testing.assert_array_equal(decoded[key], value)
    assert sweeps.decode_arrays(data[:20]) is None and sweeps.decode_arrays(b"") is None


def test_keep_outputs_false_holds_only_the_summary(tmp_path):
    reference = run(tmp_path / "kept")
    lean = run(tmp_path / "lean", keep_outputs=False)
    assert lean.outputs is None and lean.computed == (0, 1, 2, 3)
    np.testing.assert_array_equal(lean.summary["total"], reference.summary["total"])
    # the per-item outputs are on disk, chunk by chunk
    on_disk = np.concatenate([sweeps.read_checked(sweeps.chunk_path(tmp_path / "lean", c))["root"]
                              for c in range(4)])[:11]
    np.testing.assert_array_equal(on_disk, reference.outputs["root"])
