r"""Binary attribute CAMs: AFFACT-u vs AFFACT-b, proportional energy per predicted class.

Reproduces "Biased binary attribute classifiers ignore the majority classes"
on CelebA-like synthetic faces: two multi-attribute networks (one logit per
attribute the renderer draws) trained on the same images, AFFACT-u with the
plain Euclidean loss on +-1 targets and AFFACT-b with the class-balanced
Euclidean loss (eq. 5-6, weights from the training set's p_m), explained on
frontal test faces with the predicted-class target |z| (and the positive
target z for Figure 4) by Grad-CAM, Grad-CAM++, HiResCAM and Element-wise
Grad-CAM.

Run (results, JSON + Markdown + figures, land in the workdir; checkpoints in
<workdir>/models/, which a .gitignore there keeps out of git):
  bash scripts/reproduce_attribute_cams.sh            # = the line below
  python explain.py --config configs/attribute_cams.py --workdir results/attribute_cams
  python explain.py --config configs/attribute_cams.py:smoke --workdir /tmp/attribute_cams_smoke
  python explain.py --config configs/attribute_cams.py:paper --workdir runs/attribute_cams_paper  # accelerator
  python explain.py --config configs/attribute_cams.py:celeba \
      --config.data.root=/data/celeba --workdir runs/attribute_cams_celeba
Rerunning with the same workdir reloads the finished models from their Orbax
checkpoints (or resumes unfinished training) and only re-explains. Any field
can be overridden, e.g. --config.train.unbalanced_loss=bce or
--config.explain.mask_source=rectangles.

Why the default sizes (2-core CPU, about 7-8 min on a free machine):
* 96 px: the small ResNet's last feature map is then 6 x 6 (stride 16),
  close to the 7 x 7 map of the paper's ResNet-50 at 224 px, so a CAM cell
  covers about the same share of the face as in the paper. Training renders
  faces on the fly at about 200 images/s at 96 px (vs ~100 at 128 px).
* 4,000 training images x 8 epochs at batch 32 = 1,000 updates per model,
  Adam with a cosine decay from 1e-3: docs/design.md found that the number of
  steps, not epochs, decides what a small network learns. Measured here
  (AFFACT-u): with FaceX's step schedule (x0.1 at 1/3 and 2/3) over 625
  updates the 35-output network stopped learning after the ~200 full-rate
  updates (training loss ~16, vs ~18 for constant predictions; mean balanced
  accuracy 0.54, Wearing_Lipstick accuracy 0.70); with the cosine decay over
  1,000 updates it reached a loss of ~11, mean balanced accuracy 0.66 and
  Wearing_Lipstick accuracy 0.94. The two models see exactly the same
  batches in the same order.
* 560 rendered test faces from identities disjoint from training; the frontal
  filter (sec. 3.3, ratio < 0.1) kept 496 of them (89%) in the recorded run.
Estimated total on a free machine: training 2 x ~3 min, explaining
2 x 560 images with 4 CAM methods (target |z|) + Grad-CAM (target z) for
every attribute ~1 min.

Explain your own multi-attribute classifier instead of training two
(``model.source``; no training, one model, no AFFACT-u/b comparison):
  python explain.py --config configs/attribute_cams.py --workdir W \
      --config.model.source=checkpoint --config.model.path=RUN/models/affact_b
  python explain.py --config configs/attribute_cams.py --workdir W \
      --config.model.source=torchvision --config.model.path=clf.pt \
      --config.model.name=resnet50 --config.model.outputs='("Bald","Eyeglasses")'
``checkpoint``: a run directory of this project (its model.json names the
outputs); ``torchvision``: a ResNet state_dict whose ``fc`` has one output
per name in ``model.outputs`` (CelebA attribute names, in fc order).
``model.name`` is checked against the file's architecture.

Variants (comma-separated, ``config_args.parse_arg``): ``smoke`` (64 px, 2 updates per model, 32 test faces; ~40 s),
``paper`` (AFFACT's ResNet-50 at 224 px for accelerators) and ``celeba``
(real CelebA from ``data.root``: the published layout with
img_align_celeba/, list_attr_celeba.txt, list_landmarks_align_celeba.txt and
list_eval_partition.txt; no parse maps, so the energy masks are the paper's
fixed rectangles).
"""

import ml_collections

from faceaudit_jax.config_args import parse_arg
from faceaudit_jax.data import sources
from faceaudit_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD

TABLE2_ATTRIBUTES = ("Wearing_Hat", "Eyeglasses", "Wearing_Earrings", "Wearing_Necklace", "Bald")
FIGURE_ATTRIBUTES = TABLE2_ATTRIBUTES + ("Wearing_Necktie", "No_Beard", "Wearing_Lipstick",
                                         "Smiling")
CAM_METHODS = ("grad_cam", "grad_cam_plusplus", "hires_cam", "element_wise_grad_cam")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, paper=False, celeba=False)
    c = ml_collections.ConfigDict()
    c.experiment = "attribute_cams"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # Real data: data.root, data.test_root, ... (sources.REAL_DATA_FIELDS).
    sources.add_data_fields(c.data)
    c.data.source = "synthetic"          # or "celeba" (set data.root)
    c.data.root = ""                     # CelebA folder for source="celeba"
    c.data.seed = 0
    c.data.resolution = 96
    # CelebA-like co-occurrences and marginal rates (realistic imbalance:
    # Bald 1.5%, Wearing_Hat 5%, ... No_Beard 85%).
    c.data.independent = False
    c.data.images_per_identity = 10
    # Test images come from an index range (and so identities) disjoint from training.
    c.data.test_offset = 50_000_000
    # The networks' outputs. (): every attribute with known training targets
    # (synthetic: the 35 the renderer draws; CelebA: all 40); or a tuple of names.
    c.data.attributes = ()

    c.model = ml_collections.ConfigDict()
    c.model.name = "small_resnet"        # trained arch; checked against a loaded model's
    # Where the explained model comes from: "train" (AFFACT-u and AFFACT-b,
    # trained here), "checkpoint" (model.path = a run directory of this
    # project) or "torchvision" (model.path = a ResNet state_dict file).
    c.model.source = "train"
    c.model.path = ""
    # torchvision: the CelebA attribute each fc output predicts, in order
    # (checkpoint: read from the run dir's model.json; if set, checked).
    c.model.outputs = ()
    c.model.mean = IMAGENET_MEAN         # torchvision only: input normalisation
    c.model.std = IMAGENET_STD

    c.train = ml_collections.ConfigDict()
    c.train.size = 4000
    c.train.batch_size = 32
    c.train.num_epochs = 8
    # AFFACT-u: "euclidean" (plain (z - t)^2 on t in {+1, -1}, AFFACT's own
    # loss, so the two models differ only by the class weights) or "bce".
    c.train.unbalanced_loss = "euclidean"
    c.train.optimizer = "adam"
    c.train.lr = 1e-3
    c.train.weight_decay = 1e-4
    # Cosine decay to 0 over the run (see above: the step schedule stalls).
    c.train.schedule = "cosine"
    c.train.ckpt_every = 125
    c.train.log_every = 25

    c.test = ml_collections.ConfigDict()
    c.test.size = 560                    # rendered (or read) before the frontal filter
    c.test.batch_size = 40
    c.test.frontal_max_ratio = 0.1       # sec. 3.3

    c.explain = ml_collections.ConfigDict()
    c.explain.methods = CAM_METHODS
    c.explain.main_method = "grad_cam"   # Table 1 and Figures 2 and 4
    c.explain.mask_source = "parse"      # "parse" (regions) or "rectangles" (paper's boxes)
    c.explain.table2_attributes = TABLE2_ATTRIBUTES
    c.explain.figure_attributes = FIGURE_ATTRIBUTES
    # The closing note compares the models on attributes at least this
    # imbalanced (|p_m - 0.5| >= 0.35: p_m <= 0.15 or >= 0.85).
    c.explain.min_imbalance = 0.35

    if a.paper:
        # AFFACT: ResNet-50 (BatchNorm) at 224 px, a 7 x 7 final map.
        c.model.name = "resnet50"
        c.data.resolution = 224
        c.train.size = 100_000
        c.train.batch_size = 64
        c.train.num_epochs = 10
        c.train.ckpt_every = 1000
        c.train.log_every = 100
        c.test.size = 10_000
        c.test.batch_size = 100
    if a.celeba:
        c.data.source = "celeba"
        c.data.resolution = 224
        c.model.name = "resnet50"
        c.train.size = 0                 # 0: the whole training partition
        c.train.batch_size = 64
        c.train.num_epochs = 8
        c.train.ckpt_every = 1000
        c.train.log_every = 100
        c.test.size = 0                  # 0: the whole test partition
        c.test.batch_size = 100
        c.explain.mask_source = "rectangles"
    if a.smoke:  # last: shrinks any combination (e.g. 'celeba,smoke')
        c.data.resolution = 64
        c.train.size = 64
        c.train.batch_size = 32          # also for 'celeba,smoke' on a small folder
        c.train.num_epochs = 1
        c.train.ckpt_every = 2
        c.train.log_every = 1
        c.test.size = 32
        c.test.batch_size = 32
        c.explain.figure_attributes = ("Wearing_Hat", "Eyeglasses", "No_Beard")
        c.explain.table2_attributes = ("Wearing_Hat", "Eyeglasses")
    return c
