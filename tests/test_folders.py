"""CelebAMask-HQ, FairFace, RFW and LFW readers on fixture files in the published layouts."""

import os

import numpy as np
import pytest
from PIL import Image

from faceaudit_jax import regions
from faceaudit_jax.data import celeba, folders, sampling

# The painting order of CelebAMask-HQ's own merge script (g_mask.py), written
# out here as the independent reference for the merge.
G_MASK_ORDER = ['skin', 'nose', 'eye_g', 'l_eye', 'r_eye', 'l_brow', 'r_brow', 'l_ear', 'r_ear', 'mouth',
                'u_lip', 'l_lip', 'hair', 'hat', 'ear_r', 'neck_l', 'neck', 'cloth']

HQ_INDICES = [0, 1, 2, 2000, 2001]
IMG, MASK = 16, 8  # published: 1024 and 512


def _solid(path, colour, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.broadcast_to(np.asarray(colour, np.uint8), (size[0], size[1], 3)).copy()).save(
        path, quality=100, subsampling=0)


def write_celebamask_hq(root, seed=0, mapping_orig=(3, 7, 0, 10, 5)):
    rng = np.random.default_rng(seed)
    truth = {"parse": {}, "values": {}}
    for n, idx in enumerate(HQ_INDICES):
        _solid(str(root / "CelebA-HQ-img" / f"{idx}.jpg"), (20 * n, 100, 200 - 20 * n), (IMG, IMG))
        folder = root / "CelebAMask-HQ-mask-anno" / str(idx // 2000)
        os.makedirs(folder, exist_ok=True)
        reference = np.zeros((MASK, MASK), np.int32)
        present = rng.choice(G_MASK_ORDER, size=6, replace=False)
        for label_number, label in enumerate(G_MASK_ORDER):  # g_mask.py's loop, as published
            if label not in present:
                continue
            mask = np.zeros((MASK, MASK), np.uint8)
            y0, x0 = rng.integers(0, MASK - 2, size=2)
            y1, x1 = y0 + rng.integers(2, MASK - y0 + 1), x0 + rng.integers(2, MASK - x0 + 1)
            mask[y0:y1, x0:x1] = 255
            reference[mask != 0] = label_number + 1
            image = Image.fromarray(mask) if label_number % 2 else Image.fromarray(np.stack([mask] * 3, -1))
            image.save(folder / f"{idx:05d}_{label}.png")
        truth["parse"][idx] = reference
    values = rng.choice([-1, 1], size=(len(HQ_INDICES), 40))
    with open(root / "CelebAMask-HQ-attribute-anno.txt", "w") as f:
        f.write(f"{len(HQ_INDICES)}\n" + " ".join(regions.ATTRIBUTES) + "\n")
        for idx, row in zip(HQ_INDICES, values):
            f.write(f"{idx}.jpg " + " ".join(f"{v:2d}" for v in row) + "\n")
            truth["values"][idx] = row
    with open(root / "CelebA-HQ-to-CelebA-mapping.txt", "w") as f:
        f.write("idx         orig_idx   orig_file\n")
        for idx, orig in zip(HQ_INDICES, mapping_orig):
            f.write(f"{idx:<11d} {orig:<10d} {orig + 1:06d}.jpg\n")
    return truth


@pytest.fixture
def hq(tmp_path):
    return tmp_path, write_celebamask_hq(tmp_path)


def test_celebamask_hq_batch_merges_masks_in_g_mask_order(hq):
    root, truth = hq
    batch = folders.load_celebamask_hq(root, [2001, 0, 2], mask_size=MASK)
    assert set(batch) == {"image", "parse", "attrs", "index"}
    assert batch["image"].shape == (3, MASK, MASK, 3) and batch["image"].dtype == np.float32
    assert batch["parse"].dtype == np.int32
    for b, idx in enumerate([2001, 0, 2]):
        np.testing.assert_array_equal(batch["parse"][b], truth["parse"][idx])
        np.testing.assert_array_equal(batch["attrs"][b], (truth["values"][idx] == 1).astype(np.int8))
    np.testing.assert_allclose(batch["image"][1].mean(axis=(0, 1)), np.array([0, 100, 200]) / 255, atol=3 / 255)
    # The vocabulary order is g_mask's order, so the painting ids are region ids.
    assert tuple(G_MASK_ORDER) == regions.REGIONS[1:]


def test_celebamask_hq_resolution_resizes_image_and_nearest_parse(hq):
    root, truth = hq
    data = folders.CelebAMaskHQ(root, mask_size=MASK)
    batch = data.load_batch([1], resolution=16)
    assert batch["image"].shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(batch["parse"][0], np.repeat(np.repeat(truth["parse"][1], 2, 0), 2, 1))
    batches = list(data.iter_batches(HQ_INDICES, 2, resolution=4))
    assert [b["parse"].shape for b in batches] == [(2, 4, 4), (2, 4, 4), (1, 4, 4)]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), HQ_INDICES)


def test_celebamask_hq_bad_masks_are_named(hq):
    root, _ = hq
    folder = root / "CelebAMask-HQ-mask-anno" / "0"
    Image.fromarray(np.zeros((MASK, MASK), np.uint8)).save(folder / "00001_moustache.png")
    data = folders.CelebAMaskHQ(root, mask_size=MASK)
    with pytest.raises(ValueError, match=r"00001_moustache.png names region 'moustache'"):
        data.load_batch([1])
    data.load_batch([0])  # other images are unaffected
    Image.fromarray(np.zeros((MASK + 2, MASK), np.uint8)).save(folder / "00002_hat.png")
    with pytest.raises(ValueError, match=r"00002_hat.png is 8x10; expected 8x8"):
        data.load_batch([2])
    with pytest.raises(ValueError, match="expected 512x512"):
        folders.load_celebamask_hq(root, [0])  # the published mask size is the default


def test_celebamask_hq_missing_files_and_skips(hq):
    root, _ = hq
    os.remove(root / "CelebA-HQ-img" / "2.jpg")
    data = folders.CelebAMaskHQ(root, mask_size=MASK)
    with pytest.raises(FileNotFoundError, match="2.jpg"):
        data.load_batch([2])
    for name in os.listdir(root / "CelebAMask-HQ-mask-anno" / "1"):
        if name.startswith("02001_"):
            os.remove(root / "CelebAMask-HQ-mask-anno" / "1" / name)
    with pytest.raises(FileNotFoundError, match="02001_<region>.png"):
        data.load_batch([2001])
    with pytest.raises(ValueError, match="HQ index 7 is not in"):
        data.load_batch([7])
    (root / "CelebA-HQ-img" / "1.jpg").write_bytes(b"\xff\xd8 broken")
    report = celeba.SkipReport()
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        batches = list(data.iter_batches([0, 1, 2000], 2, skip_report=report))
    assert [b["index"].tolist() for b in batches] == [[0, 2000]]
    assert report.skipped[0][0].endswith("1.jpg")
    os.remove(root / "CelebAMask-HQ-attribute-anno.txt")
    with pytest.raises(FileNotFoundError, match="CelebAMask-HQ-attribute-anno.txt"):
        folders.CelebAMaskHQ(root)


def _write_celeba_partition(root, n, partition):
    os.makedirs(root / "img_align_celeba")
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    with open(root / "list_attr_celeba.txt", "w") as f:
        f.write(f"{n}\nMale\n" + "".join(f"{name} {1 if i % 2 else -1}\n" for i, name in enumerate(names)))
    with open(root / "list_eval_partition.txt", "w") as f:
        f.writelines(f"{name} {p}\n" for name, p in zip(names, partition))
    return celeba.CelebA(root)


def test_overlap_removal_and_splits_follow_the_celeba_partition(tmp_path):
    hq_root, celeba_root = tmp_path / "hq", tmp_path / "celeba"
    os.makedirs(hq_root)
    write_celebamask_hq(hq_root, mapping_orig=(3, 7, 0, 10, 5))
    partition = np.array([0] * 8 + [1] * 2 + [2] * 2)
    data = _write_celeba_partition(celeba_root, 12, partition)
    hq_data = folders.CelebAMaskHQ(hq_root, mask_size=MASK)
    # HQ originals (0-based CelebA rows): 0 -> 3, 1 -> 7, 2 -> 0, 2000 -> 10, 2001 -> 5
    np.testing.assert_array_equal(hq_data.split_indices("train", celeba=data), [0, 1, 2, 2001])
    np.testing.assert_array_equal(hq_data.split_indices("test", celeba=data), [2000])
    hq_test = [1, 2001]  # e.g. a random CelebAMask-HQ test split, as FaceX uses
    kept = folders.drop_celebamask_hq_overlap(data.filenames, data.split_indices("train"), hq_data.mapping, hq_test)
    np.testing.assert_array_equal(kept, [0, 1, 2, 3, 4, 6])
    # Reference: a plain set difference on file names.
    dropped = {f"{o + 1:06d}.jpg" for h, o in zip(HQ_INDICES, (3, 7, 0, 10, 5)) if h in hq_test}
    assert [i for i in range(8) if data.filenames[i] not in dropped] == kept.tolist()
    with pytest.raises(ValueError, match="HQ index 5 is not in the CelebA-HQ mapping"):
        folders.drop_celebamask_hq_overlap(data.filenames, range(8), hq_data.mapping, [5])


def test_published_partition_rule_boundaries(tmp_path):
    write_celebamask_hq(tmp_path, mapping_orig=(162770, 162771, 182637, 182638, 5))
    data = folders.CelebAMaskHQ(tmp_path, mask_size=MASK)
    np.testing.assert_array_equal(data.split_indices("train"), [0, 2001])
    np.testing.assert_array_equal(data.split_indices("valid"), [1, 2])
    np.testing.assert_array_equal(data.split_indices("test"), [2000])
    (tmp_path / "CelebA-HQ-to-CelebA-mapping.txt").write_text("idx orig\n0 1\n")
    with pytest.raises(ValueError, match="header 'idx orig_idx orig_file'"):
        folders.CelebAMaskHQ(tmp_path, mask_size=MASK)


def test_merge_is_the_painting_loop():
    rng = np.random.default_rng(1)
    ids = np.array([1, 4, 11, 13, 17])
    masks = rng.random((5, 9, 7)) < 0.4
    reference = np.zeros((9, 7), np.int32)
    for r, m in zip(ids, masks):
        reference[m] = r
    np.testing.assert_array_equal(folders.merge_region_masks(ids, masks), reference)


# ---------------------------------------------------------------------------
# FairFace
# ---------------------------------------------------------------------------


def write_fairface(root, n=40, seed=0, header="file,age,gender,race,service_test"):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        file = f"train/{i + 1}.jpg"
        _solid(str(root / file), (i * 5 % 256, 50, 90), (12, 12))
        rows.append((file, folders.FAIRFACE_AGE_BINS[rng.integers(9)], ["Male", "Female"][rng.integers(2)],
                     folders.FAIRFACE_RACES[rng.integers(7)], ["True", "False"][rng.integers(2)]))
    with open(root / "fairface_label_train.csv", "w") as f:
        f.write(header + "\n")
        f.writelines(",".join(r[: len(header.split(","))]) + "\n" for r in rows)
    return rows


def test_fairface_attributes_and_groups(tmp_path):
    rows = write_fairface(tmp_path)
    data = folders.FairFace(tmp_path)
    male = data.attrs[:, regions.attribute_id("Male")]
    young = data.attrs[:, regions.attribute_id("Young")]
    np.testing.assert_array_equal(male, [r[2] == "Male" for r in rows])
    # The documented cut: bins ending below 40 are Young.
    np.testing.assert_array_equal(young, [r[1] in ("0-2", "3-9", "10-19", "20-29", "30-39") for r in rows])
    np.testing.assert_array_equal(data.group, [folders.FAIRFACE_RACES.index(r[3]) for r in rows])
    others = [i for i, a in enumerate(regions.ATTRIBUTES) if a not in ("Male", "Young")]
    assert (data.attrs[:, others] == -1).all()
    young30 = folders.FairFace(tmp_path, young_below=30).attrs[:, regions.attribute_id("Young")]
    np.testing.assert_array_equal(young30, [r[1] in ("0-2", "3-9", "10-19", "20-29") for r in rows])
    batch = data.load_batch([4, 9], resolution=8)
    assert set(batch) == {"image", "attrs", "group", "index"}
    assert batch["image"].shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(batch["group"], data.group[[4, 9]])
    chosen = sampling.biased_subset(data.attrs, "Male", ["Young"], corr=0.75, size=8, seed=0,
                                    confounder_values=(1,))
    y, aligned = sampling.group_labels(data.attrs[chosen], "Male", ["Young"], (1,))
    assert aligned.sum() == 6 and y.sum() == 4
    with pytest.raises(ValueError, match="young_below=35"):
        folders.FairFace(tmp_path, young_below=35)


def test_fairface_without_service_test_column(tmp_path):
    write_fairface(tmp_path, n=3, header="file,age,gender,race")
    assert len(folders.FairFace(tmp_path)) == 3


@pytest.mark.parametrize("header, message", [
    ("file,age,gender,race,skin_tone", r"unknown column\(s\) \['skin_tone'\]"),
    ("file,age,gender", r"missing column\(s\) \['race'\]"),
])
def test_fairface_bad_columns_are_named(tmp_path, header, message):
    write_fairface(tmp_path, n=3, header=header)
    with pytest.raises(ValueError, match=message) as info:
        folders.FairFace(tmp_path)
    assert "fairface_label_train.csv" in str(info.value)


def test_fairface_bad_values_and_missing_files(tmp_path):
    write_fairface(tmp_path, n=3)
    path = tmp_path / "fairface_label_train.csv"
    lines = path.read_text().splitlines()
    fields = lines[2].split(",")
    fields[3] = "Martian"
    path.write_text("\n".join(lines[:2] + [",".join(fields)] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match="line 3 has race 'Martian'"):
        folders.FairFace(tmp_path)
    with pytest.raises(FileNotFoundError, match="fairface_label_val.csv"):
        folders.FairFace(tmp_path, split="val")
    path.write_text("\n".join(lines) + "\n")
    os.remove(tmp_path / "train" / "2.jpg")
    with pytest.raises(FileNotFoundError, match="2.jpg"):
        folders.FairFace(tmp_path).load_batch([1])


# ---------------------------------------------------------------------------
# LFW and RFW
# ---------------------------------------------------------------------------

LFW_PEOPLE = {"Ann_A": 3, "Bob_B": 2, "Cid_C": 1, "Dee_D": 2}


def write_lfw(root):
    for name, count in LFW_PEOPLE.items():
        for k in range(1, count + 1):
            _solid(str(root / "lfw" / name / f"{name}_{k:04d}.jpg"), (len(name) * 20, k * 40, 10), (10, 10))
    lines = ["2\t2",
             "Ann_A\t1\t2", "Bob_B\t1\t2", "Ann_A\t3\tCid_C\t1", "Bob_B\t2\tDee_D\t1",  # fold 0
             "Dee_D\t1\t2", "Ann_A\t2\t3", "Cid_C\t1\tDee_D\t2", "Ann_A\t1\tBob_B\t1"]  # fold 1
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return lines


def test_lfw_pairs_folds_and_batches(tmp_path):
    write_lfw(tmp_path)
    pairs = folders.read_lfw_pairs(tmp_path)
    assert len(pairs) == 8
    np.testing.assert_array_equal(pairs.same, [1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 0, 0, 1, 1, 1, 1])
    assert pairs.path_a[2] == os.path.join(str(tmp_path), "lfw", "Ann_A", "Ann_A_0003.jpg")
    assert pairs.path_b[2] == os.path.join(str(tmp_path), "lfw", "Cid_C", "Cid_C_0001.jpg")
    assert pairs.names == sorted(LFW_PEOPLE)
    np.testing.assert_array_equal(pairs.identity_a == pairs.identity_b, pairs.same)
    batch = pairs.load_batch([2, 5], resolution=8)
    assert set(batch) == {"image_a", "image_b", "same", "fold", "identity_a", "identity_b", "index"}
    assert batch["image_a"].shape == batch["image_b"].shape == (2, 8, 8, 3)
    np.testing.assert_allclose(batch["image_b"][0].mean(axis=(0, 1)), np.array([100, 40, 10]) / 255, atol=3 / 255)
    sizes = [b["image_a"].shape[0] for b in pairs.iter_batches(range(8), 3)]
    assert sizes == [3, 3, 2]


def test_lfw_single_fold_header_and_errors(tmp_path):
    lines = write_lfw(tmp_path)
    (tmp_path / "pairsDevTest.txt").write_text("\n".join(["2"] + lines[1:5]) + "\n")
    dev = folders.read_lfw_pairs(tmp_path, pairs_file="pairsDevTest.txt")
    np.testing.assert_array_equal(dev.fold, [0, 0, 0, 0])
    (tmp_path / "pairs.txt").write_text("\n".join(lines[:1] + [lines[3], lines[2], lines[1]] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match="line 2 should be a matched"):
        folders.read_lfw_pairs(tmp_path)
    (tmp_path / "pairs.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="= 8 lines, found 7"):
        folders.read_lfw_pairs(tmp_path)
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    os.remove(tmp_path / "lfw" / "Dee_D" / "Dee_D_0002.jpg")
    with pytest.raises(FileNotFoundError, match="Dee_D_0002.jpg"):
        folders.read_lfw_pairs(tmp_path)
    pairs = folders.read_lfw_pairs(tmp_path, check_files=False)
    (tmp_path / "lfw" / "Bob_B" / "Bob_B_0002.jpg").write_bytes(b"junk")
    report = celeba.SkipReport()
    with pytest.warns(UserWarning, match="skipped 2 of 4"):  # pairs 1 (Bob 2) and 3 (Bob 2)
        batches = list(pairs.iter_batches(range(4), 4, skip_report=report))
    np.testing.assert_array_equal(batches[0]["index"], [0, 2])


def write_rfw(root, flat=False):
    people = {"African": {"m.0a1": 2, "m.0a2": 1}, "Asian": {"m.0b1": 2, "m.0b2": 2}}
    for race, ids in people.items():
        for ident, count in ids.items():
            for k in range(1, count + 1):
                base = root if flat else root / "data"
                _solid(str(base / race / ident / f"{ident}_{k:04d}.jpg"), (k * 60, 10, 200), (10, 10))
    pairs = {"African": ["m.0a1\t1\t2", "m.0a1\t2\tm.0a2\t1", "m.0a1\t2\t1", "m.0a2\t1\tm.0a1\t1"],
             "Asian": ["m.0b1\t1\t2", "m.0b1\t1\tm.0b2\t2", "m.0b2\t1\t2", "m.0b2\t2\tm.0b1\t2"]}
    for race, lines in pairs.items():
        path = root / f"{race}_pairs.txt" if flat else root / "txts" / race / f"{race}_pairs.txt"
        os.makedirs(path.parent, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("flat", [False, True])
def test_rfw_pairs_by_race(tmp_path, flat):
    write_rfw(tmp_path, flat=flat)
    pairs = folders.read_rfw_pairs(tmp_path, races=("African", "Asian"), num_folds=2)
    np.testing.assert_array_equal(pairs.group, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(pairs.same, [1, 0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 1, 1, 0, 0, 1, 1])
    assert pairs.path_b[5].endswith(os.path.join("Asian", "m.0b2", "m.0b2_0002.jpg"))
    batch = pairs.load_batch([0, 7])
    np.testing.assert_array_equal(batch["group"], [0, 1])
    assert batch["image_a"].shape == (2, 10, 10, 3)


def test_rfw_errors(tmp_path):
    write_rfw(tmp_path)
    with pytest.raises(ValueError, match=r"unknown RFW race\(s\) \['Martian'\]"):
        folders.read_rfw_pairs(tmp_path, races=("Martian",))
    with pytest.raises(FileNotFoundError, match="Indian_pairs.txt"):
        folders.read_rfw_pairs(tmp_path, races=("Indian",))
    with pytest.raises(ValueError, match="4 pairs do not split into 3 equal folds"):
        folders.read_rfw_pairs(tmp_path, races=("African",), num_folds=3)
    path = tmp_path / "txts" / "Asian" / "Asian_pairs.txt"
    path.write_text("m.0b1\t1\n")
    with pytest.raises(ValueError, match="Asian_pairs.txt: line 1 should be 'name n1 n2'"):
        folders.read_rfw_pairs(tmp_path, races=("Asian",), num_folds=1)
