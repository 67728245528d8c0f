"""data.sources' ``celeba_tfds`` on a real tfds ``celeb_a`` written by the test.

The registered tfds CelebA builder itself prepares the data set (its own
``_generate_examples`` parsing CelebA's text files, its features, tfds'
array_record writer); the only change is that ``_split_generators`` points
at a tiny CelebA folder written by ``data.fixtures`` instead of downloading.
The reader under test then reads those files through ``tfds.data_source``;
every expected value comes from the arrays written or from PIL on the
written JPEGs. Needs tensorflow-datasets and array_record (no tensorflow).
"""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from tensorflow_datasets.datasets.celeb_a import celeb_a_dataset_builder  # noqa: E402

from faceaudit_jax import regions  # noqa: E402
from faceaudit_jax.data import celeba, fixtures, sources  # noqa: E402

N = 7
SIDE, PAD = 178, 20  # CelebA's aligned images are 178 x 218: a square face padded top and bottom
PARTITION = np.array([0, 0, 0, 0, 1, 2, 2])  # train 0..3, validation 4, test 5..6


def make_faces(n=N, seed=0):
    """Smooth random images (so JPEG keeps them close) and random tables."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    image = np.stack([np.asarray(Image.fromarray(c).resize((SIDE, SIDE), Image.BILINEAR)) for c in coarse])
    attrs = rng.integers(0, 2, size=(n, regions.NUM_ATTRIBUTES)).astype(np.int8)
    return {"image": image, "parse": np.zeros((n, SIDE, SIDE), np.int32), "attrs": attrs,
            "identity": rng.integers(0, 1000, size=n).astype(np.int32),
            "group": np.zeros(n, np.int32),
            "landmarks": rng.uniform(10, SIDE - 10, size=(n, 5, 2)).astype(np.float32)}


def local_celeb_a_builder(folder):
    """tfds' registered celeb_a builder, reading CelebA's files from ``folder`` (no download)."""

    class LocalCelebA(celeb_a_dataset_builder.Builder, skip_registration=True):
        name = "celeb_a"  # the name the reader asks tfds for

        @classmethod
        def get_metadata(cls):  # the parent's package metadata (this class lives in a test file)
            return celeb_a_dataset_builder.Builder.get_metadata()

        def _split_generators(self, dl_manager):
            tables = {"list_eval_partition": celeba.CELEBA_PARTITION_FILE,
                      "list_attr_celeba": celeba.CELEBA_ATTR_FILE,
                      "landmarks_celeba": celeba.CELEBA_LANDMARK_FILE,
                      "identity_celeba": celeba.CELEBA_IDENTITY_FILE}
            downloaded = {k: os.path.join(folder, v) for k, v in tables.items()}
            image_dir = os.path.join(folder, celeba.CELEBA_IMAGE_DIR)
            images = {n: os.path.join(image_dir, n) for n in os.listdir(image_dir)}
            return {split: self._generate_examples(file_id=file_id, downloaded_dirs=downloaded,
                                                   downloaded_images=images)
                    for file_id, split in enumerate(("train", "validation", "test"))}

    return LocalCelebA


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeb_a")
    faces = make_faces()
    folder = fixtures.write_layout("celeba", root / "celeba", faces, partition=PARTITION, pad=PAD)
    data_dir = root / "tfds"
    builder = local_celeb_a_builder(folder)(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return root, data_dir, faces


def data_cfg(source, root, resolution=SIDE, **fields):
    cfg = ml_collections.ConfigDict({"source": source, "root": str(root), "resolution": resolution})
    sources.add_data_fields(cfg, **fields)
    return cfg


def pil_square(path, res):
    """Independent reference: PIL decode, centre square, bilinear resize, [0, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        top = (img.height - img.width) // 2
        img = img.crop((0, top, img.width, top + img.width))
        if res != img.width:
            img = img.resize((res, res), Image.BILINEAR)
        return np.asarray(img, np.float32) / 255.0


def test_the_files_are_tfds_array_records(prepared):
    _, data_dir, _ = prepared
    written = sorted(os.listdir(data_dir / "celeb_a" / "2.1.0"))
    assert any(f.startswith("celeb_a-train.array_record") for f in written), written
    assert any(f.startswith("celeb_a-test.array_record") for f in written), written


def match_files(images, paths, res):
    """For each image, the index of the file whose PIL decode it equals (tfds shuffles a split's
    records by a hash of their keys, so the rows are a permutation of the files)."""
    references = np.stack([pil_square(p, res) for p in paths])
    distance = np.abs(images[:, None] - references[None]).max(axis=(2, 3, 4))
    match = distance.argmin(axis=1)
    np.testing.assert_allclose(distance[np.arange(len(images)), match], 0.0, atol=1e-6)
    assert sorted(match.tolist()) == list(range(len(paths))), match  # a permutation
    return match


@pytest.mark.parametrize("resolution", [SIDE, 32])
def test_splits_give_the_written_images_and_tables(prepared, resolution):
    root, data_dir, faces = prepared
    for split, partition in (("train", 0), ("test", 2)):
        source, rows = sources.build_split(data_cfg("celeba_tfds", data_dir, resolution), split)
        files = np.flatnonzero(PARTITION == partition)
        assert source.name == "celeba_tfds" and len(source) == files.size
        np.testing.assert_array_equal(rows, np.arange(files.size))
        batch = source.batch(rows)
        assert set(batch) == {"image", "attrs", "landmarks", "identity"}
        assert batch["image"].shape == (files.size, resolution, resolution, 3)
        paths = [root / "celeba" / celeba.CELEBA_IMAGE_DIR / f"{w + 1:06d}.jpg" for w in files]
        written = files[match_files(batch["image"], paths, resolution)]
        if resolution == SIDE:  # JPEG at quality 95 keeps the smooth faces close to the arrays
            assert np.abs(batch["image"] * 255 - faces["image"][written]).mean() < 3.0
        np.testing.assert_array_equal(batch["attrs"], faces["attrs"][written])
        np.testing.assert_array_equal(batch["identity"], faces["identity"][written])
        table = source.attributes(rows)
        np.testing.assert_array_equal(table["attrs"], faces["attrs"][written])
        np.testing.assert_array_equal(table["identity"], faces["identity"][written])
        # Landmarks: written rounded in the padded image; the crop removes the pad, the resize scales.
        scale = resolution / SIDE
        expected = (np.round(faces["landmarks"][written]) + 0.5) * scale - 0.5
        np.testing.assert_allclose(batch["landmarks"], expected, atol=1e-4)
        # One row at a time gives the same as the batch (the thread pool keeps the order).
        np.testing.assert_allclose(source.batch([rows[-1]])["image"][0], batch["image"][-1], atol=0)


def test_same_pixels_and_tables_as_the_celeba_folder(prepared):
    root, data_dir, _ = prepared
    tfds_source, tfds_rows = sources.build_split(data_cfg("celeba_tfds", data_dir, 48), "train")
    folder_source, folder_rows = sources.build_split(data_cfg("celeba", root / "celeba", 48), "train")
    a, b = tfds_source.batch(tfds_rows), folder_source.batch(folder_rows)
    assert set(a) == set(b)
    # Put the folder's rows in the tfds order (matched by pixels), then every key agrees.
    order = np.abs(a["image"][:, None] - b["image"][None]).max(axis=(2, 3, 4)).argmin(axis=1)
    assert sorted(order.tolist()) == list(range(len(folder_rows)))
    for key in a:
        np.testing.assert_allclose(a[key], b[key][order], atol=1e-6, err_msg=key)


def test_a_data_dir_without_celeb_a_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root=.*celeb_a split 'train' is not prepared.*"
                                                 r"--file_format=array_record"):
        sources.build_source(data_cfg("celeba_tfds", tmp_path))


def test_an_undecodable_record_image_is_named():
    with pytest.raises(celeba.UndecodableImageError, match=r"celeb_a\[test\]\[1\]"):
        celeba.decode_image_bytes(b"not a jpeg", "celeb_a[test][1]")
