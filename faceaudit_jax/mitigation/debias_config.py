"""Settings of the noise-debiasing study (configs/debias_noise.py): their check and their hashes.

`validate_config` turns settings that would fail deep inside a run into a clear
error before any work. `RunFingerprints` are the settings hashes
(`workdir.settings_hash`) under which each saved model and result of one
confounder is cached, so that other settings retrain or re-score instead of
reusing them; `models_fingerprint` is the workdir-wide record that stops a rerun
with other model settings (`workdir.check_fingerprint`).
"""

from __future__ import annotations

import numpy as np

from faceaudit_jax import regions
from faceaudit_jax import workdir as workdir_lib
from faceaudit_jax.data import sources
from faceaudit_jax.explain import patches as patches_lib
from faceaudit_jax.mitigation.debias_runs import (METHODS, check_quantile, method_spec,
                                                  parse_run_name, repeat_parts)
from faceaudit_jax.models import patch_net as pn

fingerprint = workdir_lib.settings_hash  # the settings hash of every cached model and result


def _check_confounders(config) -> tuple[str, ...]:
    if isinstance(config.confounders, str):
        raise ValueError(f"confounders={config.confounders!r}; expected a tuple of attribute "
                         "names, e.g. ('Blond_Hair',)")
    confounders = tuple(config.confounders)
    if not confounders:
        raise ValueError("confounders is empty; expected at least one attribute name")
    regions.attribute_ids(confounders)
    if config.target in confounders:
        raise ValueError(f"target {config.target!r} is also listed as a confounder")
    if len(set(confounders)) != len(confounders):
        raise ValueError(f"confounders {confounders} repeat an attribute")
    if config.sweep.confounder not in confounders:
        raise ValueError(f"sweep.confounder={config.sweep.confounder!r} is not one of the "
                         f"confounders {confounders}")
    return confounders


def validate_config(config) -> None:
    """Clear errors for settings that would fail deep inside the run."""
    regions.attribute_id(config.target)
    _check_confounders(config)
    for method in (*config.debias.methods, config.sweep.method):
        method_spec(method)
    for q in (config.debias.quantile, *config.sweep.quantiles):
        check_quantile(q)
    sources.check_data_config(config.data)
    resolution, pool = int(config.data.resolution), int(config.classifier.input_pool)
    pn.grid_positions(resolution, int(config.patch_net.patch_size), int(config.patch_net.grid))
    if pool < 1 or resolution % pool:
        raise ValueError(f"classifier.input_pool={pool}; expected a positive divisor of the "
                         f"resolution {resolution}")
    if config.patch_net.confidence not in patches_lib.CONFIDENCE_KINDS:
        raise ValueError(f"patch_net.confidence={config.patch_net.confidence!r}; expected one "
                         f"of {patches_lib.CONFIDENCE_KINDS}")
    repeats = config.classifier.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"classifier.repeats={repeats!r}; expected an int >= 1 (trainings "
                         "per Table 1 cell)")
    if int(config.test.size) < 4:
        raise ValueError(f"test.size={config.test.size}; expected at least 4 (one per "
                         "gender x confounder cell)")


PATCH_TRAIN_FIELDS = ("patch_size", "grid", "backbone", "widths", "epochs", "batch_size",
                      "learning_rate", "weight_decay", "decay_every_epochs", "decay_factor",
                      "label_smoothing")
CLASSIFIER_TRAIN_FIELDS = ("widths", "conv_dropout", "head_dropout", "input_pool", "batch_size",
                           "learning_rate", "weight_decay", "decay_per_epoch", "epochs",
                           "epochs_mask", "bn_recalibration_passes")


class RunFingerprints:
    """The settings hashes of one confounder's models and results (see `fingerprint`).

    Each hash chains the ones it depends on: data (source, every subset's rows including the test set's, seed) ->
    patch net -> its attribution maps; a gender classifier's training hashes the data,
    the classifier settings, its run and repeat, and for a method the maps and the
    augmentation strength; a result adds the test set.
    """

    def __init__(self, config, confounder: str, subsets: dict[str, np.ndarray]):
        pc, cc = config.patch_net, config.classifier
        self.config = config
        self.data = fingerprint(sources.fingerprint_fields(config.data), config.train_set,
                                config.target, confounder, config.seed,
                                {k: v.tolist() for k, v in subsets.items()})
        self.patch = fingerprint(self.data, {f: pc[f] for f in PATCH_TRAIN_FIELDS})
        self.attribution = fingerprint(self.patch, pc.confidence)
        self.test = fingerprint(config.test, subsets["test"].tolist())
        self.classifier = fingerprint({f: cc[f] for f in CLASSIFIER_TRAIN_FIELDS})
        self.patch_result = fingerprint(self.patch, self.test, config.calibration)

    def train(self, name: str, repeat: int) -> str:
        method, q = parse_run_name(name)
        parts = [self.data, self.classifier, method, q, *repeat_parts(repeat)]
        if method in METHODS:
            parts += [self.attribution, self.config.debias.noise_std, self.config.debias.mask_fill]
        return fingerprint(*parts)

    def result(self, name: str, repeat: int) -> str:
        return fingerprint(self.train(name, repeat), self.test)


def models_fingerprint(config) -> dict:
    """The fields that decide every trained model of a workdir, in the one scheme of
    faceaudit_jax.workdir: a rerun with other values stops before any work, naming them
    (``--config.overwrite=True`` retrains). Confounders, repeats, sweep quantiles and the
    test set are left out: changing them adds runs, each cached under its own settings
    hash (`RunFingerprints`). The test rows are part of every run's data hash, so another
    ``test.size`` trains that confounder's models again under new hashes."""
    fields = workdir_lib.config_fields(config, ["seed", "target", "train_set", "patch_net",
                                                "classifier", "debias.noise_std",
                                                "debias.mask_fill"])
    fields.pop("classifier.repeats", None)
    fields.update(workdir_lib.config_fields({"data": sources.fingerprint_fields(config.data)},
                                            ["data"]))
    return fields
