r"""Patch attribution and noise debiasing (De Coninck et al.): the Table 1 analogue.

Per confounder (Blond_Hair, Eyeglasses, Smiling, Wearing_Hat): a patch region
classifier trained to predict the confounder gives attribution maps; gender
classifiers are trained on the De Coninck biased set (men never with the
confounder, women 2/3 with it), on a same-size set balanced over gender x
confounder, and on the biased set with general / specific x noise / mask
augmentation at q = 0.7; plus a quantile sweep of one augmentation on one
confounder. See faceaudit_jax/experiments/debias_noise.py; departures from
the paper: docs/deviations_debias_noise.md.

Run:
  bash scripts/reproduce_debias_noise.sh                 # default -> results/debias_noise
  python explain.py --config configs/debias_noise.py --workdir results/debias_noise
  python explain.py --config configs/debias_noise.py:smoke --workdir /tmp/debias_smoke
  python explain.py --config configs/debias_noise.py:paper --workdir runs/debias_paper  # GPU
Any field can be overridden, e.g. --config.sweep.method=specific_mask.

The default variant is the paper's recipe scaled for a 2-core CPU (about 45
minutes when the machine is free: 15 for the first of the 3 trainings per
cell, 28 for the other two): the paper's set sizes at 1/5 (600 men,
400 + 200 women), a 13 x 13 grid instead of 49 x 49, a small patch backbone,
and a small gender CNN that sees the 128 px images pooled to 64 px, trained
6 epochs with lr 1e-2 (at 1e-3 it reached only about 0.6 test accuracy on a
gender-balanced set after 8 epochs; the paper's 1e-5 is slower still) and its
batch-norm statistics re-estimated after training.

Real data (``celeba`` variant, the paper's data set): the subsets are drawn
from CelebA's training partition and the gender-balanced test set from its
test partition (list_eval_partition.txt), centre-cropped to 128 px:
  python explain.py --config configs/debias_noise.py:celeba --workdir runs/debias_celeba \
    --config.data.root=/data/CelebA
The paper: 3000 men without the confounder, 2000 + 1000 women with and
without it (train_set.* at the paper's sizes in this variant).
"""

import ml_collections

from faceaudit_jax import config_args
from faceaudit_jax.data import sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "debias_noise"
    c.seed = 0
    c.target = "Male"
    c.confounders = ("Blond_Hair", "Eyeglasses", "Smiling", "Wearing_Hat")

    c.data = ml_collections.ConfigDict()
    # Real data: data.root, data.test_root, ... (sources.REAL_DATA_FIELDS).
    sources.add_data_fields(c.data)
    c.data.source = "synthetic"
    c.data.seed = 0
    c.data.resolution = 128
    # CelebA-like co-occurrences: gender is also carried by facial hair, lipstick and
    # make-up, as in CelebA. In the attribute-independent pool only the deliberately
    # subtle jaw / brow / hair-length cues carry it, and the small CNN stays near
    # chance (0.58 test accuracy on a gender-balanced set after 10 epochs, vs 0.86
    # here), which would leave nothing for the debiasing to recover. The subsets fix
    # the gender x confounder counts exactly either way.
    c.data.independent = False
    c.data.images_per_identity = 10
    c.data.pool_size = 200_000
    c.data.test_offset = 50_000_000  # test identities disjoint from training
    c.data.render_batch_size = 100

    # De Coninck et al.'s training set at 1/5: men without the confounder, women with
    # and without it (paper: 3000 / 2000 / 1000).
    c.train_set = ml_collections.ConfigDict()
    c.train_set.n_target = 600
    c.train_set.n_other_with = 400
    c.train_set.n_other_without = 200

    c.test = ml_collections.ConfigDict()
    c.test.size = 400  # balanced over gender x confounder: 100 per cell
    c.test.batch_size = 100

    # Patch region classifier, trained on the balanced set to predict the confounder.
    c.patch_net = ml_collections.ConfigDict()
    c.patch_net.patch_size = 32
    c.patch_net.grid = 13  # 13 x 13 = 169 positions (stride ~8 px); paper 49 x 49
    c.patch_net.backbone = "small"
    c.patch_net.widths = (8, 16, 32)
    c.patch_net.epochs = 30
    c.patch_net.batch_size = 64
    c.patch_net.learning_rate = 1e-3
    c.patch_net.weight_decay = 1e-2
    c.patch_net.decay_every_epochs = 14  # the paper's /10 every 40 of 90 epochs, scaled
    c.patch_net.decay_factor = 0.1
    c.patch_net.label_smoothing = 0.1
    c.patch_net.confidence = "top_softmax"
    c.patch_net.map_batch_size = 50
    c.patch_net.chunk_size = 1024

    c.calibration = ml_collections.ConfigDict()
    c.calibration.num_images = 100  # test images whose every window is a prediction
    c.calibration.num_bins = 100    # as in the paper

    # The gender classifier (SmallConvNet: three conv layers, batch norm, dropout).
    c.classifier = ml_collections.ConfigDict()
    c.classifier.widths = (16, 32, 64)
    c.classifier.conv_dropout = 0.0
    c.classifier.head_dropout = 0.2
    c.classifier.input_pool = 2  # 128 px images -> 64 px inside the model (CPU budget)
    c.classifier.batch_size = 32
    c.classifier.learning_rate = 1e-2  # paper 1e-5 (AdamW)
    c.classifier.weight_decay = 1e-3
    c.classifier.decay_per_epoch = 0.95
    # Every run gets the same 6 epochs (222 updates). The paper trains 20 epochs with
    # noise and 10 with masks; at this budget half the updates left the mask runs
    # undertrained (Blond_Hair, 3 epochs: accuracy 0.58, below the original model's 0.68).
    c.classifier.epochs = 6
    c.classifier.epochs_mask = 6
    # Re-estimate the batch-norm statistics with the final weights (epochs of the run's
    # own augmented batches, no gradient). At lr 1e-2 the running averages trail the
    # weights enough to flip eval-mode predictions (measured: train-mode accuracy 0.84,
    # eval-mode 0.53, every face called a man); 0 disables.
    c.classifier.bn_recalibration_passes = 1
    # Trainings per Table 1 cell (different initialisation, batch order and noise keys;
    # within a repeat every column shares them). Tables report mean ± s.d. over them:
    # single trainings at this budget move a gap by more than the test-set standard error.
    c.classifier.repeats = 3

    c.debias = ml_collections.ConfigDict()
    c.debias.quantile = 0.7
    c.debias.methods = ("general_noise", "general_mask", "specific_noise", "specific_mask")
    c.debias.noise_std = 0.5
    c.debias.mask_fill = 0.5

    c.sweep = ml_collections.ConfigDict()
    c.sweep.confounder = "Blond_Hair"
    c.sweep.method = "general_noise"
    c.sweep.quantiles = (0.6, 0.7, 0.8, 0.95)

    a = config_args.parse_arg(arg, paper=False, celeba=False, smoke=False)
    if a.paper:
        _paper(c)
    if a.celeba:
        _celeba(c)
    if a.smoke:
        _smoke(c)
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Every part on tiny budgets (about 2 minutes on 2 cores)."""
    c.confounders = ("Blond_Hair", "Wearing_Hat")
    c.data.resolution = 64
    c.data.pool_size = 20_000
    c.data.render_batch_size = 32
    c.train_set.n_target = 16
    c.train_set.n_other_with = 12
    c.train_set.n_other_without = 4
    c.test.size = 16
    c.test.batch_size = 16
    c.patch_net.patch_size = 16
    c.patch_net.grid = 5
    c.patch_net.widths = (4, 8)
    c.patch_net.epochs = 2
    c.patch_net.batch_size = 16
    c.patch_net.decay_every_epochs = 1
    c.patch_net.map_batch_size = 16
    c.patch_net.chunk_size = 128
    c.calibration.num_images = 16  # = map_batch_size: one sliding-window compile
    c.calibration.num_bins = 10
    c.classifier.widths = (4, 8, 8)
    c.classifier.input_pool = 2
    c.classifier.batch_size = 16
    c.classifier.epochs = 1
    c.classifier.epochs_mask = 1
    c.classifier.repeats = 2
    c.sweep.quantiles = (0.7, 0.95)


def _paper(c: ml_collections.ConfigDict) -> None:
    """The paper's scale, for accelerators: 3000 / 2000 + 1000 training faces, a
    ResNet-18 patch net on the 49 x 49 grid for 90 epochs, the gender CNN at full
    resolution with AdamW lr 1e-5 x 0.95 per epoch, 20 epochs (10 with masks)."""
    c.data.pool_size = 1_000_000
    c.data.render_batch_size = 256
    c.train_set.n_target = 3000
    c.train_set.n_other_with = 2000
    c.train_set.n_other_without = 1000
    c.test.size = 2000
    c.test.batch_size = 250
    c.patch_net.grid = 49
    c.patch_net.backbone = "resnet18"
    c.patch_net.epochs = 90
    c.patch_net.batch_size = 256
    c.patch_net.decay_every_epochs = 40
    c.patch_net.map_batch_size = 100
    c.patch_net.chunk_size = 4096
    c.calibration.num_images = 1000
    c.classifier.widths = (32, 64, 128)
    c.classifier.conv_dropout = 0.1
    c.classifier.head_dropout = 0.5
    c.classifier.input_pool = 1
    c.classifier.batch_size = 128
    c.classifier.learning_rate = 1e-5
    c.classifier.epochs = 20
    c.classifier.epochs_mask = 10
    c.classifier.bn_recalibration_passes = 0  # lr 1e-5: the running statistics keep up


def _celeba(c: ml_collections.ConfigDict) -> None:
    """The paper's data set and training-set sizes (data.root must name CelebA)."""
    c.data.source = "celeba"
    c.train_set.n_target = 3000
    c.train_set.n_other_with = 2000
    c.train_set.n_other_without = 1000
