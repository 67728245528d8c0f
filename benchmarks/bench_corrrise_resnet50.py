"""CorrRISE at the paper's model size: a ResNet-50 embedder at 112 px, JAX vs PyTorch.

1. RATIO torch_over_jax resnet50 = torch_time / jax_time (higher favours
   JAX): one pair's CorrRISE with N masks (`explain.corrrise.corrrise`, one
   device) against a FAME-style batched PyTorch implementation of the same
   algorithm (masks in chunks of 32, both images, Pearson maps as one centred
   matmul) on the same architecture rebuilt in torch: ResNet-50 v1.5
   (bottleneck stride on the 3x3 conv), BatchNorm in eval mode, flatten ->
   BatchNorm -> Linear(128) -> BatchNorm head as in `models.embedder`.
   Random weights on both sides: only the cost is compared. Timed
   alternately (JAX, torch, JAX, torch, ...), best of --repeats, after a
   warm-up call of each; needs torch (the optional extra), otherwise the
   ratio is skipped with a message.
   Also RATIO torch_forwards_over_jax_forwards resnet50: the 2N masked
   forwards alone, to separate the frameworks' convolutions from the
   algorithm.
2. Peak memory flat in masks and pairs (small_resnet, fresh processes):
   RATIO peak_rss_masks_4x_over_1x (one pair, 4N vs N masks) and
   RATIO peak_rss_pairs_4x_over_1x (a `sweeps.run_sweep` over 4P vs P
   pairs in groups of 4, maps written per chunk to disk, keep_outputs=False).

    python benchmarks/bench_corrrise_resnet50.py                 # N = 64 masks
    python benchmarks/bench_corrrise_resnet50.py --num-masks 500 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_corrrise import (IMAGE_SIZE, build_embed_fn, fame_style_corrrise,  # noqa: E402
                            interleaved_best_times, test_pair)

from faceaudit_jax.explain import corrrise as cr  # noqa: E402
from faceaudit_jax.models import resnet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_resnet50_embedder(embedding_dim: int = 128):
    """torch ResNet-50 v1.5 embedder with the layout of `models.embedder` (eval mode)."""
    import torch
    from torch import nn as tnn

    kw = resnet.backbone_kwargs("resnet50")

    class Bottleneck(tnn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            out = 4 * width
            self.body = tnn.Sequential(
                tnn.Conv2d(cin, width, 1, bias=False), tnn.BatchNorm2d(width), tnn.ReLU(),
                tnn.Conv2d(width, width, 3, stride, 1, bias=False), tnn.BatchNorm2d(width),
                tnn.ReLU(), tnn.Conv2d(width, out, 1, bias=False), tnn.BatchNorm2d(out))
            self.down = None
            if stride != 1 or cin != out:
                self.down = tnn.Sequential(tnn.Conv2d(cin, out, 1, stride, bias=False),
                                           tnn.BatchNorm2d(out))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers = [tnn.Conv2d(3, kw["stem_width"], 7, 2, 3, bias=False),
              tnn.BatchNorm2d(kw["stem_width"]), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
    cin = kw["stem_width"]
    for blocks, width, stride in zip(kw["stage_sizes"], kw["widths"], kw["stage_strides"]):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    backbone = tnn.Sequential(*layers)
    with torch.no_grad():
        fmap = backbone(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    model = tnn.Sequential(backbone, tnn.BatchNorm2d(cin), tnn.Flatten(),
                           tnn.Linear(fmap[0].numel(), embedding_dim),
                           tnn.BatchNorm1d(embedding_dim)).eval()
    mean = torch.tensor(kw["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(kw["std"]).view(1, 3, 1, 1)
    return lambda x: model((x - mean) / std)


def speed(num_masks: int, chunk_size: int, repeats: int) -> None:
    embed_fn = build_embed_fn("resnet50")
    a, b = test_pair()
    key = jax.random.PRNGKey(0)
    device = jax.devices()[:1]
    masks = cr.generate_masks(key, num_masks, IMAGE_SIZE)
    masked = jnp.concatenate([a[None] * masks[..., None], b[None] * masks[..., None]])
    batches = jax.block_until_ready(masked.reshape(
        (num_masks // chunk_size, 2 * chunk_size) + masked.shape[1:]))
    forwards = jax.jit(lambda x: jax.lax.map(embed_fn, x))
    fns = {
        "jax corrrise": lambda: cr.corrrise(embed_fn, a, b, key, num_masks=num_masks,
                                            chunk_size=chunk_size, devices=device),
        "jax forwards": lambda: forwards(batches),
    }
    try:
        import torch
        model = torch_resnet50_embedder()
        ta, tb = (torch.from_numpy(np.array(x)).permute(2, 0, 1)[None] for x in (a, b))
        tmasks = torch.from_numpy(np.array(masks))

        def torch_forwards():
            with torch.no_grad():
                for chunk in tmasks.split(32):
                    model(ta * chunk[:, None])
                    model(tb * chunk[:, None])

        fns["torch corrrise"] = lambda: fame_style_corrrise(model, ta, tb, tmasks)
        fns["torch forwards"] = torch_forwards
        torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        torch_note = None
    times = interleaved_best_times(fns, repeats)
    for name, seconds in times.items():
        print(f"{name}: {seconds:.3f} s ({2 * num_masks / seconds:.1f} masked images/s)",
              flush=True)
    if torch_note is None:
        print("SKIP torch_over_jax resnet50: torch is not installed (pip install torch)")
        return
    print(f"({torch_note}; jax {jax.__version__} on {jax.default_backend()})")
    print(f"RATIO torch_over_jax resnet50 = {times['torch corrrise'] / times['jax corrrise']:.3f}")
    print(f"RATIO torch_forwards_over_jax_forwards resnet50 = "
          f"{times['torch forwards'] / times['jax forwards']:.3f}", flush=True)


_MEMORY_CHILD = """
import json, resource, sys, jax, numpy as np
sys.path.insert(0, {bench!r})
import bench_corrrise as b
from faceaudit_jax import sweeps
from faceaudit_jax.explain import corrrise as cr
embed_fn = b.build_embed_fn("small_resnet")
a, c = b.test_pair()
A, C = np.stack([np.asarray(a)] * 4), np.stack([np.asarray(c)] * 4)
def chunk(idx):
    s_a, s_b = cr.corrrise_batch(embed_fn, A[idx % 4], C[idx % 4], jax.random.PRNGKey(0),
                                 num_masks={masks}, chunk_size=32, devices=jax.devices()[:1])
    return {{"s_a": np.asarray(s_a), "s_b": np.asarray(s_b)}}
sweeps.run_sweep(chunk, {pairs}, 4, {directory!r}, keep_outputs=False)
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent at
# fork, so a child of a parent that holds the ResNet-50s would report the parent's peak.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"rss": rss}}))
"""


def peak_rss(pairs: int, masks: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        code = _MEMORY_CHILD.format(bench=os.path.dirname(os.path.abspath(__file__)),
                                    masks=masks, pairs=pairs, directory=directory)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-masks", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.num_masks % args.chunk_size:
        parser.error("--num-masks must be a multiple of --chunk-size (equal batches)")
    if not args.skip_speed:
        print(f"CorrRISE, resnet50 embedder at {IMAGE_SIZE} px, N = {args.num_masks} masks, "
              f"chunk {args.chunk_size}, {os.cpu_count()} CPU cores", flush=True)
        speed(args.num_masks, args.chunk_size, args.repeats)
    if args.skip_memory:
        return
    base = {"pairs": 4, "masks": 64}
    rss = {"1x": peak_rss(**base), "masks 4x": peak_rss(4, 256), "pairs 4x": peak_rss(16, 64)}
    print("peak RSS (small_resnet, fresh processes): " + ", ".join(
        f"{k} {v:.0f} MiB" for k, v in rss.items()) + " (1x = 4 pairs x 64 masks)")
    print(f"RATIO peak_rss_masks_4x_over_1x = {rss['masks 4x'] / rss['1x']:.3f}")
    print(f"RATIO peak_rss_pairs_4x_over_1x = {rss['pairs 4x'] / rss['1x']:.3f}", flush=True)


if __name__ == "__main__":
    main()
