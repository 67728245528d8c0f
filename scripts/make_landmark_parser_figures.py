"""Landmark-parser figures for docs/ (README). Needs ai-edge-litert, scikit-image and a mediapipe 0.10.21 wheel file:
  python scripts/make_landmark_parser_figures.py path/to/mediapipe-0.10.21-*.whl
"""
import os, sys, warnings
import numpy as np, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from PIL import Image
from faceaudit_jax import parsing, regions
from faceaudit_jax.data import synthetic, align
from faceaudit_jax.models import parser_net

wheel = sys.argv[1]
out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
landmarker = parsing.MediaPipeFaceMesh(wheel)
parser = parsing.LandmarkParser(landmarker)
cmap = plt.get_cmap("tab20", 20)
visible = [regions.region_id(n) for n in parsing.LANDMARK_VISIBLE_REGIONS]
legend = [Patch(color=cmap(r), label=regions.REGION_LABELS[regions.REGIONS[r]]) for r in visible]

from skimage import data as skimage_data  # the astronaut photo (NASA, public domain); extra [dlib]
photos = {"astronaut (scikit-image)": skimage_data.astronaut().astype(np.float32) / 255,
          "grace_hopper (matplotlib)": np.asarray(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB"), np.float32) / 255}
fig, axes = plt.subplots(len(photos), 3, figsize=(12, 4.4 * len(photos)))
for row, (name, photo) in zip(axes, photos.items()):
    mesh, found, _ = landmarker(photo[None])
    maps = np.asarray(parser.parse(photo[None]))[0]
    crop, _ = align.align_photo(photo, np.asarray(parsing.mesh_five_points(mesh))[0])
    row[0].imshow(photo); row[0].plot(mesh[0, :, 0], mesh[0, :, 1], ".", color="cyan", ms=1.0); row[0].set_title(f"{name}: MediaPipe face mesh")
    row[1].imshow(photo); row[1].imshow(np.ma.masked_equal(maps, 0), cmap=cmap, vmin=0, vmax=19, alpha=0.55, interpolation="nearest"); row[1].set_title("LandmarkParser regions")
    row[2].imshow(crop); row[2].set_title("aligned 112x112 (ArcFace template)")
    for a in row: a.axis("off")
fig.legend(handles=legend, loc="lower center", ncol=9, fontsize=8)
fig.tight_layout(rect=(0, 0.04, 1, 1)); fig.savefig(os.path.join(out, "landmark_parser_photos.png"), dpi=80)

data = synthetic.render(0, np.arange(40), resolution=256)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pred = np.asarray(parser.parse(data["image"]))
ok = parser.last_found
truth = np.asarray(data["parse"])
vis = parser.visible_regions
truth_vis = np.where(vis[truth], truth, 0)  # regions the parser cannot see count as outside
iou = np.asarray(parser_net.per_region_iou(pred[ok], truth_vis[ok], 19))
lines = [f"faces found: {ok.sum()} of {len(ok)} (synthetic seed 0, indices 0..39, 256 px)"]
lines += [f"{regions.REGIONS[r]}: IoU {iou[r]:.3f}" for r in np.flatnonzero(vis)]
lines += [f"mean over the 9 visible regions: {np.nanmean(iou[vis]):.3f}"]
open(os.path.join(out, "landmark_parser_synthetic_iou.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
fig, ax = plt.subplots(2, 5, figsize=(12, 5.2))
for i in range(5):
    ax[0, i].imshow(data["image"][i]); ax[0, i].imshow(np.ma.masked_equal(pred[i], 0), cmap=cmap, vmin=0, vmax=19, alpha=0.55, interpolation="nearest")
    ax[1, i].imshow(np.ma.masked_equal(truth_vis[i], 0), cmap=cmap, vmin=0, vmax=19, interpolation="nearest")
    ax[0, i].axis("off"); ax[1, i].axis("off")
ax[0, 0].set_title("landmark parser", loc="left"); ax[1, 0].set_title("renderer ground truth (visible regions)", loc="left")
fig.legend(handles=legend, loc="lower center", ncol=9, fontsize=8)
fig.tight_layout(rect=(0, 0.06, 1, 1)); fig.savefig(os.path.join(out, "landmark_parser_synthetic.png"), dpi=80)
