"""Maps a config's ``experiment`` name to the module that runs it.

Each experiment module defines ``run(config, workdir)`` (the whole job) and
may define ``train(config, workdir)`` (training only, for train.py).
``config.overwrite`` (False when the config has no such field) lets a run
replace run directories made with other settings (see faceaudit_jax.workdir).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from faceaudit_jax import distributed
from faceaudit_jax.workdir import prepare_workdir, write_text_atomic

EXPERIMENTS = {
    "facex": "faceaudit_jax.experiments.facex",
    "facex_tables": "faceaudit_jax.experiments.facex_tables",
    "attribute_cams": "faceaudit_jax.experiments.attribute_cams",
    "corrrise": "faceaudit_jax.experiments.corrrise",
    "vit_fv": "faceaudit_jax.experiments.vit_fv",
    "debias_noise": "faceaudit_jax.experiments.debias_noise",
    "face_parser": "faceaudit_jax.experiments.face_parser",
    "audit": "faceaudit_jax.experiments.audit",
}


def _module(config):
    name = config.get("experiment", None)
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def _save_config(config, path: Path) -> None:
    # Written after the run: config.json describes the outputs in the workdir,
    # never a run that stopped at a fingerprint mismatch.
    # One writer in a multi-process job.
    distributed.on_primary(write_text_atomic, path / "config.json",
                           config.to_json_best_effort(indent=2) + "\n")


def run_experiment(config, workdir):
    """Run the config's experiment whole under ``workdir``; returns what its ``run`` returns."""
    path = prepare_workdir(workdir)
    module = _module(config)
    result = module.run(config, str(path))
    _save_config(config, path)
    return result


def run_training(config, workdir):
    """Run only the training step of the config's experiment (train.py)."""
    path = prepare_workdir(workdir)
    module = _module(config)
    if not hasattr(module, "train"):
        raise ValueError(f"experiment {config.experiment!r} has no separate training step; "
                         "use explain.py to run it whole")
    result = module.train(config, str(path))
    _save_config(config, path)
    return result
