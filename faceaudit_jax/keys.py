"""Run keys derived from names, so no experiment writes ``seed + 2``.

``run_key(seed, "biased", "repeat", 1)`` folds a stable 31-bit hash (crc32) of
the names into ``jax.random.key(seed)``: the same run gets the same key on a
rerun and on another machine, two differently named runs get independent
keys, and adding a new named run never shifts the keys of the existing ones
(which ``seed + k`` counters do). ``run_seed`` gives the same for the numpy
generators that draw subsets.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax


def name_hash(*names: Any) -> int:
    """A stable non-negative 31-bit integer for the names, joined with '/'."""
    if not names:
        raise ValueError("name_hash needs at least one name")
    return zlib.crc32("/".join(str(n) for n in names).encode()) & 0x7FFFFFFF


def run_key(seed: int | jax.Array, *names: Any) -> jax.Array:
    """``fold_in(key(seed), name_hash(*names))``; ``seed`` may already be a key."""
    base = seed if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(
        seed.dtype, jax.dtypes.prng_key) else jax.random.key(int(seed))
    return jax.random.fold_in(base, name_hash(*names))


def run_seed(seed: int, *names: Any) -> int:
    """A numpy-generator seed for the named run: ``seed`` mixed with ``name_hash(*names)``."""
    return int(zlib.crc32(f"{int(seed)}:{name_hash(*names)}".encode()) & 0x7FFFFFFF)


__all__ = ["name_hash", "run_key", "run_seed"]
