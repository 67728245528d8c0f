"""Maps a config's ``experiment`` name to the module that runs it.

Each experiment module defines ``run(config, workdir)`` (the whole job) and
may define ``train(config, workdir)`` (training only, for train.py).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

EXPERIMENTS = {
    "facex": "faceaudit_jax.experiments.facex",
    "facex_tables": "faceaudit_jax.experiments.facex",
    "classifier": "faceaudit_jax.experiments.classifier",
    "attribute_cams": "faceaudit_jax.experiments.attribute_cams",
    "corrrise": "faceaudit_jax.experiments.corrrise",
    "vit_fv": "faceaudit_jax.experiments.vit_fv",
    "debias_noise": "faceaudit_jax.experiments.debias_noise",
    "face_parser": "faceaudit_jax.experiments.face_parser",
    "audit": "faceaudit_jax.experiments.audit",
}


def prepare_workdir(workdir) -> Path:
    """Create ``workdir`` and prove it is writable before any work starts."""
    path = Path(workdir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"workdir {str(path)!r} is not writable ({err.strerror}); "
                         "expected a directory this process can create and write") from None
    return path


def _module(config):
    name = config.get("experiment", None)
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def _save_config(config, path: Path) -> None:
    (path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def run_experiment(config, workdir):
    path = prepare_workdir(workdir)
    module = _module(config)
    _save_config(config, path)
    entry = "run_tables" if config.experiment == "facex_tables" else "run"
    return getattr(module, entry)(config, str(path))


def run_training(config, workdir):
    path = prepare_workdir(workdir)
    module = _module(config)
    if not hasattr(module, "train"):
        raise ValueError(f"experiment {config.experiment!r} has no separate training step; "
                         "use explain.py to run it whole")
    _save_config(config, path)
    return module.train(config, str(path))


def write_json(path, obj) -> None:
    """JSON with NaN written as null, so results files stay valid JSON."""

    def clean(x):
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if hasattr(x, "tolist"):
            return clean(x.tolist())
        return x

    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(obj), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def ignore_models_folder(models_dir) -> None:
    """Checkpoints stay out of git: models/.gitignore ignores everything in models/."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    gitignore = models_dir / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# Orbax checkpoints and training logs: not for git.\n*\n")


def check_fingerprint(run_dir, expected: dict) -> None:
    """Record a model's settings in run_dir, or refuse a run_dir trained with other ones.

    A resumed run must never mix checkpoints of two configurations.
    """
    path = Path(run_dir) / "fingerprint.json"
    if path.exists():
        found = json.loads(path.read_text())
        differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        if differ:
            raise ValueError(
                f"{run_dir} holds a model trained with other settings ({', '.join(differ)} "
                f"differ: {[(k, found.get(k), expected.get(k)) for k in differ][:3]}); use "
                "another workdir or delete that folder")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(expected, indent=2) + "\n")


def readme_link_prefix(workdir) -> str:
    """Prefix that makes links in a summary.md work from the README (workdir inside the repo)."""
    try:
        return Path(workdir).resolve().relative_to(REPO_ROOT).as_posix() + "/"
    except ValueError:
        return ""
