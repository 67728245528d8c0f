"""Expected Calibration Error and reliability diagrams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax.metrics import calibration as C


def reference_ece(conf, correct, num_bins):
    """Independent reference: np.histogram bins (last bin closed), Python loop."""
    conf = np.asarray(conf, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0, 1, num_bins + 1)
    ece = 0.0
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        inside = (conf >= lo) & ((conf < hi) if b < num_bins - 1 else (conf <= hi))
        if inside.any():
            ece += inside.sum() / conf.size * abs(correct[inside].mean() - conf[inside].mean())
    return ece


def test_hand_computed_case():
    # 5 bins of width 0.2.
    # bin 0: {0.1 wrong}                 -> |0 - 0.1|    * 1/6
    # bin 2: {0.45 right, 0.55 wrong}    -> |0.5 - 0.5|  * 2/6 = 0
    # bin 4: {0.9 right, 0.95 right, 1.0 wrong} -> |2/3 - 0.95| * 3/6
    conf = [0.1, 0.45, 0.55, 0.9, 0.95, 1.0]
    correct = [0, 1, 0, 1, 1, 0]
    want = 0.1 / 6 + 0.5 * abs(2 / 3 - 0.95)
    assert float(C.expected_calibration_error(conf, correct, 5)) == pytest.approx(want, abs=1e-6)


def test_perfectly_calibrated_toy_has_zero_ece():
    # In each of 10 bins the confidence equals the empirical accuracy.
    conf, correct = [], []
    for b in range(10):
        c = (b + 0.5) / 10
        n = 20
        k = int(round(c * n))
        conf += [c] * n
        correct += [1] * k + [0] * (n - k)
    ece = float(C.expected_calibration_error(np.array(conf), np.array(correct), 10))
    assert ece == pytest.approx(0.0, abs=1e-6)
    # Sanity: the same predictions made over-confident are not calibrated.
    over = np.minimum(np.array(conf) + 0.05, 1.0)
    assert float(C.expected_calibration_error(over, np.array(correct), 10)) > 0.04


@pytest.mark.parametrize("num_bins", [1, 10, 100])
def test_matches_reference(num_bins):
    rng = np.random.default_rng(num_bins)
    conf = rng.uniform(0, 1, 500)
    correct = rng.uniform(0, 1, 500) < conf ** 2
    got = float(C.expected_calibration_error(conf.astype(np.float32), correct, num_bins))
    assert got == pytest.approx(reference_ece(conf.astype(np.float32), correct, num_bins), abs=1e-5)


def test_boundaries_one_in_last_bin_zero_in_first():
    data = C.reliability_diagram_data(np.array([1.0, 0.0, 1.0]), np.array([True, False, False]), 4)
    np.testing.assert_array_equal(data.counts, [1, 0, 0, 2])
    assert data.accuracy[3] == pytest.approx(0.5)
    assert data.mean_confidence[3] == pytest.approx(1.0)


def test_reliability_data_and_plot(tmp_path):
    rng = np.random.default_rng(7)
    conf = rng.uniform(0.3, 0.9, 300).astype(np.float32)
    correct = rng.uniform(0, 1, 300) < conf
    data = C.reliability_diagram_data(conf, correct, 10)
    assert data.bin_edges.shape == (11,) and data.counts.sum() == 300
    edges = data.bin_edges
    for b in range(10):
        inside = (conf >= edges[b]) & (conf < edges[b + 1])
        assert data.counts[b] == inside.sum()
        if inside.any():
            assert data.accuracy[b] == pytest.approx(correct[inside].mean(), abs=1e-6)
            assert data.mean_confidence[b] == pytest.approx(conf[inside].mean(), abs=1e-6)
        else:
            assert np.isnan(data.accuracy[b]) and np.isnan(data.mean_confidence[b])
    assert data.ece == pytest.approx(reference_ece(conf, correct, 10), abs=1e-5)
    path = C.plot_reliability_diagram(data, str(tmp_path / "figs" / "reliability.png"), "toy")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_jittable():
    conf = jnp.array([0.2, 0.7, 0.9])
    correct = jnp.array([True, True, False])
    got = jax.jit(lambda c, r: C.expected_calibration_error(c, r, 10))(conf, correct)
    assert float(got) == pytest.approx(reference_ece(np.asarray(conf), np.asarray(correct), 10), abs=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        C.expected_calibration_error(np.array([0.5, np.nan]), np.array([1, 0]), 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        C.expected_calibration_error(np.array([0.5, 1.2]), np.array([1, 0]), 10)
    with pytest.raises(ValueError, match="same length"):
        C.expected_calibration_error(np.array([0.5, 0.2]), np.array([1, 0, 1]), 10)
    with pytest.raises(ValueError, match="at least one"):
        C.expected_calibration_error(np.array([]), np.array([]), 10)
    with pytest.raises(ValueError, match="num_bins"):
        C.expected_calibration_error(np.array([0.5]), np.array([1]), 0)
