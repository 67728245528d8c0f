"""The run grid of attribution-guided debiasing (De Coninck et al.): names and codes.

A run is a baseline ("original": the biased training set, "balanced": a set
balanced over target x confounder) or a method (scope general / specific x
mode noise / mask, `mitigation.noise`) at a quantile q. `run_name` gives a
file-safe id that `parse_run_name` inverts; `repeat_stem` names one of a
run's repeated trainings; `augment_code` is the runtime mode of
`noise.make_selection_augment_fn`; `planned_runs` is the grid a config asks for.
"""

from __future__ import annotations

from typing import Any, Optional

from faceaudit_jax.mitigation import noise

BASELINES: tuple[str, ...] = ("original", "balanced")


METHODS: tuple[str, ...] = ("general_noise", "general_mask", "specific_noise", "specific_mask")


def method_spec(method: str) -> tuple[str, str]:
    """'general_noise' -> ('general', 'noise'): the (scope, mode) of an augmentation."""
    if method not in METHODS:
        raise ValueError(f"unknown debiasing method {method!r}; expected one of {METHODS}")
    scope, mode = method.split("_")
    return scope, mode


def check_quantile(q: Any) -> float:
    """q as a float in (0, 1] (the top 1 - q of pixels is altered), else ValueError."""
    try:
        value = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"quantile q must be a number in (0, 1], got {q!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"quantile q must lie in (0, 1], got {q!r}")
    return value


def run_name(method: str, quantile: Optional[float] = None) -> str:
    """File-safe run id: 'original', 'balanced' or e.g. 'general_noise_q0.7'
    (the quantile in its shortest exact form, so `parse_run_name` recovers it)."""
    if method in BASELINES:
        if quantile is not None:
            raise ValueError(f"run {method!r} takes no quantile, got {quantile}")
        return method
    method_spec(method)
    return f"{method}_q{check_quantile(quantile)!r}"


def parse_run_name(name: str) -> tuple[str, Optional[float]]:
    """Inverse of `run_name`."""
    if name in BASELINES:
        return name, None
    method, _, q = name.rpartition("_q")
    method_spec(method)
    return method, check_quantile(q)


def repeat_stem(name: str, repeat: int) -> str:
    """File stem of one training of a run: the run id for repeat 0 (so a job
    that gains repeats keeps its finished first runs), '<run>.rep<r>' after."""
    if repeat < 0:
        raise ValueError(f"repeat={repeat}; expected >= 0")
    return name if repeat == 0 else f"{name}.rep{repeat}"


def repeat_parts(repeat: int) -> tuple:
    """Extra key / seed parts of a repeat: none for repeat 0 (its keys predate
    repeats), the repeat index after."""
    return () if repeat == 0 else ("repeat", int(repeat))


def augment_code(method: str) -> int:
    """0 for the baselines, else the code of the method's mode."""
    if method in BASELINES:
        return noise.AUGMENT_NONE
    return noise.MODE_CODES[method_spec(method)[1]]


def planned_runs(config, confounder: str) -> list[str]:
    """Run ids for one confounder: the baselines, every method at the main quantile
    (``config.debias``), and the sweep's quantiles (``config.sweep``) where this is the
    sweep's confounder; a sweep quantile equal to the main one is not run twice."""
    names = list(BASELINES) + [run_name(m, config.debias.quantile) for m in config.debias.methods]
    if confounder == config.sweep.confounder:
        names += [n for n in dict.fromkeys(run_name(config.sweep.method, q)
                                           for q in config.sweep.quantiles) if n not in names]
    return names
