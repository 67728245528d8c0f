"""Subsets drawn from attribute tables: biased, balanced, De Coninck et al.'s, verification pairs.

All functions take an int8 attribute table [N, 40] in CelebA order (1 present,
0 absent, -1 unknown) from any reader, and return indices into it. Rows whose
involved attributes are unknown are never drawn. Randomness comes from an
explicit integer seed (numpy Generator), so a subset is reproducible.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from faceaudit_jax import keys, regions


def _as_table(attrs) -> np.ndarray:
    table = np.asarray(attrs)
    if table.ndim != 2 or table.shape[1] != regions.NUM_ATTRIBUTES:
        raise ValueError(
            f"attribute table has shape {table.shape}; expected [N, {regions.NUM_ATTRIBUTES}] "
            "in CelebA order")
    return table


def _confounder_list(confounders) -> list[str]:
    if isinstance(confounders, str):
        confounders = [confounders]
    confounders = list(confounders)
    if not confounders:
        raise ValueError("confounders is empty; expected at least one attribute name")
    return confounders


def _draw(rng: np.random.Generator, pool: np.ndarray, count: int, cell: str) -> np.ndarray:
    if count > pool.size:
        raise ValueError(
            f"subset needs {count} images in cell {cell} but the pool has only {pool.size}; "
            "use a larger pool or a smaller size")
    return rng.choice(pool, size=count, replace=False)


def _cell_pools(table: np.ndarray, names: Sequence[str]) -> dict[tuple[int, ...], np.ndarray]:
    cols = regions.attribute_ids(names)
    values = table[:, cols]
    known = np.all(values >= 0, axis=1)
    pools = {}
    for combo in itertools.product((0, 1), repeat=len(cols)):
        hit = known & np.all(values == np.array(combo, dtype=values.dtype), axis=1)
        pools[combo] = np.flatnonzero(hit)
    return pools


def _split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _cell_name(names: Sequence[str], combo: Sequence[int]) -> str:
    return "(" + ", ".join(f"{n}={v}" for n, v in zip(names, combo)) + ")"


class NoLinkError(ValueError):
    """The table links target and confounder too weakly to give a bias its direction."""


def linked_values(attrs, target: str, confounders, *, min_odds_ratio: float = 1.25) -> tuple[int, ...]:
    """Per confounder, the value that goes with target = 1 in this table: the sign of the link.

    1 when the confounder is more common with the target, P(a=1 | y=1) >
    P(a=1 | y=0), else 0. On CelebA, Male x Wearing_Lipstick gives 0 (women
    wear lipstick) and Male x Eyeglasses 1. The link must be clear: the odds
    ratio of a with y (each count + 0.5) at least ``min_odds_ratio`` either
    way, so that rare accessories count (glasses on 9% of men vs 5% of
    women) and sampling noise of independent attributes does not. Raises
    ``NoLinkError`` (a ValueError) naming the confounder and both rates
    otherwise: a table without a link has no sign to follow.
    """
    table = _as_table(attrs)
    confounders = _confounder_list(confounders)
    y = table[:, regions.attribute_id(target)]
    values = []
    for name in confounders:
        a = table[:, regions.attribute_id(name)]
        known = (y >= 0) & (a >= 0)
        with_y = a[known & (y == 1)]
        without_y = a[known & (y == 0)]
        if with_y.size == 0 or without_y.size == 0:
            raise ValueError(f"no images with both {target} and {name} known for each {target} value; "
                             "cannot tell which way the link points (pass confounder_values)")
        n11, n10 = np.sum(with_y == 1) + 0.5, np.sum(with_y == 0) + 0.5
        n01, n00 = np.sum(without_y == 1) + 0.5, np.sum(without_y == 0) + 0.5
        odds_ratio = float((n11 * n00) / (n10 * n01))
        p1, p0 = float(np.mean(with_y == 1)), float(np.mean(without_y == 1))
        if max(odds_ratio, 1.0 / odds_ratio) < float(min_odds_ratio):
            raise NoLinkError(
                f"{target} x {name}: P({name}=1 | {target}=1) = {p1:.3f} and P({name}=1 | {target}=0) = "
                f"{p0:.3f} (odds ratio {odds_ratio:.2f}, below {min_odds_ratio} either way): the table has "
                f"no link whose sign the bias could follow; pass confounder_values (the value of {name} "
                f"that goes with {target}=1)")
        values.append(1 if odds_ratio > 1.0 else 0)
    return tuple(values)


def check_confounder_values(confounder_values, confounders) -> tuple[int, ...]:
    """Validate an explicit direction: one 0 / 1 per confounder."""
    confounders = _confounder_list(confounders)
    if isinstance(confounder_values, (int, np.integer)) and not isinstance(confounder_values, bool):
        confounder_values = (confounder_values,)
    values = tuple(confounder_values)
    valid = len(values) == len(confounders) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v in (0, 1) for v in values)
    if not valid:
        raise ValueError(f"confounder_values={confounder_values!r}; expected one 0 or 1 per confounder "
                         f"{confounders} (the value that goes with target = 1)")
    return tuple(int(v) for v in values)


def biased_subset(attrs, target: str, confounders, corr: float, size: int, seed: int,
                  *, target_rate: float = 0.5, confounder_values=None) -> np.ndarray:
    """FaceX's biased subset: the confounders follow the target in a share ``corr``.

    ``confounder_values`` (one 0 / 1 per confounder) is the value of each
    confounder that goes with target = 1; target = 0 goes with the opposite
    values. By default it is the sign of the link in ``attrs``
    (``linked_values``): with CelebA's table, Male x Wearing_Lipstick gives
    FaceX's setting, 99% of women (Male = 0) wear lipstick and 99% of men do
    not. A table without a link (attributes drawn independently) raises
    unless the values are given.

    Of the images with target y, a share ``corr`` has every confounder at its
    aligned value (bias-aligned); the rest is spread evenly over the other
    confounder combinations (bias-conflicting). ``target_rate`` is the share
    of y=1 in the subset (balanced by default, so the only shortcut is the
    confounder). Returns sorted indices into ``attrs``.
    """
    table = _as_table(attrs)
    confounders = _confounder_list(confounders)
    regions.attribute_id(target)
    if target in confounders:
        raise ValueError(f"target {target!r} is also listed as a confounder")
    if not (0.5 < float(corr) <= 1.0):
        raise ValueError(f"co-occurrence corr={corr!r}; expected a value in (0.5, 1]")
    if not (0.0 < float(target_rate) < 1.0):
        raise ValueError(f"target_rate={target_rate!r}; expected a value in (0, 1)")
    size = int(size)
    if size < 2:
        raise ValueError(f"size={size}; expected at least 2")
    values = (linked_values(table, target, confounders) if confounder_values is None
              else check_confounder_values(confounder_values, confounders))
    names = [target] + confounders
    pools = _cell_pools(table, names)
    rng = np.random.default_rng(seed)
    chosen = [_draw(rng, pools[key], count, _cell_name(names, key))
              for key, count in _biased_cell_counts(size, corr, values, target_rate)]
    return np.sort(np.concatenate(chosen))


def _biased_cell_counts(size: int, corr: float, values, target_rate: float) -> list:
    """[((y, a_1, ...), count)] of ``biased_subset``, in its draw order."""
    n_pos = int(round(size * target_rate))
    cells = []
    for y, n_y in ((1, n_pos), (0, size - n_pos)):
        aligned = tuple(v if y == 1 else 1 - v for v in values)
        n_aligned = int(round(corr * n_y))
        others = [c for c in itertools.product((0, 1), repeat=len(values)) if c != aligned]
        counts = [n_aligned] + _split_evenly(n_y - n_aligned, len(others))
        cells += [((y,) + combo, count) for combo, count in zip([aligned] + others, counts)]
    return cells


def largest_biased_size(attrs, target: str, confounders, corr: float, *,
                        target_rate: float = 0.5, confounder_values=None) -> int:
    """The largest ``size`` that ``biased_subset`` can draw from ``attrs`` with these settings.

    Every cell's count grows with ``size`` (never shrinks), so the largest
    size whose counts all fit the cells is found by bisection. 0 when not even
    the smallest subset (size 2) fits.
    """
    table = _as_table(attrs)
    confounders = _confounder_list(confounders)
    values = (linked_values(table, target, confounders) if confounder_values is None
              else check_confounder_values(confounder_values, confounders))
    pools = _cell_pools(table, [target] + confounders)

    def fits(size: int) -> bool:
        return all(count <= pools[key].size
                   for key, count in _biased_cell_counts(size, corr, values, target_rate))

    if not fits(2):
        return 0
    low, high = 2, sum(p.size for p in pools.values())  # fits(low); the answer is <= high
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def largest_balanced_size(attrs, target: str, confounders) -> int:
    """The largest ``size`` that ``balanced_subset`` can draw: cells x the smallest cell (0 if one is empty)."""
    table = _as_table(attrs)
    confounders = [] if confounders in (None, (), []) else _confounder_list(confounders)
    pools = _cell_pools(table, [target] + confounders)
    return len(pools) * min(p.size for p in pools.values())


def balanced_subset(attrs, target: str, confounders, size, seed: int) -> np.ndarray:
    """A subset with equal counts in every (target, confounders...) cell.

    The test sets of the bias experiments: aligned and conflicting groups are
    equally represented, so accuracy per group is measured on equal footing.
    With an empty confounder list it balances the target alone. ``size`` 0
    or None takes the largest such subset: every cell as large as the
    smallest (an empty cell raises, naming it).
    """
    table = _as_table(attrs)
    confounders = [] if confounders in (None, (), []) else _confounder_list(confounders)
    names = [target] + confounders
    regions.attribute_ids(names)
    pools = _cell_pools(table, names)
    if not size:
        empty = [key for key in sorted(pools) if pools[key].size == 0]
        if empty:
            raise ValueError(f"no image in cell {_cell_name(names, empty[0])}; a balanced subset "
                             "needs every cell")
        size = len(pools) * min(p.size for p in pools.values())
    size = int(size)
    if size < 2 ** len(names):
        raise ValueError(f"size={size}; expected at least {2 ** len(names)} (one per cell)")
    rng = np.random.default_rng(seed)
    counts = _split_evenly(size, len(pools))
    chosen = [_draw(rng, pools[key], n, _cell_name(names, key))
              for key, n in zip(sorted(pools), counts)]
    return np.sort(np.concatenate(chosen))


def deconinck_subset(attrs, confounder: str, seed: int, *, target: str = "Male",
                     n_target: int = 3000, n_other_with: int = 2000,
                     n_other_without: int = 1000) -> np.ndarray:
    """De Coninck et al.'s training set: 3000 men without the confounder, 3000 women of
    whom 2000 have it and 1000 not (the counts are parameters)."""
    table = _as_table(attrs)
    names = [target, confounder]
    regions.attribute_ids(names)
    pools = _cell_pools(table, names)
    rng = np.random.default_rng(seed)
    parts = [
        _draw(rng, pools[(1, 0)], n_target, _cell_name(names, (1, 0))),
        _draw(rng, pools[(0, 1)], n_other_with, _cell_name(names, (0, 1))),
        _draw(rng, pools[(0, 0)], n_other_without, _cell_name(names, (0, 0))),
    ]
    return np.sort(np.concatenate(parts))



def deconinck_study_sets(train_attrs, test_attrs, confounder: str, seed: int, *, target: str,
                         n_target: int, n_other_with: int, n_other_without: int, test_size: int,
                         train_rows=None, test_rows=None) -> dict[str, np.ndarray]:
    """The three sets of one confounder in De Coninck et al.'s study.

    "biased": `deconinck_subset` of the training pool; "balanced": as many images of
    the same pool, balanced over target x confounder; "test": ``test_size`` images of
    the test pool, balanced the same way.

    Args:
      train_attrs, test_attrs: int8 [N, 40] / [M, 40] attributes of the two pools.
      confounder, target: attribute names.
      seed: the study's seed; each set draws with its own numpy seed,
        ``keys.name_hash(seed, confounder, set name)``.
      n_target, n_other_with, n_other_without: the biased set's cell counts.
      train_rows, test_rows: int64 [N] / [M] ids of the pools' rows in their sources
        (default 0..N-1 / 0..M-1); the sets are returned as these ids.
    Returns:
      {"biased", "balanced", "test": int64 row ids, in the order of ``*_rows``}.
    """
    if train_rows is None:
        train_rows = np.arange(len(train_attrs), dtype=np.int64)
    if test_rows is None:
        test_rows = np.arange(len(test_attrs), dtype=np.int64)
    biased = deconinck_subset(train_attrs, confounder, keys.name_hash(seed, confounder, "biased"),
                              target=target, n_target=int(n_target),
                              n_other_with=int(n_other_with),
                              n_other_without=int(n_other_without))
    balanced = balanced_subset(train_attrs, target, [confounder], biased.size,
                               keys.name_hash(seed, confounder, "balanced"))
    test = balanced_subset(test_attrs, target, [confounder], int(test_size),
                           keys.name_hash(seed, confounder, "test"))
    return {"biased": np.asarray(train_rows)[biased], "balanced": np.asarray(train_rows)[balanced],
            "test": np.asarray(test_rows)[test]}

def group_labels(attrs, target: str, confounders, confounder_values) -> tuple[np.ndarray, np.ndarray]:
    """(y [N] int32, aligned [N] bool): the target, and whether every confounder takes the value
    that goes with y (``confounder_values`` for y = 1, the opposite for y = 0), i.e. the
    direction the biased subset was drawn with."""
    table = _as_table(attrs)
    confounders = _confounder_list(confounders)
    values = np.asarray(check_confounder_values(confounder_values, confounders), np.int32)
    y = table[:, regions.attribute_id(target)].astype(np.int32)
    conf = table[:, regions.attribute_ids(confounders)]
    expected = np.where(y[:, None] == 1, values[None, :], 1 - values[None, :])
    aligned = np.all(conf == expected, axis=1)
    return y, aligned


def cooccurrence(attrs, target: str, confounder: str) -> tuple[float, float]:
    """(P(a=1 | y=1), P(a=0 | y=0)) over rows where both are known."""
    table = _as_table(attrs)
    y = table[:, regions.attribute_id(target)]
    a = table[:, regions.attribute_id(confounder)]
    known = (y >= 0) & (a >= 0)
    y, a = y[known], a[known]
    pos = float(np.mean(a[y == 1] == 1)) if np.any(y == 1) else float("nan")
    neg = float(np.mean(a[y == 0] == 0)) if np.any(y == 0) else float("nan")
    return pos, neg


def verification_pairs(identity, seed: int, *, num_folds: int = 10,
                       pairs_per_fold: int = 300) -> dict[str, np.ndarray]:
    """LFW-style pairs: per fold ``pairs_per_fold`` matched and as many mismatched pairs.

    Identities are split into ``num_folds`` disjoint groups and each fold's
    pairs use only its own identities, as in LFW's View 2, so a threshold
    chosen on 9 folds is tested on unseen people. Pass only test identities
    (disjoint from training) in ``identity``.

    Returns dict of int arrays ``a``, ``b`` (indices into ``identity``),
    ``same`` (bool) and ``fold``, each [num_folds * 2 * pairs_per_fold].
    """
    ids = np.asarray(identity)
    if ids.ndim != 1:
        raise ValueError(f"identity has shape {ids.shape}; expected a 1-D array")
    rng = np.random.default_rng(seed)
    unique = rng.permutation(np.unique(ids))
    if unique.size < 2 * num_folds:
        raise ValueError(
            f"{unique.size} identities cannot make {num_folds} identity-disjoint folds; "
            f"expected at least {2 * num_folds}")
    members = {int(u): np.flatnonzero(ids == u) for u in unique}
    out = {"a": [], "b": [], "same": [], "fold": []}
    for fold, fold_ids in enumerate(np.array_split(unique, num_folds)):
        multi = [int(u) for u in fold_ids if members[int(u)].size >= 2]
        if not multi:
            raise ValueError(f"fold {fold} has no identity with two or more images; "
                             "expected several images per identity")
        for _ in range(pairs_per_fold):
            person = multi[rng.integers(len(multi))]
            i, j = rng.choice(members[person], size=2, replace=False)
            out["a"].append(i); out["b"].append(j); out["same"].append(True); out["fold"].append(fold)
        for _ in range(pairs_per_fold):
            p, q = rng.choice(fold_ids, size=2, replace=False)
            out["a"].append(rng.choice(members[int(p)]))
            out["b"].append(rng.choice(members[int(q)]))
            out["same"].append(False); out["fold"].append(fold)
    return {k: np.asarray(v, dtype=bool if k == "same" else np.int64) for k, v in out.items()}


def attribute_table(attrs) -> np.ndarray:
    """``attrs`` as an [N, 40] array (CelebA order); raises ValueError when it is not one or is empty."""
    table = np.asarray(attrs)
    if table.ndim != 2 or table.shape[1] != regions.NUM_ATTRIBUTES:
        raise ValueError(f"attribute table has shape {table.shape}; expected "
                         f"[N, {regions.NUM_ATTRIBUTES}] in CelebA order")
    if table.shape[0] == 0:
        raise ValueError("attribute table is empty; expected at least one row")
    return table



def attribute_column(attrs, name: str) -> np.ndarray:
    """1 where attribute ``name`` is present, else 0 (absent or unknown): int32 [N]."""
    return (_as_table(attrs)[:, regions.attribute_id(name)] == 1).astype(np.int32)

def attribute_correlations(attrs, target: str) -> np.ndarray:
    """Pearson correlation (phi, for binary columns) of every attribute with ``target``.

    Returns float64 [40]; NaN for the target itself, for columns holding any
    unknown (-1) value (undrawn attributes) and for constant columns.
    """
    table = attribute_table(attrs)
    t = regions.attribute_id(target)
    y = table[:, t].astype(np.float64)
    if np.any(y < 0):
        raise ValueError(f"target {target!r} has unknown (-1) values; expected a labelled target")
    x = table.astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean()
    sx, sy = np.sqrt((xc ** 2).mean(0)), np.sqrt((yc ** 2).mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc[:, None]).mean(0) / (sx * sy)
    usable = np.all(table >= 0, axis=0) & (sx > 0) & (sy > 0)
    usable[t] = False
    return np.where(usable, r, np.nan)


def top_correlated_attributes(attrs, target: str, k: int, *,
                              require_regions: bool = True,
                              distinct_regions: bool = False) -> list[tuple[str, float]]:
    """The ``k`` attributes most correlated with ``target`` by |Pearson r|, highest first.

    Excludes the target, undrawn (-1) and constant attributes and, with
    ``require_regions``, attributes tied to no face region (Young, Male, ...),
    whose RP is undefined. With ``distinct_regions`` an attribute is skipped
    when it shares a region with one already chosen (No_Beard and
    5_o_Clock_Shadow both live on skin), so the k rows test k different
    regions, as FaceX's Table 4 does (skin, lips, earrings, hair, necklace).
    Returns [(name, r), ...] (fewer than k if fewer qualify); ties are broken
    by attribute order.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}; expected a positive int")
    r = attribute_correlations(attrs, target)
    candidates = [j for j, name in enumerate(regions.ATTRIBUTES)
                  if np.isfinite(r[j]) and (not require_regions or regions.regions_of(name))]
    candidates.sort(key=lambda j: (-abs(r[j]), j))
    if not distinct_regions:
        return [(regions.ATTRIBUTES[j], float(r[j])) for j in candidates[:int(k)]]
    chosen, used = [], set()
    for j in candidates:
        own = set(regions.regions_of(regions.ATTRIBUTES[j]))
        if own & used:
            continue
        chosen.append((regions.ATTRIBUTES[j], float(r[j])))
        used |= own
        if len(chosen) == int(k):
            break
    return chosen
