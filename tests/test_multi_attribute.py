"""faceaudit_jax/multi_attribute.py: the data split, attribute names, label transform and
loss choice of the multi-attribute (AFFACT-u / AFFACT-b) classifiers.

Training itself (``train_model``: fingerprint refusal, reload without
retraining) is checked on the smoke run's models in
tests/test_attribute_cams_experiment.py, which trains them once.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from faceaudit_jax import cli, multi_attribute, regions
from faceaudit_jax.explain.attribute_audit import explain_test_set

ROOT = Path(__file__).resolve().parents[1]


def get_config(variant=""):
    return cli.load_config(f"{ROOT / 'configs' / 'attribute_cams.py'}:{variant}")


def test_label_transform_puts_labels_mask_and_class_weights_in_the_batch():
    names = ("Bald", "Eyeglasses", "Smiling")
    attrs = np.full((3, regions.NUM_ATTRIBUTES), -1, np.int8)
    attrs[:, regions.attribute_ids(names)] = [[1, 0, -1], [0, 1, 1], [-1, -1, 0]]
    weights = (np.array([4.0, 1.0, 2.0]), np.array([1.0, 4.0, 2.0]))
    batch = {"attrs": jnp.asarray(attrs), "image": jnp.zeros((3, 8, 8, 3))}
    out = multi_attribute.label_transform(names, weights)(batch)
    assert set(out) == {"image", "label", "label_mask", "weight_positive", "weight_negative"}
    np.testing.assert_array_equal(out["label_mask"], [[1, 1, 0], [1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(np.asarray(out["label"]) * np.asarray(out["label_mask"]),
                                  [[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(out["weight_positive"], weights[0])
    np.testing.assert_array_equal(out["weight_negative"], weights[1])


def test_bad_data_and_loss_settings_raise_clear_errors(tmp_path):
    config = get_config("smoke")
    config.data.source = "celeba"
    config.data.root = str(tmp_path / "no_celeba_here")
    with pytest.raises(FileNotFoundError, match="data.root"):
        multi_attribute.build_source(config.data)
    config.data.source = "imagenet"
    with pytest.raises(ValueError, match="data.source"):
        multi_attribute.build_source(config.data)
    config = get_config("smoke")
    config.data.attributes = ("Wearing_Hat", "Not_An_Attribute")
    with pytest.raises(ValueError, match="Not_An_Attribute"):
        multi_attribute.attribute_names(config.data, np.zeros((2, 40), np.int8))
    config.data.attributes = ()
    with pytest.raises(ValueError, match="no known attribute targets"):
        multi_attribute.attribute_names(config.data, np.full((2, 40), -1, np.int8))
    table = np.full((2, 40), -1, np.int8)
    table[:, [regions.attribute_id("Bald"), regions.attribute_id("Young")]] = 1
    assert multi_attribute.attribute_names(config.data, table) == ("Bald", "Young")
    config = get_config("smoke")
    config.data.test_offset = 10
    with pytest.raises(ValueError, match="test_offset"):
        multi_attribute.split_indices(config, multi_attribute.build_source(config.data))
    config = get_config("smoke")
    config.train.unbalanced_loss = "hinge"
    with pytest.raises(ValueError, match="unbalanced_loss"):
        multi_attribute.model_losses(config)


def _write_tiny_celeba(root, n=4):
    """A CelebA folder in the published layout: n 178 x 218 JPEGs and the tables."""
    from PIL import Image
    from faceaudit_jax.data import celeba

    (root / celeba.CELEBA_IMAGE_DIR).mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        Image.new("RGB", (178, 218), (40 * i, 100, 200)).save(root / celeba.CELEBA_IMAGE_DIR / name)
    attrs = np.where(np.arange(n)[:, None] % 2 == 0, 1, -1) * np.ones((1, 40), int)
    (root / celeba.CELEBA_ATTR_FILE).write_text(
        f"{n}\n" + " ".join(regions.ATTRIBUTES) + "\n"
        + "".join(name + " " + " ".join(str(v) for v in row) + "\n"
                  for name, row in zip(names, attrs)))
    # Frontal landmarks (x, y): eyes, nose on the eye-mouth axis, mouth corners.
    points = "69 111 109 111 89 135 73 152 105 152"
    (root / celeba.CELEBA_LANDMARK_FILE).write_text(
        f"{n}\n" + " ".join(celeba.LANDMARK_COLUMNS) + "\n"
        + "".join(f"{name} {points}\n" for name in names))
    (root / celeba.CELEBA_PARTITION_FILE).write_text(
        "".join(f"{name} {0 if i < n - 1 else 2}\n" for i, name in enumerate(names)))


def test_celeba_source_feeds_the_training_and_test_batches(tmp_path):
    _write_tiny_celeba(tmp_path)
    config = get_config("celeba")
    config.data.root = str(tmp_path)
    config.data.resolution = 64
    source = multi_attribute.build_source(config.data)
    train_idx, test_idx = multi_attribute.split_indices(config, source)  # size 0: whole partitions
    np.testing.assert_array_equal(train_idx, [0, 1, 2])
    np.testing.assert_array_equal(test_idx, [3])
    train_attrs = source.attributes(train_idx)["attrs"]
    assert multi_attribute.attribute_names(config.data, train_attrs) == regions.ATTRIBUTES
    batch = source.batch([0, 3])
    assert set(batch) == {"image", "attrs", "landmarks"}
    assert batch["image"].shape == (2, 64, 64, 3) and batch["attrs"].shape == (2, 40)
    assert batch["landmarks"].shape == (2, 5, 2)
    from faceaudit_jax.data import frontal
    keep, counts = frontal.frontal_filter(np.asarray(batch["landmarks"]))
    assert keep.all() and counts["kept"] == 2
    np.testing.assert_allclose(multi_attribute.training_positive_share(train_attrs, regions.ATTRIBUTES),
                               np.full(40, 2 / 3))
    # CelebA has no parse maps: the parse-region masks are refused, clearly.
    config.explain.mask_source = "parse"
    with pytest.raises(ValueError, match="no parse maps"):
        explain_test_set([], source, test_idx, regions.ATTRIBUTES, (), config)
