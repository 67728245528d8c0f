"""Cost of the data-set reductions (IoR + top-k patches) and their memory footprint.

1. Time: at 512 px, one batch through the CAM stage (ResNet-18 forward + head
   VJP + upsampling) vs the same batch through the summary stage as the audit
   runs it (IoR accumulated by predicted and by true class, plus the running
   top-k patch merge), interleaved, median of repeats:
   ``RATIO summary_over_cam res=512 = x`` (target <= 0.10).
2. Memory: the whole streaming pipeline (CAM + IoR + top-k) over N and 4N
   images, each in a fresh subprocess, peak resident memory (max RSS):
   ``RATIO peak_rss_4x_over_1x = x`` (target < 1.10).

    python benchmarks/bench_summary.py
    python benchmarks/bench_summary.py --images 16 --memory-resolution 128   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from faceaudit_jax.explain import cams
from faceaudit_jax.models import build_model, classifier_fns, init_variables
from faceaudit_jax.regions import NUM_REGIONS
from faceaudit_jax.summary.ior import IoRAccumulator
from faceaudit_jax.summary.top_patches import TopPatchAccumulator


def _pipeline(model_name: str, resolution: int):
    model = build_model(model_name, 1)
    variables = init_variables(model, jax.random.key(0), resolution)
    features_fn, head_fn = classifier_fns(model, variables)
    return cams.make_cam_fn(features_fn, head_fn, cams.make_binary_target("predicted"),
                            return_logits=True)


def _batch(key, batch_size: int, resolution: int):
    """Random images, parse maps made of blocks of region ids (like a face parse), labels."""
    k_img, k_parse, k_lab = jax.random.split(key, 3)
    images = jax.random.uniform(k_img, (batch_size, resolution, resolution, 3))
    coarse = jax.random.randint(k_parse, (batch_size, 16, 16), 0, NUM_REGIONS)
    parse = jnp.repeat(jnp.repeat(coarse, resolution // 16, 1), resolution // 16, 2)
    labels = jax.random.randint(k_lab, (batch_size,), 0, 2)
    return images, parse.astype(jnp.int32), labels


class _Summary:
    """The audit's reductions for one batch: IoR by predicted and true class, top-k."""

    def __init__(self, k: int = 20):
        self.by_pred = IoRAccumulator.init(NUM_REGIONS, 2)
        self.by_true = IoRAccumulator.init(NUM_REGIONS, 2)
        self.top = TopPatchAccumulator.init(k, NUM_REGIONS)
        self.offset = 0

    def update(self, maps, logits, parse, labels):
        predicted = (logits[:, 0] >= 0).astype(jnp.int32)
        self.by_pred = IoRAccumulator.update(self.by_pred, maps, parse, predicted)
        self.by_true = IoRAccumulator.update(self.by_true, maps, parse, labels)
        ids = jnp.arange(self.offset, self.offset + maps.shape[0])
        self.top = TopPatchAccumulator.update(self.top, maps, parse, ids, patch_size=16)
        self.offset += maps.shape[0]
        return self.by_pred, self.by_true, self.top


def time_ratio(model_name: str, resolution: int, batch_size: int, repeats: int) -> None:
    cam_fn = _pipeline(model_name, resolution)
    images, parse, labels = _batch(jax.random.key(1), batch_size, resolution)
    summary = _Summary()
    maps, logits = jax.block_until_ready(cam_fn(images))
    jax.block_until_ready(summary.update(maps, logits, parse, labels))  # compile
    cam_t, sum_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        maps, logits = jax.block_until_ready(cam_fn(images))
        cam_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(summary.update(maps, logits, parse, labels))
        sum_t.append(time.perf_counter() - start)
    cam_s, sum_s = statistics.median(cam_t), statistics.median(sum_t)
    print(f"res={resolution} batch={batch_size}: CAM stage {1000 * cam_s:.1f} ms, "
          f"IoR x2 + top-k {1000 * sum_s:.1f} ms per batch")
    print(f"RATIO summary_over_cam res={resolution} = {sum_s / cam_s:.4f}", flush=True)


def child(model_name: str, resolution: int, batch_size: int, num_images: int) -> None:
    """Stream ``num_images`` through CAM + reductions; print the peak RSS as JSON."""
    cam_fn = _pipeline(model_name, resolution)
    summary = _Summary()
    key = jax.random.key(2)
    for step in range(num_images // batch_size):
        images, parse, labels = _batch(jax.random.fold_in(key, step), batch_size, resolution)
        maps, logits = cam_fn(images)
        summary.update(maps, logits, parse, labels)
    jax.block_until_ready(summary.top)
    IoRAccumulator.finalize(summary.by_pred)
    TopPatchAccumulator.finalize(summary.top)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"num_images": num_images, "peak_rss_mib": peak_kib / 1024}))


def memory_ratio(model_name: str, resolution: int, batch_size: int, num_images: int) -> None:
    peaks = {}
    for n in (num_images, 4 * num_images):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--model", model_name,
             "--memory-resolution", str(resolution), "--memory-batch-size", str(batch_size)],
            check=True, capture_output=True, text=True)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
        print(f"{n} images at {resolution} px (batch {batch_size}): peak RSS {peaks[n]:.1f} MiB",
              flush=True)
    print(f"RATIO peak_rss_4x_over_1x = {peaks[4 * num_images] / peaks[num_images]:.4f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=32, help="N for the memory test (1x)")
    parser.add_argument("--memory-resolution", type=int, default=224)
    parser.add_argument("--memory-batch-size", type=int, default=8)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.model, args.memory_resolution, args.memory_batch_size, args.child)
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, model {args.model}")
    time_ratio(args.model, args.resolution, args.batch_size, args.repeats)
    if not args.skip_memory:
        memory_ratio(args.model, args.memory_resolution, args.memory_batch_size, args.images)


if __name__ == "__main__":
    main(sys.argv[1:])
