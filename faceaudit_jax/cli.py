"""The shared shell of train.py and explain.py: flags, config overrides, one-line errors.

  python explain.py --config configs/X.py[:variant] --workdir DIR [--config.field=value]
                    [--config.overwrite=True] [--debug]

ml_collections applies ``--config.a.b=v`` overrides while absl parses flags;
a key that does not exist surfaces there as a bare ``AttributeError``. The
overrides are checked first, so a typo gets an error naming the key and the
keys that do exist at that level.

``--config.overwrite=True`` works for every config (the CLI adds the field
when a config lacks it): a run directory made with other settings is emptied
and retrained instead of stopping the run (see faceaudit_jax.workdir).

User errors (a missing config file, an unknown variant, an unwritable
workdir, a fingerprint mismatch, a damaged checkpoint folder, and any other
ValueError or missing-file error a run raises) end the process with one line
on stderr and exit status 1; ``--debug`` shows the full traceback instead.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Sequence

_PREFIX = "--config."
_OVERWRITE = "--config.overwrite"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
# Exceptions that mean "the request cannot be done as asked", not "the code is wrong".
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UsageError(ValueError):
    """A command line that cannot run: bad config spec, bad override, bad flag value."""


def load_config(spec: str):
    """The ConfigDict of "path/to/config.py[:variant]" (its get_config(variant)).

    Raises FileNotFoundError naming the path when there is no such file, and
    whatever the config's get_config raises (ValueError for an unknown variant).
    """
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config={spec!r}: no config file at {path!r}")
    module_spec = importlib.util.spec_from_file_location("_faceaudit_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"--config={spec!r}: {path!r} is not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant)


def config_spec(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in argv (either ``--config=X`` or ``--config X``), or None."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def unknown_override(argv: Sequence[str], config=None) -> str | None:
    """The first ``--config.a.b`` override naming a missing key, as an error message.

    ``config``: the loaded config (loaded from argv's ``--config`` if None;
    a config that cannot be loaded is reported elsewhere, so None is returned).
    ``--config.overwrite`` is always known.
    """
    if config is None:
        spec = config_spec(argv)
        if spec is None:
            return None
        try:
            config = load_config(spec)
        except Exception:  # reported by main with its own message
            return None
    for arg in argv:
        if not arg.startswith(_PREFIX):
            continue
        dotted = arg[len(_PREFIX):].split("=", 1)[0]
        if dotted == "overwrite":
            continue
        node, walked = config, []
        for key in dotted.split("."):
            if not hasattr(node, "keys") or key not in node.keys():
                where = ".".join(["config"] + walked)
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(a leaf value)"
                return (f"error: --config.{dotted}: {where} has no key {key!r}; "
                        f"expected one of: {valid}")
            node, walked = node[key], walked + [key]
    return None


def split_overwrite(argv: Sequence[str]) -> tuple[list[str], bool | None]:
    """(argv without ``--config.overwrite[=v]``, its value or None if absent).

    Accepts ``--config.overwrite=v``, ``--config.overwrite v`` and a bare
    ``--config.overwrite`` (True); v is true/false, 1/0 or yes/no.
    """
    rest, value, i = [], None, 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg == _OVERWRITE or arg.startswith(_OVERWRITE + "="):
            if "=" in arg:
                text = arg.split("=", 1)[1]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                text, i = argv[i + 1], i + 1
            else:
                text = "true"
            if text.lower() not in _TRUE + _FALSE:
                raise UsageError(f"{_OVERWRITE}={text!r}; expected True or False")
            value = text.lower() in _TRUE
        else:
            rest.append(arg)
        i += 1
    return rest, value


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _exit_with(err: BaseException, debug: bool):
    if debug:
        raise err
    raise SystemExit(f"error: {_one_line(err)} (rerun with --debug for the traceback)")


def main(entry: str, argv: Sequence[str] | None = None) -> None:
    """Run ``registry.run_experiment`` (entry="explain") or ``run_training`` ("train")."""
    argv = list(sys.argv if argv is None else argv)
    debug = any(arg in ("--debug", "--debug=true", "--debug=True") for arg in argv[1:])
    try:
        argv, overwrite = split_overwrite(argv)
        spec = config_spec(argv[1:])
        loaded = load_config(spec) if spec is not None else None
    except Exception as err:  # noqa: BLE001  a config that cannot load is the user's to fix
        _exit_with(err, debug)
    message = unknown_override(argv[1:], loaded) if loaded is not None else None
    if message:
        raise SystemExit(message)
    # config_flags reads its overrides from sys.argv, so it must not see --config.overwrite.
    sys.argv = list(argv)

    from absl import app, flags, logging
    from ml_collections import config_flags

    from faceaudit_jax.experiments import registry

    config_flag = config_flags.DEFINE_config_file("config", None,
                                                  "Experiment config file[:variant].")
    workdir_flag = flags.DEFINE_string("workdir", None,
                                       "Directory for everything the run writes.")
    flags.DEFINE_bool("debug", False, "Show the full traceback of user errors.")
    multihost_flag = flags.DEFINE_bool(
        "multihost", False, "Join a multi-process JAX job (docs/scale.md): coordinator from "
        "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID or SLURM; also started "
        "without the flag when those variables describe a job.")
    timeout_flag = flags.DEFINE_float(
        "multihost_timeout_s", 300.0, "With --multihost: seconds to wait for the coordinator and "
        "for every process to register before stopping with a message naming the missing ones.")
    flags.mark_flags_as_required(["config", "workdir"])
    run = {"explain": registry.run_experiment, "train": registry.run_training}[entry]

    def _main(unused_argv):
        # Orbax logs every checkpoint write at INFO; keep the console for progress.
        logging.set_verbosity(logging.WARNING)
        config = config_flag.value
        if overwrite is not None or "overwrite" not in config:
            with config.unlocked():
                config.overwrite = bool(overwrite)
        from faceaudit_jax import distributed
        try:
            try:
                if multihost_flag.value or distributed.multihost_requested():
                    distributed.initialize(timeout_s=timeout_flag.value)
                    distributed.check_same_config(config)
                run(config, workdir_flag.value)
            except USER_ERRORS + (distributed.CoordinatorUnreachableError,) as err:
                _exit_with(err, debug)
        except BaseException as err:  # noqa: BLE001  re-raised unless in a multi-process job
            if distributed.is_multiprocess():
                _leave_job(err)
            raise

    app.run(_main, argv=argv)


def _leave_job(err: BaseException) -> None:
    """End this process of a multi-process job at once: err's message, exit status 1.

    A normal exit would wait in jax.distributed's shutdown barrier for peers
    that may themselves wait in a collective for this process: the job would
    hang instead of failing. The launcher (scripts/launch_local_multihost.sh,
    srun --kill-on-bad-exit) stops the others; left alone, they stop when the
    coordinator misses this process's heartbeat.
    """
    import traceback
    if isinstance(err, SystemExit):
        if err.code in (None, 0):
            os._exit(0)
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
    else:
        traceback.print_exception(err)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1)
