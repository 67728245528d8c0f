"""Rendering throughput of the synthetic faces, side by side with training.

    python benchmarks/bench_render.py                   # 64/128/256 px, batch 32/128
    python benchmarks/bench_render.py --sizes 128 --batches 64 --seconds 10

Prints ``render_images_per_s res=R batch=B = ...`` per setting (compile and a
warm-up call excluded, every call blocks on its result, new indices every
call), the attribute sampler's rate, then ratio lines measured in this same
process, so machine load affects both sides alike:

* ``RATIO render_over_train_res128`` -- rendering at 128 px (batch 32) over
  the training throughput of the small ResNet at 128 px (batch 32). The
  renderer must not be the bottleneck of training: this should be >= 3.
* ``RATIO render_windowed_over_full_frame_res128`` -- what drawing the inner
  face features in static windows buys over drawing them on every pixel.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import jax
import jax.numpy as jnp

from faceaudit_jax.data import synthetic


def _timed_rate(call, batch_size: int, seconds: float, min_calls: int) -> float:
    """Images per second of call(i) (i = call number), after one warm-up call."""
    jax.block_until_ready(call(0))
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        calls += 1
        jax.block_until_ready(call(calls))
    return calls * batch_size / (time.perf_counter() - start)


def render_rate(resolution: int, batch_size: int, seconds: float, min_calls: int) -> float:
    def call(i):
        return synthetic.render(0, np.arange(batch_size) + i * batch_size, resolution)["image"]
    return _timed_rate(call, batch_size, seconds, min_calls)


def full_frame_rate(resolution: int, batch_size: int, seconds: float, min_calls: int) -> float:
    """The same renderer with the inner-face windows switched off."""
    fn = jax.jit(jax.vmap(lambda p: synthetic._render_one(p, resolution, windows=False)),
                 compiler_options=synthetic._COMPILER_OPTIONS)

    def call(i):
        params = synthetic.sample_parameters(0, np.arange(batch_size) + i * batch_size)
        return fn({k: jnp.asarray(v) for k, v in params.items()})[0]
    return _timed_rate(call, batch_size, seconds, min_calls)


def train_rate(resolution: int, batch_size: int, seconds: float, min_calls: int) -> float:
    """Images/s of the project's jitted update for the small ResNet (random inputs)."""
    from faceaudit_jax import losses, train_lib
    from faceaudit_jax.models import build_model

    model = build_model("small_resnet", 1)
    tx = train_lib.make_optimizer(train_lib.default_optimizer_config(), 1000)
    state = train_lib.create_train_state(model, jax.random.PRNGKey(0), resolution, tx)
    step = train_lib.make_train_step(model, lambda logits, b: losses.sigmoid_bce(logits, b["label"]))
    key = jax.random.PRNGKey(1)
    batch = {"image": jax.random.uniform(key, (batch_size, resolution, resolution, 3)),
             "label": jax.random.bernoulli(key, 0.5, (batch_size,)).astype(jnp.float32)}
    holder = {"state": state}

    def call(_):
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]
    return _timed_rate(call, batch_size, seconds, min_calls)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per setting")
    parser.add_argument("--min-calls", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="skip the training comparison")
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")

    rates = {}
    for size in args.sizes:
        for batch_size in args.batches:
            rates[size, batch_size] = render_rate(size, batch_size, args.seconds, args.min_calls)
            print(f"render_images_per_s res={size} batch={batch_size} = {rates[size, batch_size]:.1f}",
                  flush=True)

    n = 1_000_000
    start = time.perf_counter()
    synthetic.sample_attributes(0, np.arange(n))
    print(f"sample_attributes_per_s = {n / (time.perf_counter() - start):.0f}", flush=True)

    ref_batch = 32
    windowed = rates.get((128, ref_batch)) or render_rate(128, ref_batch, args.seconds, args.min_calls)
    full = full_frame_rate(128, ref_batch, args.seconds, args.min_calls)
    print(f"render_full_frame_images_per_s res=128 batch={ref_batch} = {full:.1f}")
    print(f"RATIO render_windowed_over_full_frame_res128 = {windowed / full:.3f}")
    if not args.no_train:
        train = train_rate(128, ref_batch, args.seconds, args.min_calls)
        print(f"train_images_per_s small_resnet res=128 batch={ref_batch} = {train:.1f}")
        print(f"RATIO render_over_train_res128 = {windowed / train:.3f}")


if __name__ == "__main__":
    main()
