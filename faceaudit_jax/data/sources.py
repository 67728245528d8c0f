"""One data-source interface for every experiment: ``build_source``, ``build_split``, ``build_pairs``.

A *source* is one table of images: ``len(source)`` rows, ``attributes(rows)``
(a cheap table look-up: ``attrs`` int8 [N, 40] in CelebA order, 1 / 0 / -1
unknown, plus ``identity`` and ``group`` where the data set has them) and
``batch(rows)`` (the batch format of docs/design.md: ``image`` float32
[B, R, R, 3] in [0, 1], ``parse`` int32 [B, R, R] where the source has masks,
``attrs``, ``identity``, ``landmarks``, ``group`` where known; keys a source
lacks are absent, never invented). ``resolution`` is the side R of the square
images ``batch`` returns (``with_resolution(r)`` gives the same source at r),
``annotated`` the attribute names that are not all -1, ``has_parse`` whether
batches carry parse maps.

Rows are 0 .. len - 1 in the order of the data set's own table (for the
synthetic renderer they are its image indices; its pool is 2**31 images).
Real images are decoded and resized in a pool of ``data.num_workers`` threads
(PIL releases the GIL while it decodes and resizes), and
``pipeline.iterate_batches`` / ``pipeline.step_batch_fn`` prefetch the next
batches while the model runs.

``data.source`` (kinds in ``SOURCE_KINDS``) and ``data.root`` choose the
reader; layouts are those of docs/use_your_own_data.md:

* ``synthetic``: the embedded renderer (``data.seed``, ``independent``,
  ``images_per_identity``).
* ``celeba``: the published CelebA folder (``data.celeba``).
* ``celeba_tfds``: tensorflow-datasets' ``celeb_a`` prepared under
  ``data.root`` (extra ``[tfds]``).
* ``celebamask_hq``: the published CelebAMask-HQ folder, with parse maps.
* ``fairface``: FairFace's label CSVs (``train`` and ``val``) and images.
* ``folder``: anything else: ``ROOT/attributes.csv`` (a ``file`` column,
  CelebA attribute names as columns, optional ``identity`` / ``group``),
  optional ``ROOT/masks/`` and ``ROOT/pairs.csv`` (``GENERIC_LAYOUT``).

Splits (``build_split``): the synthetic renderer uses disjoint index ranges;
a real data set uses, in this order, ``data.test_root`` (a second folder,
of kind ``data.test_source``, default the same: all its images are the test
set, or with ``data.test_split="published"`` its published test split),
its published split
(CelebA's partition file, CelebAMask-HQ's via its CelebA mapping, FairFace's
train / val CSVs, tfds' train / test), else a seeded identity-disjoint split
(``data.split_seed``, ``data.test_fraction``; images without identities are
split image by image).

Every check on a root, a layout, a field or an attribute name runs when the
source is built, so a bad setting fails before any training or explaining.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import dataclasses
import functools
import math
import os
import re
import threading
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from faceaudit_jax import regions
from faceaudit_jax.data import celeba, folders, sampling

SOURCE_KINDS = ("synthetic", "celeba", "celeba_tfds", "celebamask_hq", "fairface", "folder")
PAIR_KINDS = ("synthetic", "lfw", "rfw", "folder")
SYNTHETIC_POOL = 2 ** 31  # the renderer's index range (0 .. 2**31 - 1)

GENERIC_ATTR_FILE = "attributes.csv"
GENERIC_MASK_DIR = "masks"
GENERIC_PAIRS_FILE = "pairs.csv"
GENERIC_LAYOUT = f"""\
ROOT/{GENERIC_ATTR_FILE}   header: file,<CelebA attribute names...>[,identity][,group]
                    file: image path relative to ROOT (any size; centre-cropped to a square)
                    attribute values: 1 present, 0 absent, empty = unknown
                    identity / group: any label (ints or names); identities make the seeded split
                    identity-disjoint
ROOT/{GENERIC_MASK_DIR}/           optional parse maps, one of:
                    <stem>.png           one label PNG per image, pixel = region id 0..18
                                         (regions.REGIONS order)
                    <stem>_<region>.png  one binary PNG per region (CelebAMask-HQ naming,
                                         merged as its g_mask.py does)
ROOT/{GENERIC_PAIRS_FILE}       optional verification pairs: file_a,file_b,same[,fold]
                    (same: 1 matched, 0 mismatched)"""


class Source(Protocol):
    name: str
    resolution: int
    annotated: frozenset
    has_parse: bool

    def __len__(self) -> int: ...
    def attributes(self, indices) -> dict: ...
    def batch(self, indices) -> dict: ...
    def with_resolution(self, resolution: int) -> "Source": ...


def _cfg(data_cfg, field: str, default=None):
    value = data_cfg.get(field, default) if hasattr(data_cfg, "get") else getattr(data_cfg, field, default)
    return default if value is None else value


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ---------------------------------------------------------------------------
# Real-file sources: one shell around a per-row loader
# ---------------------------------------------------------------------------


class FileSource:
    """A table of image files with a per-row loader, decoded in a thread pool.

    Subclasses set ``name``, ``root``, ``attrs`` (int8 [N, 40]), optionally
    ``identity`` / ``group`` (int32 [N]) and implement ``load_row(row) ->
    (example dict of unbatched numpy arrays, path)`` at ``self.resolution``.
    """

    name = "files"
    has_parse = False
    prefetch = 2  # batches pipeline.iterate_batches / step_batch_fn decode ahead of the model
    identity: Optional[np.ndarray] = None
    group: Optional[np.ndarray] = None
    table_path: Optional[str] = None  # the attribute table file, named in errors

    def __init__(self, root: str, resolution: int, num_workers: int):
        self.root = root
        self.resolution = _check_resolution(resolution)
        self.num_workers = int(num_workers)
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()

    # The table --------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.attrs.shape[0])

    @property
    def annotated(self) -> frozenset:
        known = np.any(self.attrs >= 0, axis=0)
        return frozenset(n for n, k in zip(regions.ATTRIBUTES, known) if k)

    def rows(self, indices) -> np.ndarray:
        rows = np.asarray(indices, np.int64).reshape(-1)
        bad = (rows < 0) | (rows >= len(self))
        if bad.any():
            raise IndexError(f"{self.name} ({self.root}): row {int(rows[bad][0])} out of range "
                             f"0..{len(self) - 1}")
        return rows

    def attributes(self, indices) -> dict:
        rows = self.rows(indices)
        out = {"attrs": self.attrs[rows]}
        if self.identity is not None:
            out["identity"] = self.identity[rows]
        if self.group is not None:
            out["group"] = self.group[rows]
        return out

    def published_split(self, split: str) -> Optional[np.ndarray]:
        """Rows of the data set's own train / test split, or None when it publishes none."""
        return None

    # Pixels -----------------------------------------------------------------

    def load_row(self, row: int) -> tuple[dict, str]:
        raise NotImplementedError

    def _executor(self):
        with self._pool_lock:
            if self._pool is None and self.num_workers > 1:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.num_workers, thread_name_prefix=f"decode-{self.name}")
            return self._pool

    def batch(self, indices) -> dict:
        """Decode these rows (in ``num_workers`` threads); an unreadable image raises, naming it."""
        rows = self.rows(indices)
        pool = self._executor()
        loaded = list(pool.map(self.load_row, rows.tolist()) if pool is not None
                      else map(self.load_row, rows.tolist()))
        batch = celeba.stack_examples([ex for ex, _ in loaded], [p for _, p in loaded])
        batch.pop("index", None)  # the readers' own numbering; callers hold the rows they asked for
        return batch

    def with_resolution(self, resolution: int):
        other = copy.copy(self)
        other.resolution = _check_resolution(resolution)
        return other

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"], state["_pool_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, {len(self)} images, resolution={self.resolution})"


def decode_square(path: str, resolution: int) -> np.ndarray:
    """One image file -> float32 [R, R, 3] in [0, 1]: the centred square, bilinear-resized.

    A JPEG much larger than R is decoded at a reduced DCT scale first
    (PIL's ``draft``: 1/2, 1/4 or 1/8, never below R), which skips most of
    the decoding work: a 512 px face read at 128 px decodes about 4x faster,
    and the pixels differ from a full decode + resize by the difference
    between two antialiasing filters (mean |diff| ~1/255 on rendered faces).
    Missing and undecodable files raise as ``celeba.decode_image`` does.
    """
    celeba.require_file(path, "image")
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                side = min(img.size)
                img.draft("RGB", (math.ceil(img.width * resolution / side),
                                  math.ceil(img.height * resolution / side)))
            img.load()
            rgb = img.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        raise celeba.UndecodableImageError(path, f"{type(err).__name__}: {err}") from None
    box = celeba.center_square_box(rgb.width, rgb.height)
    rgb = celeba.crop_and_resize(rgb, box, (resolution, resolution))
    return np.asarray(rgb, dtype=np.float32) / np.float32(255.0)


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or int(resolution) != resolution or int(resolution) < 8:
        raise ValueError(f"data.resolution={resolution!r}; expected an int >= 8 (the side of the "
                         "square images, px)")
    return int(resolution)


class CelebASource(FileSource):
    """CelebA's published folder: centre-cropped squares, landmarks and identities when present."""

    name = "celeba"

    def __init__(self, root: str, resolution: int, num_workers: int):
        super().__init__(root, resolution, num_workers)
        self.reader = celeba.CelebA(root)
        self.table_path = os.path.join(self.reader.root, celeba.CELEBA_ATTR_FILE)
        self.attrs = self.reader.attrs
        self.identity = self.reader.identity
        self.filenames = self.reader.filenames

    def load_row(self, row: int):
        return self.reader.load_example(row, self.resolution)

    def published_split(self, split: str) -> Optional[np.ndarray]:
        if self.reader.partition is None:
            return None
        return self.reader.split_indices(split)


class CelebAMaskHQSource(FileSource):
    """CelebAMask-HQ's published folder: images resized whole, parse maps merged from region masks.

    ``hq_indices`` [N] is the HQ image number of each row (``<idx>.jpg``).
    """

    name = "celebamask_hq"
    has_parse = True

    def __init__(self, root: str, resolution: int, num_workers: int):
        super().__init__(root, resolution, num_workers)
        self.reader = folders.CelebAMaskHQ(root, mask_size=_celebamask_hq_mask_size(root))
        self.table_path = os.path.join(root, folders.CELEBAMASK_HQ_ATTR_FILE)
        self.attrs = self.reader.attrs
        self.hq_indices = self.reader.hq_indices

    def load_row(self, row: int):
        # Decoded here rather than by the reader: decode_square reads the 1024 px JPEG
        # at a reduced scale when the resolution allows.
        hq_index = int(self.hq_indices[row])
        path = self.reader.image_path(hq_index)
        parse = folders.resize_parse(self.reader.load_parse(hq_index), (self.resolution, self.resolution))
        return {"image": decode_square(path, self.resolution), "parse": parse,
                "attrs": self.attrs[row]}, path

    def rows_of(self, hq_indices) -> np.ndarray:
        position = {int(h): r for r, h in enumerate(self.hq_indices)}
        return np.array([position[int(h)] for h in hq_indices if int(h) in position], np.int64)

    def published_split(self, split: str) -> Optional[np.ndarray]:
        if self.reader.mapping is None:
            return None
        return self.rows_of(self.reader.split_indices(split))


def _celebamask_hq_mask_size(root: str) -> int:
    """The side of the first mask PNG found (the published masks are 512; fixtures are smaller)."""
    mask_dir = celeba.require_dir(os.path.join(root, folders.CELEBAMASK_HQ_MASK_DIR),
                                  "CelebAMask-HQ mask folder")
    for sub in sorted(os.listdir(mask_dir), key=lambda s: (len(s), s)):
        folder = os.path.join(mask_dir, sub)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".png"):
                    with Image.open(os.path.join(folder, name)) as img:
                        return int(img.size[0])
    raise FileNotFoundError(f"missing masks: no <idx>_<region>.png under {mask_dir}/<k>/")


class FairFaceSource(FileSource):
    """One FairFace label CSV (``train`` or ``val``): Male, Young and the race ``group``."""

    name = "fairface"

    def __init__(self, root: str, resolution: int, num_workers: int, split: str = "train"):
        super().__init__(root, resolution, num_workers)
        self.split = split
        self.reader = folders.FairFace(root, split)
        self.attrs = self.reader.attrs
        self.group = self.reader.group

    def load_row(self, row: int):
        example, path = self.reader.load_example(row, self.resolution)
        return example, path


def _label_ids(values: Sequence[str]) -> np.ndarray:
    """Identity / group labels (ints or names) -> int32 ids: ints kept, names numbered in sorted order."""
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return np.asarray([int(v) for v in values], np.int32)
    names = {n: i for i, n in enumerate(sorted(set(values)))}
    return np.asarray([names[v] for v in values], np.int32)


def read_generic_table(path: str) -> dict:
    """``attributes.csv`` of the generic layout -> {"files", "attrs", "lines" (each row's line
    number in the file), "identity", "group"}.

    Raises ValueError naming the file, line and column for an unknown column,
    a missing ``file`` column, a value other than 1 / 0 / empty, or an empty
    identity / group cell.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file; expected a header line "
                             "'file,<CelebA attribute names...>'") from None
        lines = [(n, row) for n, row in enumerate(reader, start=2) if any(c.strip() for c in row)]
    extra = ("file", "identity", "group")
    unknown = [h for h in header if h not in regions.ATTRIBUTE_ID and h not in extra]
    if unknown:
        raise ValueError(f"{path}: unknown column(s) {unknown}; expected 'file', CelebA attribute "
                         f"names ({', '.join(regions.ATTRIBUTES)}) and optionally 'identity', 'group'")
    if "file" not in header:
        raise ValueError(f"{path}: no 'file' column; expected a header like 'file,Male,Wearing_Lipstick'")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: a column is named twice: {header}")
    if not lines:
        raise ValueError(f"{path}: no image rows after the header")
    col = {h: i for i, h in enumerate(header)}
    attr_cols = [h for h in header if h in regions.ATTRIBUTE_ID]
    attrs = np.full((len(lines), regions.NUM_ATTRIBUTES), -1, np.int8)
    files, labels = [], {"identity": [], "group": []}
    for r, (number, row) in enumerate(lines):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {number} has {len(row)} fields; expected {len(header)}")
        cells = [c.strip() for c in row]
        if not cells[col["file"]]:
            raise ValueError(f"{path}: line {number} has an empty 'file'")
        files.append(cells[col["file"]])
        for name in attr_cols:
            value = cells[col[name]]
            if value in ("1", "0"):
                attrs[r, regions.ATTRIBUTE_ID[name]] = int(value)
            elif value != "":
                raise ValueError(f"{path}: line {number} has {name}={value!r}; expected 1 (present), "
                                 "0 (absent) or an empty cell (unknown)")
        for name in labels:
            if name in col:
                if not cells[col[name]]:
                    raise ValueError(f"{path}: line {number} has an empty {name!r}; expected a label")
                labels[name].append(cells[col[name]])
    return {"files": files, "attrs": attrs, "lines": [number for number, _ in lines],
            "identity": _label_ids(labels["identity"]) if "identity" in col else None,
            "group": _label_ids(labels["group"]) if "group" in col else None}


def decode_label_map(path: str) -> np.ndarray:
    """One label PNG (pixel = region id) -> int32 [H, W]; ids outside 0..18 raise, naming the file."""
    celeba.require_file(path, "parse map")
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise celeba.UndecodableImageError(path, f"{type(err).__name__}: {err}") from None
    if array.ndim == 3:
        array = array[..., 0]
    if array.size and int(array.max()) >= regions.NUM_REGIONS:
        raise ValueError(f"parse map {path} holds region id {int(array.max())}; expected ids "
                         f"0..{regions.NUM_REGIONS - 1} in the order of regions.REGIONS")
    return array.astype(np.int32)


_REGION_MASK = re.compile(r"^(.+)_(" + "|".join(sorted(regions.REGIONS, key=len, reverse=True)) + r")\.png$")


class FolderSource(FileSource):
    """The generic layout (``GENERIC_LAYOUT``): a CSV of attributes, optional masks and pairs."""

    name = "folder"

    def __init__(self, root: str, resolution: int, num_workers: int):
        super().__init__(root, resolution, num_workers)
        self.csv_path = celeba.require_file(os.path.join(root, GENERIC_ATTR_FILE), "attribute CSV")
        self.table_path = self.csv_path
        table = read_generic_table(self.csv_path)
        self.files, self.attrs = table["files"], table["attrs"]
        self.identity, self.group = table["identity"], table["group"]
        self.paths = [os.path.join(root, f) for f in self.files]
        missing = [(p, n) for p, n in zip(self.paths, table["lines"]) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"missing image: {missing[0][0]} (line {missing[0][1]} of {self.csv_path}; "
                                    f"{len(missing)} listed images are missing)")
        self.mask_files = self._scan_masks(os.path.join(root, GENERIC_MASK_DIR))
        self.has_parse = self.mask_files is not None
        if self.has_parse:  # a layout-wide mistake (masks of another size) fails here, not mid-run
            self.square_parse(0)

    def _scan_masks(self, mask_dir: str):
        """Per row: a label PNG path (str) or [(region id, path)], or None without a mask folder."""
        if not os.path.isdir(mask_dir):
            return None
        labels, per_region = {}, {}
        for entry in os.scandir(mask_dir):
            if not entry.name.endswith(".png"):
                continue
            match = _REGION_MASK.match(entry.name)
            if match:
                per_region.setdefault(match.group(1), []).append(
                    (regions.REGION_ID[match.group(2)], entry.path))
            else:
                labels[entry.name[:-4]] = entry.path
        out = []
        for path in self.files:
            stem = os.path.splitext(os.path.basename(path))[0]
            if stem in labels:
                out.append(labels[stem])
            elif stem in per_region:
                out.append(sorted(per_region[stem]))
            else:
                raise FileNotFoundError(
                    f"missing parse map for {path}: neither {os.path.join(mask_dir, stem + '.png')} "
                    f"(label PNG) nor {os.path.join(mask_dir, stem + '_<region>.png')} (region masks); "
                    f"a {GENERIC_MASK_DIR}/ folder needs one for every image")
        return out

    def load_parse(self, row: int) -> np.ndarray:
        entry = self.mask_files[row]
        if isinstance(entry, str):
            return decode_label_map(entry)
        with Image.open(entry[0][1]) as img:
            size = img.size[0]
        masks = np.stack([folders.decode_mask(p, size, like=f"{entry[0][1]}, this image's first region mask")
                          for _, p in entry])
        return folders.merge_region_masks(np.array([r for r, _ in entry]), masks)

    def square_parse(self, row: int) -> np.ndarray:
        """Row's parse map, int32 [S, S]: its centred square (the image's own crop).

        A map whose aspect ratio differs from its image's raises, naming both files.
        """
        parse = self.load_parse(row)
        with Image.open(self.paths[row]) as img:  # header only: the size, no decode
            img_w, img_h = img.size
        if parse.shape[0] * img_w != parse.shape[1] * img_h:
            entry = self.mask_files[row]
            mask = entry if isinstance(entry, str) else ", ".join(p for _, p in entry)
            raise ValueError(f"parse map {mask} is {parse.shape[1]}x{parse.shape[0]} but its image "
                             f"{self.paths[row]} is {img_w}x{img_h}; expected the same aspect ratio "
                             "(any size: maps are resized with the image)")
        pbox = celeba.center_square_box(parse.shape[1], parse.shape[0])
        return parse[pbox[1]:pbox[3], pbox[0]:pbox[2]]

    def load_row(self, row: int):
        path = self.paths[row]
        example = {"image": decode_square(path, self.resolution), "attrs": self.attrs[row]}
        if self.identity is not None:
            example["identity"] = self.identity[row]
        if self.group is not None:
            example["group"] = self.group[row]
        if self.mask_files is not None:
            example["parse"] = folders.resize_parse(self.square_parse(row), (self.resolution, self.resolution))
        return example, path


class CelebATfdsSource(FileSource):
    """tensorflow-datasets' ``celeb_a`` split, prepared under ``root`` in array_record format.

    Random access goes through ``tfds.data_source`` on the raw records (no
    tf.data pipeline, no tensorflow): the attribute / identity table is read
    once from the protobufs without decoding any image, and ``batch`` decodes
    the JPEGs with PIL and crops them as the CelebA folder reader does, so
    both give the same pixels for the same files. Prepare the data set
    beforehand with ``tfds build celeb_a --file_format=array_record
    --data_dir ROOT`` (nothing downloads at run time).
    """

    name = "celeba_tfds"

    def __init__(self, root: str, resolution: int, num_workers: int, split: str = "train"):
        super().__init__(root, resolution, num_workers)
        tfds = celeba.import_tfds()
        self.split = split
        try:
            self.records = tfds.data_source("celeb_a", split=split, data_dir=root, download=False,
                                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        except Exception as err:  # tfds raises assorted types for an unprepared data set
            raise FileNotFoundError(
                f"data.root={root!r}: tensorflow-datasets' celeb_a split {split!r} is not prepared "
                "there in array_record format; prepare it with 'tfds build celeb_a "
                f"--file_format=array_record --data_dir {root}': {err}") from err
        table = celeba.read_tfds_celeb_a_table(self.records, f"celeb_a[{split}]")
        self.attrs, self.identity = table["attrs"], table["identity"]

    def load_row(self, row: int):
        name = f"celeb_a[{self.split}][{row}] under {self.root}"
        record = celeba.parse_tfds_celeb_a_record(self.records[int(row)], name)
        example = {"image": celeba.decode_image_bytes(record["image"], name)[None],
                   **{group: {k: np.asarray([v]) for k, v in record[group].items()}
                      for group in ("attributes", "landmarks", "identity")}}
        batch = celeba.tfds_celeb_a_to_batch(example, self.resolution)
        return {k: v[0] for k, v in batch.items()}, name


# ---------------------------------------------------------------------------
# build_source / build_split
# ---------------------------------------------------------------------------

_LAYOUTS = {
    "celeba": f"{celeba.CELEBA_IMAGE_DIR}/, {celeba.CELEBA_ATTR_FILE} (optional: "
              f"{celeba.CELEBA_PARTITION_FILE}, {celeba.CELEBA_IDENTITY_FILE}, {celeba.CELEBA_LANDMARK_FILE})",
    "celebamask_hq": f"{folders.CELEBAMASK_HQ_IMAGE_DIR}/, {folders.CELEBAMASK_HQ_MASK_DIR}/<k>/, "
                     f"{folders.CELEBAMASK_HQ_ATTR_FILE} (optional: {folders.CELEBAMASK_HQ_MAPPING_FILE})",
    "fairface": "fairface_label_train.csv, fairface_label_val.csv and the images they list",
    "folder": GENERIC_LAYOUT,
    "celeba_tfds": "a tensorflow-datasets data_dir holding celeb_a in array_record format",
}


def _layout_name(kind: str) -> str:
    return "generic-layout (data.source='folder')" if kind == "folder" else kind


def _listing(root: str, limit: int = 8) -> str:
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return "(unreadable)"
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return shown or "(empty)"


def _require_root(data_cfg, root_field: str) -> str:
    kind = str(data_cfg.source)
    root = _cfg(data_cfg, root_field, "")
    if not root:
        raise ValueError(f"data.source={kind!r} needs data.{root_field}: a folder in the {kind} layout "
                         f"({_LAYOUTS[kind]}); e.g. --config.data.{root_field}=/path/to/{kind}")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.{root_field}={root!r} does not exist or is not a folder "
                                f"(data.source={kind!r})")
    return root


def check_data_config(data_cfg) -> None:
    """Cheap checks of ``data.source`` and its roots, for config validation before any work
    (``build_source`` repeats them and reads the tables)."""
    kind = str(data_cfg.source)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.source={kind!r}; expected one of {SOURCE_KINDS}")
    if kind == "synthetic":
        return
    _require_root(data_cfg, "root")
    if _cfg(data_cfg, "test_root", ""):
        _require_root(test_data_cfg(data_cfg), "root")


def _synthetic(data_cfg):
    from faceaudit_jax.data.pipeline import SyntheticSource
    return SyntheticSource(seed=int(_cfg(data_cfg, "seed", 0)), resolution=int(data_cfg.resolution),
                           independent=bool(_cfg(data_cfg, "independent", False)),
                           images_per_identity=int(_cfg(data_cfg, "images_per_identity", 10)))


_FILE_SOURCES: dict[str, Callable] = {
    "celeba": CelebASource,
    "celebamask_hq": CelebAMaskHQSource,
    "fairface": FairFaceSource,
    "folder": FolderSource,
    "celeba_tfds": CelebATfdsSource,
}


def build_source(data_cfg, *, root_field: str = "root", split: Optional[str] = None) -> Source:
    """The source named by ``data_cfg.source``, reading ``data_cfg.<root_field>``.

    ``split`` matters only for data sets whose splits are separate tables
    (FairFace: "train" -> fairface_label_train.csv, "test" -> ..._val.csv;
    tfds: the tfds split name); others ignore it. A missing root, a folder in
    the wrong layout or a malformed table raises here, naming the field, file
    and the expected layout.
    """
    kind = str(data_cfg.source)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data.source={kind!r}; expected one of {SOURCE_KINDS}")
    if kind == "synthetic":
        return _synthetic(data_cfg)
    root = _require_root(data_cfg, root_field)
    workers = int(_cfg(data_cfg, "num_workers", 0) or _default_workers())
    resolution = int(data_cfg.resolution)
    factory = _FILE_SOURCES[kind]
    kwargs = {}
    if kind == "fairface":
        kwargs["split"] = "val" if split == "test" else "train"
    elif kind == "celeba_tfds":
        kwargs["split"] = split or "train"
    try:
        return factory(root, resolution, workers, **kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"data.{root_field}={root!r} is not a {_layout_name(kind)} folder: {err}. Expected: {_LAYOUTS[kind]}. "
            f"Found: {_listing(root)}") from None


def _synthetic_split(data_cfg, split: str, pool_size: Optional[int]):
    if split == "train":
        size = int(pool_size or data_cfg.pool_size)
        return np.arange(size, dtype=np.int64)
    offset = int(data_cfg.test_offset)
    size = int(pool_size or _cfg(data_cfg, "test_pool_size", 0) or max(int(data_cfg.pool_size) // 4, 1))
    if offset < int(_cfg(data_cfg, "pool_size", 0)):
        raise ValueError(f"data.test_offset={offset} lies inside the training pool of "
                         f"data.pool_size={data_cfg.pool_size} images; expected an offset beyond it "
                         "(disjoint identities)")
    return np.arange(offset, offset + size, dtype=np.int64)


def seeded_split(source, split: str, seed: int, test_fraction: float) -> np.ndarray:
    """Rows of an identity-disjoint split drawn from ``seed``: a share ``test_fraction`` of the
    identities (of the images, when the source has no identities) is the test set."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"data.test_fraction={test_fraction!r}; expected a value in (0, 1)")
    table = source.attributes(np.arange(len(source)))
    identity = table.get("identity")
    if identity is None:
        identity = np.arange(len(source))
    people = np.random.default_rng(int(seed)).permutation(np.unique(identity))
    num_test = int(math.ceil(float(test_fraction) * people.size))
    if num_test >= people.size:
        raise ValueError(f"{source.name} ({getattr(source, 'root', '')}): {people.size} identities cannot "
                         f"make a test share of {test_fraction} and a non-empty training set")
    in_test = np.isin(identity, people[:num_test])
    return np.flatnonzero(in_test if split == "test" else ~in_test)


def test_data_cfg(data_cfg):
    """``data_cfg`` pointing at the test data set: ``test_root``, of kind ``test_source``
    (default: the same kind as ``source``)."""
    test_cfg = copy.deepcopy(data_cfg)
    if hasattr(test_cfg, "unlocked"):
        with test_cfg.unlocked():
            test_cfg.source = _cfg(data_cfg, "test_source", "") or data_cfg.source
            test_cfg.root = data_cfg.test_root
    else:
        test_cfg = dict(test_cfg, source=_cfg(data_cfg, "test_source", "") or data_cfg.source,
                        root=data_cfg["test_root"])
    return test_cfg


def _drop_test_overlap(train_source, train_rows, test_source, test_rows) -> np.ndarray:
    """CelebA training rows without the originals of CelebAMask-HQ test images (FaceX)."""
    if not (isinstance(train_source, CelebASource) and isinstance(test_source, CelebAMaskHQSource)):
        return train_rows
    mapping = test_source.reader.mapping
    if mapping is None:
        raise FileNotFoundError(
            f"missing file: {os.path.join(test_source.root, folders.CELEBAMASK_HQ_MAPPING_FILE)}; "
            "training on CelebA and testing on CelebAMask-HQ needs it to drop the test images' "
            "CelebA originals from training")
    return folders.drop_celebamask_hq_overlap(train_source.filenames, train_rows, mapping,
                                              test_source.hq_indices[test_rows])


def build_split(data_cfg, split: str, *, pool_size: Optional[int] = None) -> tuple[Source, np.ndarray]:
    """(source, rows of that split's images) for ``split`` in {"train", "test"}.

    Synthetic: train = rows 0 .. pool_size - 1 (``pool_size`` or
    ``data.pool_size``), test = ``data.test_offset`` onwards (``pool_size`` or
    ``data.test_pool_size`` or a quarter of ``data.pool_size`` images), so the
    identities are disjoint. Real data (``pool_size`` is ignored: the whole
    split):

    * ``data.test_root`` set: the test set is the data set at ``test_root``
      (of kind ``data.test_source``, default ``data.source``). With
      ``data.test_split = ""`` train is every image under ``root`` and test
      every image under ``test_root``; with ``"published"`` they are the
      published train split of ``root`` (all of it when it has none) and
      the published test split of ``test_root``. CelebA training images
      whose CelebAMask-HQ versions are in the test set are dropped (FaceX's
      protocol).
    * otherwise the published split (CelebA's partition file, CelebAMask-HQ's
      mapping, FairFace's train / val CSVs, tfds' train / test), else
      ``seeded_split`` with ``data.split_seed`` and ``data.test_fraction``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; expected 'train' or 'test'")
    if str(data_cfg.source) == "synthetic":
        return _synthetic(data_cfg), _synthetic_split(data_cfg, split, pool_size)
    test_split = str(_cfg(data_cfg, "test_split", "") or "")
    if test_split not in ("", "published"):
        raise ValueError(f"data.test_split={test_split!r}; expected '' (every image of data.test_root) "
                         "or 'published' (its published test split)")
    if _cfg(data_cfg, "test_root", ""):
        test_cfg = test_data_cfg(data_cfg)
        test_source = build_source(test_cfg, split="test")
        test_rows = np.arange(len(test_source), dtype=np.int64)
        if test_split == "published":
            test_rows = test_source.published_split("test")
            if test_rows is None:
                raise ValueError(f"data.test_split='published' but {describe(test_source)} has no published "
                                 "split (CelebA: list_eval_partition.txt; CelebAMask-HQ: "
                                 f"{folders.CELEBAMASK_HQ_MAPPING_FILE})")
        if split == "test":
            source, rows = test_source, test_rows
        else:
            source = build_source(data_cfg, split="train")
            published = source.published_split("train") if test_split == "published" else None
            rows = np.arange(len(source), dtype=np.int64) if published is None else published
            rows = _drop_test_overlap(source, rows, test_source, test_rows)
    elif str(data_cfg.source) in ("fairface", "celeba_tfds"):
        source = build_source(data_cfg, split=split)
        rows = np.arange(len(source), dtype=np.int64)
    else:
        source = build_source(data_cfg)
        rows = source.published_split(split)
        if rows is None:
            rows = seeded_split(source, split, int(_cfg(data_cfg, "split_seed", 0)),
                                float(_cfg(data_cfg, "test_fraction", 0.2)))
    if rows.size == 0:
        raise ValueError(f"{describe(source)}: the {split} split is empty; expected images in it "
                         "(set data.test_root, or data.test_fraction for a seeded split)")
    return source, rows


# ---------------------------------------------------------------------------
# Checks before any work starts
# ---------------------------------------------------------------------------


def describe(source) -> str:
    root = getattr(source, "root", None)
    return f"data.source={source.name!r}" + (f" at {root}" if root else "")


def require_attributes(source, names: Sequence[str], what: str = "attribute") -> None:
    """Raise ValueError unless every name is a CelebA attribute the source annotates."""
    for name in ([names] if isinstance(names, str) else list(names)):
        if name not in regions.ATTRIBUTE_ID:
            raise ValueError(f"{what} {name!r} is not a CelebA attribute name; expected one of "
                             f"{', '.join(regions.ATTRIBUTES)}")
        if name not in source.annotated:
            table = getattr(source, "table_path", None)
            where = f" ({table} has no {name!r} column, or only unknown values in it)" if table else ""
            raise ValueError(f"{what} {name!r}: {describe(source)} does not annotate it{where}; it annotates "
                             f"{', '.join(a for a in regions.ATTRIBUTES if a in source.annotated) or 'nothing'}")


def require_parse(source, why: str) -> None:
    if not source.has_parse:
        raise ValueError(f"{describe(source)} has no parse maps, which {why} needs; use a source with "
                         "masks (celebamask_hq, synthetic, folder with masks/) or set explain.parser")


# ---------------------------------------------------------------------------
# Verification pairs
# ---------------------------------------------------------------------------


def read_generic_pairs(root: str, *, check_files: bool = True) -> folders.VerificationPairs:
    """``ROOT/pairs.csv`` (file_a,file_b,same[,fold]) -> ``folders.VerificationPairs``.

    Identities come from ``attributes.csv``'s ``identity`` column when the
    folder has one, else from each image's parent folder name.
    """
    path = celeba.require_file(os.path.join(root, GENERIC_PAIRS_FILE), "pairs CSV")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file; expected the header 'file_a,file_b,same[,fold]'") from None
        lines = [(n, [c.strip() for c in row]) for n, row in enumerate(reader, start=2) if any(row)]
    if header[:3] != ["file_a", "file_b", "same"] or len(header) > 4 or header[3:] not in ([], ["fold"]):
        raise ValueError(f"{path}: header {header}; expected 'file_a,file_b,same' or 'file_a,file_b,same,fold'")
    ids = {}
    attr_path = os.path.join(root, GENERIC_ATTR_FILE)
    if os.path.isfile(attr_path):
        table = read_generic_table(attr_path)
        if table["identity"] is not None:
            ids = {f: str(i) for f, i in zip(table["files"], table["identity"])}
    path_a, path_b, same, fold, name_a, name_b = [], [], [], [], [], []
    for number, cells in lines:
        if len(cells) != len(header):
            raise ValueError(f"{path}: line {number} has {len(cells)} fields; expected {len(header)}")
        if cells[2] not in ("0", "1"):
            raise ValueError(f"{path}: line {number} has same={cells[2]!r}; expected 1 (matched) or 0")
        if len(cells) == 4 and not cells[3].isdigit():
            raise ValueError(f"{path}: line {number} has fold={cells[3]!r}; expected an int >= 0")
        name_a.append(ids.get(cells[0], os.path.basename(os.path.dirname(cells[0])) or cells[0]))
        name_b.append(ids.get(cells[1], os.path.basename(os.path.dirname(cells[1])) or cells[1]))
        path_a.append(os.path.join(root, cells[0])); path_b.append(os.path.join(root, cells[1]))
        same.append(cells[2] == "1"); fold.append(int(cells[3]) if len(cells) == 4 else 0)
    if not lines:
        raise ValueError(f"{path}: no pairs after the header")
    pairs = folders.VerificationPairs(path_a, path_b, np.asarray(same, bool), np.asarray(fold, np.int32),
                                      name_a, name_b)
    if check_files:
        for (number, cells), a, b in zip(lines, path_a, path_b):
            for column, image in (("file_a", a), ("file_b", b)):
                if not os.path.isfile(image):
                    raise FileNotFoundError(f"missing image: {image} ({column} on line {number} of {path}; "
                                            "expected a path relative to the folder)")
    return pairs


def build_pairs(data_cfg, *, root_field: str = "root") -> folders.VerificationPairs:
    """Face-verification pairs of a real data set: ``data.pairs`` in {"lfw", "rfw", "folder"}.

    The synthetic renderer has no pairs file: its experiments draw pairs from
    identity-disjoint index ranges (``data.verification``).
    LFW reads ``ROOT/pairs.txt`` (10 folds of 300 + 300), RFW
    ``ROOT/txts/<Race>/<Race>_pairs.txt`` for ``data.races`` (default all
    four) in ``data.num_folds`` (default 10) equal folds, folder ``ROOT/pairs.csv``.
    """
    kind = str(_cfg(data_cfg, "pairs", "") or data_cfg.source)
    if kind not in PAIR_KINDS or kind == "synthetic":
        raise ValueError(f"data.pairs={kind!r}; expected one of {PAIR_KINDS[1:]} (the synthetic renderer "
                         "draws its pairs from index ranges)")
    root = _cfg(data_cfg, root_field, "")
    if not root:
        raise ValueError(f"pairs {kind!r} need data.{root_field}: the {kind} folder")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.{root_field}={root!r} does not exist or is not a folder")
    try:
        if kind == "lfw":
            return folders.read_lfw_pairs(root)
        if kind == "rfw":
            races = tuple(_cfg(data_cfg, "races", folders.RFW_RACES))
            return folders.read_rfw_pairs(root, races, num_folds=int(_cfg(data_cfg, "num_folds", 10)))
        return read_generic_pairs(root)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.{root_field}={root!r} is not a {_layout_name(kind)} pairs folder: {err}. "
                                f"Found: {_listing(root)}") from None


@dataclasses.dataclass
class PairImages:
    """Both images of every pair, resized and held as uint8 [P, R, R, 3], with labels."""

    image_a: np.ndarray
    image_b: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    identity_a: np.ndarray
    identity_b: np.ndarray
    group: Optional[np.ndarray]


def load_pair_images(pairs: folders.VerificationPairs, resolution: int, *, num_workers: int = 0,
                     indices=None) -> PairImages:
    """Decode the pairs' images (centre square, ``resolution``) in a thread pool."""
    indices = np.arange(len(pairs)) if indices is None else np.asarray(indices, np.int64)
    workers = num_workers or _default_workers()

    def load(path):
        image, _, _ = celeba.decode_image(path, int(resolution))
        return np.round(image * 255.0).astype(np.uint8)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        a = list(pool.map(load, [pairs.path_a[i] for i in indices]))
        b = list(pool.map(load, [pairs.path_b[i] for i in indices]))
    return PairImages(np.stack(a), np.stack(b), pairs.same[indices], pairs.fold[indices],
                      pairs.identity_a[indices], pairs.identity_b[indices],
                      None if pairs.group is None else pairs.group[indices])


# ---------------------------------------------------------------------------
# Bias direction
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def celeba_like_attributes(num_images: int = 200_000) -> np.ndarray:
    """Attributes of the renderer's correlated mode (its CelebA-like links), int8 [N, 40]."""
    from faceaudit_jax.data import synthetic
    return synthetic.sample_attributes(0, np.arange(num_images), independent=False)["attrs"]


def bias_direction(bias_cfg, source, rows) -> tuple[int, ...]:
    """Per confounder, the value that goes with target = 1 in the biased training set.

    ``bias.confounder_values`` when set; else the sign of the link in the
    training pool (``sampling.linked_values`` on ``source``'s rows). A pool
    without a link (the renderer's independent attributes, or a folder
    balanced over the attributes) gives no sign, so CelebA's sign is used,
    as the renderer's correlated (CelebA-like) attributes draw it: women wear
    lipstick and earrings, men wear hats: FaceX's setting. A note says so.
    """
    target = bias_cfg.target
    confounders = [bias_cfg.confounders] if isinstance(bias_cfg.confounders, str) else list(bias_cfg.confounders)
    explicit = _cfg(bias_cfg, "confounder_values", None)
    if explicit is not None:
        return sampling.check_confounder_values(explicit, confounders)
    values = []
    for name in confounders:
        try:
            values.extend(sampling.linked_values(source.attributes(rows)["attrs"], target, [name]))
        except sampling.NoLinkError:
            try:
                value, = sampling.linked_values(celeba_like_attributes(), target, [name])
            except sampling.NoLinkError as err:
                raise ValueError(f"{describe(source)}: {err}; neither the data nor CelebA links them; set "
                                 "bias.confounder_values, e.g. --config.bias.confounder_values='(0,)'") from None
            print(f"[bias] {describe(source)} has no {target} x {name} link; following CelebA's sign "
                  f"({name}={value} goes with {target}=1; set bias.confounder_values to choose)", flush=True)
            values.append(value)
    return tuple(values)


# ---------------------------------------------------------------------------
# Config fields
# ---------------------------------------------------------------------------

# The data fields every experiment config carries for real data, with their
# defaults (configs call ``add_data_fields``). Synthetic runs ignore them.
REAL_DATA_FIELDS = {
    "root": "",            # the data set's folder (data.source != "synthetic")
    "test_root": "",       # optional second folder: the test set (every image in it, see test_split)
    "test_source": "",     # the kind of test_root when it differs from source (e.g. celebamask_hq)
    "test_split": "",      # "published": the published splits of root / test_root instead of all images
    "split_seed": 0,       # seeded identity-disjoint split (no test_root, no published split)
    "test_fraction": 0.2,  # share of identities in that split's test set
    "num_workers": 0,      # decoding threads; 0 = min(8, CPU count)
}


def add_data_fields(data_cfg, **overrides) -> None:
    """Give a config's ``data`` block every real-data field (``REAL_DATA_FIELDS``), in place."""
    for name, default in REAL_DATA_FIELDS.items():
        if name not in data_cfg:
            setattr(data_cfg, name, overrides.get(name, default))
    for name, value in overrides.items():
        setattr(data_cfg, name, value)


# The renderer's fields with the main job's values (configs/facex.py). configs/audit.py
# takes the same, so that by default it audits the very test images facex tests on.
SYNTHETIC_DATA_FIELDS = {
    # Attributes sampled independently: the only link between target and
    # confounder is the one a biased subset injects.
    "independent": True,
    "images_per_identity": 10,
    "pool_size": 100_000,
    # Test images come from an index range (and so identities) disjoint from training.
    "test_offset": 50_000_000,
}


def add_synthetic_fields(data_cfg, **overrides) -> None:
    """Set the synthetic renderer's fields (``SYNTHETIC_DATA_FIELDS``, or ``overrides``) in place."""
    unknown = sorted(set(overrides) - set(SYNTHETIC_DATA_FIELDS))
    if unknown:
        raise ValueError(f"add_synthetic_fields: unknown field(s) {unknown}; expected some of "
                         f"{sorted(SYNTHETIC_DATA_FIELDS)}")
    for name, default in SYNTHETIC_DATA_FIELDS.items():
        setattr(data_cfg, name, overrides.get(name, default))


def fingerprint_fields(data_cfg) -> dict:
    """The data settings that decide which images a run sees: for the synthetic renderer the
    real-data fields (and the decoding threads, always) are left out, so adding them to a
    config does not invalidate runs made before they existed."""
    fields = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
    fields.pop("num_workers", None)
    if str(fields.get("source")) == "synthetic":
        for name in REAL_DATA_FIELDS:
            fields.pop(name, None)
    return fields
