"""Write docs/synthetic_samples.png: synthetic faces with their parse maps.

    python docs/make_samples_figure.py [--resolution 128] [--seed 0] [--out PATH]

Twelve faces of twelve identities (default, CelebA-like attribute rates),
chosen so that the salient attributes each appear at least once; under each
face its parse map (colour legend of the 19 CelebAMask-HQ regions at the
bottom) and a few of its attributes.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from faceaudit_jax import regions  # noqa: E402
from faceaudit_jax.data import synthetic  # noqa: E402

# One colour per region id, chosen so that neighbouring regions contrast.
REGION_COLOURS = np.array([
    [0, 0, 0],        # background
    [230, 160, 130],  # skin
    [150, 220, 0],    # nose
    [255, 255, 0],    # eyeglasses
    [40, 40, 255],    # left eye
    [210, 0, 210],    # right eye
    [0, 255, 255],    # left brow
    [255, 140, 200],  # right brow
    [150, 75, 0],     # left ear
    [255, 90, 60],    # right ear
    [60, 60, 60],     # mouth
    [255, 0, 0],      # upper lip
    [140, 0, 70],     # lower lip
    [100, 70, 210],   # hair
    [255, 40, 150],   # hat
    [0, 160, 255],    # earrings
    [255, 255, 255],  # necklace
    [255, 160, 60],   # neck
    [30, 130, 30],    # cloth
], np.uint8)

# Attributes to make sure the grid shows, and the ones printed under a face.
SHOWCASE = ("Wearing_Hat", "Eyeglasses", "Wearing_Earrings", "Wearing_Necklace",
            "Wearing_Necktie", "Bald", "Goatee", "Mustache", "Gray_Hair", "Blond_Hair",
            "Bangs", "Heavy_Makeup")
CAPTION = ("Male", "Young", "Wearing_Lipstick", "Heavy_Makeup", "Smiling",
           "Mouth_Slightly_Open", "Eyeglasses", "Wearing_Hat", "Wearing_Earrings",
           "Wearing_Necklace", "Wearing_Necktie", "Bald", "Blond_Hair", "Black_Hair",
           "Brown_Hair", "Gray_Hair", "Bangs", "Mustache", "Goatee")
NUM_FACES = 12
IMAGES_PER_IDENTITY = 10


def choose_indices(seed: int) -> np.ndarray:
    """One image per identity; the first ones show each SHOWCASE attribute."""
    pool = np.arange(20_000)
    attrs = synthetic.sample_attributes(seed, pool, images_per_identity=IMAGES_PER_IDENTITY)["attrs"]
    chosen, used_ids = [], set()
    for name in SHOWCASE:
        for i in np.flatnonzero(attrs[:, regions.ATTRIBUTE_ID[name]] == 1):
            if i // IMAGES_PER_IDENTITY not in used_ids:
                chosen.append(i)
                used_ids.add(i // IMAGES_PER_IDENTITY)
                break
        if len(chosen) == NUM_FACES:
            break
    for i in pool:   # fill up with plain faces
        if len(chosen) == NUM_FACES:
            break
        if i // IMAGES_PER_IDENTITY not in used_ids:
            chosen.append(i)
            used_ids.add(i // IMAGES_PER_IDENTITY)
    return np.array(chosen)


def caption(attr_row: np.ndarray) -> str:
    names = [n for n in CAPTION if attr_row[regions.ATTRIBUTE_ID[n]] == 1]
    short = [n.replace("Wearing_", "").replace("Mouth_Slightly_Open", "Mouth_Open") for n in names]
    lines = [" ".join(short[k:k + 2]) for k in range(0, len(short), 2)]
    return "\n".join(lines[:3]) or "(none of the listed)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "synthetic_samples.png"))
    args = parser.parse_args(argv)

    indices = choose_indices(args.seed)
    batch = synthetic.render(args.seed, indices, args.resolution,
                             images_per_identity=IMAGES_PER_IDENTITY)
    images = np.asarray(batch["image"])
    parses = np.asarray(batch["parse"])
    attrs = np.asarray(batch["attrs"])
    landmarks = np.asarray(batch["landmarks"])

    cols = 6
    rows = 2 * ((NUM_FACES + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.75 * rows))
    for k in range(NUM_FACES):
        r, c = 2 * (k // cols), k % cols
        ax = axes[r, c]
        ax.imshow(images[k])
        ax.plot(landmarks[k, :, 0], landmarks[k, :, 1], ".", color="cyan", ms=3)
        ax.text(2, 2, f"#{indices[k]}  yaw {np.degrees(float(batch['yaw'][k])):+.0f}\u00b0",
                fontsize=6.5, color="white", va="top",
                bbox=dict(facecolor="black", alpha=0.45, pad=1.0, linewidth=0))
        ax = axes[r + 1, c]
        ax.imshow(REGION_COLOURS[parses[k]], interpolation="nearest")
        ax.set_xlabel(caption(attrs[k]), fontsize=6.5)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    legend = [Patch(facecolor=REGION_COLOURS[i] / 255.0, edgecolor="grey",
                    label=f"{i} {regions.REGION_LABELS[name]}")
              for i, name in enumerate(regions.REGIONS)]
    fig.legend(handles=legend, loc="lower center", ncol=7, fontsize=7, frameon=False)
    fig.suptitle(f"synthetic faces (seed {args.seed}, {args.resolution} px) with parse maps; "
                 "dots: the 5 landmarks", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.96, bottom=0.1, wspace=0.05, hspace=0.32)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
