"""CelebA as distributed, CelebA-format tables, and the streaming image I/O every reader shares.

The published CelebA layout (aligned-and-cropped images)::

    ROOT/
      img_align_celeba/000001.jpg ...          178 x 218 (W x H) JPEGs
      list_attr_celeba.txt                     required
      list_landmarks_align_celeba.txt          optional: batches get "landmarks"
      list_eval_partition.txt                  optional: needed by split_indices
      identity_CelebA.txt                      optional: batches get "identity"

Table formats (whitespace separated, as published):

- ``list_attr_celeba.txt``: line 1 the image count, line 2 the attribute names,
  then ``filename v1 .. vK`` with values 1 / -1, read as 1 / 0. CelebAMask-HQ's
  ``CelebAMask-HQ-attribute-anno.txt`` has the same format. A header may name
  any subset of the 40 CelebA attributes (in any order): columns it does not
  name are -1 (unknown) in the [N, 40] table, so subsets drawn by
  ``data.sampling`` never use them.
- ``list_landmarks_align_celeba.txt``: count, header ``lefteye_x lefteye_y
  righteye_x ... rightmouth_y``, then ``filename x1 y1 .. x5 y5``.
- ``list_eval_partition.txt``: ``filename p`` with p 0 train, 1 valid, 2 test.
- ``identity_CelebA.txt``: ``filename identity``.

Streaming: the tables are loaded up front (small text files); images are
decoded per batch with PIL in ``iter_batches``, so the data set never sits in
memory. An image that fails to decode is skipped, counted in a ``SkipReport``
and reported at the end of the pass (a warning, and the report object);
a missing file is an error naming it.

Geometry convention (shared with ``data.align``): the centre of pixel (row i,
column j) is at (x, y) = (j, i). Resizing by a factor s maps x -> (x + 0.5) * s
- 0.5, which is how landmarks follow the images.

The same data through tensorflow-datasets' ``celeb_a`` (prepared by the user
beforehand; nothing downloads at run time): ``iter_tfds_celeb_a`` streams it
through tf.data (needs tensorflow too); ``data.sources``' ``celeba_tfds`` reads
an array_record copy by random access with the helpers here (no tensorflow).
Needs the extra ``faceaudit_jax[tfds]``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import warnings
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from faceaudit_jax import regions

CELEBA_IMAGE_DIR = "img_align_celeba"
CELEBA_ATTR_FILE = "list_attr_celeba.txt"
CELEBA_LANDMARK_FILE = "list_landmarks_align_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
CELEBA_IDENTITY_FILE = "identity_CelebA.txt"

# Column names of the landmark file, in the order of the [5, 2] landmark arrays.
LANDMARK_POINTS: tuple[str, ...] = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
LANDMARK_COLUMNS: tuple[str, ...] = tuple(f"{p}_{c}" for p in LANDMARK_POINTS for c in ("x", "y"))

SPLITS: dict[str, int] = {"train": 0, "valid": 1, "test": 2}


# ---------------------------------------------------------------------------
# Errors and the skip report
# ---------------------------------------------------------------------------


class UndecodableImageError(ValueError):
    """An image file exists but PIL cannot decode it (truncated, not an image, ...)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass
class SkipReport:
    """Images skipped during a streaming pass because they failed to decode.

    ``attempted`` counts every image the pass tried; ``skipped`` lists (path,
    reason). ``summary()`` is what the iterators warn with at the end of a pass.
    """

    attempted: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def add(self, path: str, reason: str) -> None:
        self.skipped.append((str(path), str(reason)))

    def summary(self, max_listed: int = 10) -> str:
        if not self.skipped:
            return f"skipped 0 of {self.attempted} images"
        listed = "; ".join(f"{p} ({r})" for p, r in self.skipped[:max_listed])
        more = f"; ... and {self.count - max_listed} more" if self.count > max_listed else ""
        return (f"skipped {self.count} of {self.attempted} images that failed to decode: "
                f"{listed}{more}")


# ---------------------------------------------------------------------------
# Image decoding and resizing
# ---------------------------------------------------------------------------


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` as str, or raise FileNotFoundError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    return path


def require_dir(path: str | os.PathLike, what: str = "folder") -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    return path


def parse_resolution(resolution) -> tuple[int, int] | None:
    """None -> None; int r -> (r, r); (H, W) -> (H, W). Raises for anything else."""
    if resolution is None:
        return None
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        hw = (int(resolution), int(resolution))
    else:
        try:
            hw = tuple(int(v) for v in resolution)
        except TypeError:
            hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"resolution must be None, a positive int or (H, W), got {resolution!r}")
    return hw


def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred square of a W x H image."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def resize_plan(width: int, height: int, resolution, center_crop: bool):
    """Crop box and output (H, W) for an image of W x H pixels.

    int resolution with ``center_crop``: crop the centred square, then resize to
    r x r (no distortion); (H, W) or ``center_crop=False``: resize the whole
    image; None: keep the image as is. Returns (box or None, (H, W)).
    """
    hw = parse_resolution(resolution)
    if hw is None:
        return None, (height, width)
    square = isinstance(resolution, (int, np.integer))
    if square and center_crop and width != height:
        return center_square_box(width, height), hw
    return (0, 0, width, height), hw


def transform_points(points: np.ndarray, box, out_hw) -> np.ndarray:
    """Map (x, y) pixel-centre coordinates through a crop ``box`` and a resize to ``out_hw``."""
    points = np.asarray(points, np.float32)
    if box is None:
        return points
    left, top, right, bottom = box
    scale = np.array([out_hw[1] / (right - left), out_hw[0] / (bottom - top)], np.float32)
    offset = np.array([left, top], np.float32)
    return ((points - offset + 0.5) * scale - 0.5).astype(np.float32)


def crop_and_resize(img: Image.Image, box, out_hw, resample=Image.BILINEAR) -> Image.Image:
    """Crop to ``box`` first, then resize to ``out_hw`` (H, W).

    Cropping first matters: PIL's antialiased resize with a ``box`` argument
    reads pixels outside the box, which would bleed the cropped-away border in.
    """
    if box is None:
        return img
    if box != (0, 0, img.width, img.height):
        img = img.crop(box)
    if (img.height, img.width) != tuple(out_hw):
        img = img.resize((out_hw[1], out_hw[0]), resample)
    return img


def decode_image(path: str, resolution=None, *, center_crop: bool = True):
    """Decode one image file as RGB float32 [H, W, 3] in [0, 1].

    Returns (image, box, out_hw) so callers can move landmarks with
    ``transform_points``. Raises FileNotFoundError for a missing file and
    UndecodableImageError for a file PIL cannot read.
    """
    require_file(path, "image")
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode here: truncated files fail now, not later
            rgb = img.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        raise UndecodableImageError(path, f"{type(err).__name__}: {err}") from None
    box, out_hw = resize_plan(rgb.width, rgb.height, resolution, center_crop)
    rgb = crop_and_resize(rgb, box, out_hw)
    image = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
    return image, box, out_hw


def stack_examples(examples: Sequence[Mapping[str, np.ndarray]], paths: Sequence[str]) -> dict:
    """Stack per-example dicts into a batch; a clear error when image sizes differ."""
    shapes = [ex["image"].shape for ex in examples]
    if len(set(shapes)) > 1:
        first = shapes[0]
        bad = next(i for i, s in enumerate(shapes) if s != first)
        raise ValueError(
            f"images in one batch differ in size: {paths[0]} is {first[1]}x{first[0]} but "
            f"{paths[bad]} is {shapes[bad][1]}x{shapes[bad][0]}; pass a resolution to resize them")
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def _check_batching(batch_size, on_decode_error: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if on_decode_error not in ("skip", "raise"):
        raise ValueError(f"on_decode_error must be 'skip' or 'raise', got {on_decode_error!r}")


def iter_example_batches(
    load_example: Callable[[int], tuple[dict, str]],
    indices: Iterable[int],
    batch_size: int,
    *,
    drop_remainder: bool = False,
    skip_report: SkipReport | None = None,
    num_workers: int = 0,
    on_decode_error: str = "skip",
) -> Iterator[dict]:
    """Stream batches of examples, refilling past undecodable images.

    ``load_example(i)`` -> (dict of per-example arrays, path for messages); it
    raises UndecodableImageError for an image that does not decode. Such
    images are skipped (``on_decode_error="skip"``) and the batch is filled
    from later indices, so every batch but the last has ``batch_size``
    examples (static shapes for jit). At the end of the pass a warning
    summarises the skips; ``skip_report`` (if given) holds them. With
    ``on_decode_error="raise"`` the first undecodable image raises.
    ``num_workers`` > 0 decodes each batch's images in that many threads
    (PIL releases the GIL while decoding).
    """
    _check_batching(batch_size, on_decode_error)
    report = skip_report if skip_report is not None else SkipReport()
    index_list = np.asarray(list(indices), dtype=np.int64).reshape(-1).tolist()
    pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0 else None

    def attempt(i):
        try:
            return i, load_example(i), None
        except UndecodableImageError as err:
            if on_decode_error == "raise":
                raise
            return i, None, err

    buffer: list[tuple[dict, str]] = []
    try:
        position = 0
        while position < len(index_list):
            need = batch_size - len(buffer)
            chunk = index_list[position:position + need]
            position += len(chunk)
            results = pool.map(attempt, chunk) if pool is not None else map(attempt, chunk)
            for _, loaded, err in results:
                report.attempted += 1
                if err is not None:
                    report.add(err.path, err.reason)
                    continue
                buffer.append(loaded)
            if len(buffer) == batch_size:
                yield stack_examples([b[0] for b in buffer], [b[1] for b in buffer])
                buffer = []
        if buffer and not drop_remainder:
            yield stack_examples([b[0] for b in buffer], [b[1] for b in buffer])
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if report.count:
        warnings.warn(report.summary(), stacklevel=2)


# ---------------------------------------------------------------------------
# CelebA-format text tables
# ---------------------------------------------------------------------------


def read_text_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, without line ends (\n, \r\n or \r).

    Raises ValueError naming the file, line and byte when it is not UTF-8.
    """
    require_file(path, "table")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                         f"{err.start}); expected a UTF-8 (or ASCII) text file") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line end
    return lines


def _count_line(path: str, line: str) -> int:
    try:
        return int(line.split()[0])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: line 1 should hold the image count, got {line!r}") from None


def _rows(path: str, lines: Sequence[str], first_line: int, num_values: int) -> tuple[list[str], list[list[str]]]:
    """Split table rows into (filenames, value tokens), checking the column count.

    A file name on two rows is an error naming both lines (which row would be
    meant is unknowable).
    """
    names, values, line_of = [], [], {}
    for number, line in enumerate(lines[first_line:], start=first_line + 1):
        tokens = line.split()
        if not tokens:
            continue  # blank lines (a trailing newline) carry nothing
        if len(tokens) != num_values + 1:
            raise ValueError(
                f"{path}: line {number} has {len(tokens) - 1} values after the file name; "
                f"expected {num_values}: {line!r}")
        if tokens[0] in line_of:
            raise ValueError(f"{path}: {tokens[0]} has two rows, lines {line_of[tokens[0]]} and {number}; "
                             "expected one row per image")
        line_of[tokens[0]] = number
        names.append(tokens[0])
        values.append(tokens[1:])
    return names, values


def _int_values(path: str, names: Sequence[str], values: Sequence[Sequence[str]], first_line: int) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.int64).reshape(len(names), -1)
    except ValueError:
        for row, vals in enumerate(values):
            for v in vals:
                try:
                    int(v)
                except ValueError:
                    raise ValueError(
                        f"{path}: line {row + first_line + 1} ({names[row]}) holds {v!r}; expected an integer"
                    ) from None
        raise


def _check_count(path: str, declared: int, found: int) -> None:
    if declared != found:
        raise ValueError(f"{path}: line 1 declares {declared} images but the table has {found} rows")


def read_attribute_table(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """CelebA-format attribute file -> (filenames, attrs int8 [N, 40] in CelebA order).

    Values 1 / -1 become 1 / 0; attributes the header does not name are -1.
    Raises ValueError naming the file for an unknown attribute name, a value
    other than 1 / -1, a row with the wrong number of values, or a count line
    that disagrees with the rows.
    """
    path = os.fspath(path)
    lines = read_text_lines(path)
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line, found {len(lines)} lines")
    declared = _count_line(path, lines[0])
    header = lines[1].split()
    unknown = [name for name in header if name not in regions.ATTRIBUTE_ID]
    if unknown:
        raise ValueError(
            f"{path}: unknown attribute name(s) {unknown} in the header; "
            f"expected CelebA names: {', '.join(regions.ATTRIBUTES)}")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: the header names an attribute twice: {header}")
    names, values = _rows(path, lines, 2, len(header))
    _check_count(path, declared, len(names))
    raw = _int_values(path, names, values, 2)
    bad = ~np.isin(raw, (1, -1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{path}: {names[row]} has value {raw[row, col]} for {header[col]}; expected 1 or -1")
    table = np.full((len(names), regions.NUM_ATTRIBUTES), -1, np.int8)
    table[:, regions.attribute_ids(header)] = (raw == 1).astype(np.int8)
    return names, table


def read_landmark_table(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """CelebA landmark file -> (filenames, landmarks float32 [N, 5, 2] (x, y))."""
    path = os.fspath(path)
    lines = read_text_lines(path)
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line, found {len(lines)} lines")
    declared = _count_line(path, lines[0])
    header = tuple(lines[1].split())
    if header != LANDMARK_COLUMNS:
        raise ValueError(f"{path}: header {list(header)} is not the CelebA landmark header {list(LANDMARK_COLUMNS)}")
    names, values = _rows(path, lines, 2, len(LANDMARK_COLUMNS))
    _check_count(path, declared, len(names))
    coords = _int_values(path, names, values, 2).astype(np.float32)
    return names, coords.reshape(len(names), 5, 2)


def read_filename_int_table(path: str | os.PathLike, what: str) -> tuple[list[str], np.ndarray]:
    """Header-less ``filename value`` table (partition, identity) -> (filenames, int64 [N])."""
    path = os.fspath(path)
    lines = read_text_lines(path)
    names, values = _rows(path, lines, 0, 1)
    if not names:
        raise ValueError(f"{path}: the {what} table has no rows")
    return names, _int_values(path, names, values, 0).reshape(-1)


def _align_to(reference: Sequence[str], names: Sequence[str], values: np.ndarray, path: str) -> np.ndarray:
    """Reorder ``values`` (rows named ``names``) to the order of ``reference``."""
    if list(names) == list(reference):
        return values
    position = {n: i for i, n in enumerate(names)}
    missing = [n for n in reference if n not in position]
    if missing:
        raise ValueError(f"{path} has no row for {missing[0]} (and {len(missing) - 1} more) "
                         "listed in the attribute table")
    return values[np.array([position[n] for n in reference], dtype=np.int64)]


# ---------------------------------------------------------------------------
# The CelebA reader
# ---------------------------------------------------------------------------


class CelebA:
    """CelebA from its published layout; tables up front, images streamed.

    Attributes (all row-aligned with ``filenames``):
      filenames: list of N image file names.
      attrs: int8 [N, 40] (1 / 0), the table ``data.sampling`` draws subsets from.
      landmarks: float32 [N, 5, 2] or None when the landmark file is absent.
      partition: int8 [N] (0 train, 1 valid, 2 test) or None.
      identity: int32 [N] or None.

    Batches (``load_batch`` / ``iter_batches``) hold ``image``, ``attrs``,
    ``index`` (int64 row numbers) and, when their tables exist, ``landmarks``
    (moved with the resize) and ``identity``. CelebA has no parse maps and no
    skin-tone groups, so ``parse`` and ``group`` are omitted, never invented.
    """

    def __init__(self, root: str | os.PathLike, *, image_dir: str = CELEBA_IMAGE_DIR):
        self.root = require_dir(root, "CelebA root folder")
        self.image_dir = require_dir(os.path.join(self.root, image_dir), "CelebA image folder")
        attr_path = os.path.join(self.root, CELEBA_ATTR_FILE)
        self.filenames, self.attrs = read_attribute_table(attr_path)
        self.landmarks = self._optional(CELEBA_LANDMARK_FILE, read_landmark_table)
        partition = self._optional(CELEBA_PARTITION_FILE,
                                   lambda p: read_filename_int_table(p, "partition"))
        if partition is not None and not np.isin(partition, (0, 1, 2)).all():
            bad = int(partition[~np.isin(partition, (0, 1, 2))][0])
            raise ValueError(f"{os.path.join(self.root, CELEBA_PARTITION_FILE)}: partition value {bad}; "
                             "expected 0 (train), 1 (valid) or 2 (test)")
        self.partition = None if partition is None else partition.astype(np.int8)
        identity = self._optional(CELEBA_IDENTITY_FILE, lambda p: read_filename_int_table(p, "identity"))
        self.identity = None if identity is None else identity.astype(np.int32)

    def _optional(self, filename: str, reader):
        path = os.path.join(self.root, filename)
        if not os.path.exists(path):
            return None
        names, values = reader(path)
        return _align_to(self.filenames, names, values, path)

    def __len__(self) -> int:
        return len(self.filenames)

    def split_indices(self, split: str | int) -> np.ndarray:
        """Row indices of a partition: "train" / "valid" / "test" (or 0 / 1 / 2)."""
        if self.partition is None:
            raise FileNotFoundError(
                f"missing file: {os.path.join(self.root, CELEBA_PARTITION_FILE)} (needed for splits)")
        value = SPLITS.get(split, split) if isinstance(split, str) else split
        if value not in (0, 1, 2):
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)} or 0 / 1 / 2")
        return np.flatnonzero(self.partition == value)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.filenames[index])

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self.filenames):
            raise IndexError(f"CelebA index {index} out of range 0..{len(self.filenames) - 1}")
        return index

    def load_example(self, index: int, resolution=None, center_crop: bool = True) -> tuple[dict, str]:
        """One example as a dict of unbatched arrays, and its image path."""
        index = self._check_index(int(index))
        path = self.image_path(index)
        image, box, out_hw = decode_image(path, resolution, center_crop=center_crop)
        example = {"image": image, "attrs": self.attrs[index], "index": np.int64(index)}
        if self.landmarks is not None:
            example["landmarks"] = transform_points(self.landmarks[index], box, out_hw)
        if self.identity is not None:
            example["identity"] = self.identity[index]
        return example, path

    def load_batch(self, indices, resolution=None, *, center_crop: bool = True) -> dict:
        """A batch for exactly these indices; an undecodable image raises (naming it)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        loaded = [self.load_example(i, resolution, center_crop) for i in indices]
        return stack_examples([ex for ex, _ in loaded], [p for _, p in loaded])

    def iter_batches(self, indices, batch_size: int, resolution=None, *, center_crop: bool = True,
                     drop_remainder: bool = False, skip_report: SkipReport | None = None,
                     num_workers: int = 0) -> Iterator[dict]:
        """Stream batches over ``indices``; undecodable images are skipped and reported."""
        return iter_example_batches(
            lambda i: self.load_example(i, resolution, center_crop), indices, batch_size,
            drop_remainder=drop_remainder, skip_report=skip_report, num_workers=num_workers)


# ---------------------------------------------------------------------------
# tensorflow-datasets' celeb_a
# ---------------------------------------------------------------------------


def import_tfds():
    """Import tensorflow_datasets, or raise an ImportError naming the extra to install."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (optional dependency)
    except ImportError as err:
        raise ImportError(
            "reading CelebA through tensorflow-datasets needs the optional package "
            "tensorflow-datasets; install it with: pip install 'faceaudit_jax[tfds]'") from err
    return tfds


TFDS_IDENTITY_KEY = "Identity_No"  # tfds celeb_a 2.1.0: "identity" is {"Identity_No": int64}


def tfds_celeb_a_to_batch(example: Mapping, resolution=None, *, center_crop: bool = True) -> dict:
    """A batched tfds ``celeb_a`` example (numpy) -> a batch dict of the data model.

    tfds (``celeb_a`` 2.1.0) gives ``image`` uint8 [B, 218, 178, 3],
    ``attributes`` a dict of [B] bools keyed by CelebA attribute name,
    ``landmarks`` a dict of [B] ints keyed ``lefteye_x``, ``lefteye_y``, ...
    (``LANDMARK_COLUMNS``, the columns of CelebA's landmark file) and
    ``identity`` {"Identity_No": [B]}. The result holds ``image``, ``attrs``,
    ``landmarks`` [B, 5, 2] (moved with the crop and resize) and ``identity``
    where the example has them.
    """
    images = np.asarray(example["image"])
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"tfds celeb_a image has shape {images.shape}; expected [B, H, W, 3]")
    batch_size, height, width = images.shape[:3]
    attributes = example.get("attributes", {})
    unknown = sorted(set(attributes) - set(regions.ATTRIBUTE_ID))
    if unknown:
        raise ValueError(f"tfds celeb_a example has unknown attribute(s) {unknown}")
    attrs = np.full((batch_size, regions.NUM_ATTRIBUTES), -1, np.int8)
    for name, values in attributes.items():
        attrs[:, regions.ATTRIBUTE_ID[name]] = np.asarray(values).astype(bool).astype(np.int8)
    box, out_hw = resize_plan(width, height, resolution, center_crop)
    if box is not None and (box != (0, 0, width, height) or out_hw != (height, width)):
        images = np.stack([np.asarray(crop_and_resize(Image.fromarray(img), box, out_hw))
                           for img in images.astype(np.uint8)])
    batch = {"image": images.astype(np.float32) / np.float32(255.0), "attrs": attrs}
    if "landmarks" in example:
        marks = example["landmarks"]
        missing = [c for c in LANDMARK_COLUMNS if c not in marks]
        if missing:
            raise ValueError(f"tfds celeb_a landmarks lack {missing}; expected {list(LANDMARK_COLUMNS)}")
        points = np.stack([np.asarray(marks[c], np.float32) for c in LANDMARK_COLUMNS], axis=1)
        batch["landmarks"] = transform_points(points.reshape(batch_size, len(LANDMARK_POINTS), 2),
                                              box, out_hw)
    if TFDS_IDENTITY_KEY in example.get("identity", {}):
        batch["identity"] = np.asarray(example["identity"][TFDS_IDENTITY_KEY]).astype(np.int32)
    return batch


def parse_tfds_celeb_a_record(serialized: bytes, name: str) -> dict:
    """One stored tfds ``celeb_a`` record (a serialized ``tf.train.Example``) -> its
    features, unbatched, with the image still JPEG bytes.

    Reading the protobuf directly cost ~0.1 ms a record here, against ~1.6 ms
    for tfds' own numpy decoding of the same record with the image left
    encoded (~2.6 ms decoding it), so the attribute table of CelebA's 162,770
    training images takes seconds rather than minutes. tfds stores a nested feature ``a: {b: ...}`` under the
    key ``"a/b"``. ``name`` (e.g. ``celeb_a[train][7]``) is used in errors.
    """
    from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415 (optional dependency)

    feature = tf_example_pb2.Example.FromString(serialized).features.feature
    if "image" not in feature:
        raise ValueError(f"{name}: no 'image' feature; expected a tfds celeb_a record "
                         f"(features: {sorted(feature)[:6]}...)")
    out = {"image": feature["image"].bytes_list.value[0], "attributes": {}, "landmarks": {}, "identity": {}}
    for key, value in feature.items():
        group, _, field = key.partition("/")
        if group in ("attributes", "landmarks", "identity"):
            out[group][field] = int(value.int64_list.value[0])
    return out


def read_tfds_celeb_a_table(records, name: str, chunk: int = 4096) -> dict:
    """``attrs`` int8 [N, 40] (1 / 0; attributes the records lack -1) and ``identity``
    int32 [N] (None when the records have none) of a tfds ``celeb_a`` split read
    as raw bytes (``tfds.data_source(..., deserialize_method=RAW_BYTES)``)."""
    num = len(records)
    attrs = np.full((num, regions.NUM_ATTRIBUTES), -1, np.int8)
    identity = np.zeros(num, np.int32)
    has_identity = num > 0
    for first in range(0, num, chunk):
        rows = list(range(first, min(first + chunk, num)))
        for row, serialized in zip(rows, records.__getitems__(rows)):
            record = parse_tfds_celeb_a_record(serialized, f"{name}[{row}]")
            for attr, value in record["attributes"].items():
                if attr not in regions.ATTRIBUTE_ID:
                    raise ValueError(f"{name}[{row}]: unknown attribute {attr!r}; expected CelebA "
                                     "attribute names")
                attrs[row, regions.ATTRIBUTE_ID[attr]] = int(bool(value))
            if TFDS_IDENTITY_KEY in record["identity"]:
                identity[row] = record["identity"][TFDS_IDENTITY_KEY]
            else:
                has_identity = False
    return {"attrs": attrs, "identity": identity if has_identity else None}


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3]; UndecodableImageError naming ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        raise UndecodableImageError(name, f"{type(err).__name__}: {err}") from None


def iter_tfds_celeb_a(split: str = "train", batch_size: int = 64, resolution=None, *,
                      data_dir: str | None = None, center_crop: bool = True,
                      drop_remainder: bool = False) -> Iterator[dict]:
    """Stream a prepared tfds ``celeb_a`` split as batch dicts (never downloads)."""
    tfds = import_tfds()
    try:
        ds = tfds.load("celeb_a", split=split, data_dir=data_dir, download=False)
    except Exception as err:  # tfds raises assorted types for an unprepared data set
        raise FileNotFoundError(
            f"tensorflow-datasets' celeb_a split {split!r} is not prepared under data_dir={data_dir!r}; "
            "prepare it beforehand (nothing downloads at run time): " + str(err)) from err
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    for example in tfds.as_numpy(ds):
        yield tfds_celeb_a_to_batch(example, resolution, center_crop=center_crop)
