"""Do upsampled CAMs land on the receptive field of the cell they come from?

For each model a head reads one feature cell only (the sum of its ReLU'd
channels); its HiResCAM is non-zero in that cell alone, so the upsampled map
is that cell's footprint as the CAM code draws it. The cell's receptive-field
centre is measured from the network itself: the centroid of |d cell / d
image| over random images, within one stride of its peak
(``explain.upsampling.measure_cell_centre``). The
benchmark prints the distance between the two for the default
(receptive-field-aligned) upsampling and for the half-pixel one
(pytorch-grad-cam / cv2), against the goal max(2 px, stride / 8).

    python benchmarks/bench_alignment.py                     # small_resnet 256, resnet18 448
    python benchmarks/bench_alignment.py --figure results/benchmarks/alignment.png

Cells: the one nearest the image centre and one off-centre cell, reported
apart (small_resnet's GroupNorm spreads a little gradient over the whole
image and resnet18's 435 px receptive field is clipped by the border: both
pull a whole-image centroid towards the middle, hence the window).
Random weights (He init); the geometry does not depend on training.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from faceaudit_jax.explain import cams, upsampling
from faceaudit_jax.models.resnet import build_model, cell_grid, classifier_fns, init_variables


def one_cell_head(cell):
    def head(fmap):
        return jnp.sum(jax.nn.relu(fmap[:, cell[0], cell[1], :]), axis=-1, keepdims=True)
    return head


def map_centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[:m.shape[0], :m.shape[1]]
    return np.array([(m * ys).sum(), (m * xs).sum()]) / m.sum()


def measure(model_name: str, resolution: int, num_images: int, seed: int):
    model = build_model(model_name, 1)
    variables = init_variables(model, jax.random.key(seed), resolution)
    features_fn, _ = classifier_fns(model, variables)
    grid = cell_grid(model)
    stride = grid.stride[0]
    h = int(np.ceil(resolution / stride))
    centre_cell = (h // 2, h // 2)
    cells = [centre_cell, (h // 4, h // 2)]
    images = jax.random.uniform(jax.random.key(seed + 1), (num_images, resolution, resolution, 3))
    target = cams.make_binary_target("positive")
    rows = []
    for cell in cells:
        rf = upsampling.measure_cell_centre(features_fn, images, cell, window=int(stride))
        head = one_cell_head(cell)
        maps = {}
        for mode in ("aligned", "half_pixel"):
            m = np.asarray(cams.compute_cams(features_fn, head, images[:1], target,
                                             method="hires_cam", upsample=mode))[0]
            maps[mode] = m
        rows.append(dict(cell=cell, rf=rf, maps=maps,
                         error={k: float(np.linalg.norm(map_centroid(v) - rf))
                                for k, v in maps.items()}))
    return stride, rows, np.asarray(images[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_resnet:256,resnet18:448",
                        help="comma-separated name:resolution")
    parser.add_argument("--num-images", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default="", help="write a PNG of the footprints here")
    args = parser.parse_args(argv)
    figure_rows = []
    for spec in args.models.split(","):
        name, res = spec.split(":")
        stride, rows, image = measure(name, int(res), args.num_images, args.seed)
        tol = max(2.0, stride / 8)
        for row in rows:
            kind = "centre" if row is rows[0] else "off_centre"
            print(f"{name} res={res} stride={stride:g} cell={row['cell']}: receptive-field "
                  f"centre ({row['rf'][0]:.1f}, {row['rf'][1]:.1f}); aligned map "
                  f"{row['error']['aligned']:.2f} px off, half_pixel "
                  f"{row['error']['half_pixel']:.2f} px off (goal <= {tol:g})")
            print(f"RATIO aligned_error_over_goal {name} {kind} = "
                  f"{row['error']['aligned'] / tol:.3f}")
            print(f"RATIO half_pixel_error_over_goal {name} {kind} = "
                  f"{row['error']['half_pixel'] / tol:.3f}")
        figure_rows.append((name, int(res), stride, rows[0]))
    if args.figure:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(6, 3 * len(figure_rows)))
        axes = fig.subplots(len(figure_rows), 2, squeeze=False)
        for (name, res, stride, row), ax_row in zip(figure_rows, axes):
            for ax, mode in zip(ax_row, ("aligned", "half_pixel")):
                ax.imshow(row["maps"][mode], cmap="magma")
                c = map_centroid(row["maps"][mode])
                ax.plot([row["rf"][1]], [row["rf"][0]], "c+", ms=14, mew=2,
                        label="receptive-field centre")
                ax.plot([c[1]], [c[0]], "wx", ms=10, mew=2, label="map centroid")
                ax.set_title(f"{name} {res}px, {mode}: {row['error'][mode]:.1f} px", fontsize=8)
                ax.set_xticks([]), ax.set_yticks([])
        axes[0, 0].legend(fontsize=6, loc="lower left")
        fig.tight_layout()
        fig.savefig(args.figure, dpi=110)


if __name__ == "__main__":
    main()
