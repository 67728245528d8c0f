"""Long explanation sweeps (many pairs x many masks), resumable chunk by chunk.

A sweep maps ``compute_chunk(item_indices) -> {name: array [n, ...]}`` over
``num_items`` items (pairs, images) in chunks of ``chunk_size`` items. Chunk c
holds items [c * chunk_size, (c + 1) * chunk_size); the last chunk is padded
to full size (its last item repeated, the extra rows dropped) so the jitted
work compiles once.

With a ``directory``:
- every chunk's outputs go to ``chunk_{c:06d}.npz`` (numpy's npz bytes
  followed by a footer: a magic tag and the sha256 of those bytes), written
  to a temporary file, flushed and fsynced, then renamed into place, the way
  Orbax commits a checkpoint. A file that is missing, truncated or altered
  fails its checksum and the chunk is computed again; a valid one is never
  recomputed.
- each process also keeps a running summary, ``summary_p{p}of{P}.npz`` (same
  format): the merge of ``summarize(outputs)`` over the chunks it has folded,
  and which those are. A resumed process starts from it and folds only the
  chunks it lacks (read from their files, or computed).
- ``sweep.json`` records what the sweep is (item count, chunk size and a
  fingerprint of the caller's config); resuming in a directory written by a
  different sweep is an error, not a silent mix.

Several processes (``faceaudit_jax.distributed``): chunk c belongs to process
c mod P, so any process count serves any item count, and a chunk's content
does not depend on P (a sweep killed under 2 processes can resume under 1).
The directory must be shared by the processes (as for Orbax checkpoints).
At the end the outputs and summaries are all-gathered, so every process
returns the whole sweep; per-item outputs equal a one-process run's (same
chunks, same computation), and the summary differs only by the order in
which float sums are added.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional

import jax
import numpy as np

from faceaudit_jax import distributed

Outputs = dict[str, np.ndarray]
FOOTER_MAGIC = b"FASWEEP1"
FOOTER_SIZE = len(FOOTER_MAGIC) + 32
CHUNKS_KEY = "__chunks__"


# --------------------------------------------------------------------------
# Checksummed atomic files
# --------------------------------------------------------------------------

def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """npz bytes of ``arrays`` followed by FOOTER_MAGIC and their sha256."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    payload = buffer.getvalue()
    return payload + FOOTER_MAGIC + hashlib.sha256(payload).digest()


def decode_arrays(data: bytes) -> Optional[Outputs]:
    """The arrays of ``encode_arrays`` bytes, or None if truncated or altered."""
    if len(data) < FOOTER_SIZE or data[-FOOTER_SIZE:-32] != FOOTER_MAGIC:
        return None
    payload, digest = data[:-FOOTER_SIZE], data[-32:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    with np.load(io.BytesIO(payload), allow_pickle=False) as loaded:
        return {k: loaded[k] for k in loaded.files}


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file, or all of the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checked(path: Path) -> Optional[Outputs]:
    """The arrays in ``path``, or None when it is missing or fails its checksum."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode_arrays(data)


# --------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What ``run_sweep`` returns (on every process).

    outputs: {name: [num_items, ...]} in item order (all processes' chunks),
    or None with keep_outputs=False;
    summary: the merged ``summarize`` arrays over all chunks (None without
    ``summarize``); computed: the chunk ids this process computed in this
    call (the rest came from chunk files); num_chunks: chunks in the sweep.
    """
    outputs: Optional[Outputs]
    summary: Optional[Outputs]
    computed: tuple[int, ...]
    num_chunks: int


def chunk_path(directory, chunk: int) -> Path:
    return Path(directory) / f"chunk_{chunk:06d}.npz"


def summary_path(directory, process_index: int, process_count: int) -> Path:
    return Path(directory) / f"summary_p{process_index}of{process_count}.npz"


def _check_manifest(directory: Path, manifest: dict) -> None:
    path = directory / "sweep.json"
    if path.exists():
        found = json.loads(path.read_text())
        differing = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
        if differing:
            shown = "; ".join(f"{k}: {found.get(k)!r} on disk, {manifest.get(k)!r} now"
                              for k in differing)
            raise ValueError(
                f"{directory} holds a different sweep ({shown}); use a new directory or "
                f"the same settings to resume")
    elif jax.process_index() == 0:
        atomic_write(path, json.dumps(manifest, sort_keys=True, indent=1).encode())


def _add(total: Outputs, part: Outputs) -> Outputs:
    return {k: total[k] + part[k] for k in total}


def _padded_chunk(chunk: int, chunk_size: int, num_items: int) -> tuple[np.ndarray, int]:
    start = chunk * chunk_size
    items = np.arange(start, min(start + chunk_size, num_items), dtype=np.int64)
    pad = np.full(chunk_size - items.size, items[-1], dtype=np.int64)
    return np.concatenate([items, pad]), items.size


def _check_outputs(outputs, chunk_size: int, chunk: int) -> Outputs:
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError(
            f"compute_chunk returned {type(outputs).__name__} for chunk {chunk}; "
            "expected a non-empty dict of arrays")
    arrays = {str(k): np.asarray(v) for k, v in outputs.items()}
    for name, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != chunk_size:
            raise ValueError(
                f"compute_chunk output {name!r} has shape {value.shape} for chunk {chunk}; "
                f"expected a leading axis of {chunk_size} (one row per item)")
    return arrays


def _check_sweep_size(num_items, chunk_size) -> tuple[int, int, int]:
    """(num_items, chunk_size, num_chunks) as ints, or a ValueError naming the bad value
    (also when there are fewer chunks than processes)."""
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"num_items={num_items!r}; expected an integer >= 1")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; expected an integer >= 1")
    num_items, chunk_size = int(num_items), int(chunk_size)
    num_chunks = -(-num_items // chunk_size)
    processes = jax.process_count()
    if num_chunks < processes:
        raise ValueError(
            f"{num_items} items in chunks of {chunk_size} make {num_chunks} chunk(s) for "
            f"{processes} processes; expected at least one chunk per process (lower chunk_size)")
    return num_items, chunk_size, num_chunks


def _saved_summary(directory: Path, process: int, processes: int) -> tuple[Optional[Outputs], set]:
    """This process's running summary and the chunks folded into it, from its last save."""
    saved = read_checked(summary_path(directory, process, processes))
    if saved is None:
        return None, set()
    folded = set(int(c) for c in saved.pop(CHUNKS_KEY))
    return (saved or None), folded


def run_sweep(compute_chunk: Callable[[np.ndarray], Mapping[str, np.ndarray]], num_items: int,
              chunk_size: int, directory=None, *, config=None,
              summarize: Optional[Callable[[Outputs], Mapping[str, np.ndarray]]] = None,
              merge: Callable[[Outputs, Outputs], Outputs] = _add,
              gather: bool = True, keep_outputs: bool = True) -> SweepResult:
    """Run (or resume) a chunked sweep over ``num_items`` items; see the module doc.

    compute_chunk(indices int64 [chunk_size]) -> {name: [chunk_size, ...]}
    (the last chunk's indices are padded by repeating its last item).
    summarize(outputs of one chunk, padding removed) -> {name: array}, merged
    over chunks with ``merge`` (default: add) into the running summary.
    ``config``: anything ``distributed.config_fingerprint`` accepts; it is
    stored in ``sweep.json`` and resuming with another one raises.
    gather=False returns only this process's chunks in ``outputs`` (keys
    unchanged, rows of the other processes' chunks absent) and this
    process's summary. keep_outputs=False holds no chunk outputs in memory
    (they are only written to ``directory`` and folded into the summary;
    ``outputs`` is None), so memory stays flat in the number of items.
    """
    num_items, chunk_size, num_chunks = _check_sweep_size(num_items, chunk_size)
    process, processes = jax.process_index(), jax.process_count()
    mine = list(range(process, num_chunks, processes))
    directory = None if directory is None else Path(directory)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        _check_manifest(directory, {"num_items": num_items, "chunk_size": chunk_size,
                                    "config": distributed.config_fingerprint(config)})
    summary, folded = (None, set()) if directory is None or summarize is None else \
        _saved_summary(directory, process, processes)
    local: dict[int, Outputs] = {}   # chunk -> its outputs, padding removed
    computed: list[int] = []
    for chunk in mine:
        indices, valid = _padded_chunk(chunk, chunk_size, num_items)
        outputs = read_checked(chunk_path(directory, chunk)) if directory is not None else None
        if outputs is None:
            outputs = _check_outputs(compute_chunk(indices), chunk_size, chunk)
            if directory is not None:
                atomic_write(chunk_path(directory, chunk), encode_arrays(outputs))
            computed.append(chunk)
        outputs = {k: v[:valid] for k, v in outputs.items()}
        if keep_outputs:
            local[chunk] = outputs
        if summarize is not None and chunk not in folded:
            part = {str(k): np.asarray(v) for k, v in summarize(outputs).items()}
            summary = part if summary is None else merge(summary, part)
            folded.add(chunk)
            if directory is not None:
                atomic_write(summary_path(directory, process, processes),
                             encode_arrays({**summary, CHUNKS_KEY: np.asarray(sorted(folded))}))

    if not keep_outputs:
        return SweepResult(None, _gather_summary(summary, merge) if gather else summary,
                           tuple(computed), num_chunks)
    if not gather:
        order = sorted(local)
        outputs = {k: np.concatenate([local[c][k] for c in order]) for k in local[order[0]]} \
            if order else {}
        return SweepResult(outputs, summary, tuple(computed), num_chunks)
    return SweepResult(_gather_outputs(local, mine, num_chunks, chunk_size, num_items),
                       _gather_summary(summary, merge), tuple(computed), num_chunks)


def _gather_outputs(local: dict[int, Outputs], mine: list[int], num_chunks: int,
                    chunk_size: int, num_items: int) -> Outputs:
    """All chunks' outputs in item order, on every process (one all-gather)."""
    processes = jax.process_count()
    slots = -(-num_chunks // processes)  # chunks per process, the last ones padded
    template = local[mine[0]]
    stacked = {}
    for name, value in template.items():
        block = np.zeros((slots, chunk_size) + value.shape[1:], value.dtype)
        for slot, chunk in enumerate(mine):
            rows = local[chunk][name]
            block[slot, :rows.shape[0]] = rows
        stacked[name] = block
    gathered = distributed.allgather(stacked)  # {name: [P, slots, chunk_size, ...]}
    outputs = {}
    for name, block in gathered.items():
        # chunk c sits at process c % P, slot c // P.
        ordered = np.stack([block[c % processes, c // processes] for c in range(num_chunks)])
        outputs[name] = ordered.reshape((num_chunks * chunk_size,) + block.shape[3:])[:num_items]
    return outputs


def _gather_summary(summary: Optional[Outputs], merge) -> Optional[Outputs]:
    if summary is None or jax.process_count() == 1:
        return summary
    gathered = distributed.allgather(summary)
    total = {k: v[0] for k, v in gathered.items()}
    for p in range(1, jax.process_count()):
        total = merge(total, {k: v[p] for k, v in gathered.items()})
    return total


__all__ = [
    "FOOTER_MAGIC", "encode_arrays", "decode_arrays", "atomic_write", "read_checked",
    "SweepResult", "chunk_path", "summary_path", "run_sweep",
]
