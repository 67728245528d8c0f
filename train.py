r"""Trains the model a config describes, without explaining it.

  python train.py --config configs/attribute_cams.py[:smoke] --workdir DIR [--config.field=value]

Experiments with a separate training step: attribute_cams, face_parser,
vit_fv (others, e.g. facex, train inside ``explain.py``). Orbax checkpoints
(verified on restore), metrics.jsonl and fingerprint.json go under DIR; a
killed run restarted with the same DIR continues from its last intact
checkpoint, and a run directory made with other settings stops the run
unless ``--config.overwrite=True``. User errors are one line; ``--debug``
shows the traceback.
"""

from faceaudit_jax import cli

if __name__ == "__main__":
    cli.main("train")
