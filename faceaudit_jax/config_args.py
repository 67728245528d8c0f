"""``parse_arg``: a config's variant string as typed options (big_vision's habit).

``get_config("smoke")``, ``get_config("celeba,smoke")`` and
``get_config("res=96,smoke")`` all go through one parser instead of an
if/elif ladder per config file::

    def get_config(arg=""):
        a = parse_arg(arg, smoke=False, celeba=False, res=128)
        ...
        if a.smoke:
            ...

A bare word sets a boolean option to True; ``key=value`` sets any option,
converted to the type of its default (bools accept true/false/1/0). An
unknown option or a value of the wrong type raises ValueError naming it and
the options that exist.
"""

from __future__ import annotations

from typing import Any

import ml_collections

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"config option {key}={text!r}; expected true or false")
    if default is None or isinstance(default, str):
        return text
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"config option {key}={text!r}; expected a {type(default).__name__} "
                         f"(default {default!r})") from None


def parse_arg(arg: str | None, **options: Any) -> ml_collections.ConfigDict:
    """The options named in ``arg`` ("a,b=2,c"), with ``options`` as defaults and types."""
    values = dict(options)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, has_value, text = part.partition("=")
        key = key.strip()
        if key not in options:
            known = ", ".join(sorted(options)) or "(none)"
            raise ValueError(f"unknown config variant {key!r}; expected some of: {known} "
                             "(comma-separated, e.g. 'smoke' or 'celeba,smoke')")
        if not has_value:
            if not isinstance(options[key], bool):
                raise ValueError(f"config option {key!r} needs a value ({key}=...)")
            values[key] = True
        else:
            values[key] = _convert(key, text.strip(), options[key])
    return ml_collections.ConfigDict(values)


__all__ = ["parse_arg"]
