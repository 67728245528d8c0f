r"""CorrRISE (Lu, Xu and Ebrahimi): Table 1 analogue on synthetic verification pairs.

Trains a small_resnet face embedder with CosFace on synthetic identities at
112 px, measures 10-fold verification accuracy on disjoint test identities,
then explains matching pairs with similarity Grad-CAM, Grad-CAM++, RISE,
occlusion and CorrRISE and scores them with Deletion / Insertion (accuracy at
the fixed threshold); plus the model-randomisation sanity check and figures.

Run:
  bash scripts/reproduce_corrrise.sh                   # default -> results/corrrise
  python explain.py --config configs/corrrise.py --workdir results/corrrise
  python explain.py --config configs/corrrise.py:smoke --workdir /tmp/corrrise_smoke
  python explain.py --config configs/corrrise.py:paper --workdir runs/corrrise_paper   # accelerator
Any field can be overridden, e.g. --config.explain.correlation=spearman.

A second scenario (``occluded``, the paper's Webface-Occ analogue) explains
matching pairs whose probe wears glasses or a hat. Default sizes (2-core CPU,
about 15 min free): 400 training identities x 10 images, 6 epochs at batch
32 (750 updates); 100 test identities, 600 pairs; 32 explained pairs (16
occluded) with the paper's N = 500 masks.

Real data (``celeba`` variant): the embedder trains on CelebA identities of
the training partition and is tested on identities of the test partition
(CelebA's partitions are identity-disjoint; identity_CelebA.txt required),
centre-cropped to 112 px; any folder with an ``identity`` column works the
same way (data.source=folder, seeded identity-disjoint split):
  python explain.py --config configs/corrrise.py:celeba --workdir runs/corrrise_celeba \
    --config.data.root=/data/CelebA
The data set's own pairs (LFW pairs.txt, RFW, a folder's pairs.csv) replace
the drawn test pairs with ``data.pairs``; any embedder can be explained
(``model.source``):
  python explain.py --config configs/corrrise.py --workdir W --config.data.source=lfw \
    --config.data.root=/data/lfw --config.data.pairs=lfw \
    --config.model.source=callable --config.model.function=mypkg.faces:embed
  python explain.py --config configs/corrrise.py --workdir W2 \
    --config.model.source=checkpoint --config.model.path=results/corrrise
Protocol and deviations from the paper: docs/deviations_corrrise.md.
"""

import ml_collections

from faceaudit_jax.config_args import parse_arg
from faceaudit_jax.data import sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_arg(arg, smoke=False, paper=False, celeba=False)
    c = ml_collections.ConfigDict()
    c.experiment = "corrrise"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # Real data: data.root, data.test_root, ... (sources.REAL_DATA_FIELDS).
    sources.add_data_fields(c.data)
    c.data.source = "synthetic"
    c.data.seed = 0
    c.data.resolution = 112  # the paper's face size
    c.data.independent = True
    c.data.images_per_identity = 10
    # Test identities start here: disjoint from the training identities.
    c.data.test_offset = 50_000_000
    c.data.render_batch = 100
    # "" draws test pairs from test identities; "lfw" | "rfw" | "folder" reads the
    # data set's own pairs file under data.root (data.sources.build_pairs).
    c.data.pairs = ""

    c.model = ml_collections.ConfigDict()
    # model.source: "train" (CosFace here) | "checkpoint" (model.path: a CorrRISE
    # workdir or its models/embedder) | "callable" (model.function = "module:function",
    # a numpy embedder f(images [B, H, W, 3] in [0, 1]) -> [B, D]).
    c.model.source = "train"
    c.model.path = ""
    c.model.function = ""
    c.model.name = "small_resnet"
    c.model.embedding_dim = 128

    c.train = ml_collections.ConfigDict()
    c.train.num_identities = 400
    c.train.batch_size = 32
    c.train.num_epochs = 6
    c.train.loss = "cosface"
    c.train.scale = 32.0
    c.train.margin = 0.35
    c.train.optimizer = "adam"
    c.train.lr = 1e-3
    c.train.weight_decay = 1e-4
    c.train.schedule = "cosine"
    c.train.decay_boundaries = (1 / 3, 2 / 3)
    c.train.decay_factor = 0.1
    c.train.ckpt_every = 150
    c.train.log_every = 25

    c.test = ml_collections.ConfigDict()
    c.test.num_identities = 100
    c.test.num_folds = 10
    c.test.pairs_per_fold = 60
    c.test.pair_seed = 0
    c.test.batch_size = 100

    c.explain = ml_collections.ConfigDict()
    c.explain.seed = 0
    c.explain.num_pairs = 32  # matching pairs for Deletion / Insertion
    c.explain.pairs_per_call = 4
    c.explain.chunk_size = 32
    c.explain.num_masks = 500  # the paper's N
    c.explain.num_patches = 10
    c.explain.patch_size = 30
    c.explain.correlation = "pearson"
    c.explain.rise_masks = 500
    c.explain.rise_grid = 8
    c.explain.occlusion_patch = 24
    c.explain.occlusion_stride = 16
    c.explain.num_steps = 10
    c.explain.curve_chunk = 64

    c.sanity = ml_collections.ConfigDict()
    c.sanity.seed = 1
    c.sanity.num_pairs = 4

    # Second scenario (the paper's Webface-Occ analogue): probes with glasses
    # or a hat against a plain image of the same person.
    c.occluded = ml_collections.ConfigDict()
    c.occluded.enabled = True
    c.occluded.num_pairs = 16

    if a.smoke:
        c.data.resolution = 64
        c.data.images_per_identity = 4
        c.data.render_batch = 64
        c.train.num_identities = 16
        c.train.batch_size = 16
        c.train.num_epochs = 1
        c.train.ckpt_every = 4
        c.train.log_every = 2
        c.test.num_identities = 20
        c.test.num_folds = 10
        c.test.pairs_per_fold = 2
        c.explain.num_pairs = 3
        c.explain.pairs_per_call = 3
        c.explain.chunk_size = 8
        c.explain.num_masks = 16
        c.explain.num_patches = 3
        c.explain.patch_size = 16
        c.explain.rise_masks = 16
        c.explain.occlusion_patch = 32
        c.explain.occlusion_stride = 32
        c.explain.num_steps = 4
        c.explain.curve_chunk = 16
        c.sanity.num_pairs = 2
        c.occluded.num_pairs = 2
    if a.paper:
        # The paper's CorrRISE settings with a larger model (accelerator).
        c.model.name = "resnet18"
        c.train.num_identities = 1200
        c.train.batch_size = 128
        c.train.num_epochs = 20
        c.test.num_identities = 400
        c.test.pairs_per_fold = 200
        c.explain.num_pairs = 500
        c.explain.pairs_per_call = 8
        c.explain.num_masks = 500
        c.explain.rise_masks = 4000
        c.explain.occlusion_patch = 16
        c.explain.occlusion_stride = 8
        c.explain.num_steps = 20
        c.sanity.num_pairs = 50
        c.occluded.num_pairs = 500
    if a.celeba:
        c.data.source = "celeba"
    return c
