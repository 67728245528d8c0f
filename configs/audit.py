r"""FaceX audit of an existing classifier on your own data: no training.

Loads the model named by ``model.source`` / ``model.path``, explains its logit
``model.output_index`` (the attribute ``target``) with Grad-CAM on the test
images of ``data.source`` / ``data.root``, balanced over target x
``confounders``, and writes report.md, results.json (``ior``: region -> IoR,
``ranking``; the model, accuracies and the ranking position (RP) of each
confounder under ``extra``) and the figures into the workdir.

Model sources (``faceaudit_jax.models.sources``):
  checkpoint   model.path = a run directory written by train.py (e.g. W/biased);
               architecture and outputs are read from its model.json
  torchvision  model.path = torch.save(model.state_dict()) of a torchvision
               resnet18/34/50 with its own fc (needs the [torch] extra);
               model.mean / model.std = the normalisation it was trained with
               (inputs are images in [0, 1]; ImageNet's by default)
``model.arch`` and ``model.num_outputs``, when set, are checked against the file.

Test images (``data.sources.build_split``): every image of ``data.test_root``
when set (to audit every image of a folder, pass it there), else the data
set's published test split, else the test share of a seeded identity-disjoint
split of ``data.root`` (``data.split_seed``, ``data.test_fraction``), the same
split train.py holds out. Aligned / conflicting accuracy follows
``confounder_values`` (or the sign of the link in those images); a test set
without a link gets per-cell accuracies only.

Run:
  python train.py --config configs/facex.py --workdir W     # writes W/biased, W/balanced
  python explain.py --config configs/audit.py --workdir W/audit_biased \
      --config.model.path=W/biased
  python explain.py --config configs/audit.py --workdir W --config.model.source=torchvision \
      --config.model.path=clf.pt --config.model.arch=resnet18 \
      --config.data.source=celebamask_hq --config.data.root=DIR --config.target=Male
  python explain.py --config configs/audit.py:smoke --workdir /tmp/audit --config.model.path=...
"""

import ml_collections

from faceaudit_jax.data import sources
from faceaudit_jax.config_args import parse_arg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "audit"
    c.seed = 0
    # The attribute the explained logit predicts (CelebA name).
    c.target = "Male"
    # Attributes whose regions' ranking position is reported; the test images
    # are balanced over target x confounders. () balances the target alone.
    c.confounders = ("Wearing_Lipstick",)
    # The value of each confounder that goes with target = 1 in the bias the
    # model is suspected of (bias-aligned vs -conflicting accuracy), e.g. '(0,)':
    # lipstick with Male = 0. None: the sign of the link in the test data
    # (sources.bias_direction; synthetic faces: CelebA's, women wear lipstick).
    c.confounder_values = ml_collections.FieldReference(None, field_type=tuple)

    c.model = ml_collections.ConfigDict()
    c.model.source = "checkpoint"       # "checkpoint" | "torchvision"
    c.model.path = ""
    c.model.arch = ""                   # "" = as recorded / inferred; else checked
    c.model.num_outputs = 0             # 0 = as the file says; else checked
    c.model.output_index = 0            # which logit is explained
    c.model.mean = IMAGENET_MEAN        # torchvision only: input normalisation
    c.model.std = IMAGENET_STD

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.resolution = 128
    # Synthetic faces (data.source="synthetic"): the fields of configs/facex.py
    # (sources.SYNTHETIC_DATA_FIELDS), so the audited test images are those
    # facex's train.py tests on.
    c.data.seed = 0
    sources.add_synthetic_fields(c.data)
    # Real data: data.root; data.test_root (a second folder of the same layout:
    # all its images are the test set), else the published split, else a
    # seeded identity-disjoint split (sources.REAL_DATA_FIELDS).
    sources.add_data_fields(c.data)

    c.test = ml_collections.ConfigDict()
    # At most this many images, balanced over target x confounders; 0 (and any
    # size above it) = the largest balanced subset the test set holds.
    c.test.size = 1000
    c.test.batch_size = 100

    c.explain = ml_collections.ConfigDict()
    c.explain.method = "grad_cam"
    c.explain.target_mode = "predicted"
    c.explain.ior_mode = "soft"
    c.explain.resolution = None         # None: the data resolution
    c.explain.patch_size = 16
    c.explain.top_k = 20
    c.explain.num_overlays = 8
    # "" = the data set's own masks; a configs/face_parser.py workdir = that parser.
    c.explain.parser = ""

    a = parse_arg(arg, smoke=False)
    if a.smoke:
        c.data.resolution = 64
        c.data.pool_size = 20_000
        c.test.size = 32
        c.test.batch_size = 16
        c.explain.top_k = 4
        c.explain.num_overlays = 4
    return c
