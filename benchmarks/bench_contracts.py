"""Cost of the value-contract checks at the explanation entry points (faceaudit_jax.contracts).

For each entry point: the median time of the call (checks included) and the
median time of exactly the checks it runs, timed alone (interleaved, after
warm-up); their ratio is the overhead. Timed alone because the difference
of two noisy totals is below the noise of a shared machine.

- ``compute_cams`` on a numpy batch: the host check of every pixel before
  the jitted call, plus the in-call flag (timed as the same reduction
  jitted alone: an upper bound on its fused cost);
- ``compute_cams`` on a device batch: the in-call flag only;
- ``IoRAccumulator.update`` in an audit step (CAM + IoR of one batch): the
  maps' on-device range reduction (the parse-id check existed before);
- ``corrrise`` on one pair: host checks of both images (``check_pair``)
  and device checks of the converted pair (``check_pair_batch``).

Prints ``RATIO contract_overhead <entry> = x`` (target < 0.02).

    python benchmarks/bench_contracts.py
    python benchmarks/bench_contracts.py --batch 16 --resolution 64 --repeats 5   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax import contracts
from faceaudit_jax.explain import cams, corrrise
from faceaudit_jax.models import build_model, classifier_fns, init_variables
from faceaudit_jax.models.embedder import build_embedder, embedder_fns
from faceaudit_jax.regions import NUM_REGIONS
from faceaudit_jax.summary import ior


def _medians(fns: dict, repeats: int) -> dict:
    """Median wall time of each zero-argument fn, interleaved over repeats, after one warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--masks", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ready = jax.block_until_ready

    model = build_model(args.model, 1)
    variables = init_variables(model, jax.random.key(0), args.resolution)
    features_fn, head_fn = classifier_fns(model, variables)
    target = cams.make_binary_target("predicted")
    host = rng.uniform(size=(args.batch, args.resolution, args.resolution, 3)).astype(np.float32)
    device = jnp.asarray(host)
    flag = jax.jit(lambda x: contracts.in_unit_range(x, axis=(1, 2, 3)))
    cam_fn = cams.make_cam_fn(features_fn, head_fn, target)
    coarse = rng.integers(0, NUM_REGIONS, size=(args.batch, 16, 16))
    parse = jnp.asarray(np.repeat(np.repeat(coarse, args.resolution // 16, 1), args.resolution // 16, 2),
                        jnp.int32)
    state = ior.IoRAccumulator.init(NUM_REGIONS, 2)
    groups = jnp.zeros((args.batch,), jnp.int32)
    maps = ready(cam_fn(device))

    size = 64
    embedder = build_embedder("small_resnet", embedding_dim=64)
    emb_vars = embedder.init(jax.random.key(1), jnp.zeros((1, size, size, 3)))
    embed = embedder_fns(embedder, emb_vars)[2]
    pair = rng.uniform(size=(2, size, size, 3)).astype(np.float32)
    devices = jax.devices()[:1]

    def pair_checks():
        contracts.check_unit_range(pair[0], "image_a")
        contracts.check_unit_range(pair[1], "image_b")
        a, b = jnp.asarray(pair[:1]), jnp.asarray(pair[1:])
        contracts.check_unit_range(a, "images_a")
        contracts.check_unit_range(b, "images_b")

    t = _medians({
        "cams_numpy": lambda: ready(cams.compute_cams(features_fn, head_fn, host, target)),
        "cams_numpy_checks": lambda: (contracts.unit_violation(host, "images"), ready(flag(device))),
        "cams_device": lambda: ready(cams.compute_cams(features_fn, head_fn, device, target)),
        "cams_device_checks": lambda: ready(flag(device)),
        "audit_step": lambda: ready(ior.IoRAccumulator.update(state, cam_fn(device), parse, groups)),
        "ior_checks": lambda: contracts.check_unit_range(maps, "maps"),
        "corrrise": lambda: ready(corrrise.corrrise(embed, pair[0], pair[1], jax.random.key(0),
                                                    num_masks=args.masks, num_patches=4, patch_size=8,
                                                    devices=devices)),
        "corrrise_checks": pair_checks,
    }, args.repeats)

    print(f"# {args.model} {args.resolution} px, batch {args.batch}; corrrise: small_resnet "
          f"embedder {size} px, {args.masks} masks; {jax.devices()[0].platform}")
    for entry, call in (("compute_cams_numpy", "cams_numpy"), ("compute_cams_device", "cams_device"),
                        ("ior_update_in_audit_step", "audit_step"), ("corrrise", "corrrise")):
        checks = t[f"{call}_checks" if call != "audit_step" else "ior_checks"]
        print(f"{entry}: call {t[call] * 1e3:.1f} ms, its checks {checks * 1e3:.2f} ms")
        print(f"RATIO contract_overhead {entry} = {checks / t[call]:.4f}")


if __name__ == "__main__":
    main()
