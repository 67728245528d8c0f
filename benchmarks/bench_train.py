"""Training throughput (images/s) of the jitted update, after compilation.

    python benchmarks/bench_train.py            # small_resnet, 96 and 128 px, batch 32 and 128
    python benchmarks/bench_train.py --model resnet18 --sizes 112 --batches 32 --seconds 20

Prints one line per setting, ``train_images_per_s res=128 batch=32 = ...``, then
ratio lines measured in the same process (``RATIO name = value``), among them
the cost of FLAC (``mitigation.flac``: a frozen bias-capturing network of the
same architecture run inside the step, and the pairwise loss on the pooled
features) against plain BCE at the smallest size (``--no-flac`` skips it). Each setting
is compiled and warmed up with one update, then timed over at least
``--min-steps`` updates and about ``--seconds`` seconds (blocking on the
result). Inputs are random images: this measures the update alone, not data
loading or rendering. The default run stays under about two minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from faceaudit_jax import losses, train_lib
from faceaudit_jax.mitigation import flac
from faceaudit_jax.models import build_model


def _loss(logits, batch):
    return losses.sigmoid_bce(logits, batch["label"])


def measure(template_state, train_step, size: int, batch_size: int, seconds: float, min_steps: int) -> float:
    """Images per second of ``train_step`` at (size, batch_size), compile excluded."""
    key = jax.random.PRNGKey(size * 1000 + batch_size)
    batch = {
        "image": jax.random.uniform(key, (batch_size, size, size, 3)),
        "label": jax.random.bernoulli(key, 0.5, (batch_size,)).astype(jnp.float32),
        "label_mask": jnp.ones((batch_size,), bool),
    }
    # The update donates its state: train on a copy so the template stays usable.
    state = jax.tree.map(jnp.copy, template_state)
    state, metrics = train_step(state, batch)  # compile + warm-up
    jax.block_until_ready(metrics)
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        state, metrics = train_step(state, batch)
        steps += 1
        jax.block_until_ready(metrics["loss"])
    elapsed = time.perf_counter() - start
    return steps * batch_size / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_resnet")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per setting")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--no-flac", dest="flac", action="store_false")
    args = parser.parse_args(argv)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, model {args.model}")
    model = build_model(args.model, 1)
    tx = train_lib.make_optimizer(train_lib.default_optimizer_config(), 1000)
    # Parameters do not depend on the input size: one initialisation serves every setting.
    template_state = train_lib.create_train_state(model, jax.random.PRNGKey(0), max(args.sizes), tx)
    train_step = train_lib.make_train_step(model, _loss)

    rates = {}
    for size in args.sizes:
        for batch_size in args.batches:
            rate = measure(template_state, train_step, size, batch_size, args.seconds, args.min_steps)
            rates[size, batch_size] = rate
            print(f"train_images_per_s res={size} batch={batch_size} = {rate:.1f}", flush=True)

    small_b, large_b = min(args.batches), max(args.batches)
    small_s, large_s = min(args.sizes), max(args.sizes)
    if large_b != small_b:
        for size in args.sizes:
            print(f"RATIO train_batch{large_b}_over_batch{small_b}_res{size} = "
                  f"{rates[size, large_b] / rates[size, small_b]:.3f}")
    if large_s != small_s:
        for batch_size in args.batches:
            print(f"RATIO train_res{small_s}_over_res{large_s}_batch{batch_size} = "
                  f"{rates[small_s, batch_size] / rates[large_s, batch_size]:.3f}")
    if args.flac:
        protected = train_lib.create_train_state(model, jax.random.PRNGKey(1), small_s, tx)
        flac_step = train_lib.make_train_step(
            model, flac.FlacLoss(alpha=1000.0, ce_weight=1.0),
            augment_fn=flac.protected_features_augment(model, train_lib.state_variables(protected)))
        for batch_size in args.batches:
            rate = measure(template_state, flac_step, small_s, batch_size, args.seconds, args.min_steps)
            print(f"train_flac_images_per_s res={small_s} batch={batch_size} = {rate:.1f}", flush=True)
            print(f"RATIO train_flac_over_bce_res{small_s}_batch{batch_size} = "
                  f"{rate / rates[small_s, batch_size]:.3f}")


if __name__ == "__main__":
    main()
