r"""Write CelebAMask-HQ-layout folders of cartoon faces that the project's renderer did not draw.

A new-user trial of ``train.py`` + ``explain.py --config configs/audit.py``
needs real files in a published layout, drawn by something other than
``data/synthetic.py``. This script paints flat PIL faces (ellipse face and
ears, almond eyes with irises, bar brows, triangle nose, two-polygon lips,
long or short hair, neck, shirt, optional round glasses) and writes:

  ROOT/CelebA-HQ-img/<idx>.jpg
  ROOT/CelebAMask-HQ-mask-anno/<idx // 2000>/<idx:05d>_<region>.png   (one PNG per visible region)
  ROOT/CelebAMask-HQ-attribute-anno.txt   (Male, Wearing_Lipstick, Eyeglasses, Young; 1 / -1)

Every mask is the set of pixels where that region is the visible one (shapes
are painted into a label image in the same order as into the picture), so
the data set's max-id merge gives back exactly the painted label map.

The gender cue is deliberately weak (jaw width, brow thickness, hair length,
each with overlap between the sexes); lipstick is a saturated lip colour.
Lipstick follows the folder's ``--link``: the share of women wearing it and
of men not wearing it (0.5 = independent; the train folder of the trial uses
0.92 so a 0.99 biased subset can be drawn from it).

  python scripts/make_foreign_faces.py --root /tmp/foreign/train --count 2400 --link 0.92 --seed 0
  python scripts/make_foreign_faces.py --root /tmp/foreign/test --count 600 --link 0.5 --seed 1
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from faceaudit_jax import regions

ATTRIBUTES = ("Male", "Wearing_Lipstick", "Eyeglasses", "Young")
IMAGES_PER_FOLDER = 2000
_SKIN = [(241, 204, 178), (224, 172, 135), (198, 134, 96), (141, 85, 54), (250, 220, 196)]
_HAIR = [(30, 22, 18), (90, 56, 30), (160, 110, 60), (220, 190, 120), (120, 120, 120)]
_LIPSTICK = [(200, 20, 40), (170, 10, 80), (225, 40, 90), (150, 0, 30)]


def draw_attributes(rng: np.random.Generator, count: int, link: float) -> np.ndarray:
    """int8 [count, 4] in ATTRIBUTES order: Male 1/0, lipstick by the link, glasses 15%, young 50%."""
    male = rng.random(count) < 0.5
    follows = rng.random(count) < link   # lipstick agrees with "women wear it"
    lipstick = np.where(follows, ~male, male)
    glasses = rng.random(count) < 0.15
    young = rng.random(count) < 0.5
    return np.stack([male, lipstick, glasses, young], 1).astype(np.int8)


def _darker(colour, f):
    return tuple(int(c * f) for c in colour)


def paint_face(attrs: np.ndarray, size: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """One face: (RGB image, uint8 label map of region ids [size, size])."""
    rng = np.random.default_rng(seed)
    male, lipstick, glasses, young = (bool(a) for a in attrs)
    s = size / 128.0
    bg = tuple(int(v) for v in rng.integers(60, 230, 3))
    image = Image.new("RGB", (size, size), bg)
    label = Image.new("L", (size, size), 0)
    paint, mark = ImageDraw.Draw(image), ImageDraw.Draw(label)

    def shape(kind, xy, colour, region, **kw):
        getattr(paint, kind)(xy, fill=colour, **kw)
        getattr(mark, kind)(xy, fill=regions.REGION_ID[region], **kw)

    cx = 64 * s + rng.normal(0, 3) * s
    cy = 58 * s + rng.normal(0, 3) * s
    # Weak gender cue: men's faces a little wider at the jaw, with overlap.
    half_w = (25 + (2.0 if male else 0.0) + rng.normal(0, 1.5)) * s
    half_h = (32 + rng.normal(0, 1.5)) * s
    skin = _SKIN[rng.integers(len(_SKIN))]
    hair = _HAIR[rng.integers(len(_HAIR))]
    long_hair = rng.random() < (0.25 if male else 0.75)

    shirt = tuple(int(v) for v in rng.integers(0, 255, 3))
    shape("polygon", [(cx - 50 * s, size), (cx - 30 * s, cy + 46 * s), (cx + 30 * s, cy + 46 * s),
                      (cx + 50 * s, size)], shirt, "cloth")
    shape("rectangle", [cx - 11 * s, cy + 20 * s, cx + 11 * s, cy + 50 * s], _darker(skin, 0.9), "neck")
    if long_hair:
        shape("rounded_rectangle", [cx - half_w - 9 * s, cy - half_h - 8 * s, cx + half_w + 9 * s,
                                    cy + half_h + 14 * s], hair, "hair", radius=int(20 * s))
    for side in (-1, 1):
        ex = cx + side * half_w
        shape("ellipse", [ex - 5 * s, cy - 6 * s, ex + 5 * s, cy + 8 * s], _darker(skin, 0.95),
              "l_ear" if side > 0 else "r_ear")
    shape("ellipse", [cx - half_w, cy - half_h, cx + half_w, cy + half_h], skin, "skin")
    # Hair on top of the head: a cap over the forehead.
    shape("chord", [cx - half_w - 2 * s, cy - half_h - 6 * s, cx + half_w + 2 * s,
                    cy - half_h + 26 * s], hair, "hair", start=180, end=360)

    eye_y = cy - 4 * s + rng.normal(0, 0.7) * s
    eye_dx = (11 + rng.normal(0, 0.7)) * s
    brow_thick = (3.2 if male else 2.2) + rng.normal(0, 0.6)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        name = "l_" if side > 0 else "r_"
        shape("ellipse", [ex - 6 * s, eye_y - 3 * s, ex + 6 * s, eye_y + 3 * s], (245, 245, 240), name + "eye")
        iris = tuple(int(v) for v in rng.integers(20, 120, 3))
        paint.ellipse([ex - 2.5 * s, eye_y - 2.5 * s, ex + 2.5 * s, eye_y + 2.5 * s], fill=iris)
        by = eye_y - 7 * s
        shape("rectangle", [ex - 7 * s, by - brow_thick * s / 2, ex + 7 * s, by + brow_thick * s / 2],
              _darker(hair, 0.8), name + "brow")
    shape("polygon", [(cx, eye_y + 2 * s), (cx - 5 * s, cy + 12 * s), (cx + 5 * s, cy + 12 * s)],
          _darker(skin, 0.85), "nose")

    mouth_y = cy + 19 * s + rng.normal(0, 0.7) * s
    mouth_w = (10 + rng.normal(0, 0.8)) * s
    lips = _LIPSTICK[rng.integers(len(_LIPSTICK))] if lipstick else _darker(skin, 0.8)
    shape("polygon", [(cx - mouth_w, mouth_y), (cx - 3 * s, mouth_y - 4 * s), (cx, mouth_y - 2.5 * s),
                      (cx + 3 * s, mouth_y - 4 * s), (cx + mouth_w, mouth_y)], lips, "u_lip")
    shape("rectangle", [cx - mouth_w + 2 * s, mouth_y, cx + mouth_w - 2 * s, mouth_y + 1.2 * s],
          (60, 20, 20), "mouth")
    shape("chord", [cx - mouth_w, mouth_y - 4 * s, cx + mouth_w, mouth_y + 6 * s], lips, "l_lip",
          start=0, end=180)
    if glasses:
        for side in (-1, 1):
            ex = cx + side * eye_dx
            paint.ellipse([ex - 8 * s, eye_y - 6 * s, ex + 8 * s, eye_y + 6 * s], outline=(20, 20, 20),
                          width=max(1, int(1.5 * s)))
            mark.ellipse([ex - 8 * s, eye_y - 6 * s, ex + 8 * s, eye_y + 6 * s],
                         outline=regions.REGION_ID["eye_g"], width=max(1, int(1.5 * s)))
    if not young:  # a few lines on the forehead
        for k in range(2):
            y = cy - half_h + (12 + 3 * k) * s
            paint.line([cx - 8 * s, y, cx + 8 * s, y], fill=_darker(skin, 0.75), width=1)
    picture = np.asarray(image, np.float32)
    picture += rng.normal(0, 4, picture.shape)  # sensor noise, so JPEG is not flat colour
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)), np.asarray(label)


def _write_one(args):
    root, idx, attrs, size, seed = args
    image, label = paint_face(attrs, size, seed)
    image.save(os.path.join(root, "CelebA-HQ-img", f"{idx}.jpg"), quality=92)
    folder = os.path.join(root, "CelebAMask-HQ-mask-anno", str(idx // IMAGES_PER_FOLDER))
    for region_id in np.unique(label):
        if region_id == 0:
            continue
        mask = (label == region_id).astype(np.uint8) * 255
        Image.fromarray(mask).save(os.path.join(folder, f"{idx:05d}_{regions.REGIONS[region_id]}.png"))


def write_folder(root: str, count: int, link: float, seed: int, size: int = 128, workers: int = 2) -> np.ndarray:
    """Write ``count`` faces under ``root`` in the CelebAMask-HQ layout; returns their attributes."""
    rng = np.random.default_rng(seed)
    attrs = draw_attributes(rng, count, link)
    os.makedirs(os.path.join(root, "CelebA-HQ-img"), exist_ok=True)
    for folder in range((count - 1) // IMAGES_PER_FOLDER + 1):
        os.makedirs(os.path.join(root, "CelebAMask-HQ-mask-anno", str(folder)), exist_ok=True)
    jobs = [(root, i, attrs[i], size, seed * 1_000_003 + i) for i in range(count)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=64))
    else:
        for job in jobs:
            _write_one(job)
    lines = [str(count), " ".join(ATTRIBUTES)]
    lines += [f"{i}.jpg " + " ".join("1" if v else "-1" for v in attrs[i]) for i in range(count)]
    with open(os.path.join(root, "CelebAMask-HQ-attribute-anno.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return attrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--count", type=int, default=2400)
    parser.add_argument("--link", type=float, default=0.5,
                        help="share of women wearing lipstick and of men not wearing it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    attrs = write_folder(args.root, args.count, args.link, args.seed, args.size, args.workers)
    male, lip = attrs[:, 0] == 1, attrs[:, 1] == 1
    print(f"{args.root}: {args.count} faces; women with lipstick {int((~male & lip).sum())}, "
          f"women without {int((~male & ~lip).sum())}, men without {int((male & ~lip).sum())}, "
          f"men with {int((male & lip).sum())}")


if __name__ == "__main__":
    main()
