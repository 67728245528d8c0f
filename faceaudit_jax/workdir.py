"""Run directories that never lie: one fingerprint scheme, atomic JSON, robust JSONL.

The bookkeeping of a ``--workdir`` and its run directories lives here:

- ``prepare_workdir(path)``: create it, prove it writable, remove temporary
  files a killed run left behind (``*.tmp-<pid>-<n>`` from ``write_json``,
  older than a minute).
- ``check_fingerprint(run_dir, expected, overwrite=False)``: every folder
  holding a trained model records, in ``fingerprint.json``, the settings that
  determine that model and its data (a flat dict, e.g. ``{"train.lr": 0.001,
  "train.images_sha256": "..."}``). A rerun with other settings stops before
  any work with one message naming each differing field (old -> new); with
  ``overwrite=True`` the folder's contents are removed and the new fingerprint
  recorded. ``config_fields`` and ``array_digest`` build such dicts.
- ``write_json``: atomic (temporary file + ``os.replace``), NaN -> null.
- ``read_jsonl`` / ``append_jsonl`` / ``rewrite_jsonl``: JSON-lines logs whose
  last line may be half-written by a killed run; that line is dropped with a
  warning, any other bad line is an error naming the file and line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

FINGERPRINT_FILE = "fingerprint.json"
OVERWRITE_HINT = "rerun with --config.overwrite=True to discard it and retrain, or use another --workdir"

# Temporary files of write_json: "<name>.tmp-<pid>-<n>", renamed over <name> when complete;
# one older than this was left by a killed run.
STALE_AFTER_S = 60.0
_TMP_PATTERN = re.compile(r".+\.tmp-\d+-\d+$")
_tmp_counter = itertools.count()


class WorkdirError(ValueError):
    """A workdir or run directory that cannot be used as asked (a user error, not a bug)."""


class FingerprintMismatch(WorkdirError):
    """A run directory holds a model made with other settings."""


# ----------------------------------------------------------------------------- workdir


def prepare_workdir(workdir) -> Path:
    """Create ``workdir``, prove it writable, and remove stale temporary files; returns its Path.

    Raises WorkdirError naming the path when it cannot be created or written,
    before any work starts.
    """
    path = Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise WorkdirError(f"workdir {str(path)!r} is not writable ({err.strerror or err}); "
                           "expected a directory this process can create and write") from None
    remove_stale_tmp(path)
    return path


def remove_stale_tmp(root, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete ``write_json`` temporary files under ``root`` left by killed runs; returns them.

    Only files older than ``min_age_s``: a write in flight (another process
    or host sharing the workdir) lasts milliseconds. Orbax's own
    ``*.orbax-checkpoint-tmp*`` folders are removed by the checkpoint
    manager (``train_lib``), which knows when none is in flight.
    """
    removed, now = [], time.time()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if _TMP_PATTERN.match(name):
                stale = Path(dirpath) / name
                try:
                    if now - stale.stat().st_mtime < min_age_s:
                        continue
                    stale.unlink()
                    removed.append(stale)
                except OSError:  # gone already, or not ours to delete: leave it
                    pass
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) left by a killed run under {root}",
                      stacklevel=2)
    return removed


# ----------------------------------------------------------------------------- JSON


def to_jsonable(x: Any) -> Any:
    """Plain JSON types: arrays and numpy scalars as lists/numbers, tuples as lists, NaN as None."""
    if hasattr(x, "to_dict"):  # ConfigDict
        x = x.to_dict()
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return to_jsonable(x.tolist())
    return x


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{next(_tmp_counter)}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically; NaN is written as null so files stay valid JSON."""
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def read_json(path) -> Any:
    """The JSON in ``path``; a file that is not valid JSON raises WorkdirError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkdirError(f"{path} is not valid JSON ({err}); delete it or "
                           f"{OVERWRITE_HINT}") from None


def read_json_if(path, fingerprint: str) -> Any:
    """The JSON record at ``path`` if it exists and its "fingerprint" field is ``fingerprint``
    (made with the same settings), else None: a cached result to reuse or redo."""
    saved = read_json(path) if Path(path).exists() else {}
    return saved if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else None



def read_npz_if(path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The arrays of the npz file at ``path`` if it exists and its "fingerprint" entry is
    ``fingerprint``, else None: ``read_json_if`` for a cache of arrays."""
    if not Path(path).exists():
        return None
    with np.load(path) as loaded:
        same = "fingerprint" in loaded.files and str(loaded["fingerprint"]) == fingerprint
        return {k: loaded[k] for k in loaded.files} if same else None

# ----------------------------------------------------------------------------- JSON lines


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist).

    A last line that does not parse (a run killed mid-write) is dropped with a
    warning naming the file; a bad line before the last raises WorkdirError
    naming the file and line number.
    """
    path = Path(path)
    if not path.exists():
        return []
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(raw) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if position == len(numbered) - 1:
                warnings.warn(f"{path}: dropped its last line {number}, which is incomplete ({err}); "
                              "a run was probably killed while writing it", stacklevel=2)
                break
            raise WorkdirError(f"{path}: line {number} is not valid JSON ({err}); only the last "
                               "line may be incomplete. Delete the file or fix that line") from None
    return records


def last_record(path, kind: str) -> dict:
    """The last record of a JSON-lines file whose "kind" is ``kind`` ({} when there is none),
    e.g. the last ``{"kind": "train", ...}`` log that ``train_lib.fit`` wrote to metrics.jsonl."""
    records = [r for r in read_jsonl(path) if r.get("kind") == kind]
    return records[-1] if records else {}


def rewrite_jsonl(path, records: Iterable[Mapping]) -> None:
    """Replace ``path`` with ``records``, one JSON object a line, atomically."""
    write_text_atomic(path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))


def keep_jsonl(path, keep: Callable[[dict], bool]) -> None:
    """Drop the records of ``path`` for which ``keep`` is false, and an incomplete last line.

    The file is rewritten only when something was dropped.
    """
    path = Path(path)
    if not path.exists():
        return
    records = read_jsonl(path)
    kept = [r for r in records if keep(r)]
    with open(path, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    if len(kept) != lines:
        rewrite_jsonl(path, kept)


def append_jsonl(file, record: Mapping) -> None:
    """Append ``record`` as one line to an open text file and flush it."""
    file.write(json.dumps(to_jsonable(record)) + "\n")
    file.flush()


# ----------------------------------------------------------------------------- fingerprints


def array_digest(*arrays: Any) -> str:
    """sha256 (hex) of arrays' dtypes, shapes and bytes; None entries count as absent."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def settings_hash(*parts: Any) -> str:
    """16 hex digits of sha256 over JSON-serialisable settings (ConfigDicts via to_dict, dict
    keys sorted, tuples as lists, anything else by ``str``): the key under which a run's
    models and results are cached, so that other settings never reuse them."""
    def plain(x):
        if hasattr(x, "to_dict"):
            return plain(x.to_dict())
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_fields(config, names: Sequence[str]) -> dict:
    """{dotted name: value} for ``names`` ("train.lr", or "model" for a whole sub-config).

    A sub-config is flattened to its leaves, so a mismatch names the leaf
    that changed. A name missing from ``config`` maps to None.
    """
    out = {}
    for name in names:
        node = config
        for key in name.split("."):
            node = node.get(key, None) if hasattr(node, "get") else None
        out.update(_flatten(name, to_jsonable(node)))
    return out


def _flatten_top(d: dict) -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(k, v))
    return flat


def _flatten(prefix: str, value: Any) -> dict:
    if isinstance(value, dict):
        flat = {}
        for k, v in value.items():
            flat.update(_flatten(f"{prefix}.{k}", v))
        return flat
    return {prefix: value}


def overwrite_requested(config) -> bool:
    """``config.overwrite`` (False when the config has no such field; the CLI adds it)."""
    return bool(config.get("overwrite", False)) if hasattr(config, "get") else False


def fingerprint_difference(found: Mapping, expected: Mapping) -> list[str]:
    """"field: old -> new" for every field whose value differs (absent fields shown as <absent>).

    Nested dicts are compared leaf by leaf ("train.lr"), so a change is named
    by the field that changed, not by the whole sub-dict.
    """
    absent = "<absent>"
    found, expected = (_flatten_top(to_jsonable(dict(d))) for d in (found, expected))
    return [f"{k}: {found.get(k, absent)!r} -> {expected.get(k, absent)!r}"
            for k in sorted(set(found) | set(expected)) if found.get(k, absent) != expected.get(k, absent)]


def check_fingerprint(run_dir, expected: Mapping, *, overwrite: bool = False) -> None:
    """Record ``expected`` in run_dir/fingerprint.json, or refuse a run_dir made with other settings.

    A run directory must never mix checkpoints (or results) of two
    configurations. On a mismatch this raises FingerprintMismatch naming every
    differing field, old -> new, unless ``overwrite``: then run_dir's contents
    are removed (a warning says so) and the new fingerprint is recorded. A
    run_dir with contents but no fingerprint (made before fingerprints
    existed) adopts ``expected`` with a warning: it cannot be verified.
    """
    run_dir = Path(run_dir)
    path = run_dir / FINGERPRINT_FILE
    expected = to_jsonable(dict(expected))
    if path.exists():
        found = read_json(path) if not overwrite else _read_or_none(path)
        differ = fingerprint_difference(found or {}, expected)
        if not differ:
            return
        if not overwrite:
            raise FingerprintMismatch(
                f"{run_dir} holds a model made with other settings ({len(differ)} field(s) differ: "
                f"{'; '.join(differ)}); {OVERWRITE_HINT}")
        warnings.warn(f"overwrite: removing the contents of {run_dir} (made with other settings: "
                      f"{'; '.join(differ)})", stacklevel=2)
        clear_directory(run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        if overwrite:
            warnings.warn(f"overwrite: removing the contents of {run_dir} (no {FINGERPRINT_FILE} "
                          "to compare with)", stacklevel=2)
            clear_directory(run_dir)
        else:
            warnings.warn(f"{run_dir} has no {FINGERPRINT_FILE} (made before fingerprints were "
                          "recorded): its settings cannot be verified; recording the current ones",
                          stacklevel=2)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, expected)


def _read_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def clear_directory(path) -> None:
    """Remove everything inside ``path`` (the folder itself stays)."""
    for child in Path(path).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# The repository's root: summaries under results/ link from the README.
REPO_ROOT = Path(__file__).resolve().parents[1]


def ignore_models_folder(models_dir) -> None:
    """Checkpoints stay out of git: models/.gitignore ignores everything in models/."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    gitignore = models_dir / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# Orbax checkpoints and training logs: not for git.\n*\n")


def readme_link_prefix(workdir) -> str:
    """Prefix that makes links in a summary.md work from the README (workdir inside the repo)."""
    try:
        return Path(workdir).resolve().relative_to(REPO_ROOT).as_posix() + "/"
    except ValueError:
        return ""
