"""Starting and stopping the processes of tests/multihost_worker.py (shared by the tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # The worker (or the launch script) sets the devices per process itself; the
    # other test-wide flags (conftest.py: compile options) are passed on.
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))
    # Programs compiled by one run are reused by the next (process 0's at least:
    # JAX keys them by device ids and only process 0 writes).
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def without_device_count(xla_flags: str) -> str:
    """``xla_flags`` less any --xla_force_host_platform_device_count."""
    return " ".join(f for f in xla_flags.split()
                    if not f.startswith("--xla_force_host_platform_device_count"))


def start(mode: str, out_dir: Path, num_processes: int, cache_dir: Path, *extra,
          port: int | None = None, process_ids=None) -> list[subprocess.Popen]:
    port = free_port() if port is None else port
    procs = []
    for pid in (range(num_processes) if process_ids is None else process_ids):
        log = open(out_dir / f"{mode}_log{pid}.txt", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(out_dir), str(pid), str(num_processes),
             str(port), *map(str, extra)],
            stdout=log, stderr=subprocess.STDOUT, env=worker_env(cache_dir), cwd=str(ROOT)))
    return procs


def log_tail(out_dir: Path, mode: str, chars: int = 3000) -> str:
    texts = [f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
             for p in sorted(out_dir.glob(f"{mode}_log*.txt"))]
    return "\n".join(texts)


def wait_all(procs, out_dir: Path, mode: str, timeout: float = 600) -> list[int]:
    """Exit codes; on a timeout every process is killed and the logs are shown."""
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        kill_all(procs)
        raise AssertionError(f"{mode} workers timed out\n{log_tail(out_dir, mode)}")
    return codes


def kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait()


def load(out_dir: Path, name: str, process: int) -> dict:
    with np.load(out_dir / f"{name}_p{process}.npz") as data:
        return {k: data[k] for k in data.files}
