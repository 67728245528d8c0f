"""FaceX audit reading JPEG files vs the same audit on preloaded arrays, and decoder scaling.

Writes a generic-layout folder (``data.sources.GENERIC_LAYOUT``) of rendered
synthetic faces as 512 px JPEGs with label-PNG parse maps, then:

1. The FaceX audit (``summary.audit.audit``: Grad-CAM + IoR + top-k
   patches; a small_resnet at ``--resolution``, random weights: the cost
   does not depend on them) over every image, streaming from the files
   (decode + resize in ``data.num_workers`` threads, prefetched while the
   model runs) vs over the same decoded arrays held in memory:
   ``RATIO audit_files_over_preloaded res=R = x`` (goal >= 0.8).
2. Decoding alone (JPEG + parse PNG, crop, resize) vs worker threads:
   ``decode workers=w: n images/s`` and ``RATIO decode_w{w}_over_w1 = x``.

    python benchmarks/bench_input.py
    python benchmarks/bench_input.py --images 64 --repeats 2      # quicker
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the audit's progress bar would interleave with the lines
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

from faceaudit_jax.data import fixtures, sources
from faceaudit_jax import classifiers
from faceaudit_jax.summary import audit as audit_lib
from faceaudit_jax.models import build_model, init_variables


class Preloaded:
    """The same images as arrays in memory: what the audit costs without any file I/O."""

    name = "preloaded"
    prefetch = 0

    def __init__(self, source, rows):
        batch = source.batch(rows)
        self.arrays = {k: batch[k] for k in ("image", "parse", "attrs")}
        self.resolution = source.resolution

    def batch(self, rows):
        rows = np.asarray(rows)
        return {k: v[rows] for k, v in self.arrays.items()}


def write_folder(root: str, num_images: int, chunk: int = 16) -> None:
    """Rendered 512 px faces as JPEGs, written chunk by chunk (the renderer compiles once)."""
    os.makedirs(root, exist_ok=True)
    parts = [fixtures.render_faces(chunk, 512, offset=i) for i in range(0, num_images, chunk)]
    faces = {k: np.concatenate([p[k] for p in parts])
             for k in ("image", "parse", "attrs", "identity", "group", "landmarks")}
    fixtures.write_folder(root, faces, masks="labels", pairs=False, image_format="jpg")


def timed_audit(clf, source, rows, explain_cfg, batch_size: int) -> float:
    start = time.perf_counter()
    result = audit_lib.audit(clf, source, rows, "Male", explain_cfg, batch_size, desc="bench")
    np.asarray(result.ior)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--audit-workers", type=int, default=0,
                        help="decoding threads during the audit (0: min(8, CPU count))")
    args = parser.parse_args()

    print(f"devices: {jax.devices()}; CPU count {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_folder(root, args.images)
        print(f"wrote {args.images} 512 px JPEG faces in {time.perf_counter() - start:.1f} s")
        cfg = ml_collections.ConfigDict({"source": "folder", "root": root,
                                         "resolution": args.resolution})
        sources.add_data_fields(cfg, num_workers=args.audit_workers)
        files = sources.build_source(cfg)
        rows = np.arange(len(files))
        memory = Preloaded(files, rows)

        model = build_model("small_resnet", 1)
        variables = init_variables(model, jax.random.key(0), args.resolution)
        clf = classifiers.TrainedClassifier(model, variables, "bench", root)
        explain_cfg = ml_collections.ConfigDict({
            "method": "grad_cam", "target_mode": "predicted", "ior_mode": "soft",
            "patch_size": 16, "top_k": 20, "num_overlays": 1})
        timed_audit(clf, memory, rows[:args.batch_size], explain_cfg, args.batch_size)  # compile
        file_times, memory_times = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            file_times.append(timed_audit(clf, files, rows, explain_cfg, args.batch_size))
            memory_times.append(timed_audit(clf, memory, rows, explain_cfg, args.batch_size))
        t_files, t_memory = statistics.median(file_times), statistics.median(memory_times)
        print(f"audit images/s from files = {args.images / t_files:.1f} (median of {args.repeats}; "
              f"{files.num_workers} decoding threads, {files.prefetch} batches prefetched)")
        print(f"audit images/s from memory = {args.images / t_memory:.1f}")
        print(f"RATIO audit_files_over_preloaded res={args.resolution} = {t_memory / t_files:.2f}")

        rates = {}
        for workers in args.workers:
            source = files.with_resolution(args.resolution)
            source.num_workers, source._pool = workers, None
            source.batch(rows[:workers])  # start the threads
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for begin in range(0, rows.size, args.batch_size):
                    source.batch(rows[begin:begin + args.batch_size])
                times.append(time.perf_counter() - start)
            rates[workers] = args.images / statistics.median(times)
            print(f"decode images/s workers={workers} = {rates[workers]:.1f} "
                  f"(512 px JPEG + label PNG -> {args.resolution} px)")
        base = rates[args.workers[0]]
        for workers, rate in rates.items():
            print(f"RATIO decode_w{workers}_over_w{args.workers[0]} = {rate / base:.2f}")


if __name__ == "__main__":
    main()
