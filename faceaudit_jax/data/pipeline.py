"""Batching, labels and device placement for every data source.

A *source* is anything with ``attributes(indices) -> dict`` (cheap table
look-up) and ``batch(indices) -> batch dict`` (the batch format of docs/design.md).
The synthetic renderer and the real-data readers both fit. Training batches
come from ``step_batch_fn``: a pure function of the step number, so a run
resumed from a checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from faceaudit_jax import regions


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """The embedded default: faces rendered on demand from (seed, index).

    Implements ``data.sources.Source``: rows are image indices 0 .. 2**31 - 1,
    every drawn attribute is annotated, batches carry exact parse maps.
    """

    seed: int = 0
    resolution: int = 128
    independent: bool = False
    images_per_identity: int = 10

    name = "synthetic"
    has_parse = True
    # Rendering runs on the same XLA CPU thread pool as the model: loading
    # ahead in a thread would only contend with it, so batches render on demand.
    prefetch = 0

    @property
    def annotated(self) -> frozenset:
        from faceaudit_jax.data import synthetic
        return frozenset(synthetic.DRAWN_ATTRIBUTES)

    def __len__(self) -> int:
        return 2 ** 31

    def attributes(self, indices) -> dict[str, np.ndarray]:
        from faceaudit_jax.data import synthetic
        return synthetic.sample_attributes(
            self.seed, np.asarray(indices), independent=self.independent,
            images_per_identity=self.images_per_identity)

    def batch(self, indices) -> dict[str, jax.Array]:
        from faceaudit_jax.data import synthetic
        return synthetic.render(
            self.seed, np.asarray(indices), self.resolution, independent=self.independent,
            images_per_identity=self.images_per_identity)

    def with_resolution(self, resolution: int) -> "SyntheticSource":
        return dataclasses.replace(self, resolution=int(resolution))


def attribute_label_fn(target: str) -> Callable[[dict], dict]:
    """Adds ``label`` (float32 [B], 0/1) and ``label_mask`` for one binary attribute."""
    add_labels = multi_attribute_label_fn([target])

    def add_label(batch):
        batch = add_labels(batch)
        batch["label"], batch["label_mask"] = batch["label"][:, 0], batch["label_mask"][:, 0]
        return batch

    return add_label


def multi_attribute_label_fn(names: Sequence[str]) -> Callable[[dict], dict]:
    """Adds ``label`` [B, A] 0/1 and ``label_mask`` [B, A] (False where unknown)."""
    cols = np.asarray(regions.attribute_ids(names))

    def add_labels(batch):
        raw = batch["attrs"][:, cols]
        batch = dict(batch)
        batch["label"] = jnp.asarray(raw == 1, jnp.float32)
        batch["label_mask"] = jnp.asarray(raw >= 0)
        return batch

    return add_labels


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}; expected a positive integer")
    if num_examples < batch_size:
        raise ValueError(
            f"{num_examples} training examples cannot fill one batch of {batch_size}")
    return num_examples // batch_size


def step_indices(indices: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The example indices of training step ``step``: epoch-wise shuffles, drop remainder.

    A pure function of (seed, step), so resumed runs replay the same order.
    """
    indices = np.asarray(indices)
    per_epoch = steps_per_epoch(indices.size, batch_size)
    epoch, within = divmod(int(step), per_epoch)
    order = np.random.default_rng([int(seed), epoch]).permutation(indices.size)
    return indices[order[within * batch_size:(within + 1) * batch_size]]


def array_batch_fn(images_u8: np.ndarray, batch_size: int, seed: int,
                   **columns: np.ndarray) -> Callable[[int], dict]:
    """``batch_fn(step)`` for train_lib.fit over in-memory arrays: {"image": float32 [B, H, W, 3]
    in [0, 1], name: column[rows] for each of ``columns`` (arrays indexed by example)}, rows
    ``step_indices(arange(N), batch_size, seed, step)`` (epoch-wise shuffles, drop remainder)."""
    order = np.arange(np.shape(images_u8)[0])
    for name, column in columns.items():
        if np.shape(column)[0] != order.size:
            raise ValueError(f"column {name!r} has {np.shape(column)[0]} rows for {order.size} images")

    def batch_fn(step: int) -> dict:
        idx = step_indices(order, batch_size, seed, step)
        return {"image": uint8_to_float(images_u8[idx]),
                **{name: jnp.asarray(column[idx]) for name, column in columns.items()}}

    return batch_fn


def padded_index_batches(num: int, batch_size: int):
    """(index array of length batch_size, number of real rows) covering 0..num-1.

    The last batch repeats its final index, so every batch has one shape and a
    jitted function over it compiles once.
    """
    for start in range(0, num, batch_size):
        idx = np.arange(start, min(start + batch_size, num))
        real = idx.size
        yield np.concatenate([idx, np.repeat(idx[-1:], batch_size - real)]), real


def uint8_to_float(images_u8: np.ndarray) -> jax.Array:
    """uint8 images [..., 3] -> float32 in [0, 1] (images kept as uint8 take a quarter of the memory)."""
    return jnp.asarray(images_u8, jnp.float32) / 255.0


def render_uint8(source, indices: np.ndarray, batch_size: int) -> np.ndarray:
    """Render a source's images as uint8 [N, H, W, 3] (a quarter of float32's memory).

    One fixed batch shape (the last batch padded), so the renderer compiles once.
    """
    out = []
    for batch, valid in iterate_batches(source, indices, int(batch_size)):
        images = np.asarray(jnp.round(batch["image"] * 255.0).astype(jnp.uint8))
        out.append(images[valid])
    return np.concatenate(out)


def _device_put(batch: dict) -> dict:
    """Start the host-to-device copy of the pixel arrays (images, parse maps: ndim >= 3) now, so
    it overlaps with the model; labels and indices stay as they are (numpy keeps int64)."""
    return {k: (jax.device_put(v) if isinstance(v, np.ndarray) and v.ndim >= 3 else v)
            for k, v in batch.items()}


def default_prefetch(source) -> int:
    """How many batches to load ahead for ``source``: its ``prefetch`` attribute (file sources
    2: decoding overlaps with the model; the renderer 0), else 2."""
    return int(getattr(source, "prefetch", 2))


def step_batch_fn(source, indices, batch_size: int, seed: int,
                  transform: Optional[Callable[[dict], dict]] = None,
                  sharding: Optional[NamedSharding] = None, *, prefetch: Optional[int] = None,
                  num_steps: Optional[int] = None) -> Callable[[int], dict]:
    """``batch_fn(step) -> batch`` for train_lib.fit: deterministic in (seed, step).

    With ``prefetch`` > 0 (None: ``default_prefetch(source)``), serving step s starts loading steps s+1 .. s+prefetch
    in a background thread (file decoding overlaps with the train step); the
    batches are the same, since each is a pure function of its step. Give
    ``num_steps`` so nothing is loaded past the last step and the thread ends.
    """

    prefetch = default_prefetch(source) if prefetch is None else int(prefetch)

    def load(step: int) -> dict:
        batch = source.batch(step_indices(indices, batch_size, seed, step))
        if transform is not None:
            batch = transform(batch)
        if sharding is not None:
            return shard_batch(batch, sharding)
        return _device_put(batch) if prefetch else batch

    if not prefetch:
        return load
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch-steps")
    pending: dict[int, concurrent.futures.Future] = {}
    lock = threading.Lock()

    def batch_fn(step: int) -> dict:
        step = int(step)
        with lock:
            future = pending.pop(step, None)
            for stale in [s for s in pending if s < step]:
                pending.pop(stale).cancel()
            last = step + int(prefetch) if num_steps is None else min(step + int(prefetch), int(num_steps) - 1)
            for ahead in range(step + 1, last + 1):
                if ahead not in pending:
                    pending[ahead] = worker.submit(load, ahead)
        batch = future.result() if future is not None else load(step)
        if num_steps is not None and step >= int(num_steps) - 1:
            worker.shutdown(wait=False)
        return batch

    return batch_fn


def iterate_batches(source, indices, batch_size: int,
                    transform: Optional[Callable[[dict], dict]] = None, *,
                    prefetch: Optional[int] = None) -> Iterator[tuple[dict, np.ndarray]]:
    """Evaluation batches in order, the last one padded to full size.

    Yields (batch, valid) where ``valid`` [batch_size] bool marks real rows, so
    jitted consumers see one shape and compile once. The next ``prefetch``
    batches (None: ``default_prefetch(source)``) are loaded (decoded,
    transformed, copied to the device) in a background thread while the
    caller works on the current one; 0 loads each batch when it is asked for.
    """
    prefetch = default_prefetch(source) if prefetch is None else int(prefetch)
    indices = np.asarray(indices)
    if indices.size == 0:
        raise ValueError("no images to iterate over (empty index list)")

    def load(start: int):
        chunk = indices[start:start + batch_size]
        valid = np.zeros(batch_size, bool)
        valid[:chunk.size] = True
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - chunk.size)])
        batch = source.batch(padded)
        if transform is not None:
            batch = transform(batch)
        return (_device_put(batch) if prefetch else batch), valid

    starts = range(0, indices.size, batch_size)
    if not prefetch:
        for start in starts:
            yield load(start)
        return
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch-batches")
    queue: collections.deque = collections.deque()
    try:
        for start in starts:
            queue.append(worker.submit(load, start))
            if len(queue) > int(prefetch):
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:
        for future in queue:
            future.cancel()
        worker.shutdown(wait=True)


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh named ``data`` over all (or the given) devices.

    ``jax.devices()`` lists every process's devices in a multi-process job,
    so by default this is the global mesh.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Place every array of a batch split along its leading (batch) axis.

    One process: ``batch`` is the whole batch, split over the mesh's devices.
    Several processes: ``batch`` is this process's rows (its block of the
    global batch, in process order) and the result is the global array
    (``jax.make_array_from_process_local_data``); each process must pass the
    same number of rows, a multiple of its devices in the mesh.
    """
    processes = jax.process_count()
    num = sharding.mesh.size // processes if processes > 1 else sharding.mesh.size
    where = "this process's" if processes > 1 else "the"

    def put(x):
        x = jnp.asarray(x) if processes == 1 else np.asarray(x)
        rows = x.shape[0] if x.ndim else 0
        if rows == 0 or rows % num:
            raise ValueError(
                f"batch axis of size {rows} cannot be split over {where} {num} devices; "
                f"expected a multiple of {num}")
        if processes > 1:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, batch)
