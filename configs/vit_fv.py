r"""ViT face-verification heatmaps (Correia et al.): Table 1 analogue and perturbation curves.

Trains a ViT face embedder with CosFace on synthetic identities at 112 px,
runs the 10-fold verification protocol on disjoint test identities, explains
true-positive and true-negative pairs with attention maps (No-Grad ViT-LRP as
the main method, plus rollout and Chefer's gradient-weighted rollout), scores
OIM / UM / N-IUM with SM+ / SM-, and compares the selected heatmaps with
CorrRISE, RISE and occlusion on recall / TNR perturbation curves.

Run (results land in the workdir; checkpoints in <workdir>/models/, which a
.gitignore there keeps out of git):
  bash scripts/reproduce_vit_fv.sh                     # = the line below
  python explain.py --config configs/vit_fv.py --workdir results/vit_fv
  python explain.py --config configs/vit_fv.py:smoke --workdir /tmp/vit_fv_smoke
  python explain.py --config configs/vit_fv.py:paper --workdir runs/vit_fv_paper   # accelerator
Rerunning with the same workdir reloads the trained model and only re-explains.
Any field can be overridden, e.g. --config.model.name=vit_tiny_face (14 x 14
grid, ~5x slower) or --config.explain.num_positive=300.

Why the default sizes (2-core CPU, about 10-12 min on a free machine):
* vit_tiny_face_p16: 16 px patches give a 7 x 7 grid (50 tokens), about 5x
  cheaper than the 14 x 14 grid of vit_tiny_face and the paper's model.
* 400 identities x 10 images x 6 epochs at batch 32 = 750 updates (steps
  matter more than epochs here: 3 epochs at batch 64 left the CosFace loss
  nearly flat, 3 epochs at batch 32 with s = 16, m = 0.2 reached ~88%
  10-fold accuracy).
* 100 test identities, 10 folds x 30 matched + 30 mismatched pairs.
* Table 1 on up to 100 true-positive and 100 true-negative pairs (each
  attention method costs one forward + backward per image and one forward
  per masked image: 8 forwards per pair).
* Curves on 24 + 24 pairs with 300 CorrRISE and 300 RISE masks (the
  baselines cost 2 x pairs x masks forwards; the papers use 500-4000).


Real data (``celeba`` variant): the ViT trains on CelebA identities of the
training partition and the 10-fold protocol runs on identities of the test
partition (identity-disjoint; identity_CelebA.txt required), centre-cropped
to 112 px; a folder with an ``identity`` column works the same way:
  python explain.py --config configs/vit_fv.py:celeba --workdir runs/vit_fv_celeba \
    --config.data.root=/data/CelebA
The paper trains on VGGFace2 and tests on LFW / RFW pairs. ``data.pairs``
("lfw" | "rfw" | "folder") replaces the drawn test pairs with the data set's
own pairs file under data.root (``data.sources.build_pairs``); the ``lfw``
variant explains a ViT trained by another run on LFW's pairs.txt (10 folds,
faces centre-cropped to data.resolution, which must match the checkpoint's):
  python explain.py --config configs/vit_fv.py:lfw --workdir runs/vit_fv_lfw \
    --config.data.root=/data/lfw --config.model.path=runs/vit_fv_celeba
With ``model.source=train`` and a pairs file, the ViT trains on the training
split of data.source at data.root (e.g. a folder with an identity column and
a pairs.csv), whose identities the pairs file may also name."""

import ml_collections

from faceaudit_jax.config_args import parse_arg
from faceaudit_jax.data import sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, paper=False, celeba=False, lfw=False)
    c = ml_collections.ConfigDict()
    c.experiment = "vit_fv"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # Real data: data.root, data.test_root, ... (sources.REAL_DATA_FIELDS).
    sources.add_data_fields(c.data)
    c.data.source = "synthetic"
    c.data.seed = 0
    c.data.resolution = 112
    c.data.independent = False
    c.data.images_per_identity = 10
    # Test identities start here: disjoint from the training ones.
    c.data.test_offset = 10_000_000
    c.data.render_batch = 100
    # "" draws test pairs from test identities; "lfw" | "rfw" | "folder" reads the
    # data set's own pairs file under data.root (data.sources.build_pairs).
    c.data.pairs = ""

    c.model = ml_collections.ConfigDict()
    # model.source: "train" (CosFace here) | "checkpoint" (model.path: a vit_fv
    # workdir or its models/vit_embedder; the architecture comes from its fingerprint).
    c.model.source = "train"
    c.model.path = ""
    c.model.name = "vit_tiny_face_p16"
    # Any ViTConfig field, e.g. {"num_layers": 6}.
    c.model.overrides = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.num_identities = 400
    c.train.batch_size = 32
    c.train.num_epochs = 6
    c.train.optimizer = "adamw"
    c.train.lr = 1e-3
    c.train.weight_decay = 0.05
    c.train.schedule = "cosine"
    c.train.warmup_steps = 50
    c.train.grad_clip_norm = 1.0
    # CosFace on the cosine head. Face Transformer's s = 64, m = 0.35 (the paper
    # variant) barely moved a small ViT trained from scratch for a few hundred
    # steps (s = 32, m = 0.35: loss 17.2 -> 16.1, 76% verification accuracy after
    # 186 updates); s = 16, m = 0.2 learns within the CPU budget.
    c.train.scale = 16.0
    c.train.margin = 0.2
    c.train.flip = True
    c.train.ckpt_every = 100
    c.train.log_every = 25

    c.test = ml_collections.ConfigDict()
    c.test.num_identities = 100
    c.test.num_folds = 10
    c.test.pairs_per_fold = 30
    c.test.pair_seed = 0
    c.test.batch_size = 100

    c.explain = ml_collections.ConfigDict()
    # "nograd" is left out: its maps equal rollout's after normalisation.
    c.explain.methods = ("rollout", "grad_rollout", "nograd_lrp")
    c.explain.main_method = "nograd_lrp"
    # "pair": gradient methods explain each image's similarity to its partner
    # (pair-conditioned maps); "image": each image's own predicted-class
    # cosine against the CosFace class centres (classification-focused, one
    # map per image, as the paper).
    c.explain.target = "pair"
    c.explain.num_positive = 100
    c.explain.num_negative = 100
    c.explain.batch_pairs = 25
    # Removed pixels become black (0.0), for the SM masks and the curves alike.
    c.explain.fill = 0.0
    # The paper's heatmap: 256-bin Otsu, 8 x 8 dilation, 56 x 56 Gaussian of variance 6.6.
    c.explain.bins = 256
    c.explain.dilation_size = 8
    c.explain.gaussian_size = 56
    c.explain.gaussian_variance = 6.6
    c.explain.num_examples = 4

    c.curves = ml_collections.ConfigDict()
    c.curves.num_positive = 24
    c.curves.num_negative = 24
    c.curves.num_steps = 20
    c.curves.corrrise_masks = 300
    c.curves.corrrise_patches = 10
    c.curves.corrrise_patch_size = 30
    c.curves.rise_masks = 300
    c.curves.rise_grid = 8
    c.curves.rise_keep_prob = 0.5
    c.curves.occlusion_patch = 16
    c.curves.occlusion_stride = 8
    c.curves.chunk_size = 8

    if a.smoke:
        # Every stage on tiny budgets (64 px: the renderer's minimum).
        c.data.resolution = 64
        c.data.render_batch = 50
        c.model.overrides = ml_collections.ConfigDict(dict(
            image_size=64, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64, embed_dim=32))
        c.train.num_identities = 20
        c.train.batch_size = 50
        c.train.num_epochs = 1
        c.train.warmup_steps = 0
        c.train.ckpt_every = 4
        c.train.log_every = 2
        c.test.num_identities = 20
        c.test.pairs_per_fold = 3
        c.test.batch_size = 50
        c.explain.methods = ("rollout", "nograd_lrp")
        c.explain.num_positive = 6
        c.explain.num_negative = 6
        c.explain.batch_pairs = 6
        c.explain.gaussian_size = 24
        c.explain.num_examples = 2
        c.curves.num_positive = 3
        c.curves.num_negative = 3
        c.curves.num_steps = 4
        c.curves.corrrise_masks = 8
        c.curves.corrrise_patches = 4
        c.curves.corrrise_patch_size = 16
        c.curves.rise_masks = 8
        c.curves.rise_grid = 4
        c.curves.occlusion_patch = 32
        c.curves.occlusion_stride = 32
        c.curves.chunk_size = 8
    if a.paper:
        # The paper's setting for accelerators: Face Transformer ViT-P12S8 (14 x 14
        # overlapping patches, 20 layers), CosFace s = 64, LFW-sized protocol.
        c.model.name = "vit_face_paper"
        c.train.num_identities = 10_000
        c.train.batch_size = 256
        c.train.num_epochs = 20
        c.train.lr = 3e-4
        c.train.warmup_steps = 1000
        c.train.scale = 64.0
        c.train.margin = 0.35
        c.train.ckpt_every = 1000
        c.train.log_every = 100
        c.test.num_identities = 1000
        c.test.pairs_per_fold = 300
        c.explain.num_positive = 1000
        c.explain.num_negative = 1000
        c.explain.batch_pairs = 50
        c.curves.num_positive = 200
        c.curves.num_negative = 200
        c.curves.corrrise_masks = 1000
        c.curves.rise_masks = 4000
        c.curves.chunk_size = 32
    if a.celeba:
        c.data.source = "celeba"
    if a.lfw:
        # LFW's own 10 folds of pairs.txt explain a ViT trained elsewhere (LFW has no
        # training identities of its own here): model.path is a vit_fv workdir.
        c.data.source = "lfw"
        c.data.pairs = "lfw"
        c.model.source = "checkpoint"
    return c
