"""summary.audit: RP helpers, and the evaluator's named results against the one-call audit."""

import jax
import ml_collections
import numpy as np
import pytest

from faceaudit_jax.data import pipeline
from faceaudit_jax.models import resnet
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.summary import audit as audit_lib


def test_rp_helpers():
    assert audit_lib.ordered_rps([7, 2]) == [2, 7]
    assert audit_lib.ordered_rps([None, 4]) == [4, None]
    assert audit_lib.ordered_rps([None, None]) == [None, None]
    assert audit_lib.mean_rp([1, None, 4]) == pytest.approx(2.5)
    assert audit_lib.mean_rp([None]) is None


def test_evaluator_run_yields_every_result_and_shares_one_compile_per_architecture():
    model = resnet.build_model("small_resnet", 1, widths=(8, 8, 8, 8), stem_width=8, norm_groups=4)
    clfs = [model_sources.Classifier(model, resnet.init_variables(model, jax.random.PRNGKey(k), 64),
                                     f"m{k}", "") for k in (0, 1)]
    cfg = ml_collections.ConfigDict(dict(method="grad_cam", target_mode="predicted", ior_mode="soft",
                                         patch_size=8, top_k=3, num_overlays=2))
    source = pipeline.SyntheticSource(seed=0, resolution=64)
    evaluator = audit_lib.AuditEvaluator(source, np.arange(6), "Male", cfg, 4)
    named = dict(evaluator.run(clfs[0]))
    reference = audit_lib.audit(clfs[0], source, np.arange(6), "Male", cfg, 4)
    assert named["num_images"] == 6 and len(named["overlay_titles"]) == 2
    np.testing.assert_array_equal(named["ior"], reference.ior)
    np.testing.assert_array_equal(named["top"].values, reference.top.values)
    before = audit_lib._explain_step._cache_size()
    other = evaluator.evaluate(clfs[1])
    assert audit_lib._explain_step._cache_size() == before  # new weights, same compile
    assert not np.array_equal(other.ior, reference.ior)


def test_evaluator_rejects_a_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size=0"):
        audit_lib.AuditEvaluator(None, np.arange(2), "Male", ml_collections.ConfigDict(), 0)
