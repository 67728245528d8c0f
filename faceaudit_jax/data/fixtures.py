"""Tiny folders in every published layout, written from rendered faces: try a pipeline on disk.

``write_layout(kind, root, faces)`` writes one layout (``LAYOUT_KINDS``)
from ``render_faces`` output, so a user can see what each reader expects and
run any experiment on files before pointing it at a real data set; the tests
use the same writers. Every writer returns the folder it wrote and stores the
ground truth in the ``faces`` dict it was given (attributes, parse maps,
identities), which is what the readers must give back.

Sizes are the caller's: a few dozen 64 px faces write in well under a second.
The published sizes (CelebA 178 x 218, CelebA-HQ 1024, masks 512) are not
reproduced; the readers take any size.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from faceaudit_jax import regions

LAYOUT_KINDS = ("celeba", "celebamask_hq", "fairface", "lfw", "rfw", "folder")


def render_faces(num_images: int, resolution: int = 64, *, seed: int = 0, offset: int = 0,
                 images_per_identity: int = 4, independent: bool = True,
                 balance: Sequence[str] = ()) -> dict:
    """Rendered synthetic faces as numpy: ``image`` uint8 [N, R, R, 3], ``parse``, ``attrs``,
    ``identity``, ``group``, ``landmarks`` and ``source_index`` (renderer indices).

    With ``balance`` (attribute names), the faces are the first images from
    ``offset`` on that fill every cell of those attributes equally (N must
    be a multiple of 2 ** len(balance)), so a tiny folder still has
    bias-aligned and bias-conflicting images.
    """
    from faceaudit_jax.data import synthetic

    num_images = int(num_images)
    cells = 2 ** len(balance)
    if num_images < 1 or num_images % cells:
        raise ValueError(f"num_images={num_images}; expected a positive multiple of {cells}")
    if balance:
        pool = np.arange(offset, offset + 64 * num_images + 1000, dtype=np.int64)
        attrs = synthetic.sample_attributes(seed, pool, independent=independent,
                                            images_per_identity=images_per_identity)["attrs"]
        values = attrs[:, regions.attribute_ids(list(balance))]
        code = (values * (2 ** np.arange(len(balance)))).sum(axis=1)
        known = (values >= 0).all(axis=1)
        chosen = []
        for cell in range(cells):
            rows = np.flatnonzero(known & (code == cell))[: num_images // cells]
            if rows.size < num_images // cells:
                raise ValueError(f"cannot fill cell {cell} of {list(balance)} from {pool.size} faces")
            chosen.append(pool[rows])
        indices = np.sort(np.concatenate(chosen))
    else:
        indices = np.arange(offset, offset + num_images, dtype=np.int64)
    batch = synthetic.render(seed, indices, resolution, independent=independent,
                             images_per_identity=images_per_identity)
    image = np.round(np.clip(np.asarray(batch["image"]), 0, 1) * 255).astype(np.uint8)
    return {"image": image, "parse": np.asarray(batch["parse"], np.int32),
            "attrs": np.asarray(batch["attrs"], np.int8),
            "identity": np.asarray(batch["identity"], np.int32),
            "group": np.asarray(batch["group"], np.int32),
            "landmarks": np.asarray(batch["landmarks"], np.float32), "source_index": indices}


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array)
    if path.endswith(".jpg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def _celeba_values(attrs: np.ndarray) -> list[str]:
    # CelebA tables know only 1 / -1: an unknown (-1) attribute is written absent.
    return [" 1" if v == 1 else "-1" for v in attrs]


def write_celeba(root: str, faces: dict, *, partition: Optional[np.ndarray] = None,
                 pad: int = 8) -> str:
    """CelebA's layout: ``img_align_celeba/000001.jpg ...`` (padded to a portrait, as CelebA's
    178 x 218, so the reader's centre crop gives the face back), the attribute,
    identity, landmark and (with ``partition``: 0 / 1 / 2 per image) partition tables."""
    n, res = faces["image"].shape[:2]
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name, image in zip(names, faces["image"]):
        tall = np.pad(image, ((pad, pad), (0, 0), (0, 0)), mode="edge")
        _save(os.path.join(root, "img_align_celeba", name), tall)
    header = " ".join(regions.ATTRIBUTES)
    with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{n}\n{header}\n")
        for name, row in zip(names, faces["attrs"]):
            f.write(name + " " + " ".join(_celeba_values(row)) + "\n")
    with open(os.path.join(root, "identity_CelebA.txt"), "w") as f:
        for name, ident in zip(names, faces["identity"]):
            f.write(f"{name} {int(ident)}\n")
    with open(os.path.join(root, "list_landmarks_align_celeba.txt"), "w") as f:
        f.write(f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                "leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n")
        for name, marks in zip(names, faces["landmarks"]):
            shifted = np.round(marks + np.array([0, pad])).astype(int).reshape(-1)
            f.write(name + " " + " ".join(str(v) for v in shifted) + "\n")
    if partition is not None:
        with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
            for name, p in zip(names, partition):
                f.write(f"{name} {int(p)}\n")
    faces["celeba_files"] = names
    return root


def write_celebamask_hq(root: str, faces: dict, *, orig_index: Optional[np.ndarray] = None,
                        first_index: int = 0) -> str:
    """CelebAMask-HQ's layout: ``CelebA-HQ-img/<idx>.jpg``, one binary PNG per present region
    in ``CelebAMask-HQ-mask-anno/<idx // 2000>/<idx:05d>_<region>.png`` (at the image size),
    the attribute table and (with ``orig_index``, CelebA rows) the CelebA mapping."""
    n = faces["image"].shape[0]
    hq = np.arange(first_index, first_index + n)
    for idx, image, parse in zip(hq, faces["image"], faces["parse"]):
        _save(os.path.join(root, "CelebA-HQ-img", f"{idx}.jpg"), image)
        folder = os.path.join(root, "CelebAMask-HQ-mask-anno", str(idx // 2000))
        for rid in np.unique(parse):
            if rid == 0:
                continue
            _save(os.path.join(folder, f"{idx:05d}_{regions.REGIONS[rid]}.png"),
                  ((parse == rid) * 255).astype(np.uint8))
    with open(os.path.join(root, "CelebAMask-HQ-attribute-anno.txt"), "w") as f:
        f.write(f"{n}\n" + " ".join(regions.ATTRIBUTES) + "\n")
        for idx, row in zip(hq, faces["attrs"]):
            f.write(f"{idx}.jpg " + " ".join(_celeba_values(row)) + "\n")
    if orig_index is not None:
        with open(os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt"), "w") as f:
            f.write("idx orig_idx orig_file\n")
            for idx, orig in zip(hq, orig_index):
                f.write(f"{idx} {int(orig)} {int(orig) + 1:06d}.jpg\n")
    faces["hq_index"] = hq
    return root


def write_fairface(root: str, faces: dict, *, val_fraction: float = 0.25) -> str:
    """FairFace's layout: ``fairface_label_{train,val}.csv`` (file,age,gender,race) and
    ``train/<n>.jpg`` / ``val/<n>.jpg``; Young -> age "20-29", not Young -> "50-59",
    skin-tone group g -> race ``FAIRFACE_RACES[g]``. The last ``val_fraction`` is val."""
    from faceaudit_jax.data.folders import FAIRFACE_RACES

    n = faces["image"].shape[0]
    num_val = max(1, int(round(n * val_fraction)))
    split = np.array(["train"] * (n - num_val) + ["val"] * num_val)
    young = faces["attrs"][:, regions.ATTRIBUTE_ID["Young"]]
    male = faces["attrs"][:, regions.ATTRIBUTE_ID["Male"]]
    for name in ("train", "val"):
        rows = np.flatnonzero(split == name)
        with open(os.path.join(root, f"fairface_label_{name}.csv"), "w") as f:
            f.write("file,age,gender,race,service_test\n")
            for k, r in enumerate(rows):
                path = f"{name}/{k + 1}.jpg"
                _save(os.path.join(root, path), faces["image"][r])
                age = "20-29" if young[r] == 1 else "50-59"
                gender = "Male" if male[r] == 1 else "Female"
                f.write(f"{path},{age},{gender},{FAIRFACE_RACES[int(faces['group'][r])]},True\n")
    faces["fairface_split"] = split
    return root


def _pairs_by_identity(identity: np.ndarray, num_folds: int, per_fold: int, seed: int):
    """(a, b, same) rows: per fold ``per_fold`` matched then ``per_fold`` mismatched pairs."""
    rng = np.random.default_rng(seed)
    people = np.unique(identity)
    multi = [p for p in people if (identity == p).sum() >= 2]
    if not multi or people.size < 2:
        raise ValueError("pairs need an identity with two images and at least two identities")
    out = []
    for _ in range(num_folds):
        for _ in range(per_fold):
            p = multi[rng.integers(len(multi))]
            i, j = rng.choice(np.flatnonzero(identity == p), 2, replace=False)
            out.append((int(i), int(j), True))
        for _ in range(per_fold):
            p, q = rng.choice(people, 2, replace=False)
            out.append((int(rng.choice(np.flatnonzero(identity == p))),
                        int(rng.choice(np.flatnonzero(identity == q))), False))
    return out


def _person_files(identity: np.ndarray, prefix: str = "person") -> list[tuple[str, int]]:
    """(name, 1-based image number within the person) of each image."""
    seen: dict[int, int] = {}
    out = []
    for ident in identity:
        seen[int(ident)] = seen.get(int(ident), 0) + 1
        out.append((f"{prefix}_{int(ident)}", seen[int(ident)]))
    return out


def _pair_lines(pairs, files) -> list[str]:
    lines = []
    for a, b, same in pairs:
        (na, ka), (nb, kb) = files[a], files[b]
        lines.append(f"{na} {ka} {kb}" if same else f"{na} {ka} {nb} {kb}")
    return lines


def write_lfw(root: str, faces: dict, *, num_folds: int = 2, pairs_per_fold: int = 3,
              seed: int = 0) -> str:
    """LFW's layout: ``lfw/<name>/<name>_<nnnn>.jpg`` and ``pairs.txt`` ("folds n" header)."""
    files = _person_files(faces["identity"])
    for (name, k), image in zip(files, faces["image"]):
        _save(os.path.join(root, "lfw", name, f"{name}_{k:04d}.jpg"), image)
    pairs = _pairs_by_identity(faces["identity"], num_folds, pairs_per_fold, seed)
    with open(os.path.join(root, "pairs.txt"), "w") as f:
        f.write(f"{num_folds} {pairs_per_fold}\n" + "\n".join(_pair_lines(pairs, files)) + "\n")
    faces["pairs"] = pairs
    return root


def write_rfw(root: str, faces: dict, *, races: Sequence[str] = ("African", "Asian"),
              num_folds: int = 2, pairs_per_fold: int = 2, seed: int = 0) -> str:
    """RFW's layout: ``data/<Race>/<id>/<id>_<nnnn>.jpg`` and ``txts/<Race>/<Race>_pairs.txt``;
    the faces are split over ``races`` by identity (identity mod number of races)."""
    pairs_all = {}
    for k, race in enumerate(races):
        rows = np.flatnonzero(faces["identity"] % len(races) == k)
        files = _person_files(faces["identity"][rows], prefix=race.lower())
        for (name, n), r in zip(files, rows):
            _save(os.path.join(root, "data", race, name, f"{name}_{n:04d}.jpg"), faces["image"][r])
        pairs = _pairs_by_identity(faces["identity"][rows], num_folds, pairs_per_fold, seed + k)
        os.makedirs(os.path.join(root, "txts", race), exist_ok=True)
        with open(os.path.join(root, "txts", race, f"{race}_pairs.txt"), "w") as f:
            f.write("\n".join(_pair_lines(pairs, files)) + "\n")
        pairs_all[race] = [(int(rows[a]), int(rows[b]), s) for a, b, s in pairs]
    faces["rfw_pairs"] = pairs_all
    return root


def write_folder(root: str, faces: dict, *, masks: Optional[str] = "labels", pairs: bool = True,
                 attributes: Optional[Sequence[str]] = None, image_format: str = "png",
                 num_folds: int = 2, pairs_per_fold: int = 3, seed: int = 0) -> str:
    """The generic layout (``data.sources.GENERIC_LAYOUT``): ``images/<n>.<fmt>``,
    ``attributes.csv`` (the given attribute columns, default every annotated one, with
    identity and group), ``masks/`` as ``"labels"`` (one label PNG per image) or
    ``"regions"`` (CelebAMask-HQ naming) or none, and ``pairs.csv``."""
    n = faces["image"].shape[0]
    files = [f"images/{i:05d}.{image_format}" for i in range(n)]
    if attributes is None:
        known = (faces["attrs"] >= 0).any(axis=0)
        attributes = [a for a, k in zip(regions.ATTRIBUTES, known) if k]
    cols = regions.attribute_ids(list(attributes))
    for path, image in zip(files, faces["image"]):
        _save(os.path.join(root, path), image)
    with open(os.path.join(root, "attributes.csv"), "w") as f:
        f.write(",".join(["file", *attributes, "identity", "group"]) + "\n")
        for path, row, ident, group in zip(files, faces["attrs"], faces["identity"], faces["group"]):
            values = ["" if v < 0 else str(int(v)) for v in row[cols]]
            f.write(",".join([path, *values, str(int(ident)), str(int(group))]) + "\n")
    for i, parse in enumerate(faces["parse"]):
        if masks == "labels":
            _save(os.path.join(root, "masks", f"{i:05d}.png"), parse.astype(np.uint8))
        elif masks == "regions":
            for rid in np.unique(parse):
                if rid:
                    _save(os.path.join(root, "masks", f"{i:05d}_{regions.REGIONS[rid]}.png"),
                          ((parse == rid) * 255).astype(np.uint8))
        elif masks is not None:
            raise ValueError(f"masks={masks!r}; expected 'labels', 'regions' or None")
    if pairs:
        rows = _pairs_by_identity(faces["identity"], num_folds, pairs_per_fold, seed)
        with open(os.path.join(root, "pairs.csv"), "w") as f:
            f.write("file_a,file_b,same,fold\n")
            for k, (a, b, same) in enumerate(rows):
                f.write(f"{files[a]},{files[b]},{int(same)},{k // (2 * pairs_per_fold)}\n")
        faces["pairs"] = rows
    faces["folder_files"] = files
    return root


WRITERS = {"celeba": write_celeba, "celebamask_hq": write_celebamask_hq, "fairface": write_fairface,
           "lfw": write_lfw, "rfw": write_rfw, "folder": write_folder}


def write_layout(kind: str, root: str, faces: dict, **kwargs) -> str:
    """Write ``faces`` under ``root`` in the layout ``kind`` (one of ``LAYOUT_KINDS``)."""
    if kind not in WRITERS:
        raise ValueError(f"layout {kind!r}; expected one of {LAYOUT_KINDS}")
    os.makedirs(root, exist_ok=True)
    return WRITERS[kind](os.fspath(root), faces, **kwargs)
