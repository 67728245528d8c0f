"""Left-right symmetry diagnostic: closed forms and a mirrored input."""

import numpy as np
import pytest

from faceaudit_jax import regions
from faceaudit_jax.data import synthetic
from faceaudit_jax.summary import ior as ior_lib

_SWAP = np.arange(regions.NUM_REGIONS)
for _left, _right in ior_lib.SYMMETRIC_PAIRS:
    _l, _r = regions.region_id(_left), regions.region_id(_right)
    _SWAP[_l], _SWAP[_r] = _r, _l


def test_closed_form_on_a_hand_built_ior_vector():
    ior = np.full(regions.NUM_REGIONS, 0.5)
    ior[regions.region_id("r_ear")], ior[regions.region_id("l_ear")] = 0.7, 0.4    # +0.3
    ior[regions.region_id("r_eye")], ior[regions.region_id("l_eye")] = 0.2, 0.3    # -0.1
    ior[regions.region_id("r_brow")], ior[regions.region_id("l_brow")] = 0.6, 0.5  # +0.1
    out = ior_lib.left_right_symmetry(ior)
    assert out["num_pairs"] == 3
    assert out["mean_right_minus_left"] == pytest.approx(0.1)
    assert out["right_wins_share"] == pytest.approx(2 / 3)
    assert out["pairs"]["r_ear-l_ear"] == pytest.approx(0.3)
    # stacked audits: each (audit, pair) is one comparison; NaN pairs are skipped
    other = ior.copy()
    other[regions.region_id("r_ear")] = np.nan
    both = ior_lib.left_right_symmetry(np.stack([ior, other]))
    assert both["num_pairs"] == 5
    assert both["mean_right_minus_left"] == pytest.approx((0.3 - 0.1 + 0.1 - 0.1 + 0.1) / 5)
    with pytest.raises(ValueError, match="R = 19"):
        ior_lib.left_right_symmetry(np.zeros(5))


def test_mirrored_input_negates_the_diagnostic_and_a_symmetric_map_cancels():
    batch = synthetic.render(0, np.arange(6), resolution=64)
    parse = np.asarray(batch["parse"])
    h, w = parse.shape[1:]
    # A map that prefers the image's right half, as a misplaced CAM does.
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, w, dtype=np.float32), (6, h, w))
    maps = ramp * np.asarray(batch["image"]).mean(-1)
    mirrored_maps = maps[:, :, ::-1]
    mirrored_parse = _SWAP[parse[:, :, ::-1]]

    def diag(m, p):
        return ior_lib.left_right_symmetry(
            ior_lib.summarize_ior(*ior_lib.region_ior(np.ascontiguousarray(m), p)))

    original = diag(maps, parse)
    flipped = diag(mirrored_maps, mirrored_parse)
    assert original["mean_right_minus_left"] > 0.05  # the ramp favours the right twins
    assert flipped["mean_right_minus_left"] == pytest.approx(-original["mean_right_minus_left"],
                                                             abs=1e-6)
    assert flipped["right_wins_share"] == pytest.approx(1 - original["right_wins_share"])
    # Auditing a data set and its mirror image together cancels any side preference.
    joint_maps = np.concatenate([maps, mirrored_maps])
    joint_parse = np.concatenate([parse, mirrored_parse])
    joint = diag(joint_maps, joint_parse)
    assert abs(joint["mean_right_minus_left"]) < 1e-6


def test_every_facex_report_carries_the_symmetry_check(tmp_path):
    import json

    import jax
    import ml_collections

    from faceaudit_jax.data import pipeline
    from faceaudit_jax.models import resnet
    from faceaudit_jax.models import sources as model_sources
    from faceaudit_jax.summary import audit as audit_lib
    from faceaudit_jax.viz import figures

    model = resnet.build_model("small_resnet", 1)
    variables = resnet.init_variables(model, jax.random.PRNGKey(0), 64)
    clf = model_sources.Classifier(model, variables, "untrained", str(tmp_path))
    source = pipeline.SyntheticSource(seed=0, resolution=64)
    indices = np.arange(8)
    config = ml_collections.ConfigDict({
        "bias": {"target": "Male"},
        "explain": {"method": "grad_cam", "target_mode": "predicted", "ior_mode": "soft",
                    "patch_size": 16, "top_k": 2, "num_overlays": 1, "upsample": "aligned"}})
    result = audit_lib.audit(clf, source, indices, "Male", config.explain, 8)
    figures.write_audit_report(tmp_path / "report_x", result, source, indices, title="x",
                               patch_size=16)
    stored = json.loads((tmp_path / "report_x" / "results.json").read_text())["extra"]
    expected = ior_lib.left_right_symmetry(result.ior)
    assert stored["symmetry_right_minus_left"] == pytest.approx(expected["mean_right_minus_left"])
    assert stored["symmetry_right_wins_share"] == pytest.approx(expected["right_wins_share"])
    assert set(stored["symmetry_pairs"]) == {"r_ear-l_ear", "r_eye-l_eye", "r_brow-l_brow"}
    assert "symmetry_right_minus_left" in (tmp_path / "report_x" / "report.md").read_text()
