"""data/verification.py: identity-disjoint splits, training batches, choosing true decisions."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from faceaudit_jax.data import verification as verification_data

ROOT = Path(__file__).resolve().parents[1]


def _smoke_config():
    spec = importlib.util.spec_from_file_location("vit_fv_config", ROOT / "configs" / "vit_fv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


def test_split_indices_disjoint_and_bad_offsets():
    config = _smoke_config()
    train, test = verification_data.split_indices(config)
    ipi = config.data.images_per_identity
    assert train.size == config.train.num_identities * ipi
    assert test.size == config.test.num_identities * ipi
    assert not set(train // ipi) & set(test // ipi)
    config.data.test_offset = 5  # overlaps training and is not a multiple of 10
    with pytest.raises(ValueError, match="test_offset"):
        verification_data.split_indices(config)
    config = _smoke_config()
    config.test.num_identities = 5
    with pytest.raises(ValueError, match="identity-disjoint folds"):
        verification_data.split_indices(config)


def test_select_pairs_takes_only_true_decisions():
    same = np.asarray([True, True, False, False, True, False])
    predicted = np.asarray([True, False, False, True, True, False])
    tp = verification_data.select_pairs(same, predicted, "tp", 10, seed=0)
    tn = verification_data.select_pairs(same, predicted, "tn", 1, seed=0)
    assert sorted(tp.tolist()) == [0, 4]
    assert tn.size == 1 and tn[0] in (2, 5)
    np.testing.assert_array_equal(tp, verification_data.select_pairs(same, predicted, "tp", 10, seed=0))
    with pytest.raises(ValueError, match="TN"):
        verification_data.select_pairs(same, np.ones(6, bool), "tn", 3, seed=0)
    with pytest.raises(ValueError, match="decision"):
        verification_data.select_pairs(same, predicted, "fp", 3, seed=0)


def test_batch_fn_is_deterministic_and_flips():
    images = np.arange(8 * 2 * 3 * 3, dtype=np.uint8).reshape(8, 2, 3, 3)
    labels = np.arange(8)
    batch_fn = verification_data.make_batch_fn(images, labels, 4, seed=3, flip=True)
    first, again = batch_fn(5), batch_fn(5)
    np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(again["image"]))
    got = np.asarray(first["image"]) * 255.0
    for img, i in zip(got, np.asarray(first["identity"])):
        original, mirrored = images[i].astype(np.float32), images[i, :, ::-1].astype(np.float32)
        assert np.allclose(img, original) or np.allclose(img, mirrored)
    plain = verification_data.make_batch_fn(images, labels, 4, seed=3, flip=False)(5)
    np.testing.assert_allclose(np.asarray(plain["image"]) * 255.0,
                               images[np.asarray(plain["identity"])], atol=1e-4)
