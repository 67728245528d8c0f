"""CorrRISE speed and memory, measured side by side in one process.

1. RATIO corrrise_over_forwards = forward_time / corrrise_time (higher is
   better; 1.0 means mask generation, masking and the correlation cost
   nothing on top of the 2N forward passes). forward_time embeds the same
   2N = 1000 masked 112 x 112 images (built beforehand) with the same
   embed_fn, in the same batches (2 x chunk_size) inside one jitted lax.map;
   corrrise_time is one pair's `corrrise` with N = 500 masks. Goal >= 0.85.
2. RATIO peak_rss_n4000_over_n500: peak resident memory of a fresh process
   running CorrRISE with N = 4000 vs N = 500 (memory flat in N: ~1.0; the
   mask stack alone would be 4000 x 112 x 112 x 4 B = 200 MB).
3. RATIO torch_over_jax = torch_time / jax_corrrise_time (goal >= 1): a
   batched PyTorch implementation of the same algorithm (masks in chunks of
   32, as AIML-IfI/fame does) with the same architecture rebuilt in torch
   (random weights), when torch is importable; otherwise it is skipped with
   a message. The torch time is measured after the JAX one (one warm-up run,
   then one timed run), so it is more exposed to load changes.

Usage: python benchmarks/bench_corrrise.py [--model small_resnet] [--repeats 3]
       [--skip-memory]. Runs on whatever JAX backend is present (one device).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.explain import corrrise as cr
from faceaudit_jax.models import embedder as E
from faceaudit_jax.models import resnet

IMAGE_SIZE = 112


def build_embed_fn(model_name: str, seed: int = 0):
    model = E.build_embedder(model_name, 128)
    variables = resnet.init_variables(model, jax.random.PRNGKey(seed), IMAGE_SIZE)
    return E.embedder_fns(model, variables)[2]


def test_pair(seed: int = 1):
    key_a, key_b = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.uniform(key_a, (IMAGE_SIZE, IMAGE_SIZE, 3))
    b = jnp.clip(a + 0.1 * jax.random.normal(key_b, a.shape), 0.0, 1.0)
    return a, b


def interleaved_best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, measured in alternation (A, B, A, B, ...)
    so a change in machine load hits all of them alike. Compiles first."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def speed(model_name: str, num_masks: int, chunk_size: int, repeats: int) -> dict:
    embed_fn = build_embed_fn(model_name)
    a, b = test_pair()
    key = jax.random.PRNGKey(0)
    device = jax.devices()[:1]

    # The 2N masked images CorrRISE will embed, in its batches of 2 x chunk.
    masks = cr.generate_masks(key, num_masks, IMAGE_SIZE)
    masked = jnp.concatenate([a[None] * masks[..., None], b[None] * masks[..., None]])
    batches = masked.reshape((2 * num_masks // (2 * chunk_size), 2 * chunk_size)
                             + masked.shape[1:])
    batches = jax.block_until_ready(batches)
    forwards = jax.jit(lambda x: jax.lax.map(embed_fn, x))

    times = interleaved_best_times({
        "forward": lambda: forwards(batches),
        "corrrise": lambda: cr.corrrise(embed_fn, a, b, key, num_masks=num_masks,
                                        chunk_size=chunk_size, devices=device),
    }, repeats)
    return {"forward_time": times["forward"], "corrrise_time": times["corrrise"],
            "images_per_s": 2 * num_masks / times["forward"]}


def peak_rss_child(model_name: str, num_masks: int, chunk_size: int) -> float:
    """Runs one CorrRISE in a fresh process; returns its peak RSS in MiB."""
    code = f"""
import json, resource, jax
import benchmarks.bench_corrrise as b
from faceaudit_jax.explain import corrrise as cr
embed_fn = b.build_embed_fn({model_name!r})
a, c = b.test_pair()
maps = cr.corrrise(embed_fn, a, c, jax.random.PRNGKey(0), num_masks={num_masks},
                   chunk_size={chunk_size}, devices=jax.devices()[:1])
jax.block_until_ready(maps)
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=root, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss"]


def torch_embedder(model_name: str, embedding_dim: int = 128):
    """The same architecture as `build_embed_fn` in PyTorch (random weights:
    only the cost matters). Basic-block ResNets only (small_resnet, resnet18/34)."""
    import torch
    from torch import nn as tnn

    kw = resnet.backbone_kwargs(model_name)
    if kw["block"] != "basic":
        raise ValueError(f"the torch comparison supports basic-block models, not {model_name}")
    head = E.build_embedder(model_name, embedding_dim)

    def norm(channels, kind=kw["norm"], groups=kw["norm_groups"]):
        return tnn.GroupNorm(groups, channels) if kind == "group" else tnn.BatchNorm2d(channels)

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.norm1 = norm(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.norm2 = norm(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                           norm(cout))

        def forward(self, x):
            y = torch.relu(self.norm1(self.conv1(x)))
            y = self.norm2(self.conv2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers = []
    if kw["stem"] == "imagenet":
        layers += [tnn.Conv2d(3, kw["stem_width"], 7, 2, 3, bias=False), norm(kw["stem_width"]),
                   tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
    else:
        layers += [tnn.Conv2d(3, kw["stem_width"], 3, 2, 1, bias=False), norm(kw["stem_width"]),
                   tnn.ReLU()]
    cin = kw["stem_width"]
    for blocks, width, stride in zip(kw["stage_sizes"], kw["widths"], kw["stage_strides"]):
        for i in range(blocks):
            layers.append(Block(cin, width, stride if i == 0 else 1))
            cin = width
    backbone = tnn.Sequential(*layers)
    with torch.no_grad():
        fmap = backbone(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    head_layers = [norm(cin, head.head_norm, head.head_groups), tnn.Flatten(),
                   tnn.Linear(fmap[0].numel(), embedding_dim)]
    if head.head_norm == "batch":
        head_layers.append(tnn.BatchNorm1d(embedding_dim))
    mean = torch.tensor(kw["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(kw["std"]).view(1, 3, 1, 1)
    model = tnn.Sequential(backbone, *head_layers).eval()
    return lambda x: model((x - mean) / std)


def fame_style_corrrise(model, a, b, masks):
    """FAME's layout: masks in chunks of 32, both images, then Pearson maps."""
    import torch
    num_masks = masks.shape[0]
    with torch.no_grad():
        ea, eb = model(a), model(b)
        scores_a, scores_b = [], []
        for chunk in masks.split(32):
            m = chunk[:, None]
            scores_a.append(torch.nn.functional.cosine_similarity(model(a * m), eb))
            scores_b.append(torch.nn.functional.cosine_similarity(model(b * m), ea))
        flat = masks.reshape(num_masks, -1)
        flat = flat - flat.mean(0)
        maps = []
        for s in (torch.cat(scores_a), torch.cat(scores_b)):
            s = s - s.mean()
            maps.append((s @ flat) / (s.norm() * flat.norm(dim=0)).clamp_min(1e-12))
    return maps


def torch_comparison(model_name: str, num_masks: int, jax_time: float,
                     jax_forward_time: float) -> None:
    try:
        import torch
    except ImportError:
        print("SKIP torch_over_jax: torch is not installed (pip install torch to compare "
              "with a batched PyTorch CorrRISE, masks in chunks of 32)")
        return
    model = torch_embedder(model_name)
    a, b = (torch.from_numpy(np.array(x)).permute(2, 0, 1)[None] for x in test_pair())
    masks = torch.from_numpy(np.array(cr.generate_masks(jax.random.PRNGKey(0), num_masks,
                                                          IMAGE_SIZE)))

    def torch_corrrise():
        return fame_style_corrrise(model, a, b, masks)

    @torch.no_grad()
    def torch_forwards():
        # The same 2N masked images through the model, nothing else: separates
        # the framework's convolution speed from the algorithm's overhead.
        for chunk in masks.split(32):
            model(a * chunk[:, None])
            model(b * chunk[:, None])

    # torch returns tensors that are ready when the call returns (block_until_ready is a no-op).
    times = interleaved_best_times({"corrrise": torch_corrrise, "forwards": torch_forwards}, repeats=3)
    torch_time, torch_forward_time = times["corrrise"], times["forwards"]
    print(f"torch corrrise ({torch.__version__}, {torch.get_num_threads()} threads): "
          f"{torch_time:.3f} s; its 2N forwards alone {torch_forward_time:.3f} s")
    print(f"RATIO torch_over_jax = {torch_time / jax_time:.3f}")
    print(f"RATIO torch_forwards_over_jax_forwards = {torch_forward_time / jax_forward_time:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--num-masks", type=int, default=500)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.num_masks % args.chunk_size:
        parser.error("--num-masks must be a multiple of --chunk-size (equal batches)")

    print(f"backend {jax.default_backend()}, model {args.model}, {IMAGE_SIZE} px, "
          f"N = {args.num_masks}, chunk {args.chunk_size} masks ({2 * args.chunk_size} images)")
    result = speed(args.model, args.num_masks, args.chunk_size, args.repeats)
    print(f"2N forwards: {result['forward_time']:.3f} s "
          f"({result['images_per_s']:.0f} images/s); "
          f"corrrise: {result['corrrise_time']:.3f} s")
    print(f"RATIO corrrise_over_forwards = "
          f"{result['forward_time'] / result['corrrise_time']:.3f}")

    if not args.skip_memory:
        rss_small = peak_rss_child(args.model, 500, args.chunk_size)
        rss_large = peak_rss_child(args.model, 4000, args.chunk_size)
        print(f"peak RSS: N=500 {rss_small:.0f} MiB, N=4000 {rss_large:.0f} MiB "
              f"(a materialised N=4000 mask stack alone: "
              f"{4000 * IMAGE_SIZE * IMAGE_SIZE * 4 / 2**20:.0f} MiB)")
        print(f"RATIO peak_rss_n4000_over_n500 = {rss_large / rss_small:.3f}")

    torch_comparison(args.model, args.num_masks, result["corrrise_time"], result["forward_time"])


if __name__ == "__main__":
    main()
