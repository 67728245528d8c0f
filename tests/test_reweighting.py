"""Group-balanced reweighting against a per-image loop reference."""

import numpy as np
import pytest

from faceaudit_jax import regions
from faceaudit_jax.mitigation.reweighting import group_balanced_weights


def col(name):
    return regions.attribute_id(name)


def test_group_balanced_weights_match_loop_reference():
    rng = np.random.default_rng(0)
    table = (rng.random((500, regions.NUM_ATTRIBUTES)) < 0.3).astype(np.int8)
    confs = ["Blond_Hair", "Wearing_Hat"]
    w = group_balanced_weights(table, "Male", confs)
    keys = [tuple(row) for row in table[:, [col("Male")] + [col(c) for c in confs]]]
    counts = {k: keys.count(k) for k in set(keys)}
    expected = np.array([len(keys) / (len(counts) * counts[k]) for k in keys])
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w.dtype == np.float32 and w.mean() == pytest.approx(1.0, abs=1e-6)
    for k in counts:  # every cell carries the same total weight
        assert w[[i for i, kk in enumerate(keys) if kk == k]].sum() == pytest.approx(
            len(keys) / len(counts), rel=1e-5)


def test_group_balanced_weights_of_a_099_subset():
    table = np.zeros((200, regions.NUM_ATTRIBUTES), np.int8)
    table[:100, col("Male")] = 1
    table[:99, col("Blond_Hair")] = 1      # 99 aligned men, 1 conflicting
    table[100, col("Blond_Hair")] = 1      # 1 conflicting woman, 99 aligned
    w = group_balanced_weights(table, "Male", ["Blond_Hair"])
    assert w[0] == pytest.approx(200 / (4 * 99)) and w[99] == pytest.approx(50.0)
    assert w[100] == pytest.approx(50.0) and w[150] == pytest.approx(200 / (4 * 99))


def test_group_balanced_weights_reject_unknown_values():
    table = np.zeros((4, regions.NUM_ATTRIBUTES), np.int8)
    table[2, col("Wearing_Hat")] = -1
    with pytest.raises(ValueError, match="row 2"):
        group_balanced_weights(table, "Male", ["Wearing_Hat"])
    with pytest.raises(ValueError, match="shape"):
        group_balanced_weights(table[:, :10], "Male", ["Wearing_Hat"])
