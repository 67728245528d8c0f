r"""Trains the model a config describes, without explaining it.

  python train.py --config configs/facex.py[:smoke] --workdir DIR [--config.field=value]

Orbax checkpoints and metrics.jsonl go under DIR; a killed run restarted with
the same DIR continues from its last checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from faceaudit_jax.experiments import registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Orbax logs every checkpoint write at INFO; keep the console for progress.
    logging.set_verbosity(logging.WARNING)
    registry.run_training(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
