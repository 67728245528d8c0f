"""FaceX audit throughput: one process vs several processes on this machine.

The whole audit (`summary.audit.audit`: synthetic rendering, ResNet CAMs,
IoR by predicted and true class, running top-k patches, the global
reduction at the end) over the same images, run

- by one process that sees every CPU core (the default single-process path),
- by P processes of one `jax.distributed` job (gloo on localhost), each
  auditing its block of the images, each pinned to cores / P of the cores.

Each run audits one batch per process first (compilation), then times the
audit of the measured images. Prints images/s of each and
``RATIO multiprocess_over_single = x`` (throughput of P processes / one
process). On one machine both runs share the same cores, so a ratio near 1
means the multi-process path costs nothing; above 1, the processes overlap
host-side work (rendering dispatch, Python) that one process runs serially.
The gain that matters comes from more hosts.

    python benchmarks/bench_multihost.py                   # resnet18, 512 px, 16 images, P = 2
    python benchmarks/bench_multihost.py --resolution 128 --images 32 --model small_resnet
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One process of a run: audit, print a JSON line from process 0."""
    if args.num_processes > 1 and hasattr(os, "sched_setaffinity"):
        # Each process gets its own share of the cores, as separate hosts would.
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // args.num_processes)
        mine = cores[args.process_id * share:(args.process_id + 1) * share] or cores[-share:]
        os.sched_setaffinity(0, mine)
    import jax
    import ml_collections
    import numpy as np

    from faceaudit_jax import distributed
    from faceaudit_jax.data import pipeline
    from faceaudit_jax import classifiers
    from faceaudit_jax.summary import audit as audit_lib
    from faceaudit_jax.models.resnet import build_model, init_variables

    if args.num_processes > 1:
        distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                               timeout_s=120)
    model = build_model(args.model, 1)
    clf = classifiers.TrainedClassifier(model, init_variables(model, jax.random.key(0),
                                                             args.resolution), args.model, "")
    explain_cfg = ml_collections.ConfigDict(dict(
        target_mode="predicted", method="grad_cam", top_k=20, num_overlays=1,
        ior_mode="soft", patch_size=16))
    source = pipeline.SyntheticSource(seed=0, resolution=args.resolution)
    warm = np.arange(args.batch_size * args.num_processes)
    audit_lib.audit(clf, source, warm, "Male", explain_cfg, args.batch_size, desc="warm-up")
    distributed.barrier("timed audit")
    start = time.perf_counter()
    result = audit_lib.audit(clf, source, np.arange(1000, 1000 + args.images), "Male", explain_cfg,
                         args.batch_size, desc="audit")
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"seconds": seconds, "images": result.num_images,
                                      "processes": jax.process_count(),
                                      "devices": jax.device_count()}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, num_processes: int) -> dict:
    port = free_port()
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1")
        cmd = [sys.executable, __file__, "--child", "--num-processes", str(num_processes),
               "--process-id", str(pid), "--port", str(port), "--model", args.model,
               "--resolution", str(args.resolution), "--images", str(args.images),
               "--batch-size", str(args.batch_size)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a {num_processes}-process run failed: {[o[-2000:] for o in outputs]}")
    line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.images % (args.batch_size * args.num_processes):
        raise SystemExit(f"--images {args.images} must be a multiple of batch size x processes "
                         f"({args.batch_size * args.num_processes})")
    print(f"FaceX audit, {args.model} at {args.resolution} px, {args.images} images, batch "
          f"{args.batch_size}, {os.cpu_count()} CPU cores", flush=True)
    single = launch(args, 1)
    multi = launch(args, args.num_processes)
    rates = {}
    for name, run in (("1 process", single), (f"{args.num_processes} processes", multi)):
        rates[name] = run["images"] / run["seconds"]
        print(f"{name} ({run['devices']} device(s) in all): {run['images']} images in "
              f"{run['seconds']:.2f} s = {rates[name]:.2f} images/s", flush=True)
    print(f"RATIO multiprocess_over_single = "
          f"{rates[f'{args.num_processes} processes'] / rates['1 process']:.3f}", flush=True)


if __name__ == "__main__":
    main()
