r"""Train the 19-region face parser (``models.parser_net.ParserNet``) and score it by IoU.

FaceX parses images that come without masks (RFW, your own photos) with a
pretrained parser; none can be downloaded here, so the project trains one:
on synthetic faces by default, on CelebAMask-HQ when you have it.

Run:
  bash scripts/reproduce_face_parser.sh                # default -> results/face_parser
  python explain.py --config configs/face_parser.py --workdir results/face_parser
  python explain.py --config configs/face_parser.py:smoke --workdir /tmp/face_parser_smoke
  python explain.py --config configs/face_parser.py:celebamask_hq --workdir runs/parser_hq \
      --config.data.root=/data/CelebAMask-HQ           # real masks, accelerator recommended
  python explain.py --config configs/face_parser.py:celebamask_hq,smoke --workdir /tmp/parser_try \
      --config.data.root=DIR                           # smoke sizes on any CelebAMask-HQ-layout folder
Then audit with it: --config.explain.parser=<workdir> on a FaceX config.

The ``:celebamask_hq`` variant follows the data set's protocol: its published
train / test split (by each image's CelebA original in
CelebA-HQ-to-CelebA-mapping.txt: CelebA's test partition is test, its train
partition train, its valid partition unused; without that file a seeded
split, image by image, as CelebAMask-HQ has no identities), the 512 px masks
merged into the 19 regions as its g_mask.py does, mean IoU over the regions
present in the test set; here at 256 px.

Default sizes (2-core CPU, a few minutes): 96 px faces from the CelebA-like
(correlated) renderer, 3,000 training images x 3 epochs at batch 16 (~560
steps), 256 test images from disjoint identities.
"""

import ml_collections

from faceaudit_jax.data import sources
from faceaudit_jax.config_args import parse_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "face_parser"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # Real data: data.root, data.test_root, ... (sources.REAL_DATA_FIELDS).
    sources.add_data_fields(c.data)
    c.data.source = "synthetic"          # or "celebamask_hq" (needs data.root)
    c.data.root = ""
    c.data.seed = 0
    c.data.resolution = 96
    c.data.independent = False           # CelebA-like attribute correlations
    c.data.images_per_identity = 10
    c.data.test_offset = 50_000_000      # test identities disjoint from training

    c.model = ml_collections.ConfigDict()
    c.model.widths = (16, 32, 64, 128)
    c.model.norm_groups = 8

    c.train = ml_collections.ConfigDict()
    c.train.size = 3000
    c.train.batch_size = 16
    c.train.num_epochs = 3
    c.train.optimizer = "adam"
    c.train.lr = 2e-3
    c.train.weight_decay = 0.0
    c.train.schedule = "cosine"
    c.train.ckpt_every = 100
    c.train.log_every = 25
    # Small regions (eyes, brows, lips: ~0.2% of the pixels each) need
    # reweighting or a short run never predicts them (mean IoU 0.24 without).
    c.train.class_weighting = "median_frequency"
    c.train.weight_power = 0.5           # square root: background and skin still count
    c.train.weight_sample = 256          # training maps the region frequencies come from

    c.test = ml_collections.ConfigDict()
    c.test.size = 256
    c.test.batch_size = 16
    c.test.num_examples = 4              # rows of the example figure

    a = parse_arg(arg, smoke=False, celebamask_hq=False)
    if a.celebamask_hq:
        _celebamask_hq(c)
    if a.smoke:  # after the data set's settings: 'celebamask_hq,smoke' is a smoke-size run on real files
        _smoke(c)
    return c


def _celebamask_hq(c: ml_collections.ConfigDict) -> None:
    # The masks' own 512 px halved; the data set's published train/test split.
    c.data.source = "celebamask_hq"
    c.data.resolution = 256
    c.model.widths = (32, 64, 128, 256, 256)
    c.train.size = 0                 # 0 = the whole training split
    c.train.batch_size = 16
    c.train.num_epochs = 20
    c.train.ckpt_every = 1000
    c.train.log_every = 100
    c.test.size = 0                  # 0 = the whole test split


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.data.resolution = 64
    c.model.widths = (8, 16)
    c.train.size = 32
    c.train.batch_size = 8
    c.train.num_epochs = 1
    c.train.ckpt_every = 2
    c.train.log_every = 2
    c.test.size = 16
    c.test.batch_size = 8
    c.test.num_examples = 2
    c.train.weight_sample = 16
