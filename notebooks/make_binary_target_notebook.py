"""Write notebooks/binary_target.ipynb: one attribute of one image, both CAM targets.

The notebook trains a small ResNet for a few seconds on synthetic faces (all
40 attributes, balanced Euclidean loss), picks an image the model predicts
*negative* for one attribute, and shows its Grad-CAM with the predicted-class
target |z| (paper eq. 4) next to the positive-class target z (eq. 8), with the
proportional energy of each inside the attribute's mask. Runs on CPU in about a
minute.

    python notebooks/make_binary_target_notebook.py            # write it
    python notebooks/make_binary_target_notebook.py --execute  # write and run it in place
"""

from __future__ import annotations

import os

import notebook_builder

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "binary_target.ipynb")

CELLS = [
    ("md", """\
# Which class does a binary attribute CAM explain?

A binary attribute classifier has one logit $z$ per attribute. The usual CAM
target, the logit $z$ itself (eq. 8 of *Biased binary attribute classifiers
ignore the majority classes*), always explains the **positive** class, even
for an image the model predicts negative. The paper's target is the logit of
the **predicted** class, $|z|$ (eq. 4): its gradient is $\\partial z$ where
$z \\ge 0$ and $\\partial(-z)$ where $z < 0$.

Below: a small ResNet trained for a few seconds on synthetic faces, one image
it predicts negative for one attribute, and its Grad-CAM with both targets."""),
    ("code", """\
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from faceaudit_jax import losses, regions
from faceaudit_jax.data import synthetic
from faceaudit_jax.data.frontal import frontal_filter
from faceaudit_jax.explain import attribute_cams, attribute_masks
from faceaudit_jax.metrics.energy import proportional_energy
from faceaudit_jax.models import resnet

ATTRIBUTE = "Wearing_Hat"  # rare (majority class: no hat), large mask (hat + hair)
RESOLUTION, NUM_IMAGES, TRAIN_STEPS, BATCH = 64, 96, 40, 32"""),
    ("md", "Synthetic faces (rendered from their indices) and the frontal filter of sec. 3.3."),
    ("code", """\
faces = synthetic.render(seed=0, indices=np.arange(NUM_IMAGES), resolution=RESOLUTION)
frontal, counts = frontal_filter(faces["landmarks"])
labels, known = losses.attribute_targets(faces["attrs"])
p_pos = np.asarray(labels.sum(0) / np.maximum(known.sum(0), 1))
print(counts, f"| share of {ATTRIBUTE}: {p_pos[regions.attribute_id(ATTRIBUTE)]:.2f}")"""),
    ("md", "AFFACT-b in miniature: one network, 40 logits, the balanced Euclidean loss (eqs. 5-6)."),
    ("code", """\
model = resnet.build_model("small_resnet", regions.NUM_ATTRIBUTES)
params = resnet.init_variables(model, jax.random.key(0), RESOLUTION)["params"]
weights = losses.balanced_weights(p_pos)
optimizer = optax.adam(3e-3)

@jax.jit
def train_step(params, opt_state, images, labels, known):
    def loss_fn(p):
        logits, _ = model.apply({"params": p}, images)
        return losses.balanced_euclidean(logits, 2 * labels - 1, weights, known)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

opt_state = optimizer.init(params)
for step in range(TRAIN_STEPS):
    rows = np.arange(step * BATCH, (step + 1) * BATCH) % NUM_IMAGES
    params, opt_state, loss = train_step(params, opt_state, faces["image"][rows],
                                         labels[rows], known[rows])
print(f"loss after {TRAIN_STEPS} steps: {float(loss):.2f}")"""),
    ("md", """\
CAMs for the attribute with both targets: one forward pass each, the head's
gradient per attribute. Pick a frontal image the model predicts negative."""),
    ("code", """\
features_fn, head_fn = resnet.classifier_fns(model, {"params": params})
cam = {mode: attribute_cams.make_attribute_cam_fn(features_fn, head_fn, "grad_cam", mode,
                                                  attributes=[ATTRIBUTE])
       for mode in ("predicted", "positive")}
maps = {mode: np.asarray(fn(faces["image"])[0][:, 0]) for mode, fn in cam.items()}
z = np.asarray(cam["predicted"](faces["image"])[1][:, 0])
negatives = np.flatnonzero(frontal & (z < 0))
positives = np.flatnonzero(frontal & (z >= 0))
i = negatives[0]
mask = np.asarray(attribute_masks.attribute_masks(faces["parse"][i:i + 1], [ATTRIBUTE]))[0, 0]
energy = {mode: float(proportional_energy(m[i:i + 1], mask[None])[0]) for mode, m in maps.items()}
print(f"image {i}: z = {z[i]:+.3f} (predicted not {ATTRIBUTE}); energy in the "
      f"{ATTRIBUTE} mask: |z| target {energy['predicted']:.3f}, z target {energy['positive']:.3f}")"""),
    ("code", """\
image = np.asarray(faces["image"][i])
fig, axes = plt.subplots(1, 4, figsize=(11, 3))
axes[0].imshow(image); axes[0].set_title("image", fontsize=9)
axes[1].imshow(mask, cmap="gray"); axes[1].set_title(f"{ATTRIBUTE} mask", fontsize=9)
for ax, mode in zip(axes[2:], ("predicted", "positive")):
    ax.imshow(image)
    ax.imshow(maps[mode][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    ax.set_title(f"target {'|z|' if mode == 'predicted' else 'z'} ({mode} class)", fontsize=9)
for ax in axes:
    ax.axis("off")
plt.show()"""),
    ("md", """\
The two targets agree wherever the model predicts positive and differ exactly
on the negatively predicted images, where the $z$ target explains a class the
model did not predict:"""),
    ("code", """\
same_on_positive = np.allclose(maps["predicted"][positives], maps["positive"][positives], atol=1e-5)
differ = np.abs(maps["predicted"][negatives] - maps["positive"][negatives]).max(axis=(1, 2))
print(f"identical on all {len(positives)} positively predicted images: {same_on_positive}")
print(f"different on {(differ > 1e-3).sum()} of {len(negatives)} negatively predicted images")"""),
    ("md", """\
For a whole test set, `attribute_cams.mean_cams_by_prediction` averages these
maps over all positive and all negative predictions per attribute (the
paper's Figure 2), and `metrics.energy.energy_by_prediction` gives the mean
proportional energy on each side (Table 1)."""),
]


def build_notebook():
    return notebook_builder.build_notebook(CELLS)


if __name__ == "__main__":
    notebook_builder.main(CELLS, NOTEBOOK, __doc__.split("\n\n")[0])
