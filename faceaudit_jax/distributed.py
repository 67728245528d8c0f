"""Several processes (hosts) as one job: start-up, data shards and global reductions.

JAX's own multi-process runtime does the work (``jax.distributed``, a global
device mesh, ``multihost_utils`` collectives); this module is the thin layer
the explanation workloads share:

- ``initialize``: start the runtime from explicit arguments (``--multihost``
  flags), from environment variables, or from a cluster JAX detects itself
  (SLURM, Open MPI, Kubernetes, Cloud TPU). A worker that cannot reach the
  coordinator fails with a message naming it; a process whose peers never
  show up stops after ``timeout_s`` with a message naming the processes it
  waited for (JAX itself would abort the process with a C++ stack trace).
- ``check_same_config``: every process compares a fingerprint of its config
  with every other's at start-up, so hosts launched with different flags fail
  at once instead of silently reducing unrelated numbers.
- ``process_shard``: the contiguous block of a data set's items a process
  reads. The item count must divide evenly by the process count (an error
  says so): every process then runs the same number of batches, and item
  positions stay global.
- ``host_local_to_global``: process-local rows -> one array sharded over the
  global mesh (``jax.make_array_from_process_local_data``).
- ``allgather`` / ``global_sum`` / ``global_ior_state`` /
  ``global_top_patch_state``: reductions of the streaming accumulators
  across processes. With one process they return their input unchanged (no
  collective, no copy), so the single-process path costs nothing extra.

On CPU the collectives go over gloo (``jax_cpu_collectives_implementation``),
which ``initialize`` selects, so the multi-process paths run and are tested on
one machine: see ``scripts/launch_local_multihost.sh`` and docs/scale.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Environment variables read when no explicit argument is given. JAX itself
# reads JAX_COORDINATOR_ADDRESS; the process count and id use the same naming.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Exit status of a process whose peers did not all connect within the timeout.
EXIT_PEERS_MISSING = 75
DATA_AXIS = "data"


class CoordinatorUnreachableError(TimeoutError):
    """A worker process could not open a connection to the coordinator in time."""


# --------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------

def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}; expected an integer") from None


def multihost_requested() -> bool:
    """True when the environment describes a multi-process job.

    That is JAX_COORDINATOR_ADDRESS set, or a SLURM step with more than one
    task (SLURM_NTASKS > 1 inside srun), the cluster JAX detects most often.
    """
    if os.environ.get(ENV_COORDINATOR):
        return True
    return (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_ID" in os.environ


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r}; expected HOST:PORT, e.g. 10.0.0.1:1234")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, process_id: int, num_processes: Optional[int],
                         timeout_s: float) -> None:
    """Block until a TCP connection to the coordinator opens; raise after ``timeout_s``.

    Run by every process but the coordinator (process 0) before JAX's own
    registration, whose failure aborts the interpreter instead of raising.
    """
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last_error: Optional[OSError] = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise CoordinatorUnreachableError(
                f"process {process_id} of {num_processes or '?'} could not reach the coordinator "
                f"(process 0) at {address} within {timeout_s:g} s ({last_error}); start "
                f"process 0 on that host first, or check the address and port")
        time.sleep(0.2)


def _peers_missing_message(process_id: int, num_processes: int, address: str,
                           timeout_s: float) -> str:
    others = [p for p in range(num_processes) if p != process_id]
    names = ", ".join(str(p) for p in others)
    return (f"faceaudit_jax.distributed: process {process_id} of {num_processes} waited "
            f"{timeout_s:g} s at coordinator {address} and not every process registered; "
            f"waiting for process(es) {names}: check that each was started with "
            f"num_processes={num_processes}, its own process id and this coordinator address")


def _job_arguments(coordinator_address: Optional[str], num_processes: Optional[int],
                   process_id: Optional[int]) -> tuple[Optional[str], Optional[int], Optional[int]]:
    """The arguments, with those left None read from the JAX_* variables, checked."""
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes}; expected an integer >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id}; expected an id in 0..{num_processes - 1} "
            f"for num_processes={num_processes}")
    return coordinator_address, num_processes, process_id


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: float = 300.0,
               heartbeat_timeout_s: int = 100,
               local_device_ids: Optional[Sequence[int]] = None) -> bool:
    """Start JAX's multi-process runtime; return True when more than one process runs.

    Arguments left None come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID, and when those are unset too, from JAX's cluster
    detection (SLURM, Open MPI, Kubernetes, Cloud TPU). Safe to call twice.

    Faults: a worker that cannot open a TCP connection to the coordinator
    within ``timeout_s`` raises ``CoordinatorUnreachableError`` naming the
    address; a process whose peers do not all register within ``timeout_s``
    prints which process ids it waited for and exits with status
    ``EXIT_PEERS_MISSING`` (JAX's registration blocks in C++, so no Python
    exception can be raised there). A process that dies mid-job takes the
    others down after ``heartbeat_timeout_s``.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    coordinator_address, num_processes, process_id = _job_arguments(
        coordinator_address, num_processes, process_id)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s}; expected a positive number of seconds")
    # CPU collectives (all-gathers of the accumulators) need a transport
    # between processes; gloo ships with jaxlib. Other backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = coordinator_address is not None and process_id is not None
    if explicit and process_id != 0:
        wait_for_coordinator(coordinator_address, process_id, num_processes, timeout_s)
    message = (_peers_missing_message(process_id, num_processes, coordinator_address, timeout_s)
               if explicit and num_processes else
               f"faceaudit_jax.distributed: this process did not finish registering with the "
               f"coordinator within {timeout_s:g} s; check that every process of the job started")

    def give_up():
        print(message, file=sys.stderr, flush=True)
        os._exit(EXIT_PEERS_MISSING)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own deadline sits past ours so the clear message wins the race.
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id, local_device_ids=local_device_ids,
            initialization_timeout=int(timeout_s) + 30,
            heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except ValueError as error:
        if coordinator_address is not None:
            raise
        raise ValueError(
            f"no multi-process job to join ({error}); set {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or run under a cluster JAX detects "
            "(SLURM srun, Open MPI, Kubernetes, Cloud TPU); see docs/scale.md") from None
    finally:
        watchdog.cancel()
    return jax.process_count() > 1


def is_multiprocess() -> bool:
    return jax.process_count() > 1


# --------------------------------------------------------------------------
# Config agreement
# --------------------------------------------------------------------------

def config_fingerprint(config: Any) -> str:
    """sha256 of a config's canonical JSON (ml_collections configs, dicts, strings)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    def plain(value):  # nested configs (ml_collections) as dicts, anything else by repr
        return value.to_dict() if hasattr(value, "to_dict") else repr(value)

    text = config if isinstance(config, str) else json.dumps(config, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config: Any) -> str:
    """Raise on every process unless all processes hold the same config; return its fingerprint.

    One all-gather of a 32-byte digest. The error names the processes whose
    fingerprint differs from process 0's.
    """
    fingerprint = config_fingerprint(config)
    if jax.process_count() == 1:
        return fingerprint
    digest = np.frombuffer(bytes.fromhex(fingerprint), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(digest))  # [P, 32]
    differing = [p for p in range(gathered.shape[0]) if not np.array_equal(gathered[p], gathered[0])]
    if differing:
        shown = ", ".join(f"process {p}: {gathered[p].tobytes().hex()[:12]}" for p in differing)
        raise ValueError(
            f"the processes were started with different configs: process 0 has fingerprint "
            f"{gathered[0].tobytes().hex()[:12]}, but {shown}; launch every host with the same "
            f"--config and overrides (this is process {jax.process_index()})")
    return fingerprint


# --------------------------------------------------------------------------
# Data shards and global arrays
# --------------------------------------------------------------------------

def process_shard(items, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, *,
                  uneven: bool = False) -> tuple[np.ndarray, int]:
    """(this process's contiguous block of ``items``, its offset in ``items``).

    Process p of P takes items[p * n : (p + 1) * n] with n = len(items) / P.
    The length must divide evenly: then every process runs the same number of
    batches and ``offset + position`` is a global position. One process gets
    everything at offset 0.

    ``uneven=True`` accepts any length: n = ceil(len(items) / P), so the last
    block(s) are shorter (possibly empty) and every item is kept. For loops
    with no collective per batch (the FaceX audit): each process pads its own
    last batch with masked rows, as one process does with its last batch.
    """
    items = np.asarray(items)
    if items.ndim != 1:
        raise ValueError(f"items must be a 1-D index list; got shape {items.shape}")
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process {index} of {count}; expected 0 <= index < count")
    total = items.shape[0]
    if uneven:
        size = -(-total // count)
        start = min(index * size, total)
        return items[start:min(start + size, total)], start
    if total % count:
        lower = total - total % count
        raise ValueError(
            f"{total} items cannot be split evenly over {count} processes "
            f"({total} % {count} = {total % count}); expected a multiple of {count}, "
            f"e.g. {lower or count} items")
    size = total // count
    return items[index * size:(index + 1) * size], index * size


def global_mesh(axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over every device of every process (process-major order)."""
    return Mesh(np.asarray(jax.devices()), (axis,))


def host_local_to_global(tree, mesh: Optional[Mesh] = None, axis: str = DATA_AXIS):
    """Each process's rows [n_local, ...] -> global arrays [n_local * P, ...] split over ``mesh``.

    Rows land in process order, so process p's rows are global rows
    [p * n_local, (p + 1) * n_local) (matching ``process_shard``). Every
    process must pass the same row count, a multiple of its local devices.
    """
    from faceaudit_jax.data.pipeline import shard_batch
    mesh = global_mesh(axis) if mesh is None else mesh
    return shard_batch(tree, NamedSharding(mesh, PartitionSpec(axis)))


# --------------------------------------------------------------------------
# Global reductions
# --------------------------------------------------------------------------

def allgather(tree):
    """Every leaf [...] -> numpy [P, ...], stacked in process order (one process: [1, ...])."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))


def allgather_rows(tree):
    """Each process's rows [n_p, ...] -> every process's rows [sum n_p, ...], in process order.

    The row counts n_p may differ (e.g. after a per-process filter): rows
    are padded to the largest count for the all-gather and cut back after.
    One process: the input unchanged.
    """
    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [np.asarray(leaf) for leaf in leaves]
    for leaf in leaves:
        if leaf.ndim == 0:
            raise ValueError("allgather_rows needs arrays with a leading row axis; got a scalar")
    counts = allgather(np.asarray([leaf.shape[0] for leaf in leaves]))  # [P, L]
    most = counts.max(axis=0)
    padded = [np.concatenate([leaf, np.zeros((int(m) - leaf.shape[0],) + leaf.shape[1:],
                                             leaf.dtype)]) for leaf, m in zip(leaves, most)]
    gathered = allgather(padded)  # each [P, max rows, ...]
    rows = [np.concatenate([block[p, :counts[p, i]] for p in range(block.shape[0])])
            for i, block in enumerate(gathered)]
    return jax.tree.unflatten(treedef, rows)


def global_sum(tree):
    """Leaf-wise sum over processes (the input unchanged with one process)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda g, x: jnp.asarray(g.sum(axis=0), dtype=jnp.asarray(x).dtype),
                        allgather(tree), tree)


def global_ior_state(state):
    """An ``summary.ior.IoRState`` summed over processes (sums, counts and image counts add)."""
    from faceaudit_jax.summary.ior import merge_ior_states
    if jax.process_count() == 1:
        return state
    return merge_ior_states(allgather(state))


def global_top_patch_state(state):
    """A ``summary.top_patches.TopPatchState`` merged over processes: the k best of all."""
    from faceaudit_jax.summary.top_patches import merge_top_patch_states
    if jax.process_count() == 1:
        return state
    return merge_top_patch_states(allgather(state))


def is_primary() -> bool:
    """True on process 0, the one process that writes reports, JSON and figures."""
    return jax.process_index() == 0


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if hasattr(value, "to_dict"):  # ml_collections configs
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _broadcast_bytes(data: bytes) -> bytes:
    """Process 0's ``data`` on every process (two broadcasts: the length, then the bytes)."""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int64)))
    buffer = np.zeros(max(size, 1), np.uint8)
    if is_primary():
        buffer[:size] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size].tobytes()


class PrimaryProcessError(ValueError):
    """Raised on processes 1..P-1 when a step that process 0 runs alone failed there."""


def on_primary(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run by process 0 alone; its result on every process.

    For the steps of a job that write shared files (fingerprints, reports,
    JSON, figures): the other processes never race on the same paths. The
    result must be JSON-serializable (numpy values allowed); processes
    1..P-1 get its JSON round trip (tuples as lists, numpy as lists and
    numbers). The broadcast is also a barrier: no process goes on before
    process 0 is done. If ``fn`` raises on process 0, process 0 re-raises it
    and every other process raises ``PrimaryProcessError`` with its message,
    so a bad input stops the whole job at once. With one process: just
    ``fn(*args, **kwargs)``.
    """
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    result, error, text = None, None, b""
    if is_primary():
        try:
            result = fn(*args, **kwargs)
            text = json.dumps({"result": result}, default=_json_default).encode()
        except Exception as err:  # noqa: BLE001  reported on every process below
            error = err
            text = json.dumps({"error": f"{type(err).__name__}: {err}"}).encode()
    text = _broadcast_bytes(text)
    if error is not None:
        raise error
    shared = json.loads(text)
    if "error" in shared:
        raise PrimaryProcessError(f"process 0 failed, so process {jax.process_index()} stops: "
                                  f"{shared['error']}")
    return result if is_primary() else shared["result"]


def broadcast_from_primary(tree):
    """Process 0's arrays on every process (numpy leaves); one process: ``tree`` unchanged.

    Every process then holds bit-identical values even where the processes'
    own computations could differ in the last bits (e.g. a model trained on
    each host with different convolution algorithms).
    """
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(jax.device_get(tree)))


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


__all__ = [
    "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "EXIT_PEERS_MISSING", "DATA_AXIS",
    "CoordinatorUnreachableError", "multihost_requested", "wait_for_coordinator", "initialize",
    "is_multiprocess", "config_fingerprint", "check_same_config", "process_shard",
    "global_mesh", "host_local_to_global", "allgather", "allgather_rows", "global_sum", "global_ior_state",
    "global_top_patch_state", "is_primary", "PrimaryProcessError", "on_primary",
    "broadcast_from_primary", "barrier",
]
