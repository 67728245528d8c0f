"""The audit of a multi-attribute classifier: one fused jitted step and one streaming pass.

``make_explain_step`` runs the backbone once per batch and, for every
(CAM method, target) pair, the head's gradient for every attribute
(``explain.attribute_cams``), the proportional energy of each map in its
attribute mask (``explain.attribute_masks`` + ``metrics.energy``) and running
sums of the maps per predicted class. ``explain_test_set`` streams a test set
through it for several models of one architecture, explaining only frontal
faces (``data.frontal``); in a multi-process job each process explains its
block and the results are summed / gathered (``distributed``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import distributed, regions
from faceaudit_jax.data import frontal, pipeline, sources
from faceaudit_jax.explain import attribute_cams as attribute_cams_lib
from faceaudit_jax.explain import attribute_masks as masks_lib
from faceaudit_jax.explain import cams as cams_lib
from faceaudit_jax.metrics import energy as energy_lib
from faceaudit_jax.models import resnet as resnet_lib


class ExplainSums(NamedTuple):
    """Running sums over the explained (valid) test images; a jit-friendly pytree."""

    cams: tuple  # one attribute_cams.CamSums per (method, target) pair, [A, H, W] each
    mask_sum: jax.Array  # float32 [A, H, W]: sum of the attribute masks
    image_sum: jax.Array  # float32 [H, W, 3]
    count: jax.Array  # int32 (): images summed


def cam_pairs(methods: Sequence[str], main_method: str) -> tuple[tuple[str, str], ...]:
    """(method, target) pairs: |z| for every method, plus z for the main one (Figure 4)."""
    methods = tuple(methods)
    if not methods:
        raise ValueError("explain.methods is empty; expected at least one CAM method")
    for method in methods:
        cams_lib.resolve_cam_method(method)  # validates the name
    if main_method not in methods:
        raise ValueError(
            f"explain.main_method={main_method!r} is not in explain.methods={methods}")
    return tuple((m, "predicted") for m in methods) + ((main_method, "positive"),)


def init_explain_sums(num_pairs: int, num_attributes: int, height: int, width: int) -> ExplainSums:
    cam_sums = attribute_cams_lib.init_cam_sums(num_attributes, height, width)
    return ExplainSums(
        cams=tuple(cam_sums for _ in range(num_pairs)),
        mask_sum=jnp.zeros((num_attributes, height, width), jnp.float32),
        image_sum=jnp.zeros((height, width, 3), jnp.float32),
        count=jnp.zeros((), jnp.int32))


def make_explain_step(model, names: Sequence[str], pairs: Sequence[tuple[str, str]],
                      mask_source: str) -> Callable:
    """Jitted ``step(variables, sums, images, parse, valid) -> (sums, logits, energy, area)``.

    ``model`` is a classifier with ``features`` / ``head`` methods
    (``models.resnet.ResNetClassifier``); its variables are an argument, so
    AFFACT-u and AFFACT-b share one compiled step. images [B, H, W, 3],
    parse int [B, H, W] (only its shape is read for
    ``mask_source="rectangles"``), valid bool [B] (padding and non-frontal
    rows False: they are left out of the sums). Returns logits [B, A],
    energy [P, B, A] (proportional energy, eq. 7, of the upsampled and
    min-max normalised CAM of each (method, target) pair inside the attribute
    mask) and area [B, A] (the mask's share of the image: the energy of a
    uniform map). The backbone runs once per call; each pair costs one head
    VJP per attribute (vmapped), the CAM formula and the resize.
    """
    names = tuple(names)
    pairs = tuple((cams_lib.resolve_cam_method(m), mode) for m, mode in pairs)
    # Each feature cell is placed at its receptive-field centre when resized.
    grid = resnet_lib.cell_grid(model) or "aligned"

    def step(variables, sums: ExplainSums, images, parse, valid):
        def head_fn(fmap):
            return model.apply(variables, fmap, method="head")

        fmap = model.apply(variables, images, train=False, method="features")
        height, width = images.shape[1:3]
        masks = masks_lib.attribute_masks(parse, names, mask_source)  # bool [B, A, H, W]
        energies, new_cams, logits = [], [], None
        for (formula, mode), cam_sums in zip(pairs, sums.cams):
            raw, logits = attribute_cams_lib.attribute_cams_from_features(fmap, head_fn, formula,
                                                                          mode)
            maps = attribute_cams_lib.postprocess_maps(raw, (height, width), grid=grid)
            energies.append(energy_lib.proportional_energy(maps, masks))
            new_cams.append(attribute_cams_lib.accumulate_cam_sums(cam_sums, maps, logits, valid))
        weight = valid.astype(jnp.float32)
        masks_f = masks.astype(jnp.float32)
        new_sums = ExplainSums(
            cams=tuple(new_cams),
            mask_sum=sums.mask_sum + jnp.einsum("b,bahw->ahw", weight, masks_f),
            image_sum=sums.image_sum + jnp.einsum("b,bhwc->hwc", weight, images),
            count=sums.count + jnp.sum(valid, dtype=jnp.int32))
        return new_sums, logits, jnp.stack(energies), jnp.mean(masks_f, axis=(-2, -1))

    return jax.jit(step)


@dataclasses.dataclass
class Evaluation:
    """One model's outputs on the explained (frontal) test faces."""

    logits: np.ndarray  # [N, A]
    targets: np.ndarray  # int8 [N, A], 1 / 0 / -1
    energy: np.ndarray  # [P, N, A]
    area: np.ndarray  # [N, A]
    sums: ExplainSums


def _check_explainable(models, source, mask_source: str) -> None:
    if mask_source not in masks_lib.MASK_SOURCES:
        raise ValueError(
            f"explain.mask_source={mask_source!r}; expected one of {masks_lib.MASK_SOURCES}")
    if mask_source == "parse" and not source.has_parse:
        raise ValueError(f"{sources.describe(source)} has no parse maps; set "
                         "explain.mask_source='rectangles'")
    if not models:
        raise ValueError("no models to explain; expected at least one model")
    if len({m.model for m in models}) != 1:
        raise ValueError("the models to explain must share one architecture (one compiled step)")


def _frontal_rows(batch, real, batch_size: int, max_ratio: float, counts: dict) -> np.ndarray:
    """bool [batch_size]: the real rows the frontal filter keeps; adds its counts to ``counts``."""
    keep_real, batch_counts = frontal.frontal_filter(np.asarray(batch["landmarks"])[real],
                                                     max_ratio)
    for key in counts:
        counts[key] += batch_counts[key]
    valid = np.zeros(batch_size, bool)
    valid[np.flatnonzero(real)[keep_real]] = True
    return valid


def _gather(collected: dict, targets: list, sums: dict) -> dict[str, Evaluation]:
    """Per-process outputs -> {model name: Evaluation} over every process (in process order)."""
    target_array = distributed.allgather_rows(np.concatenate(targets))
    evaluations = {}
    for name, out in collected.items():
        logits, energy, area = distributed.allgather_rows((
            np.concatenate(out["logits"]), np.moveaxis(np.concatenate(out["energy"], axis=1), 1, 0),
            np.concatenate(out["area"])))
        evaluations[name] = Evaluation(logits=logits, targets=target_array,
                                       energy=np.moveaxis(energy, 0, 1), area=area,
                                       sums=distributed.global_sum(sums[name]))
    return evaluations


def explain_test_set(models: Sequence, source, test_idx: np.ndarray, names: Sequence[str],
                     pairs, config) -> tuple[dict[str, Evaluation], dict]:
    """One streaming pass over the test faces that explains every model.

    ``models``: objects with ``name``, ``model`` (one architecture for all)
    and ``variables``. ``config`` supplies ``explain.mask_source``,
    ``test.batch_size`` and ``test.frontal_max_ratio``. Returns ({model name:
    Evaluation}, frontal filter counts). In a multi-process job each process
    explains its block of ``test_idx``; the counts and CAM sums add over
    processes and the per-face arrays are all-gathered in process order.
    """
    mask_source = str(config.explain.mask_source)
    _check_explainable(models, source, mask_source)
    cols = np.asarray(regions.attribute_ids(names))
    step = make_explain_step(models[0].model, names, pairs, mask_source)
    sums: dict[str, ExplainSums] = {}
    collected = {m.name: {"logits": [], "energy": [], "area": []} for m in models}
    targets, counts = [], dict.fromkeys(("total", "kept", "excluded", "not_frontal",
                                         "degenerate"), 0)
    batch_size, max_ratio = int(config.test.batch_size), float(config.test.frontal_max_ratio)
    start = time.perf_counter()
    local_idx, _ = distributed.process_shard(test_idx)
    num_batches = -(-local_idx.size // batch_size)
    for i, (batch, real) in enumerate(pipeline.iterate_batches(source, local_idx, batch_size)):
        valid = _frontal_rows(batch, real, batch_size, max_ratio, counts)
        images = batch["image"]
        parse = batch["parse"] if "parse" in batch else jnp.zeros(images.shape[:3], jnp.int32)
        targets.append(np.asarray(batch["attrs"])[valid][:, cols])
        for model in models:
            if model.name not in sums:
                sums[model.name] = init_explain_sums(len(pairs), len(names), *images.shape[1:3])
            sums[model.name], logits, energy, area = step(
                model.variables, sums[model.name], images, parse, jnp.asarray(valid))
            out = collected[model.name]
            out["logits"].append(np.asarray(logits)[valid])
            out["energy"].append(np.asarray(energy)[:, valid])
            out["area"].append(np.asarray(area)[valid])
        print(f"explain: batch {i + 1}/{num_batches}, {counts['kept']} frontal faces so far "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    totals = distributed.global_sum(np.asarray(list(counts.values())))
    counts = {key: int(total) for key, total in zip(counts, totals)}
    if counts["kept"] == 0:
        raise ValueError(
            f"the frontal filter (ratio < {max_ratio}) kept none of the {counts['total']} test "
            "faces; raise test.size or test.frontal_max_ratio")
    return _gather(collected, targets, sums), counts
