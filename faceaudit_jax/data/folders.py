"""Readers for published face data-set layouts: CelebAMask-HQ, FairFace, RFW and LFW.

Every reader loads its small text tables up front and decodes images per
batch (``iter_batches`` / ``load_batch``), producing the batch format of
docs/design.md. Keys a source does not have are omitted, never invented; the one
exception is ``attrs``, which is always [B, 40] with -1 where an attribute is
not annotated, so ``data.sampling`` works on every reader's ``attrs`` table.
Streaming, resizing, landmark geometry and the ``SkipReport`` for undecodable
images are shared with ``data.celeba``.

Layouts (ROOT is what you pass in):

CelebAMask-HQ::

    ROOT/CelebA-HQ-img/<idx>.jpg                          1024 x 1024, idx 0..29999
    ROOT/CelebAMask-HQ-mask-anno/<k>/<idx:05d>_<region>.png   512 x 512, k = idx // 2000
    ROOT/CelebAMask-HQ-attribute-anno.txt                 CelebA attribute format
    ROOT/CelebA-HQ-to-CelebA-mapping.txt                  "idx orig_idx orig_file" (optional)
    ROOT/CelebAMask-HQ-pose-anno.txt                      "Yaw Pitch Raw" (optional)

The per-region masks are merged into one parse map exactly as the data set's
own merge script (``g_mask.py``) does: regions are painted in the order skin,
nose, eye_g, l_eye, r_eye, l_brow, r_brow, l_ear, r_ear, mouth, u_lip, l_lip,
hair, hat, ear_r, neck_l, neck, cloth (the id order of ``regions.REGIONS``),
a later region overwriting an earlier one where masks overlap; pixels in no
mask are background (0). Since ids increase along the painting order, the
merge is a max over ``id * mask``.

FairFace::

    ROOT/fairface_label_train.csv, ROOT/fairface_label_val.csv
        columns file, age, gender, race[, service_test]; file is relative to ROOT
        (e.g. "train/1.jpg")

gender -> ``Male``; age bin -> ``Young`` (bins whose upper end is below
``young_below``, 40 by default: "0-2" .. "30-39" are Young, "40-49" ..
"more than 70" are not); race -> ``group`` (index into ``FAIRFACE_RACES``).

RFW (Racial Faces in-the-Wild)::

    ROOT/data/<Race>/<identity>/<identity>_<nnnn>.jpg      (or ROOT/<Race>/...)
    ROOT/txts/<Race>/<Race>_pairs.txt                      (or ROOT/<Race>_pairs.txt)

LFW::

    ROOT/pairs.txt                  "10 300", then per fold 300 matched lines
                                    "name n1 n2" and 300 mismatched "name1 n1 name2 n2"
    ROOT/lfw/<name>/<name>_<nnnn>.jpg

Pairs files (RFW and LFW) become ``VerificationPairs`` with a fold id per pair.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import threading
import warnings
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from faceaudit_jax import regions
from faceaudit_jax.data.celeba import (
    SkipReport,
    UndecodableImageError,
    decode_image,
    iter_example_batches,
    parse_resolution,
    read_attribute_table,
    require_dir,
    require_file,
    stack_examples,
    read_text_lines,
)

# ---------------------------------------------------------------------------
# CelebAMask-HQ
# ---------------------------------------------------------------------------

CELEBAMASK_HQ_IMAGE_DIR = "CelebA-HQ-img"
CELEBAMASK_HQ_MASK_DIR = "CelebAMask-HQ-mask-anno"
CELEBAMASK_HQ_ATTR_FILE = "CelebAMask-HQ-attribute-anno.txt"
CELEBAMASK_HQ_MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
CELEBAMASK_HQ_POSE_FILE = "CelebAMask-HQ-pose-anno.txt"
CELEBAMASK_HQ_MASK_SIZE = 512
CELEBAMASK_HQ_IMAGES_PER_FOLDER = 2000

# The published g_partition.py assigns an HQ image to a split by comparing its
# 0-based CelebA index (orig_idx) with these cut points.
PUBLISHED_VALID_START = 162771
PUBLISHED_TEST_START = 182638

_MASK_NAME = re.compile(r"^(\d{5})_(.+)\.png$")
# What a mask file that misses _MASK_NAME probably meant (e.g. 1_nose.png): warned about.
_LOOSE_MASK_NAME = re.compile(r"^(\d+)_(.+)\.png$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CelebAHQMapping:
    """CelebA-HQ-to-CelebA-mapping.txt: row r maps HQ image hq_index[r] to CelebA.

    orig_index is the 0-based CelebA row and orig_file the CelebA file name.
    """

    hq_index: np.ndarray  # int64 [N]
    orig_index: np.ndarray  # int64 [N]
    orig_file: tuple[str, ...]

    def celeba_numbers(self, hq_indices) -> np.ndarray:
        """CelebA file numbers (000123.jpg -> 123) of the given HQ indices."""
        hq_indices = np.asarray(hq_indices, dtype=np.int64).reshape(-1)
        position = np.full(int(self.hq_index.max()) + 1, -1, np.int64)
        position[self.hq_index] = np.arange(self.hq_index.size)
        bad = (hq_indices < 0) | (hq_indices >= position.size)
        bad[~bad] = position[hq_indices[~bad]] < 0
        if bad.any():
            raise ValueError(f"HQ index {int(hq_indices[bad][0])} is not in the CelebA-HQ mapping")
        numbers = np.array([_file_number(f, "CelebA-HQ mapping") for f in self.orig_file], np.int64)
        return numbers[position[hq_indices]]


def _file_number(filename: str, where: str) -> int:
    stem = os.path.splitext(os.path.basename(filename))[0]
    if not stem.isdigit():
        raise ValueError(f"{where}: file name {filename!r} is not numbered like CelebA's 000001.jpg")
    return int(stem)


def read_celebahq_mapping(path: str | os.PathLike) -> CelebAHQMapping:
    """Read CelebA-HQ-to-CelebA-mapping.txt (header ``idx orig_idx orig_file``)."""
    path = os.fspath(path)
    lines = [line for line in read_text_lines(path) if line.strip()]
    if not lines or lines[0].split() != ["idx", "orig_idx", "orig_file"]:
        raise ValueError(f"{path}: first line should be the header 'idx orig_idx orig_file', "
                         f"got {lines[0] if lines else ''!r}")
    hq, orig, files = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        tokens = line.split()
        if len(tokens) != 3 or not tokens[0].isdigit() or not tokens[1].isdigit():
            raise ValueError(f"{path}: line {number} should be 'idx orig_idx orig_file', got {line!r}")
        hq.append(int(tokens[0]))
        orig.append(int(tokens[1]))
        files.append(tokens[2])
    return CelebAHQMapping(np.asarray(hq, np.int64), np.asarray(orig, np.int64), tuple(files))


def drop_celebamask_hq_overlap(celeba_filenames: Sequence[str], celeba_indices,
                               mapping: CelebAHQMapping, hq_indices) -> np.ndarray:
    """CelebA row indices with the images of the given CelebAMask-HQ set removed.

    FaceX trains on CelebA and evaluates IoR on a CelebAMask-HQ test set, so
    the CelebA originals of those HQ images must leave the training set.
    ``celeba_filenames`` is the CelebA reader's file list (rows), and
    ``celeba_indices`` the rows to filter (e.g. the training split). Images are
    matched by their CelebA file number, so zero padding does not matter.
    Returns the kept indices in their original order.
    """
    celeba_indices = np.asarray(celeba_indices, dtype=np.int64).reshape(-1)
    numbers = np.array([_file_number(f, "CelebA file list") for f in celeba_filenames], np.int64)
    excluded = mapping.celeba_numbers(hq_indices)
    keep = ~np.isin(numbers[celeba_indices], excluded)
    return celeba_indices[keep]


def _read_pose_table(path: str) -> tuple[list[str], np.ndarray]:
    lines = read_text_lines(path)
    if len(lines) < 2 or lines[1].split() != ["Yaw", "Pitch", "Raw"]:
        raise ValueError(f"{path}: expected a count line then the header 'Yaw Pitch Raw'")
    names, values = [], []
    for number, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue
        try:
            if len(tokens) != 4:
                raise ValueError
            values.append([float(t) for t in tokens[1:]])
        except ValueError:
            raise ValueError(f"{path}: line {number} should be 'file yaw pitch roll', got {line!r}") from None
        names.append(tokens[0])
    return names, np.asarray(values, np.float32).reshape(-1, 3)


def decode_mask(path: str, expected_size: int, like: str = "every other CelebAMask-HQ mask") -> np.ndarray:
    """One region mask PNG -> bool [S, S] (nonzero first channel, as g_mask.py reads it);
    another size raises, naming the file and where ``expected_size`` comes from (``like``)."""
    require_file(path, "mask")
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise UndecodableImageError(path, f"{type(err).__name__}: {err}") from None
    if array.ndim == 3:
        array = array[..., 0]
    if array.shape != (expected_size, expected_size):
        raise ValueError(
            f"mask {path} is {array.shape[1]}x{array.shape[0]}; expected {expected_size}x{expected_size} "
            f"like {like}")
    return array != 0


def merge_region_masks(region_ids: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Merge bool masks [K, H, W] of regions ``region_ids`` [K] into a parse map int32 [H, W].

    Painting in increasing id order with later regions on top equals taking
    the max of id * mask, which is what this computes (no loop over regions).
    """
    region_ids = np.asarray(region_ids, np.int32).reshape(-1, 1, 1)
    if masks.shape[0] == 0:
        raise ValueError("no masks to merge")
    return np.max(np.where(masks, region_ids, 0), axis=0).astype(np.int32)


def resize_parse(parse: np.ndarray, out_hw) -> np.ndarray:
    """Nearest-neighbour resize of a parse map int [H, W] to (H', W')."""
    if parse.shape == tuple(out_hw):
        return parse.astype(np.int32)
    img = Image.fromarray(parse.astype(np.uint8))
    return np.asarray(img.resize((out_hw[1], out_hw[0]), Image.NEAREST), dtype=np.int32)


class CelebAMaskHQ:
    """CelebAMask-HQ from its published layout.

    Attributes:
      hq_indices: int64 [N], the HQ image index of each attribute-table row.
      attrs: int8 [N, 40] in CelebA order (the table ``data.sampling`` uses).
      mapping: ``CelebAHQMapping`` or None when the mapping file is absent.
      pose: float32 [N, 3] (yaw, pitch, roll in degrees) or None.

    Batches hold ``image`` (resized to ``resolution``, by default the mask
    size), ``parse`` (merged masks, nearest-resized), ``attrs`` and ``index``
    (the HQ image index). Indices passed in are HQ image indices (the number
    in ``<idx>.jpg``), not row numbers.
    """

    def __init__(self, root: str | os.PathLike, *, mask_size: int = CELEBAMASK_HQ_MASK_SIZE):
        self.root = require_dir(root, "CelebAMask-HQ root folder")
        self.image_dir = require_dir(os.path.join(self.root, CELEBAMASK_HQ_IMAGE_DIR), "CelebA-HQ image folder")
        self.mask_dir = require_dir(os.path.join(self.root, CELEBAMASK_HQ_MASK_DIR), "CelebAMask-HQ mask folder")
        self.mask_size = int(mask_size)
        attr_path = os.path.join(self.root, CELEBAMASK_HQ_ATTR_FILE)
        names, self.attrs = read_attribute_table(attr_path)
        self.hq_indices = np.array([_file_number(n, attr_path) for n in names], np.int64)
        self._row_of = {int(i): r for r, i in enumerate(self.hq_indices)}
        mapping_path = os.path.join(self.root, CELEBAMASK_HQ_MAPPING_FILE)
        self.mapping = read_celebahq_mapping(mapping_path) if os.path.exists(mapping_path) else None
        pose_path = os.path.join(self.root, CELEBAMASK_HQ_POSE_FILE)
        self.pose = None
        if os.path.exists(pose_path):
            pose_names, pose = _read_pose_table(pose_path)
            order = {n: r for r, n in enumerate(pose_names)}
            missing = [n for n in names if n not in order]
            if missing:
                raise ValueError(f"{pose_path} has no row for {missing[0]}")
            self.pose = pose[[order[n] for n in names]]
        self._mask_index: dict[int, dict[int, list[tuple[str, str]]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.hq_indices.size)

    # -- masks ---------------------------------------------------------------

    def _folder_masks(self, folder: int) -> dict[int, list[tuple[str, str]]]:
        """HQ index -> [(region name, path)] for one mask folder, scanned once."""
        with self._lock:
            cached = self._mask_index.get(folder)
            if cached is not None:
                return cached
            path = require_dir(os.path.join(self.mask_dir, str(folder)), "CelebAMask-HQ mask folder")
            table: dict[int, list[tuple[str, str]]] = {}
            misnamed = []
            with os.scandir(path) as entries:
                for entry in entries:
                    match = _MASK_NAME.match(entry.name)
                    if match:
                        table.setdefault(int(match.group(1)), []).append((match.group(2), entry.path))
                    elif _LOOSE_MASK_NAME.match(entry.name):
                        misnamed.append(entry.name)
            if misnamed:
                # Ignored files drop regions silently otherwise: say which image loses what.
                shown = ", ".join(f"{name} (image {int(_LOOSE_MASK_NAME.match(name).group(1))})"
                                  for name in sorted(misnamed)[:10])
                warnings.warn(
                    f"{path}: {len(misnamed)} mask file(s) do not match the naming pattern "
                    f"<5-digit image index>_<region>.png and are ignored, so those images lack "
                    f"that region: {shown}{' ...' if len(misnamed) > 10 else ''}", stacklevel=3)
            self._mask_index[folder] = table
            return table

    def mask_files(self, hq_index: int) -> list[tuple[int, str]]:
        """[(region id, path)] of one image's mask PNGs, sorted by region id.

        Raises ValueError naming the file for a region name outside the
        vocabulary, and FileNotFoundError when the image has no masks.
        """
        folder = hq_index // CELEBAMASK_HQ_IMAGES_PER_FOLDER
        entries = self._folder_masks(folder).get(hq_index)
        if not entries:
            raise FileNotFoundError(
                f"missing masks: no {hq_index:05d}_<region>.png in {os.path.join(self.mask_dir, str(folder))}")
        files = []
        for name, path in entries:
            if name not in regions.REGION_ID:
                raise ValueError(
                    f"mask {path} names region {name!r}, which is not in the vocabulary; "
                    f"expected one of: {', '.join(regions.REGIONS)}")
            files.append((regions.REGION_ID[name], path))
        return sorted(files)

    def load_parse(self, hq_index: int) -> np.ndarray:
        """Merged parse map int32 [mask_size, mask_size] of one image."""
        files = self.mask_files(hq_index)
        masks = np.stack([decode_mask(path, self.mask_size) for _, path in files])
        return merge_region_masks(np.array([r for r, _ in files]), masks)

    # -- examples and batches ------------------------------------------------

    def image_path(self, hq_index: int) -> str:
        return os.path.join(self.image_dir, f"{hq_index}.jpg")

    def load_example(self, hq_index: int, resolution=None) -> tuple[dict, str]:
        hq_index = int(hq_index)
        row = self._row_of.get(hq_index)
        if row is None:
            raise ValueError(f"HQ index {hq_index} is not in {CELEBAMASK_HQ_ATTR_FILE}")
        out_hw = parse_resolution(resolution) or (self.mask_size, self.mask_size)
        path = self.image_path(hq_index)
        image, _, _ = decode_image(path, out_hw, center_crop=False)
        parse = resize_parse(self.load_parse(hq_index), out_hw)
        return {"image": image, "parse": parse, "attrs": self.attrs[row], "index": np.int64(hq_index)}, path

    def load_batch(self, hq_indices, resolution=None) -> dict:
        hq_indices = np.asarray(hq_indices, dtype=np.int64).reshape(-1)
        loaded = [self.load_example(i, resolution) for i in hq_indices]
        return stack_examples([ex for ex, _ in loaded], [p for _, p in loaded])

    def iter_batches(self, hq_indices, batch_size: int, resolution=None, *, drop_remainder: bool = False,
                     skip_report: SkipReport | None = None, num_workers: int = 0) -> Iterator[dict]:
        return iter_example_batches(
            lambda i: self.load_example(i, resolution), hq_indices, batch_size,
            drop_remainder=drop_remainder, skip_report=skip_report, num_workers=num_workers)

    # -- splits ----------------------------------------------------------------

    def _require_mapping(self) -> CelebAHQMapping:
        if self.mapping is None:
            raise FileNotFoundError(f"missing file: {os.path.join(self.root, CELEBAMASK_HQ_MAPPING_FILE)}")
        return self.mapping

    def split_indices(self, split: str, celeba=None) -> np.ndarray:
        """HQ indices of "train" / "valid" / "test".

        With ``celeba`` (a ``data.celeba.CelebA`` with its partition file), an
        HQ image takes the CelebA partition of its original. Without it, the
        rule of the data set's published partition script is used: orig_idx
        (0-based) >= 182638 is test, >= 162771 valid, the rest train.
        """
        mapping = self._require_mapping()
        if split not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train', 'valid' or 'test'")
        if celeba is not None:
            if celeba.partition is None:
                raise FileNotFoundError("the CelebA reader has no list_eval_partition.txt")
            numbers = np.array([_file_number(f, "CelebA file list") for f in celeba.filenames], np.int64)
            lookup = np.full(int(numbers.max()) + 1, -1, np.int64)
            lookup[numbers] = celeba.partition
            orig_numbers = mapping.celeba_numbers(mapping.hq_index)
            if orig_numbers.max() >= lookup.size or (lookup[orig_numbers] < 0).any():
                raise ValueError("some CelebA-HQ originals are not in the CelebA file list")
            part = lookup[orig_numbers]
        else:
            part = np.where(mapping.orig_index >= PUBLISHED_TEST_START, 2,
                            np.where(mapping.orig_index >= PUBLISHED_VALID_START, 1, 0))
        wanted = {"train": 0, "valid": 1, "test": 2}[split]
        return np.sort(mapping.hq_index[part == wanted])


def load_celebamask_hq(root: str | os.PathLike, indices, resolution=None, *,
                       mask_size: int = CELEBAMASK_HQ_MASK_SIZE) -> dict:
    """A batch dict for these HQ image indices, read from the published CelebAMask-HQ layout.

    Keys: ``image`` float32 [B, R, R, 3], ``parse`` int32 [B, R, R], ``attrs``
    int8 [B, 40], ``index`` int64 [B]. ``resolution`` defaults to the mask
    size (512); images (1024) are resized bilinearly and parse maps by nearest
    neighbour. Every mask must be ``mask_size`` square. For repeated reads
    build a ``CelebAMaskHQ`` once (it caches the tables and the mask folder
    listings).
    """
    return CelebAMaskHQ(root, mask_size=mask_size).load_batch(indices, resolution)


# ---------------------------------------------------------------------------
# FairFace
# ---------------------------------------------------------------------------

FAIRFACE_RACES: tuple[str, ...] = (
    "White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
FAIRFACE_AGE_BINS: tuple[str, ...] = (
    "0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
_AGE_BIN_BOUNDS = ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, None))
FAIRFACE_GENDERS: tuple[str, ...] = ("Female", "Male")
FAIRFACE_REQUIRED_COLUMNS = ("file", "age", "gender", "race")
FAIRFACE_OPTIONAL_COLUMNS = ("service_test",)


class FairFace:
    """FairFace label CSV + images for one split ("train" or "val").

    Attributes: ``files`` (paths relative to root), ``attrs`` int8 [N, 40]
    (Male and Young known, the rest -1), ``group`` int32 [N] (race index into
    ``FAIRFACE_RACES``), ``age_bin`` int32 [N] (index into
    ``FAIRFACE_AGE_BINS``). Batches: ``image``, ``attrs``, ``group``, ``index``.
    ``young_below`` is the age cut for Young: one of the bins' lower ends
    (3, 10, 20, ..., 70); bins ending below it are Young.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, young_below: int = 40):
        if split not in ("train", "val"):
            raise ValueError(f"unknown FairFace split {split!r}; expected 'train' or 'val'")
        lower_ends = [lo for lo, _ in _AGE_BIN_BOUNDS[1:]]
        if young_below not in lower_ends:
            raise ValueError(f"young_below={young_below!r} must be a bin's lower end, one of {lower_ends}")
        self.root = require_dir(root, "FairFace root folder")
        self.csv_path = require_file(os.path.join(self.root, f"fairface_label_{split}.csv"), "FairFace label CSV")
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise ValueError(f"{self.csv_path}: empty file; expected a header line") from None
            rows = [row for row in reader if row]
        known = FAIRFACE_REQUIRED_COLUMNS + FAIRFACE_OPTIONAL_COLUMNS
        unknown = [h for h in header if h not in known]
        if unknown:
            raise ValueError(f"{self.csv_path}: unknown column(s) {unknown}; expected {list(known)} "
                             "(service_test optional)")
        missing = [h for h in FAIRFACE_REQUIRED_COLUMNS if h not in header]
        if missing:
            raise ValueError(f"{self.csv_path}: missing column(s) {missing}; expected {list(known)}")
        col = {h: i for i, h in enumerate(header)}
        self.files, ages, genders, races = [], [], [], []
        age_of = {b: i for i, b in enumerate(FAIRFACE_AGE_BINS)}
        race_of = {r: i for i, r in enumerate(FAIRFACE_RACES)}
        for number, row in enumerate(rows, start=2):
            if len(row) != len(header):
                raise ValueError(f"{self.csv_path}: line {number} has {len(row)} fields; expected {len(header)}")
            values = {h: row[i].strip() for h, i in col.items()}
            for name, vocab in (("age", FAIRFACE_AGE_BINS), ("race", FAIRFACE_RACES),
                                ("gender", FAIRFACE_GENDERS)):
                if values[name] not in vocab:
                    raise ValueError(f"{self.csv_path}: line {number} has {name} {values[name]!r}; "
                                     f"expected one of {list(vocab)}")
            self.files.append(values["file"])
            ages.append(age_of[values["age"]])
            genders.append(values["gender"] == "Male")
            races.append(race_of[values["race"]])
        self.age_bin = np.asarray(ages, np.int32)
        self.group = np.asarray(races, np.int32)
        young_bins = np.array([hi is not None and hi < young_below for _, hi in _AGE_BIN_BOUNDS])
        self.attrs = np.full((len(self.files), regions.NUM_ATTRIBUTES), -1, np.int8)
        self.attrs[:, regions.ATTRIBUTE_ID["Male"]] = np.asarray(genders, np.int8)
        self.attrs[:, regions.ATTRIBUTE_ID["Young"]] = young_bins[self.age_bin].astype(np.int8)

    def __len__(self) -> int:
        return len(self.files)

    def load_example(self, index: int, resolution=None) -> tuple[dict, str]:
        index = int(index)
        if not 0 <= index < len(self.files):
            raise IndexError(f"FairFace index {index} out of range 0..{len(self.files) - 1}")
        path = os.path.join(self.root, self.files[index])
        image, _, _ = decode_image(path, resolution)
        return {"image": image, "attrs": self.attrs[index], "group": self.group[index],
                "index": np.int64(index)}, path

    def load_batch(self, indices, resolution=None) -> dict:
        loaded = [self.load_example(i, resolution) for i in np.asarray(indices, np.int64).reshape(-1)]
        return stack_examples([ex for ex, _ in loaded], [p for _, p in loaded])

    def iter_batches(self, indices, batch_size: int, resolution=None, *, drop_remainder: bool = False,
                     skip_report: SkipReport | None = None, num_workers: int = 0) -> Iterator[dict]:
        return iter_example_batches(
            lambda i: self.load_example(i, resolution), indices, batch_size,
            drop_remainder=drop_remainder, skip_report=skip_report, num_workers=num_workers)


# ---------------------------------------------------------------------------
# Verification pairs: LFW and RFW
# ---------------------------------------------------------------------------

RFW_RACES: tuple[str, ...] = ("African", "Asian", "Caucasian", "Indian")


@dataclasses.dataclass
class VerificationPairs:
    """Face-verification pairs read from an LFW-style pairs file.

    path_a, path_b: image paths; same: bool [P] (matched pair); fold: int32 [P]
    (cross-validation fold); name_a, name_b: identity names; identity_a,
    identity_b: int32 [P] ids into ``names`` (sorted); group: int32 [P] or
    None (RFW: the race index into ``RFW_RACES``).

    Batches hold ``image_a``, ``image_b``, ``same``, ``fold``, ``identity_a``,
    ``identity_b``, ``index`` and, for RFW, ``group``.
    """

    path_a: list[str]
    path_b: list[str]
    same: np.ndarray
    fold: np.ndarray
    name_a: list[str]
    name_b: list[str]
    group: np.ndarray | None = None

    def __post_init__(self):
        self.names = sorted(set(self.name_a) | set(self.name_b))
        ids = {n: i for i, n in enumerate(self.names)}
        self.identity_a = np.array([ids[n] for n in self.name_a], np.int32)
        self.identity_b = np.array([ids[n] for n in self.name_b], np.int32)

    def __len__(self) -> int:
        return len(self.path_a)

    def check_files(self) -> None:
        """Raise FileNotFoundError naming the first image that does not exist."""
        for path in self.path_a + self.path_b:
            require_file(path, "image")

    def load_example(self, index: int, resolution=None) -> tuple[dict, str]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range 0..{len(self) - 1}")
        image_a, _, _ = decode_image(self.path_a[index], resolution)
        image_b, _, _ = decode_image(self.path_b[index], resolution)
        if image_a.shape != image_b.shape:
            raise ValueError(f"{self.path_a[index]} and {self.path_b[index]} differ in size; pass a resolution")
        example = {"image": image_a, "image_b": image_b, "same": self.same[index], "fold": self.fold[index],
                   "identity_a": self.identity_a[index], "identity_b": self.identity_b[index],
                   "index": np.int64(index)}
        if self.group is not None:
            example["group"] = self.group[index]
        return example, self.path_a[index]

    @staticmethod
    def _rename(batch: dict) -> dict:
        # stack_examples checks sizes on "image"; the public name is image_a.
        batch["image_a"] = batch.pop("image")
        return {k: batch[k] for k in ["image_a"] + [k for k in batch if k != "image_a"]}

    def load_batch(self, indices, resolution=None) -> dict:
        loaded = [self.load_example(i, resolution) for i in np.asarray(indices, np.int64).reshape(-1)]
        return self._rename(stack_examples([ex for ex, _ in loaded], [p for _, p in loaded]))

    def iter_batches(self, indices, batch_size: int, resolution=None, *, drop_remainder: bool = False,
                     skip_report: SkipReport | None = None, num_workers: int = 0) -> Iterator[dict]:
        """Stream pair batches; a pair with an undecodable image is skipped and reported."""
        batches = iter_example_batches(
            lambda i: self.load_example(i, resolution), indices, batch_size,
            drop_remainder=drop_remainder, skip_report=skip_report, num_workers=num_workers)
        return (self._rename(b) for b in batches)


def _lfw_image(images_dir: str, name: str, number: str, path: str, line_number: int) -> str:
    if not number.isdigit():
        raise ValueError(f"{path}: line {line_number} has image number {number!r}; expected an integer")
    return os.path.join(images_dir, name, f"{name}_{int(number):04d}.jpg")


def _parse_pair_line(tokens: list[str], images_dir: str, path: str, line_number: int):
    """'name n1 n2' (matched) or 'name1 n1 name2 n2' (mismatched) -> (a, b, same, name_a, name_b).

    A mismatched line naming one person twice is an error: it would be
    scored as a non-match of the same identity.
    """
    if len(tokens) == 3:
        name, n1, n2 = tokens
        return (_lfw_image(images_dir, name, n1, path, line_number),
                _lfw_image(images_dir, name, n2, path, line_number), True, name, name)
    if len(tokens) == 4:
        name1, n1, name2, n2 = tokens
        if name1 == name2:
            raise ValueError(f"{path}: line {line_number} is a mismatched pair naming {name1!r} twice; "
                             "expected two different people (a matched pair is 'name n1 n2')")
        return (_lfw_image(images_dir, name1, n1, path, line_number),
                _lfw_image(images_dir, name2, n2, path, line_number), False, name1, name2)
    raise ValueError(f"{path}: line {line_number} should be 'name n1 n2' or 'name1 n1 name2 n2', "
                     f"got {' '.join(tokens)!r}")


def read_lfw_pairs(root: str | os.PathLike, *, pairs_file: str = "pairs.txt", images_dir: str | None = None,
                   check_files: bool = True) -> VerificationPairs:
    """LFW pairs in its 10-fold format (or the single-fold pairsDevTrain/Test format).

    The first line is "folds n" (pairs.txt: "10 300"), then each fold has n
    matched lines followed by n mismatched lines; a first line with only "n"
    (pairsDevTrain.txt) is one fold. Images are ``root/lfw/<name>/<name>_<nnnn>.jpg``
    unless ``images_dir`` says otherwise. A line of the wrong kind at its
    position is an error naming the file and line.
    """
    root = require_dir(root, "LFW root folder")
    path = require_file(os.path.join(root, pairs_file), "LFW pairs file")
    images_dir = images_dir if images_dir is not None else os.path.join(root, "lfw")
    lines = [(i + 1, line.split()) for i, line in enumerate(read_text_lines(path)) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty pairs file")
    head = lines[0][1]
    if not all(t.isdigit() for t in head) or len(head) not in (1, 2):
        raise ValueError(f"{path}: first line should be 'folds pairs_per_fold' (e.g. '10 300'), got {head}")
    folds, per_fold = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    if folds < 1 or per_fold < 1:
        raise ValueError(f"{path}: first line {' '.join(head)!r} declares {folds} folds of {per_fold} pairs; "
                         "expected at least one fold of at least one pair")
    body = lines[1:]
    if len(body) != folds * 2 * per_fold:
        raise ValueError(f"{path}: header announces {folds} folds x 2 x {per_fold} pairs = "
                         f"{folds * 2 * per_fold} lines, found {len(body)}")
    path_a, path_b, same, name_a, name_b = [], [], [], [], []
    for position, (line_number, tokens) in enumerate(body):
        a, b, matched, na, nb = _parse_pair_line(tokens, images_dir, path, line_number)
        expected_matched = (position % (2 * per_fold)) < per_fold
        if matched != expected_matched:
            kind = "matched 'name n1 n2'" if expected_matched else "mismatched 'name1 n1 name2 n2'"
            raise ValueError(f"{path}: line {line_number} should be a {kind} pair at this position of its fold")
        path_a.append(a), path_b.append(b), same.append(matched), name_a.append(na), name_b.append(nb)
    fold = (np.arange(len(body)) // (2 * per_fold)).astype(np.int32)
    pairs = VerificationPairs(path_a, path_b, np.asarray(same, bool), fold, name_a, name_b)
    if check_files:
        pairs.check_files()
    return pairs


def read_rfw_pairs(root: str | os.PathLike, races: Sequence[str] = RFW_RACES, *, num_folds: int = 10,
                   check_files: bool = True) -> VerificationPairs:
    """RFW pairs of the given races, concatenated, with ``group`` = race index in ``RFW_RACES``.

    Each ``<Race>_pairs.txt`` lists matched "name n1 n2" and mismatched
    "name1 n1 name2 n2" lines without a header, in ``num_folds`` equal
    consecutive folds (RFW: 10 folds of 300 matched + 300 mismatched).
    Images are ``<images>/<Race>/<identity>/<identity>_<nnnn>.jpg`` with
    <images> = ROOT/data when it exists, else ROOT.
    """
    root = require_dir(root, "RFW root folder")
    image_root = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root
    unknown = [r for r in races if r not in RFW_RACES]
    if unknown:
        raise ValueError(f"unknown RFW race(s) {unknown}; expected some of {list(RFW_RACES)}")
    parts = []
    for race in races:
        candidates = [os.path.join(root, "txts", race, f"{race}_pairs.txt"), os.path.join(root, f"{race}_pairs.txt")]
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise FileNotFoundError(f"missing RFW pairs file: {candidates[0]} (or {candidates[1]})")
        lines = [(i + 1, line.split()) for i, line in enumerate(read_text_lines(path)) if line.strip()]
        if not lines or len(lines) % num_folds:
            raise ValueError(f"{path}: {len(lines)} pairs do not split into {num_folds} equal folds")
        images_dir = require_dir(os.path.join(image_root, race), f"RFW {race} image folder")
        parsed = [_parse_pair_line(tokens, images_dir, path, n) for n, tokens in lines]
        fold = (np.arange(len(parsed)) // (len(parsed) // num_folds)).astype(np.int32)
        parts.append((parsed, fold, RFW_RACES.index(race)))
    pairs = VerificationPairs(
        path_a=[p[0] for parsed, _, _ in parts for p in parsed],
        path_b=[p[1] for parsed, _, _ in parts for p in parsed],
        same=np.array([p[2] for parsed, _, _ in parts for p in parsed], bool),
        fold=np.concatenate([fold for _, fold, _ in parts]),
        name_a=[p[3] for parsed, _, _ in parts for p in parsed],
        name_b=[p[4] for parsed, _, _ in parts for p in parsed],
        group=np.concatenate([np.full(len(parsed), g, np.int32) for parsed, _, g in parts]),
    )
    if check_files:
        pairs.check_files()
    return pairs
