"""One process of the multi-process tests (tests/test_distributed.py, tests/test_sweeps.py).

Run as ``python tests/multihost_worker.py MODE OUT_DIR PROCESS_ID NUM_PROCESSES PORT [...]``
with the repository root on PYTHONPATH. The workloads are plain functions of
this module so the tests compute their one-process references with the very
same code, in the pytest process, without ``jax.distributed``.
"""

from __future__ import annotations

import os
import sys
import time

# Two CPU devices per process, set before jax starts (a 2 x 2 job); the
# launcher's other XLA flags (tests/conftest.py) are kept.
if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import distributed, sweeps
from faceaudit_jax.data import pipeline

RESOLUTION = 64
NUM_AUDIT_IMAGES = 16
NUM_PAIRS = 6
PAIR_CHUNK = 1
NUM_MASKS = 16
CAM_ATTRIBUTES = ("Wearing_Hat", "Eyeglasses", "Wearing_Lipstick")


def tiny_classifier(num_outputs: int):
    from faceaudit_jax.models import sources as model_sources
    from faceaudit_jax.models.resnet import build_model, init_variables
    model = build_model("small_resnet", num_outputs, widths=(8, 8, 8, 8), stem_width=8,
                        norm_groups=4)
    variables = init_variables(model, jax.random.key(3), RESOLUTION)
    return model_sources.Classifier(model, variables, "tiny", "")


def audit_result():
    """FaceX audit of a random tiny classifier on 15 synthetic faces (each process: its block).

    15 does not divide over 2 processes: blocks of 8 and 7 (the shorter one's
    last batch padded with masked rows). The overlays are the first 10 images
    overall, more than process 0's block, so they are gathered across processes.
    """
    import ml_collections
    from faceaudit_jax.summary import audit as audit_lib
    explain_cfg = ml_collections.ConfigDict(dict(
        target_mode="predicted", method="grad_cam", top_k=5, num_overlays=10,
        ior_mode="soft", patch_size=8))
    source = pipeline.SyntheticSource(seed=1, resolution=RESOLUTION)
    result = audit_lib.audit(tiny_classifier(1), source,
                             np.arange(100, 100 + NUM_AUDIT_IMAGES - 1), "Male", explain_cfg,
                             batch_size=4)
    return {"ior": result.ior, "counts": result.counts, "accuracy": np.asarray(result.accuracy),
            "num_images": np.asarray(result.num_images),
            "ior_by_true": result.ior_by_true, "top_values": result.top.values,
            "top_ids": result.top.image_ids, "top_rows": result.top.rows,
            "top_cols": result.top.cols, "overlay_images": result.overlay_images,
            "overlay_maps": result.overlay_maps, "overlay_titles": np.asarray(result.overlay_titles)}


def _tiny_linear():
    import flax.linen as nn

    class TinyLinear(nn.Module):
        """Mean colour -> one logit: a real Flax model whose train step compiles in a second."""

        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(1)(x.mean(axis=(1, 2)))

    return TinyLinear()


def _tiny_loss(logits, batch):
    return jnp.mean((logits[:, 0] - batch["label"]) ** 2)


def checkpoint_result(out_dir):
    """``train_lib.fit`` for 2 steps (a checkpoint each) in ``out_dir/fit``, then read back.

    In a multi-process job every process trains the same model, Orbax's save
    is collective and process 0 alone writes the files and metrics.jsonl.
    The checkpoint is then restored by ``restore_latest`` and by
    ``models.sources.restore_variables`` (configs/audit.py's loader).
    """
    import optax
    from faceaudit_jax import train_lib
    from faceaudit_jax.models import sources as model_sources
    model, tx, run_dir = _tiny_linear(), optax.sgd(0.1), os.path.join(out_dir, "fit")

    def batch_fn(step):
        images = jax.random.uniform(jax.random.key(step), (4, 8, 8, 3))
        return {"image": images, "label": images.mean(axis=(1, 2, 3))}

    fresh = lambda: train_lib.create_train_state(model, jax.random.key(0), 8, tx)  # noqa: E731
    trained = train_lib.fit(model, fresh(), batch_fn, 2, run_dir, loss_fn=_tiny_loss,
                            ckpt_every=1, log_every=1, progress=False)
    restored = train_lib.restore_latest(fresh(), run_dir)
    loaded = model_sources.restore_variables(run_dir)
    return {"trained": np.asarray(trained.params["Dense_0"]["kernel"]),
            "restored": np.asarray(restored.params["Dense_0"]["kernel"]),
            "restored_step": np.asarray(restored.step),
            "loaded": np.asarray(loaded["params"]["Dense_0"]["kernel"])}


def _fail_on_primary():
    raise ValueError(f"bad input seen by process {jax.process_index()}")


def primary_result():
    """``on_primary`` (a result, then an error) and ``broadcast_from_primary``."""
    shared = distributed.on_primary(lambda: {"who": jax.process_index(), "values": np.arange(3)})
    try:
        distributed.on_primary(_fail_on_primary)
        error = ""
    except distributed.PrimaryProcessError as err:
        error = f"PrimaryProcessError: {err}"
    except ValueError as err:
        error = f"ValueError: {err}"
    own = {"w": np.full(3, jax.process_index(), np.float32)}
    return {"who": np.asarray(shared["who"]), "values": np.asarray(shared["values"]),
            "error": np.asarray(error), "w": distributed.broadcast_from_primary(own)["w"]}


def _pair_images():
    """Smooth random image pairs (B = A plus noise): no renderer to compile in the sweeps."""
    rng = np.random.default_rng(5)
    coarse = rng.random((NUM_PAIRS, 8, 8, 3)).astype(np.float32)
    images_a = np.repeat(np.repeat(coarse, RESOLUTION // 8, axis=1), RESOLUTION // 8, axis=2)
    noise = 0.1 * rng.standard_normal(images_a.shape).astype(np.float32)
    return images_a, np.clip(images_a + noise, 0.0, 1.0)


_PROJECTION = np.random.default_rng(0).normal(size=(8 * 8 * 3, 16)).astype(np.float32)


def tiny_embed(images):
    """A fixed nonlinear embedder: average pooling to 8 x 8, a random projection, tanh."""
    batch = images.shape[0]
    factor = images.shape[1] // 8
    pooled = images.reshape(batch, 8, factor, 8, factor, 3).mean(axis=(2, 4)).reshape(batch, -1)
    return jnp.tanh(pooled @ _PROJECTION)


def corrrise_chunk(pair_indices, delay_s: float = 0.0):
    from faceaudit_jax.explain.corrrise import corrrise_batch
    images_a, images_b = _pair_images()
    s_a, s_b = corrrise_batch(tiny_embed, images_a[pair_indices], images_b[pair_indices],
                              jax.random.key(7), num_masks=NUM_MASKS, num_patches=3,
                              patch_size=16, chunk_size=8)
    time.sleep(delay_s)  # lets a test kill the sweep between chunks
    return {"s_a": np.asarray(s_a), "s_b": np.asarray(s_b)}


def corrrise_summary(outputs):
    """Sums over pairs: the kind of running summary a long sweep keeps."""
    return {"sum_s_a": outputs["s_a"].sum(axis=0), "sum_abs": np.abs(outputs["s_b"]).sum(axis=0),
            "pairs": np.asarray(outputs["s_a"].shape[0])}


def corrrise_sweep(directory, delay_s: float = 0.0):
    return sweeps.run_sweep(lambda idx: corrrise_chunk(idx, delay_s), NUM_PAIRS, PAIR_CHUNK,
                            directory, config={"test": "corrrise", "masks": NUM_MASKS},
                            summarize=corrrise_summary)


def cam_result():
    """``explain.attribute_audit.explain_test_set`` on 16 faces: energies, counts, CAM sums.

    In a multi-process job each process explains its 8 faces; the frontal
    filter keeps a different number on each, so the per-face arrays are
    gathered with uneven row counts.
    """
    import ml_collections
    from faceaudit_jax.explain.attribute_audit import explain_test_set
    from faceaudit_jax.multi_attribute import TrainedModel
    clf = tiny_classifier(len(CAM_ATTRIBUTES))
    model = TrainedModel("u", clf.model, clf.variables, 0, "")
    config = ml_collections.ConfigDict(dict(
        explain=dict(mask_source="parse"), test=dict(batch_size=4, frontal_max_ratio=0.1)))
    source = pipeline.SyntheticSource(seed=4, resolution=RESOLUTION)
    evaluations, counts = explain_test_set([model], source, np.arange(NUM_AUDIT_IMAGES),
                                           CAM_ATTRIBUTES, (("grad_cam", "predicted"),), config)
    result = evaluations["u"]
    return {"energy": result.energy[0], "logits": result.logits, "targets": result.targets,
            "kept": np.asarray(counts["kept"]), "total": np.asarray(counts["total"]),
            "count": np.asarray(result.sums.count), "mask_sum": np.asarray(result.sums.mask_sum),
            "cam_sum": np.asarray(jax.tree.leaves(result.sums.cams)[0])}


def patch_apply(variables, patches, position_ids):
    """A small real patch classifier: patch colour means through a fixed linear layer,
    plus a per-position bias (the position embedding's role in the patch net)."""
    features = jnp.concatenate([patches.mean(axis=(1, 2)), patches.std(axis=(1, 2))], axis=-1)
    return features @ variables["w"] + variables["position"][position_ids]


def patch_map_result():
    """``explain.patches.general_confidence_map`` over 16 faces (each process: its block)."""
    from faceaudit_jax.explain import patches
    from faceaudit_jax.models.patch_net import grid_positions
    positions = grid_positions(RESOLUTION, 16, 7)
    keys = jax.random.split(jax.random.key(5), 2)
    variables = {"w": jax.random.normal(keys[0], (6, 2)),
                 "position": 0.1 * jax.random.normal(keys[1], (positions.shape[0], 2))}
    indices, _ = distributed.process_shard(np.arange(NUM_AUDIT_IMAGES))
    source = pipeline.SyntheticSource(seed=6, resolution=RESOLUTION)
    batches = (source.batch(indices[i:i + 4])["image"] for i in range(0, indices.size, 4))
    general = patches.general_confidence_map(patch_apply, batches, 16, positions,
                                             kind="margin", variables=variables)
    return {"general_map": np.asarray(general)}


def global_array_check():
    """Rows fed per process become one global array; a jitted sum over it sees all rows."""
    local, offset = distributed.process_shard(np.arange(8, dtype=np.float32))
    global_rows = distributed.host_local_to_global(local)
    total = jax.jit(jnp.sum)(global_rows)
    uneven = np.full((jax.process_index() + 1, 2), jax.process_index())  # p + 1 rows
    return {"global_sum": np.asarray(jax.device_get(total)),
            "global_shape": np.asarray(global_rows.shape),
            "uneven_rows": distributed.allgather_rows(uneven)}


_START = time.perf_counter()


def _save(out_dir, name, arrays):
    print(f"worker {jax.process_index()}: {name} at {time.perf_counter() - _START:.1f} s",
          file=sys.stderr, flush=True)
    np.savez(os.path.join(out_dir, f"{name}_p{jax.process_index()}.npz"), **arrays)


def main(argv):
    mode, out_dir, process_id, num_processes, port = argv[:5]
    process_id, num_processes = int(process_id), int(num_processes)
    address = f"127.0.0.1:{port}"
    if mode == "unreachable":  # a worker whose coordinator never starts, or a lone coordinator
        try:
            distributed.initialize(address, num_processes, process_id, timeout_s=float(argv[5]))
        except distributed.CoordinatorUnreachableError as error:
            print(f"UNREACHABLE: {error}", flush=True)
            return 3
        return 0
    distributed.initialize(address, num_processes, process_id, timeout_s=60,
                           heartbeat_timeout_s=20)
    if mode == "mismatch":
        try:
            distributed.check_same_config({"lr": 0.1 * (1 + process_id)})
        except ValueError as error:
            print(f"MISMATCH: {error}", flush=True)
            return 4
        return 0
    if mode == "job":
        distributed.check_same_config({"test": "job"})
        try:
            distributed.process_shard(np.arange(7))
            shard_error = ""
        except ValueError as error:
            shard_error = str(error)
        _save(out_dir, "audit", audit_result())
        _save(out_dir, "primary", primary_result())
        _save(out_dir, "checkpoint", checkpoint_result(out_dir))
        _save(out_dir, "cams", cam_result())
        _save(out_dir, "patch_map", patch_map_result())
        _save(out_dir, "global", global_array_check())
        result = corrrise_sweep(os.path.join(out_dir, "corrrise_sweep"))
        _save(out_dir, "corrrise", {**result.outputs, **result.summary,
                                    "shard_error": np.asarray(shard_error),
                                    "computed": np.asarray(result.computed)})
        return 0
    if mode == "sweep":
        result = corrrise_sweep(os.path.join(out_dir, "sweep"), delay_s=float(argv[5]))
        _save(out_dir, f"sweep_{argv[6]}", {**result.outputs, **result.summary,
                                            "computed": np.asarray(result.computed, np.int64)})
        return 0
    raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
