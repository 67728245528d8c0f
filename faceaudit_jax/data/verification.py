"""Data plumbing shared by the face-verification experiments (CorrRISE, ViT heatmaps).

Identity-disjoint train/test images (synthetic index ranges, or a real data
set's split from ``data.sources.build_split`` with its identities), loaded
into compact uint8 arrays held in memory, and step-indexed identity batches
for ``train_lib.fit``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.data import pipeline, sources


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


def to_float(images_uint8) -> jax.Array:
    """uint8 [..., H, W, 3] -> float32 in [0, 1]."""
    return jnp.asarray(images_uint8, jnp.float32) / 255.0


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
