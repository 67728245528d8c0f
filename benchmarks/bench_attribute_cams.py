"""Cost of explaining A attributes of a batch, in forward passes of that batch.

``explain.attribute_cams`` runs the backbone once and the head's VJP once per
attribute (vmapped), so the CAMs of A attributes should cost about one forward
pass whatever A (the issue's goal: A = 40 costs <= 2 forward passes). The
alternative, one ``compute_cams`` call per attribute (what the paper's
released code does, per image), costs A forward passes.

All functions are timed in one process, interleaved (forward, A=1, A=10, ...,
forward, A=1, ...) so that load from other processes hits them alike, after a
compile warm-up, with ``block_until_ready``; the median of the repeats is
reported.

    python benchmarks/bench_attribute_cams.py                  # resnet18, 128 px, batch 16
    python benchmarks/bench_attribute_cams.py --model small_resnet --resolution 128 \
        --batch-size 8 --repeats 3 --methods grad_cam hires_cam

Prints ``RATIO attr_cams_over_forward A=<A> = x`` (time of the A-attribute
CAMs over the time of one forward pass) for the first method, the same with
``method=<name>`` for the others, and ``RATIO compute_cams_loop_over_attr_cams
A=40 = x`` (A per-attribute ``compute_cams`` calls, estimated as A times one
call, over one multi-attribute call).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from faceaudit_jax.explain import attribute_cams as ac
from faceaudit_jax.explain import cams
from faceaudit_jax.models import resnet

NUM_OUTPUTS = 40


def _median_seconds(fns: dict, images, repeats: int) -> dict:
    """Median wall time per call of each function, calls interleaved across functions."""
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn(images))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(images))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=resnet.MODEL_NAMES)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-attributes", type=int, nargs="+", default=[1, 10, 40])
    parser.add_argument("--methods", nargs="+", default=["grad_cam"],
                        choices=sorted(cams.CAM_METHODS))
    parser.add_argument("--mode", default="predicted", choices=cams.BINARY_TARGET_MODES)
    args = parser.parse_args(argv)
    if max(args.num_attributes) > NUM_OUTPUTS or min(args.num_attributes) < 1:
        parser.error(f"--num-attributes must be in 1..{NUM_OUTPUTS}")

    model = resnet.build_model(args.model, NUM_OUTPUTS)
    variables = resnet.init_variables(model, jax.random.key(0), args.resolution)
    features_fn, head_fn = resnet.classifier_fns(model, variables)
    images = jax.random.uniform(jax.random.key(1),
                                (args.batch_size, args.resolution, args.resolution, 3))

    forward = jax.jit(lambda x: head_fn(features_fn(x)))
    fns = {"forward": forward}
    for method in args.methods:
        for num in args.num_attributes:
            fns[(method, num)] = ac.make_attribute_cam_fn(
                features_fn, head_fn, method, args.mode, tuple(range(num)), validate=False)
    # The per-attribute alternative: one compute_cams call explains one attribute.
    single_target = cams.make_binary_target(args.mode)
    one_attribute = cams.make_cam_fn(features_fn, head_fn,
                                     lambda z: single_target(z[:, 0]), args.methods[0],
                                     validate=False)
    fns["compute_cams_one"] = one_attribute

    print(f"device {jax.devices()[0].platform} x{jax.device_count()}, model {args.model}, "
          f"{args.resolution} px, batch {args.batch_size}, mode {args.mode}, "
          f"median of {args.repeats}")
    seconds = _median_seconds(fns, images, args.repeats)
    base = seconds["forward"]
    print(f"forward pass: {base * 1e3:.1f} ms per batch")
    for method in args.methods:
        for num in args.num_attributes:
            t = seconds[(method, num)]
            label = f"A={num}" if method == args.methods[0] else f"A={num} method={method}"
            print(f"{method} A={num}: {t * 1e3:.1f} ms per batch")
            print(f"RATIO attr_cams_over_forward {label} = {t / base:.3f}")
    largest = max(args.num_attributes)
    loop = largest * seconds["compute_cams_one"]
    print(f"compute_cams, one attribute: {seconds['compute_cams_one'] * 1e3:.1f} ms per batch")
    print(f"RATIO compute_cams_loop_over_attr_cams A={largest} = "
          f"{loop / seconds[(args.methods[0], largest)]:.3f}")


if __name__ == "__main__":
    main()
