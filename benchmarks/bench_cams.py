"""CAM throughput vs forward-only throughput (and vs pytorch-grad-cam when installed).

A CAM here is one forward pass through the backbone plus a VJP through the
head only, so its cost should be close to a forward pass. Both are timed in
one process, interleaved (forward, CAM, forward, CAM, ...) so that load from
other processes hits both alike, after a compile warm-up; the median of the
repeats is reported.

    python benchmarks/bench_cams.py                       # resnet18, 224 and 512
    python benchmarks/bench_cams.py --resolutions 224 --batch-sizes 8 --repeats 3

Prints ``RATIO cam_over_forward res=R = x`` (images/s of CAMs over images/s of
forward passes). When torch, torchvision and grad-cam (pytorch-grad-cam) are
importable it also times pytorch-grad-cam's GradCAM on torchvision's
ResNet-18 at the same resolution, batched and at batch size 1 (the setting of
FaceX's released code), and prints ``RATIO jax_over_pytorch_grad_cam ...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

from faceaudit_jax.explain import cams
from faceaudit_jax.models import build_model, classifier_fns, init_variables


def _median_seconds(fns: dict, args: dict, repeats: int) -> dict:
    """Median wall time per call of each function, calls interleaved across functions."""
    for name, fn in fns.items():  # compile and warm up
        jax.block_until_ready(fn(args[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(args[name]))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_jax(model_name: str, resolution: int, batch_size: int, repeats: int, method: str):
    model = build_model(model_name, 1)
    variables = init_variables(model, jax.random.key(0), resolution)
    features_fn, head_fn = classifier_fns(model, variables)
    forward = jax.jit(lambda x: head_fn(features_fn(x)))
    cam_fn = cams.make_cam_fn(features_fn, head_fn, cams.make_binary_target("predicted"), method)
    cam_bs1 = cam_fn  # same function: compiles once more for the batch-1 shape
    images = jax.random.uniform(jax.random.key(1), (batch_size, resolution, resolution, 3))
    single = images[:1]
    seconds = _median_seconds({"forward": forward, "cam": cam_fn, "cam_bs1": cam_bs1},
                              {"forward": images, "cam": images, "cam_bs1": single}, repeats)
    return {"forward": batch_size / seconds["forward"], "cam": batch_size / seconds["cam"],
            "cam_bs1": 1 / seconds["cam_bs1"]}


def _torch_available() -> bool:
    try:
        import pytorch_grad_cam  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def bench_pytorch_grad_cam(resolution: int, batch_size: int, repeats: int):
    """images/s of pytorch-grad-cam GradCAM on torchvision ResNet-18, batched and at bs 1."""
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    model = torchvision.models.resnet18(weights=None, num_classes=1).eval()
    images = torch.rand(batch_size, 3, resolution, resolution)
    out = {}
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        for name, batch in (("batched", images), ("bs1", images[:1])):
            targets = [ClassifierOutputTarget(0)] * batch.shape[0]
            cam(input_tensor=batch, targets=targets)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                cam(input_tensor=batch, targets=targets)
                times.append(time.perf_counter() - start)
            out[name] = batch.shape[0] / statistics.median(times)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--method", default="grad_cam")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 2],
                        help="one per resolution (sized for a 2-core CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if len(args.batch_sizes) != len(args.resolutions):
        parser.error("give one --batch-sizes value per --resolutions value")

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, model {args.model}, "
          f"method {args.method}, median of {args.repeats} interleaved repeats")
    torch_ok = _torch_available()
    for res, bs in zip(args.resolutions, args.batch_sizes):
        jx = bench_jax(args.model, res, bs, args.repeats, args.method)
        print(f"res={res} batch={bs}: forward {jx['forward']:.2f} img/s, CAM {jx['cam']:.2f} "
              f"img/s, CAM at batch 1 {jx['cam_bs1']:.2f} img/s", flush=True)
        print(f"RATIO cam_over_forward res={res} = {jx['cam'] / jx['forward']:.3f}", flush=True)
        if not torch_ok:
            continue
        if args.model != "resnet18":
            print(f"skipping pytorch-grad-cam comparison: it uses torchvision resnet18, "
                  f"not {args.model}")
            continue
        pt = bench_pytorch_grad_cam(res, bs, args.repeats)
        print(f"res={res}: pytorch-grad-cam GradCAM {pt['batched']:.2f} img/s at batch {bs}, "
              f"{pt['bs1']:.2f} img/s at batch 1")
        print(f"RATIO jax_over_pytorch_grad_cam res={res} batched = "
              f"{jx['cam'] / pt['batched']:.3f}")
        print(f"RATIO jax_over_pytorch_grad_cam res={res} bs1 = {jx['cam_bs1'] / pt['bs1']:.3f}")
        print(f"RATIO jax_batched_over_pytorch_grad_cam_bs1 res={res} = "
              f"{jx['cam'] / pt['bs1']:.3f}", flush=True)
    if not torch_ok:
        print("pytorch-grad-cam comparison skipped: torch, torchvision and grad-cam are not "
              "all importable (install the optional `bench` extra to run it)")


if __name__ == "__main__":
    main(sys.argv[1:])
