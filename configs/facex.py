r"""FaceX audit of a Male classifier with an injected Wearing_Lipstick shortcut (the main job).

Trains (or loads from its Orbax checkpoint) a classifier on synthetic faces in
which 99% of men wear no lipstick and 99% of women do (FaceX's direction:
``bias.confounder_values`` unset follows the sign of the link, which the
renderer's independent attributes lack, so CelebA's sign as drawn by the
renderer's correlated mode: lipstick goes with Male = 0), plus a baseline trained
on a same-size subset balanced over Male x Wearing_Lipstick; then explains the
biased model with Grad-CAM over a balanced test set and writes the FaceX
report (prototype heatmap, region ranking, patch galleries, JSON).

Run:
  python explain.py --config configs/facex.py --workdir runs/facex
  python explain.py --config configs/facex.py:smoke --workdir /tmp/facex_smoke
  python explain.py --config configs/facex.py:paper --workdir runs/facex_paper   # accelerator
Any field can be overridden, e.g. --config.bias.confounders='("Wearing_Hat",)'.

Real data (docs/use_your_own_data.md), every variant reads --config.data.root:
  :celebamask_hq  your CelebAMask-HQ-layout folders: train on data.root, test and
      explain on data.test_root (or, without it, the published split via
      CelebA-HQ-to-CelebA-mapping.txt), with the data set's own masks:
      python train.py --config configs/facex.py:celebamask_hq --workdir W \
        --config.data.root=TRAIN --config.data.test_root=TEST
  :celeba  FaceX's protocol: ResNet-18 trained at 224 px on CelebA's training
      partition minus the CelebA originals of the CelebAMask-HQ test images,
      tested and explained on the CelebAMask-HQ test split (published
      partition) at 512 px:
      python explain.py --config configs/facex.py:celeba --workdir W \
        --config.data.root=CELEBA --config.data.test_root=CELEBAMASK_HQ
  Both default to the sign of the data set's own Male x Wearing_Lipstick link
  (CelebA: women wear lipstick), and test on the largest subset balanced
  over Male x Wearing_Lipstick that the test set holds (test.size = 0).
"""

import ml_collections

from faceaudit_jax.data import sources
from faceaudit_jax.config_args import parse_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "facex"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.seed = 0
    c.data.resolution = 128
    # Synthetic faces (sources.SYNTHETIC_DATA_FIELDS): independent attributes, so the only
    # target x confounder link is the one the biased subset injects; test identities
    # disjoint from training.
    sources.add_synthetic_fields(c.data)
    # Real data: data.root, data.test_root, ... (sources.REAL_DATA_FIELDS).
    sources.add_data_fields(c.data)

    c.bias = ml_collections.ConfigDict()
    c.bias.target = "Male"
    c.bias.confounders = ("Wearing_Lipstick",)
    c.bias.corr = 0.99
    # The value of each confounder that goes with target = 1, e.g. '(0,)': lipstick
    # with Male = 0. None: the sign of the link in the data (sources.bias_direction).
    c.bias.confounder_values = ml_collections.FieldReference(None, field_type=tuple)

    c.model = ml_collections.ConfigDict()
    # "train": train the models here. To audit an existing model (a train.py
    # run dir or a torchvision state_dict) use configs/audit.py.
    c.model.source = "train"
    c.model.name = "small_resnet"

    c.train = ml_collections.ConfigDict()
    # Images in the biased training set (and the baseline's). A real folder that holds
    # fewer (at bias.corr, every cell filled) trains on the largest subset it can give,
    # printed as "[subsets] train.size=4000 -> N: ..."; 0 asks for that largest size.
    c.train.size = 4000
    c.train.batch_size = 32
    # 625 updates at batch 32: the shortcut is learned within ~250 (docs/design.md).
    c.train.num_epochs = 5
    # FaceX's recipe: Adam, lr 1e-3 x0.1 at 1/3 and 2/3, weight decay 1e-4.
    c.train.optimizer = "adam"
    c.train.lr = 1e-3
    c.train.weight_decay = 1e-4
    c.train.schedule = "step"
    c.train.decay_boundaries = (1 / 3, 2 / 3)
    c.train.decay_factor = 0.1
    c.train.ckpt_every = 100
    c.train.log_every = 25
    # Also train the baseline on a subset balanced over target x confounder.
    c.train.baseline = True

    c.test = ml_collections.ConfigDict()
    # Balanced over target x confounders; 0 = the largest such subset the test set holds.
    c.test.size = 1000
    c.test.batch_size = 100

    c.explain = ml_collections.ConfigDict()
    c.explain.method = "grad_cam"
    c.explain.target_mode = "predicted"
    c.explain.ior_mode = "soft"
    # None: explain at the training resolution; FaceX suggests larger (e.g. 512).
    c.explain.resolution = None
    # Side of the square patches P_iq (eq. 6); FaceX's released code uses 16.
    c.explain.patch_size = 16
    c.explain.top_k = 20
    c.explain.num_overlays = 8
    # Parse maps: "" = the data set's own masks; a configs/face_parser.py
    # workdir = that trained parser (for images without masks).
    c.explain.parser = ""

    a = parse_arg(arg, smoke=False, paper=False, celebamask_hq=False, celeba=False)
    if a.smoke:
        c.data.resolution = 64
        c.data.pool_size = 20_000
        c.train.size = 256
        c.train.batch_size = 32
        c.train.num_epochs = 1
        c.train.ckpt_every = 4
        c.train.log_every = 2
        c.test.size = 64
        c.test.batch_size = 32
        c.explain.top_k = 4
        c.explain.num_overlays = 4
    if a.paper:
        # FaceX's setting for accelerators: ResNet-18, batch 128, 20 epochs,
        # and an explanation at a larger resolution than training.
        c.model.name = "resnet18"
        c.data.resolution = 224
        c.data.pool_size = 400_000
        c.train.size = 20_000
        c.train.batch_size = 128
        c.train.num_epochs = 20
        c.test.size = 4000
        c.explain.resolution = 448
    if a.celebamask_hq:
        c.data.source = "celebamask_hq"
        c.data.resolution = 128
        c.test.size = 0
    if a.celeba:
        c.data.source = "celeba"
        c.data.test_source = "celebamask_hq"
        c.data.test_split = "published"
        c.model.name = "resnet18"
        c.data.resolution = 224
        c.train.size = 20_000
        c.train.batch_size = 128
        c.train.num_epochs = 20
        # CelebA's training partition has too few men wearing lipstick for a
        # balanced set of 20,000; FaceX audits the biased model only.
        c.train.baseline = False
        c.test.size = 0
        c.explain.resolution = 512
    return c
