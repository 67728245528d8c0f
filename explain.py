r"""Runs an experiment (audit, reproduction) described by a config.

  python explain.py --config configs/facex.py[:smoke] --workdir DIR [--config.field=value]

Everything the run writes (checkpoints, metrics.jsonl, figures, report, results
JSON, and config.json once the run completes) goes under DIR; rerunning with
the same DIR resumes from the last intact checkpoint. Each trained model's
folder records a fingerprint of the settings that made it: a rerun with other
settings stops with the differing fields named, unless
``--config.overwrite=True`` (that folder is then emptied and retrained). User
errors are one line; ``--debug`` shows the traceback.
"""

from faceaudit_jax import cli

if __name__ == "__main__":
    cli.main("explain")
