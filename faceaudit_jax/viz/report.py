"""Markdown and figure helpers shared by every experiment's report.

One place for how numbers print in tables (``fmt``), how a table is laid out
(``markdown_table``) and how a figure lands on disk (``save_figure``), so the
experiments' ``report`` functions only say what goes where.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, Path]


def fmt(value: Any, spec: str = ".3f", missing: str = "n/a") -> str:
    """A table cell: ``missing`` for None / NaN / inf, integers as integers, floats with ``spec``.

    Strings pass through unchanged, so a row can mix text and numbers.
    """
    if isinstance(value, str):
        return value
    if value is None:
        return missing
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    return missing if not math.isfinite(value) else format(value, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   spec: str = ".3f", missing: str = "n/a",
                   align: Optional[Sequence[str]] = None) -> str:
    """A GitHub Markdown table; every non-string cell goes through ``fmt(cell, spec, missing)``.

    ``align``: one of "l", "r", "c" per column (default: "---" everywhere).
    Raises ValueError naming the row when a row's length differs from the header's.
    """
    headers = [str(h) for h in headers]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row {i} has {len(row)} cells, expected "
                             f"{len(headers)} ({', '.join(headers)})")
    if align is None:
        rule = ["---"] * len(headers)
    else:
        marks = {"l": ":---", "r": "---:", "c": ":---:"}
        if len(align) != len(headers) or any(a not in marks for a in align):
            raise ValueError(f"markdown_table: align={list(align)!r}; expected one of "
                             f"'l', 'r', 'c' for each of the {len(headers)} columns")
        rule = [marks[a] for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(fmt(c, spec, missing) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: Optional[PathLike], dpi: int = 110, **savefig_kwargs) -> Optional[str]:
    """Write ``fig`` as an image at ``path`` (parents created) and return the path as a string.

    ``path=None`` saves nothing and returns None (the caller only wants the
    figure object, e.g. to show it in a notebook).
    """
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **savefig_kwargs)
    return str(path)


__all__ = ["fmt", "markdown_table", "save_figure"]
