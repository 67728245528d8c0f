r"""Trains the model a config describes, without explaining it.

  python train.py --config configs/facex.py[:smoke] --workdir DIR [--config.field=value]

Orbax checkpoints and metrics.jsonl go under DIR; a killed run restarted with
the same DIR continues from its last checkpoint.
"""

from faceaudit_jax import cli

if __name__ == "__main__":
    cli.main("train")
