r"""Runs an experiment (audit, reproduction) described by a config.

  python explain.py --config configs/facex.py[:smoke] --workdir DIR [--config.field=value]

Everything the run writes (checkpoints, metrics.jsonl, figures, report, results
JSON) goes under DIR; rerunning with the same DIR resumes from checkpoints.
"""

from faceaudit_jax import cli

if __name__ == "__main__":
    cli.main("explain")
