"""The ViT face embedder as a verification audit uses it: trained, loaded, applied.

``train_embedder`` trains ``models.vit.ViTMarginClassifier`` (a ViT embedder
plus a cosine head over the training identities) with CosFace through
``train_lib.fit``: Orbax checkpoints in the run directory, a killed run
resumes, a finished one reloads. ``train_lib``'s update calls
``loss_fn(first model output, batch)``; the classifier's first output are the
cosines, so ``vit.CosFaceOnCosines`` applies margin and scale to them
(``losses.cosface_logits`` would re-normalise what is already normalised).
``load_checkpoint`` reads such a run directory back (``model.source=checkpoint``).
``ViTEmbed`` / ``BoundEmbed`` / ``embed_images`` turn the embedder into the
``embed_fn`` forms the explainers and the protocol take.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from faceaudit_jax import train_lib, workdir as workdir_lib
from faceaudit_jax.data import pipeline
from faceaudit_jax.data.verification import make_batch_fn
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.models import vit

MODEL_SOURCES = ("train", "checkpoint")
# The data fields that decide a real data set's training images (not recorded for the
# synthetic renderer, whose fingerprints must stay as they were).
_REAL_DATA_FINGERPRINT = ("source", "root", "test_root", "test_source", "test_split",
                          "split_seed", "test_fraction")


def build_embedder(model_cfg) -> vit.ViTFaceEmbedder:
    """``vit.build_vit(model.name, **model.overrides)``."""
    overrides = dict(model_cfg.get("overrides", {}) or {})
    return vit.build_vit(str(model_cfg.name), **overrides)


@dataclasses.dataclass
class TrainedEmbedder:
    embedder: vit.ViTFaceEmbedder
    params: dict  # {"params": embedder sub-tree}, for ViTApply
    num_steps: int
    run_dir: str
    last_metrics: dict
    # [D, C] class centres of the CosFace head: the per-image explanation target.
    centres: Optional[np.ndarray] = None


def fingerprint(config, num_identities: int) -> dict:
    """What the checkpoint depends on; a mismatch means another experiment's model."""
    found = {
        "model": str(config.model.name),
        "overrides": dict(config.model.get("overrides", {}) or {}),
        "resolution": int(config.data.resolution), "data_seed": int(config.data.seed),
        "independent": bool(config.data.independent),
        "images_per_identity": int(config.data.images_per_identity),
        "num_identities": int(num_identities), "batch_size": int(config.train.batch_size),
        "num_epochs": int(config.train.num_epochs), "lr": float(config.train.lr),
        "scale": float(config.train.scale), "margin": float(config.train.margin),
        "flip": bool(config.train.flip), "seed": int(config.seed),
    }
    if str(config.data.source) != "synthetic":
        found["data"] = {k: config.data.get(k, None) for k in _REAL_DATA_FINGERPRINT}
    return found


def train_embedder(config, run_dir, images: np.ndarray, identity: np.ndarray) -> TrainedEmbedder:
    """Train (or resume, or reload when finished) the ViT with CosFace in ``run_dir``.

    images: uint8 [N, H, W, 3]; identity: [N] (any ids; mapped to 0..C-1).
    Raises ValueError when the ViT's image size is not ``data.resolution`` or
    ``run_dir`` holds a model of other settings (``config.overwrite`` clears it).
    """
    classes, labels = np.unique(identity, return_inverse=True)
    embedder = build_embedder(config.model)
    if embedder.config.image_size != int(config.data.resolution):
        raise ValueError(
            f"the ViT is built for {embedder.config.image_size} px but data.resolution="
            f"{config.data.resolution}; set model.overrides.image_size or data.resolution")
    model = vit.ViTMarginClassifier(embedder.config, int(classes.size))
    run_dir = Path(run_dir)
    workdir_lib.check_fingerprint(run_dir, fingerprint(config, classes.size),
                                  overwrite=workdir_lib.overwrite_requested(config))
    batch_size = int(config.train.batch_size)
    num_steps = pipeline.steps_per_epoch(images.shape[0], batch_size) * int(config.train.num_epochs)
    if num_steps < 1:
        raise ValueError(f"train.num_epochs={config.train.num_epochs}; expected >= 1")
    tx = train_lib.make_optimizer(config.train, num_steps)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(int(config.seed)),
                                         int(config.data.resolution), tx)
    batch_fn = make_batch_fn(images, labels, batch_size, int(config.seed), bool(config.train.flip))
    loss_fn = vit.CosFaceOnCosines(float(config.train.scale), float(config.train.margin))
    state = train_lib.fit(model, state, batch_fn, num_steps, str(run_dir), loss_fn=loss_fn,
                          ckpt_every=int(config.train.ckpt_every),
                          log_every=int(config.train.log_every), desc="train ViT (CosFace)")
    return TrainedEmbedder(embedder, {"params": state.params["embedder"]}, num_steps, str(run_dir),
                           workdir_lib.last_record(run_dir / "metrics.jsonl", "train"),
                           centres=np.asarray(state.params["class_centres"]))


def check_model_source(config) -> str:
    """``model.source`` ("train" or "checkpoint"); a checkpoint's ``model.path`` is checked
    here, so a bad path fails before any work."""
    source = str(config.model.get("source", "train") or "train")
    if source not in MODEL_SOURCES:
        raise ValueError(f"model.source={source!r}; vit_fv explains a ViT: expected 'train' or 'checkpoint'")
    if source == "checkpoint":
        model_sources.vit_embedder_run_dir(config.model.get("path", ""))
    return source


def load_checkpoint(config) -> tuple[TrainedEmbedder, dict]:
    """The ViT of ``model.path`` (a vit_fv workdir or its models/vit_embedder) and setup fields."""
    embedder, params, centres, record = model_sources.load_vit_checkpoint(config.model.path)
    if embedder.config.image_size != int(config.data.resolution):
        raise ValueError(f"model.path={config.model.path!r} holds a ViT for {embedder.config.image_size} px "
                         f"but data.resolution={config.data.resolution}")
    run_dir = str(model_sources.vit_embedder_run_dir(config.model.path))
    trained = TrainedEmbedder(embedder, params, 0, run_dir, {}, centres=centres)
    return trained, {"model_source": "checkpoint", "model_path": str(config.model.path),
                     "train_identities": int(record["num_identities"]), "train_images": None}


@dataclasses.dataclass(frozen=True)
class ViTEmbed:
    """``embed_fn(params, images [B, H, W, 3]) -> [B, D]``; hashable by the model config."""

    apply: vit.ViTApply

    def __call__(self, params, images):
        return self.apply(params, images)[0]


class BoundEmbed:
    """``embed_fn(images) -> [B, D]`` with the parameters bound, for the black-box explainers.

    Hashes by identity (a static jit argument): create one per run and reuse it.
    """

    def __init__(self, embed: ViTEmbed, params):
        self.embed = embed
        self.params = params

    def __call__(self, images):
        return self.embed(self.params, images)


@functools.partial(jax.jit, static_argnums=0)
def _embed_uint8(embed: ViTEmbed, params, images_uint8):
    return embed(params, pipeline.uint8_to_float(images_uint8))


def embed_images(embed: ViTEmbed, params, images_uint8: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeddings [N, D] of uint8 images [N, H, W, 3], in fixed-size (padded) batches: one compile."""
    outputs = []
    for rows, real in pipeline.padded_index_batches(images_uint8.shape[0], int(batch_size)):
        outputs.append(np.asarray(_embed_uint8(embed, params, images_uint8[rows]))[:real])
    return np.concatenate(outputs)
