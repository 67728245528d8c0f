r"""Runs an experiment (audit, reproduction) described by a config.

  python explain.py --config configs/facex.py[:smoke] --workdir DIR [--config.field=value]

Everything the run writes (checkpoints, metrics.jsonl, figures, report, results
JSON) goes under DIR; rerunning with the same DIR resumes from checkpoints.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from faceaudit_jax.experiments import registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the run writes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Orbax logs every checkpoint write at INFO; keep the console for progress.
    logging.set_verbosity(logging.WARNING)
    registry.run_experiment(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
