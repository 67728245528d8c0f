"""Data plumbing shared by the face-verification experiments (CorrRISE, ViT heatmaps).

Identity-disjoint train/test images (synthetic index ranges, or a real data
set's split from ``data.sources.build_split`` with its identities), loaded
into compact uint8 arrays held in memory, and step-indexed identity batches
for ``train_lib.fit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from faceaudit_jax import regions
from faceaudit_jax.data import pipeline, sampling, sources


def split_indices(config) -> tuple[np.ndarray, np.ndarray]:
    """(training image indices, test image indices) with disjoint identities.

    Training: 0 .. train.num_identities * images_per_identity - 1; test: the
    same count of test.num_identities identities from ``data.test_offset``.
    """
    per_identity = int(config.data.images_per_identity)
    if per_identity < 2:
        raise ValueError(f"data.images_per_identity={per_identity}; expected >= 2 (matched "
                         "pairs need two images of a person)")
    num_train = int(config.train.num_identities)
    num_test = int(config.test.num_identities)
    if num_train < 2:
        raise ValueError(f"train.num_identities={num_train}; expected >= 2")
    num_folds = int(config.test.num_folds)
    if num_test < 2 * num_folds:
        raise ValueError(f"test.num_identities={num_test} cannot make {num_folds} "
                         f"identity-disjoint folds; expected >= {2 * num_folds}")
    offset = int(config.data.test_offset)
    train_size = num_train * per_identity
    if offset < train_size or offset % per_identity:
        raise ValueError(
            f"data.test_offset={offset}; expected a multiple of images_per_identity="
            f"{per_identity} that is >= the {train_size} training images (disjoint identities)")
    return (np.arange(train_size, dtype=np.int64),
            np.arange(offset, offset + num_test * per_identity, dtype=np.int64))


def build_source(data_cfg):
    """``data.sources.build_source``: the renderer or a real data set with identities."""
    return sources.build_source(data_cfg)


def _first_identities(source, rows: np.ndarray, count: int, seed: int, field: str) -> np.ndarray:
    """Rows of ``count`` identities drawn with ``seed`` (those with >= 2 images), all their images."""
    identity = source.attributes(rows).get("identity")
    if identity is None:
        raise ValueError(f"{sources.describe(source)} has no identities, which face verification needs "
                         "(CelebA: identity_CelebA.txt; folder: an 'identity' column in attributes.csv)")
    people, counts = np.unique(identity, return_counts=True)
    people = np.random.default_rng(seed).permutation(people[counts >= 2])
    if people.size < count:
        raise ValueError(f"{field}={count}, but {sources.describe(source)} has only {people.size} "
                         "identities with two or more images in this split")
    return rows[np.isin(identity, people[:count])]


def split_rows(config, split: str):
    """(source, image indices) of the "train" or "test" split, identity-disjoint.

    Synthetic: the renderer and the index ranges of ``split_indices``. Real
    data: that split of ``sources.build_split``, keeping
    ``train.num_identities`` / ``test.num_identities`` identities with two or
    more images, drawn with ``data.split_seed``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; expected 'train' or 'test'")
    if str(config.data.source) == "synthetic":
        train_idx, test_idx = split_indices(config)
        return build_source(config.data), (train_idx if split == "train" else test_idx)
    source, rows = sources.build_split(config.data, split)
    count = int(config.train.num_identities if split == "train" else config.test.num_identities)
    rows = _first_identities(source, rows, count, int(config.data.get("split_seed", 0)),
                             f"{split}.num_identities")
    return source, rows


def load_images(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, R, R, 3], identity int64 [N]) of ``split_rows(config, split)``."""
    source, rows = split_rows(config, split)
    return render_uint8(source, rows, int(config.data.render_batch))


def render_uint8(source, indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render faces in fixed-size batches: (images uint8 [N, H, W, 3], identity int64 [N])."""
    images, identity = [], []
    for batch, valid in pipeline.iterate_batches(source, indices, int(batch_size)):
        pixels = np.asarray(batch["image"])[valid]
        images.append(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8))
        identity.append(np.asarray(batch["identity"])[valid].astype(np.int64))
    return np.concatenate(images), np.concatenate(identity)


# uint8 [..., H, W, 3] -> float32 in [0, 1]: the pipeline's one conversion, under the name
# the verification experiments import.
to_float = pipeline.uint8_to_float


def make_batch_fn(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                  flip: bool) -> Callable[[int], dict]:
    """``batch_fn(step)`` for ``train_lib.fit``: a pure function of the step.

    Epoch-wise shuffles (``pipeline.step_indices``) and, with ``flip``, a
    horizontal flip of each image with probability 1/2 drawn from (seed, step).
    Returns {"image" float32 [B, H, W, 3], "identity" int32 [B]}.
    """
    positions = np.arange(images.shape[0])

    def batch_fn(step: int) -> dict:
        chosen = pipeline.step_indices(positions, batch_size, seed, step)
        batch_images = images[chosen]
        if flip:
            mirror = np.random.default_rng([int(seed), int(step), 1]).random(chosen.size) < 0.5
            batch_images = np.where(mirror[:, None, None, None], batch_images[:, :, ::-1],
                                    batch_images)
        return {"image": to_float(batch_images),
                "identity": jnp.asarray(labels[chosen], jnp.int32)}

    return batch_fn


def embed_all(embed_fn, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeddings [N, D] of uint8 images [N, H, W, 3], ``batch_size`` at a time."""
    out = [np.asarray(embed_fn(to_float(images_uint8[i:i + batch_size])))
           for i in range(0, images_uint8.shape[0], batch_size)]
    return np.concatenate(out)


def select_pairs(same: np.ndarray, predicted_same: np.ndarray, decision: str, count: int,
                 seed: int) -> np.ndarray:
    """Indices of up to ``count`` true-positive ("tp") or true-negative ("tn") pairs, shuffled.

    same, predicted_same: bool [P]. The order is a permutation drawn from
    (seed, decision). Raises ValueError when the model made no such decision.
    """
    if decision == "tp":
        pool = np.flatnonzero(same & predicted_same)
    elif decision == "tn":
        pool = np.flatnonzero(~same & ~predicted_same)
    else:
        raise ValueError(f"decision={decision!r}; expected 'tp' or 'tn'")
    if pool.size == 0:
        raise ValueError(f"the model made no {decision.upper()} decision on the test pairs; "
                         "train longer or use more test pairs")
    order = np.random.default_rng([int(seed), 0 if decision == "tp" else 1]).permutation(pool)
    return order[:int(count)]


def occluder_mask(parse: np.ndarray) -> np.ndarray:
    """bool [..., H, W]: pixels of the occluders (glasses, hat) in a parse map."""
    ids = [regions.region_id("eye_g"), regions.region_id("hat")]
    return np.isin(parse, ids)


def occluded_pairs(attrs: np.ndarray, identity: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) positions of matching pairs whose probe A wears glasses or a hat and whose B wears
    neither: the occluder is the one thing that differs. At most one pair per probe, in order."""
    occluded = (attrs[:, regions.attribute_id("Eyeglasses")] == 1) | (
        attrs[:, regions.attribute_id("Wearing_Hat")] == 1)
    a_list, b_list = [], []
    for a in np.flatnonzero(occluded):
        partners = np.flatnonzero((identity == identity[a]) & ~occluded)
        if partners.size:
            a_list.append(a)
            b_list.append(partners[0])
        if len(a_list) == count:
            break
    return np.asarray(a_list, np.int64), np.asarray(b_list, np.int64)


@dataclasses.dataclass
class TestPairs:
    """The verification protocol's pairs: pair p compares images[a[p]] with images[b[p]].

    images uint8 [N, R, R, 3]; a, b int [P]; same bool [P]; fold int [P].
    Drawn pairs (``source`` and ``rows`` set, ``identity`` [N]) come from
    test identities; file pairs (LFW ``pairs.txt``, RFW, a folder's
    ``pairs.csv``) hold both images of each pair. ``name`` says which data
    set they come from, for the report.
    """

    images: np.ndarray
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    name: str
    from_file: bool
    identity: Optional[np.ndarray] = None
    source: Any = None
    rows: Optional[np.ndarray] = None

    @property
    def num_folds(self) -> int:
        return int(np.unique(self.fold).size)


def data_name(data_cfg) -> str:
    """How a report names the data set: "synthetic faces" or the source and its folder."""
    if str(data_cfg.source) == "synthetic":
        return "synthetic faces"
    root = str(data_cfg.get("root", "") or "")
    return f"{data_cfg.source}" + (f" ({root})" if root else "")


def uses_pairs_file(data_cfg) -> bool:
    """True when ``data.pairs`` names a pairs file kind (lfw, rfw, folder)."""
    return bool(str(data_cfg.get("pairs", "") or ""))


def drawn_test_pairs(config) -> TestPairs:
    """LFW-style identity-disjoint folds drawn from the test identities (``sampling.verification_pairs``)."""
    source, rows = split_rows(config, "test")
    images, identity = render_uint8(source, rows, int(config.data.render_batch))
    pairs = sampling.verification_pairs(identity, int(config.test.pair_seed),
                                        num_folds=int(config.test.num_folds),
                                        pairs_per_fold=int(config.test.pairs_per_fold))
    return TestPairs(images, pairs["a"], pairs["b"], pairs["same"], pairs["fold"],
                     data_name(config.data), False, identity, source, rows)


def file_test_pairs(config) -> TestPairs:
    """The data set's own pairs (``data.sources.build_pairs``), decoded at ``data.resolution``."""
    pairs = sources.build_pairs(config.data)
    loaded = sources.load_pair_images(pairs, int(config.data.resolution),
                                      num_workers=int(config.data.get("num_workers", 0)))
    count = loaded.same.size
    if not loaded.same.any() or loaded.same.all():
        raise ValueError(f"data.pairs={config.data.pairs!r} at {config.data.root}: the pairs file needs "
                         f"matching and non-matching pairs; found {int(loaded.same.sum())} matching of {count}")
    name = f"{data_name(config.data)}, {config.data.pairs} pairs file"
    return TestPairs(np.concatenate([loaded.image_a, loaded.image_b]), np.arange(count),
                     count + np.arange(count), loaded.same.astype(bool), loaded.fold, name, True)


def test_pairs(config) -> TestPairs:
    """File pairs when ``data.pairs`` is set, else pairs drawn from test identities."""
    return file_test_pairs(config) if uses_pairs_file(config.data) else drawn_test_pairs(config)
