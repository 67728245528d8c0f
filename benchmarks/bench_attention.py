"""Speed of ViT attention explanations and of the masked-pair evaluation, as ratios.

Measured side by side in one process on the same model and batch:

- attention maps for a batch / the embedding forward pass of the same batch,
  for every method of ``explain.attention`` (goal: <= 1.2 for rollout, <= 3
  for the gradient methods), and for ``pair_attention_maps`` (2B images) /
  the forward pass of those 2B images;
- ``fv_heatmaps.evaluate_masks`` (all K = 3 masks of B pairs in one jitted
  call, 2B + 2KB images) / the forward pass of those 2B + 2KB images, and K
  separate calls (one per technique) / the single call;
- ``fv_heatmaps.explain_pairs`` (binarise + masks + evaluation + heatmaps) /
  ``evaluate_masks`` alone;
- XLA's cost model (flops, bytes accessed) of each map method's compiled
  program / the forward's: free of the timing noise of a shared CPU.

Every function is compiled (warm-up) before timing; the two sides of a ratio
are timed alternately, ``--repeats`` rounds with ``block_until_ready``; the
ratio of the fastest runs is printed first (see ``paired_ratio``).

    python benchmarks/bench_attention.py [--config vit_tiny_face] [--batch 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.explain import attention, fv_heatmaps
from faceaudit_jax.models import vit


def paired_ratio(fn_a, fn_b, repeats: int) -> tuple[float, float, float, float]:
    """time(a) / time(b), a and b timed back to back in every round.

    On a CPU shared with other jobs, interference only ever adds time, so the
    primary figure is the ratio of the fastest runs (min / min, as ``timeit``
    advises); the median over rounds of the per-round ratio is returned too.
    Returns (min ratio, median ratio, min time a, min time b), times in seconds.
    """
    jax.block_until_ready(fn_a())
    jax.block_until_ready(fn_b())
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, sink in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            sink.append(time.perf_counter() - start)
    times_a, times_b = np.asarray(times_a), np.asarray(times_b)
    return (float(times_a.min() / times_b.min()), float(np.median(times_a / times_b)),
            float(times_a.min()), float(times_b.min()))


def report(name: str, result) -> None:
    ratio, median_ratio, t_a, t_b = result
    print(f"RATIO {name} = {ratio:.2f}  (median of rounds {median_ratio:.2f}; "
          f"{t_a * 1e3:.1f} ms vs {t_b * 1e3:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_tiny_face", choices=sorted(vit.VIT_CONFIGS))
    parser.add_argument("--batch", type=int, default=8, help="pairs (maps use 2x images)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    model = vit.build_vit(args.config)
    size = model.config.image_size
    keys = jax.random.split(jax.random.key(0), 3)
    probes = jax.random.uniform(keys[0], (args.batch, size, size, 3))
    galleries = jax.random.uniform(keys[1], (args.batch, size, size, 3))
    images = jnp.concatenate([probes, galleries])  # 2B images for the map timings
    params = jax.jit(model.init)(keys[2], probes)
    apply_fn = vit.ViTApply(model)
    embed = jax.jit(lambda p, x: model.apply(p, x)[0])

    def embed_fn(p, x):  # static for evaluate_masks / explain_pairs
        return model.apply(p, x)[0]

    print(f"device: {jax.devices()[0].device_kind}, config {args.config} "
          f"({model.config.num_layers} layers, T={model.config.num_tokens}), "
          f"{images.shape[0]} images of {size} px")

    def forward():
        return embed(params, images)

    others = jax.lax.stop_gradient(embed(params, jnp.roll(images, args.batch, axis=0)))

    def neg_dist(emb, other):
        return attention.similarity(emb, other)

    # Noise-free companion figures: XLA's own cost model of the compiled programs.
    def compiled_cost(jitted, *args, **kwargs):
        cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cost.get("flops", float("nan")), cost.get("bytes accessed", float("nan"))

    base_flops, base_bytes = compiled_cost(embed, params, images)
    for method in attention.METHODS:
        flops, bytes_ = compiled_cost(
            attention._attention_maps_jit, apply_fn, params, images, method, neg_dist, others,
            "cls", None, "mean", 0.0, True)
        print(f"RATIO {method}_flops_over_forward = {flops / base_flops:.2f}  "
              f"(bytes accessed: {bytes_ / base_bytes:.2f})")

    for method in attention.METHODS:
        report(f"{method}_over_forward", paired_ratio(lambda: attention.attention_maps(
            apply_fn, params, images, method, neg_dist, target_args=others), forward,
            args.repeats))
    report("pair_grad_rollout_over_forward", paired_ratio(
        lambda: attention.pair_attention_maps(apply_fn, params, probes, galleries,
                                              "grad_rollout"), forward, args.repeats))

    # masks from real maps of the pairs
    maps_p, maps_g = attention.pair_attention_maps(apply_fn, params, probes, galleries,
                                                   "rollout")
    bin_p, _ = fv_heatmaps.otsu_binarize(maps_p)
    bin_g, _ = fv_heatmaps.otsu_binarize(maps_g)
    masks = fv_heatmaps.technique_masks(bin_p, bin_g)
    num_masks = masks.shape[0]
    all_images = jnp.concatenate([probes, galleries] * (1 + num_masks))

    def one_call():
        return fv_heatmaps.evaluate_masks(embed_fn, probes, galleries, masks,
                                          embed_params=params)

    def per_technique():
        return [fv_heatmaps.evaluate_masks(embed_fn, probes, galleries, masks[k],
                                           embed_params=params) for k in range(num_masks)]

    print(f"evaluate_masks: {args.batch} pairs x {num_masks} masks = {all_images.shape[0]} "
          f"images in one call")
    report("evaluate_masks_over_forward",
           paired_ratio(one_call, lambda: embed(params, all_images), args.repeats))
    report("per_technique_calls_over_one_call",
           paired_ratio(per_technique, one_call, args.repeats))
    positive = jnp.arange(args.batch) % 2 == 0
    report("explain_pairs_over_evaluate_masks", paired_ratio(
        lambda: fv_heatmaps.explain_pairs(embed_fn, probes, galleries, maps_p, maps_g,
                                          positive, embed_params=params, warn=False),
        one_call, args.repeats))


if __name__ == "__main__":
    main()
