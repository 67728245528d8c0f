"""Write notebooks/facex_audit.ipynb: a FaceX audit in a dozen lines, and a new CAM formula.

The notebook trains a small classifier on synthetic faces with an injected
shortcut (the smoke budget of configs/facex.py, so it runs on a CPU in about a
minute), audits it with FaceX (region IoR, ranking, ranking position of the
shortcut, prototype heatmap), then adds a CAM formula (LayerCAM) as a plain
function: passed directly as a callable, and registered by name so the whole
audit uses it.

    python notebooks/make_facex_notebook.py            # write it
    python notebooks/make_facex_notebook.py --execute  # write and run it in place
"""

from __future__ import annotations

import os

import notebook_builder

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "facex_audit.ipynb")

CELLS = [
    ("md", """\
# Auditing a face-attribute classifier with FaceX

FaceX (Sarridis et al.) summarises where a classifier looks over a whole test
set: each image's CAM $G_i$ is intersected with its 19 parsed face regions,
$\\mathrm{IoR}_{ir} = \\sum G_i M_{ir} / \\sum M_{ir}$ (eq. 3), averaged over
the images where the region is present (eq. 4), and the regions are ranked.
The ranking position (RP) of the region tied to a known bias says whether the
audit finds it.

Here: a Male classifier trained on synthetic faces in which 99% of women wear
lipstick and 99% of men do not. The budget is the smoke variant of
`configs/facex.py` (64 px, a few training steps) so the notebook runs in about
a minute on a CPU; the full config (`python explain.py --config
configs/facex.py --workdir runs/facex`) learns the shortcut and ranks the lips
at the top."""),
    ("code", """\
%matplotlib inline
import importlib.util, tempfile
from pathlib import Path
import jax, jax.numpy as jnp, matplotlib, numpy as np
from faceaudit_jax import classifiers
from faceaudit_jax.summary import audit as audit_lib
from faceaudit_jax.explain import cams
from faceaudit_jax.viz import figures, prototype

matplotlib.rcParams["figure.dpi"] = 64   # keeps the stored notebook small

root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "configs" / "facex.py").exists())
spec = importlib.util.spec_from_file_location("facex_config", root / "configs" / "facex.py")
config_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_module)
config = config_module.get_config("smoke")
print(config.bias)"""),
    ("md", "## The audit in a dozen lines"),
    ("code", """\
source = classifiers.build_source(config.data)        # faces rendered on demand from their indices
subsets = classifiers.make_subsets(config, source)    # biased training set, balanced test set
workdir = tempfile.mkdtemp()                          # Orbax checkpoints and metrics.jsonl
clf = classifiers.train_classifier(config, workdir, subsets["biased"], source, "biased")

result = audit_lib.audit(clf, source, subsets["test"], config.bias.target, config.explain,
                     batch_size=int(config.test.batch_size))
print(f"accuracy {result.accuracy:.3f} on {result.num_images} test images")
for rank, region, value in result.ranking()[:5]:
    print(f"{rank:2d}. {region:8s} IoR {value:.3f}")
confounders = list(config.bias.confounders)
print("RP of", confounders, "=", audit_lib.confounder_rp(result.ior, confounders))"""),
    ("md", "The heatmap on the face prototype (blue = low, red = high IoR; grey = region never present):"),
    ("code", """\
prototype.plot_prototype_heatmap(result.ior, title="FaceX IoR, Male classifier (smoke budget)")"""),
    ("md", """\
## A new CAM formula as a plain function

A CAM formula is any function `fn(acts, grads) -> maps`: `acts` is the last
feature map [B, h, w, C], `grads` the gradient of the explained score with
respect to it (same shape), and it returns [B, h, w] after the final ReLU.
Upsampling and the [0, 1] normalisation are done for you. Example: LayerCAM
(Jiang et al., 2021), which weights every position of every channel by its
own positive gradient, $\\mathrm{ReLU}(\\sum_c \\mathrm{ReLU}(g_c) \\odot a_c)$,
as pytorch-grad-cam's `LayerCAM`. (XGrad-CAM would make a dull example here:
behind a global-average-pooling + linear head the gradient is constant over
positions and XGrad-CAM coincides with Grad-CAM.)"""),
    ("code", """\
def layer_cam(acts, grads):
    return jax.nn.relu((jax.nn.relu(grads) * acts).sum(axis=-1))        # [B, h, w]"""),
    ("md", "**Option 1: pass the function itself** as `method` to `compute_cams` (or `make_cam_fn`):"),
    ("code", """\
features_fn, head_fn = clf.fns()
batch = source.batch(subsets["test"][:6])
target = cams.make_binary_target("predicted")          # |z|: explain the predicted class
maps = {m: cams.compute_cams(features_fn, head_fn, batch["image"], target, method=m)
        for m in ("grad_cam", layer_cam)}
print("maps", maps[layer_cam].shape, "in [0, 1]:",
      float(maps[layer_cam].min()), float(maps[layer_cam].max()))
print("mean |LayerCAM - Grad-CAM|:", float(jnp.abs(maps[layer_cam] - maps["grad_cam"]).mean()))
figures.plot_cam_overlays(np.asarray(batch["image"]), np.asarray(maps[layer_cam]),
                          titles=[f"image {i}" for i in range(6)])"""),
    ("md", """\
**Option 2: register it by name**, so anything configured by a method name
(the config field `explain.method`, hence `explain.py` and the whole audit)
can use it. `overwrite=True` lets this cell run twice."""),
    ("code", """\
cams.register_cam_method("layer_cam", layer_cam, overwrite=True)
config.explain.method = "layer_cam"
result_x = audit_lib.audit(clf, source, subsets["test"], config.bias.target, config.explain,
                       batch_size=int(config.test.batch_size))
print("top regions, Grad-CAM: ", [r for _, r, _ in result.ranking()[:5]])
print("top regions, LayerCAM: ", [r for _, r, _ in result_x.ranking()[:5]])
figures.plot_ior_comparison(result.ior, result_x.ior, labels=("Grad-CAM", "LayerCAM"))"""),
    ("md", """\
The tables of the paper (single and double injected biases, no injected bias,
and a mitigation before/after) run with `bash scripts/reproduce_facex.sh`;
see `configs/facex_tables.py`."""),
]


def build_notebook():
    return notebook_builder.build_notebook(CELLS)


if __name__ == "__main__":
    notebook_builder.main(CELLS, NOTEBOOK, __doc__.split("\n\n")[0])
