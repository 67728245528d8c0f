"""CelebA reader on fixture files written in the published layout."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from faceaudit_jax import regions
from faceaudit_jax.data import celeba, sampling

W, H = 16, 20  # CelebA's aligned images are portrait (178 x 218); so are the fixtures
N = 12


def _colour(i):
    return np.array([(37 * i) % 256, (91 * i + 40) % 256, (173 * i + 80) % 256], np.uint8)


def _write_image(path, i):
    pixels = np.broadcast_to(_colour(i), (H, W, 3)).copy()
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)


def write_celeba(root, n=N, seed=0, attr_header=regions.ATTRIBUTES):
    rng = np.random.default_rng(seed)
    os.makedirs(root / "img_align_celeba")
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        _write_image(root / "img_align_celeba" / name, i)
    values = rng.choice([-1, 1], size=(n, len(attr_header)))
    with open(root / "list_attr_celeba.txt", "w") as f:
        f.write(f"{n}\n" + " ".join(attr_header) + "\n")
        for name, row in zip(names, values):
            f.write(name + " " + " ".join(f"{v:2d}" for v in row) + "\n")
    marks = rng.integers(0, 16, size=(n, 10))
    with open(root / "list_landmarks_align_celeba.txt", "w") as f:
        f.write(f"{n}\n" + " ".join(celeba.LANDMARK_COLUMNS) + "\n")
        for name, row in zip(names, marks):
            f.write(name + "   " + " ".join(str(v) for v in row) + "\n")
    partition = np.array([0] * (n // 2) + [1] * (n // 4) + [2] * (n - n // 2 - n // 4))
    with open(root / "list_eval_partition.txt", "w") as f:
        f.writelines(f"{name} {p}\n" for name, p in zip(names, partition))
    identity = rng.integers(1, 5, size=n)
    with open(root / "identity_CelebA.txt", "w") as f:
        f.writelines(f"{name} {p}\n" for name, p in zip(names, identity))
    return dict(names=names, values=values, marks=marks.reshape(n, 5, 2), partition=partition,
                identity=identity)


@pytest.fixture
def fixture(tmp_path):
    truth = write_celeba(tmp_path)
    return tmp_path, truth


def test_tables_match_the_files(fixture):
    root, truth = fixture
    data = celeba.CelebA(root)
    assert len(data) == N and data.filenames == truth["names"]
    assert data.attrs.dtype == np.int8 and data.attrs.shape == (N, 40)
    np.testing.assert_array_equal(data.attrs, (truth["values"] == 1).astype(np.int8))
    np.testing.assert_array_equal(data.landmarks, truth["marks"].astype(np.float32))
    np.testing.assert_array_equal(data.identity, truth["identity"])
    np.testing.assert_array_equal(data.split_indices("train"), np.flatnonzero(truth["partition"] == 0))
    np.testing.assert_array_equal(data.split_indices("valid"), np.flatnonzero(truth["partition"] == 1))
    np.testing.assert_array_equal(data.split_indices(2), np.flatnonzero(truth["partition"] == 2))
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.split_indices("val")


def test_header_subset_leaves_other_attributes_unknown(tmp_path):
    header = ("Young", "Male", "Eyeglasses")
    truth = write_celeba(tmp_path, attr_header=header)
    data = celeba.CelebA(tmp_path)
    for column, name in enumerate(header):
        np.testing.assert_array_equal(data.attrs[:, regions.attribute_id(name)],
                                      (truth["values"][:, column] == 1).astype(np.int8))
    others = [i for i, a in enumerate(regions.ATTRIBUTES) if a not in header]
    assert (data.attrs[:, others] == -1).all()


def test_batch_contents_native_and_resized(fixture):
    root, truth = fixture
    data = celeba.CelebA(root)
    batch = data.load_batch([3, 0, 7])
    assert set(batch) == {"image", "attrs", "index", "landmarks", "identity"}  # no parse, no group
    assert batch["image"].shape == (3, H, W, 3) and batch["image"].dtype == np.float32
    for b, i in enumerate([3, 0, 7]):
        np.testing.assert_allclose(batch["image"][b].mean(axis=(0, 1)), _colour(i) / 255.0, atol=3 / 255)
    np.testing.assert_array_equal(batch["index"], [3, 0, 7])
    np.testing.assert_array_equal(batch["attrs"], data.attrs[[3, 0, 7]])
    np.testing.assert_array_equal(batch["identity"], truth["identity"][[3, 0, 7]])

    # int resolution: centre square crop (rows 2..17), then 16 -> 8 (scale 1/2).
    small = data.load_batch([1], resolution=8)
    assert small["image"].shape == (1, 8, 8, 3)
    x, y = truth["marks"][1].astype(np.float64).T
    expected = np.stack([(x + 0.5) * 0.5 - 0.5, (y - 2 + 0.5) * 0.5 - 0.5], axis=-1)
    np.testing.assert_allclose(small["landmarks"][0], expected, atol=1e-6)
    # (H, W) resolution: whole image, anisotropic scale.
    wide = data.load_batch([1], resolution=(10, 32))
    assert wide["image"].shape == (1, 10, 32, 3)
    expected = np.stack([(x + 0.5) * 2.0 - 0.5, (y + 0.5) * 0.5 - 0.5], axis=-1)
    np.testing.assert_allclose(wide["landmarks"][0], expected, atol=1e-6)


def test_centre_crop_drops_the_top_and_bottom_rows(tmp_path):
    pixels = np.zeros((40, 24, 3), np.uint8)
    pixels[:8] = (0, 255, 0)  # rows outside the centred 24 x 24 square (rows 8..31)
    pixels[-8:] = (0, 255, 0)
    pixels[8:-8] = (255, 0, 0)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    image, box, out_hw = celeba.decode_image(str(path), 12)
    assert box == (0, 8, 24, 32) and out_hw == (12, 12)
    np.testing.assert_allclose(image[..., 0], 1.0)
    np.testing.assert_allclose(image[..., 1], 0.0)


def test_streaming_batches_and_remainder(fixture):
    root, _ = fixture
    data = celeba.CelebA(root)
    sizes = [b["image"].shape[0] for b in data.iter_batches(range(10), 4, resolution=8)]
    assert sizes == [4, 4, 2]
    sizes = [b["image"].shape[0] for b in data.iter_batches(range(10), 4, resolution=8, drop_remainder=True)]
    assert sizes == [4, 4]
    serial = list(data.iter_batches(np.arange(N), 5))
    threaded = list(data.iter_batches(np.arange(N), 5, num_workers=2))
    for a, b in zip(serial, threaded):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="batch_size"):
        next(data.iter_batches(range(3), 0))


def test_undecodable_images_are_skipped_counted_and_reported(fixture):
    root, truth = fixture
    image_dir = root / "img_align_celeba"
    (image_dir / truth["names"][2]).write_bytes(b"this is not a jpeg")
    full = (image_dir / truth["names"][5]).read_bytes()
    (image_dir / truth["names"][5]).write_bytes(full[: len(full) // 2])  # truncated
    data = celeba.CelebA(root)
    report = celeba.SkipReport()
    with pytest.warns(UserWarning, match=r"skipped 2 of 8 images"):
        batches = list(data.iter_batches(range(8), 3, skip_report=report))
    # Batches are refilled past skipped images: only the last one is short.
    assert [b["image"].shape[0] for b in batches] == [3, 3]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [0, 1, 3, 4, 6, 7])
    assert report.count == 2 and report.attempted == 8
    assert {os.path.basename(p) for p, _ in report.skipped} == {truth["names"][2], truth["names"][5]}
    # Asking for exactly one bad image raises, naming it.
    with pytest.raises(celeba.UndecodableImageError, match=truth["names"][2]):
        data.load_batch([2])
    with pytest.raises(celeba.UndecodableImageError):
        list(celeba.iter_example_batches(data.load_example, range(4), 2, on_decode_error="raise"))


def test_no_warning_when_nothing_is_skipped(fixture):
    root, _ = fixture
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(celeba.CelebA(root).iter_batches(range(N), 5))


def test_missing_files_are_named(fixture):
    root, truth = fixture
    os.remove(root / "img_align_celeba" / truth["names"][4])
    data = celeba.CelebA(root)
    with pytest.raises(FileNotFoundError, match=truth["names"][4]):
        list(data.iter_batches(range(6), 3))
    os.remove(root / "list_attr_celeba.txt")
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        celeba.CelebA(root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        celeba.CelebA(root / "nowhere")


def test_optional_tables_absent_means_keys_absent(fixture):
    root, _ = fixture
    for name in ("list_landmarks_align_celeba.txt", "identity_CelebA.txt", "list_eval_partition.txt"):
        os.remove(root / name)
    data = celeba.CelebA(root)
    assert set(data.load_batch([0])) == {"image", "attrs", "index"}
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        data.split_indices("train")


def test_tables_in_another_order_are_aligned_and_gaps_are_errors(fixture):
    root, truth = fixture
    path = root / "identity_CelebA.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[::-1]) + "\n")
    np.testing.assert_array_equal(celeba.CelebA(root).identity, truth["identity"])
    path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=f"identity_CelebA.txt has no row for {truth['names'][0]}"):
        celeba.CelebA(root)


@pytest.mark.parametrize("mutate, message", [
    (lambda lines: lines[:1] + [lines[1].replace("Male", "Manly")] + lines[2:], "unknown attribute name.*Manly"),
    (lambda lines: lines[:2] + [" ".join(lines[2].split()[:1] + ["2"] + lines[2].split()[2:])] + lines[3:],
     "has value 2 for 5_o_Clock_Shadow"),
    (lambda lines: ["13"] + lines[1:], "declares 13 images but the table has 12"),
    (lambda lines: lines[:3] + [lines[3].rsplit(" ", 1)[0]] + lines[4:], "line 4 has 39 values"),
    (lambda lines: ["twelve"] + lines[1:], "line 1 should hold the image count"),
])
def test_bad_attribute_tables_name_the_file(fixture, mutate, message):
    root, _ = fixture
    path = root / "list_attr_celeba.txt"
    path.write_text("\n".join(mutate(path.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        celeba.CelebA(root)
    assert "list_attr_celeba.txt" in str(info.value)


def test_bad_landmark_header_and_partition_values(fixture):
    root, _ = fixture
    path = root / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace(" 0", " 7")] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="partition value 7"):
        celeba.CelebA(root)
    path.write_text("\n".join(lines) + "\n")
    path = root / "list_landmarks_align_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace("nose_x", "nose")] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="landmark header"):
        celeba.CelebA(root)


def test_subsets_draw_from_the_reader_table(tmp_path):
    write_celeba(tmp_path, n=60, seed=3)
    data = celeba.CelebA(tmp_path)
    chosen = sampling.balanced_subset(data.attrs, "Male", ["Smiling"], size=8, seed=0)
    cells = data.attrs[chosen][:, regions.attribute_ids(["Male", "Smiling"])]
    assert sorted(map(tuple, cells.tolist())) == sorted([(0, 0), (0, 1), (1, 0), (1, 1)] * 2)
    batch = data.load_batch(chosen, resolution=8)
    assert batch["image"].shape == (8, 8, 8, 3)


def test_tfds_conversion_and_missing_package(monkeypatch):
    rng = np.random.default_rng(0)
    example = {
        "image": rng.integers(0, 256, size=(2, 20, 16, 3), dtype=np.uint8),
        # tfds celeb_a 2.1.0's features: one int per landmark column, identity under Identity_No
        "landmarks": {c: rng.integers(0, 16, size=2) for c in celeba.LANDMARK_COLUMNS},
        "attributes": {name: rng.integers(0, 2, size=2).astype(bool) for name in regions.ATTRIBUTES},
        "identity": {"Identity_No": np.array([7, 9])},
    }
    batch = celeba.tfds_celeb_a_to_batch(example)
    np.testing.assert_allclose(batch["image"], example["image"] / 255.0, atol=1e-7)
    for name in regions.ATTRIBUTES:
        np.testing.assert_array_equal(batch["attrs"][:, regions.attribute_id(name)], example["attributes"][name])
    np.testing.assert_array_equal(batch["landmarks"][:, 2, 0], example["landmarks"]["nose_x"])
    np.testing.assert_array_equal(batch["landmarks"][:, 2, 1], example["landmarks"]["nose_y"])
    np.testing.assert_array_equal(batch["identity"], [7, 9])
    resized = celeba.tfds_celeb_a_to_batch(example, 8)
    assert resized["image"].shape == (2, 8, 8, 3)
    nose_y = example["landmarks"]["nose_y"].astype(np.float64)
    np.testing.assert_allclose(resized["landmarks"][:, 2, 1], (nose_y - 2 + 0.5) * 0.5 - 0.5, atol=1e-6)
    del example["landmarks"]["rightmouth_y"]
    with pytest.raises(ValueError, match="landmarks lack.*rightmouth_y"):
        celeba.tfds_celeb_a_to_batch(example)
    # Without tensorflow-datasets the error names the extra to install.
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("tensorflow_datasets"):
            raise ImportError("No module named 'tensorflow_datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"faceaudit_jax\[tfds\]"):
        next(celeba.iter_tfds_celeb_a("train"))
