"""The shared shell of train.py and explain.py: flags, config overrides, logging.

  python explain.py --config configs/X.py[:variant] --workdir DIR [--config.field=value]

ml_collections applies ``--config.a.b=v`` overrides while absl parses flags;
a key that does not exist surfaces there as a bare ``AttributeError``. The
overrides are checked first, so a typo gets an error naming the key and the
keys that do exist at that level.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

_PREFIX = "--config."


def load_config(spec: str):
    """The ConfigDict of "path/to/config.py[:variant]" (its get_config(variant))."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_faceaudit_config", path)
    if module_spec is None:
        raise SystemExit(f"error: --config={spec!r}: no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant)


def unknown_override(argv: Sequence[str]) -> str | None:
    """The first ``--config.a.b`` override naming a missing key, as an error message."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None:
        return None
    try:
        config = load_config(spec)
    except Exception:  # a broken config file: absl's own parse reports it in full
        return None
    for arg in argv:
        if not arg.startswith(_PREFIX):
            continue
        dotted = arg[len(_PREFIX):].split("=", 1)[0]
        node, walked = config, []
        for key in dotted.split("."):
            if not hasattr(node, "keys") or key not in node.keys():
                where = ".".join(["config"] + walked)
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(a leaf value)"
                return (f"error: --config.{dotted}: {where} has no key {key!r}; "
                        f"expected one of: {valid}")
            node, walked = node[key], walked + [key]
    return None


def main(entry: str, argv: Sequence[str] | None = None) -> None:
    """Run ``registry.run_experiment`` (entry="explain") or ``run_training`` ("train")."""
    argv = list(sys.argv if argv is None else argv)
    message = unknown_override(argv[1:])
    if message:
        raise SystemExit(message)

    from absl import app, flags, logging
    from ml_collections import config_flags

    from faceaudit_jax.experiments import registry

    config_flag = config_flags.DEFINE_config_file("config", None,
                                                  "Experiment config file[:variant].")
    workdir_flag = flags.DEFINE_string("workdir", None,
                                       "Directory for everything the run writes.")
    multihost_flag = flags.DEFINE_bool(
        "multihost", False, "Join a multi-process JAX job (docs/scale.md): coordinator from "
        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or SLURM; also started "
        "without the flag when those variables describe a job.")
    flags.mark_flags_as_required(["config", "workdir"])
    run = {"explain": registry.run_experiment, "train": registry.run_training}[entry]

    def _main(unused_argv):
        # Orbax logs every checkpoint write at INFO; keep the console for progress.
        logging.set_verbosity(logging.WARNING)
        from faceaudit_jax import distributed
        if multihost_flag.value or distributed.multihost_requested():
            distributed.initialize()
            distributed.check_same_config(config_flag.value)
        run(config_flag.value, workdir_flag.value)

    app.run(_main, argv=argv)
