"""Value contracts of the public explanation entry points, checked before any work.

Images are float arrays with finite values in [0, 1]; attribution maps given
to IoR are finite and in [0, 1] (normalised, as ``compute_cams`` returns
them); parse ids are integers in 0..R-1 (``summary.ior.check_parse``). A
violation raises one ValueError naming the argument, the first offending
index and value, and what was expected: a batch in 0..255 (uint8 or float),
in -1..1, or with a NaN otherwise gives plausible-looking but wrong maps.

Where the check runs: numpy inputs are checked on the host before anything
is compiled or run; for JAX arrays the dtype is checked on the host (free)
and the values with one jitted reduction (three scalars transferred), or,
in ``compute_cams``, inside the jitted call itself (one flag transferred).
A violation found that way is then described from a host copy. Called
inside a caller's own ``jax.jit`` nothing concrete exists to raise on, and
nothing turns bad input into plausible output: ``compute_cams``/``cam_fn``
give NaN maps for the images that break the contract (normalisation alone
would make them all-zero maps), CorrRISE's maps carry the NaN of a NaN
similarity score. Check such results with ``jnp.isnan`` or
``jax.experimental.checkify``.

``UNIT_TOLERANCE`` admits the rounding of resizing and colour conversion
(a bilinear resize of [0, 1] images can overshoot by float epsilons).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

UNIT_TOLERANCE = 1e-3


def check_float_dtype(x, name: str) -> None:
    """Raise ValueError unless ``x`` holds floating-point values."""
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if not np.issubdtype(dtype, np.floating):
        hint = " (divide 8-bit images by 255)" if dtype == np.uint8 else ""
        raise ValueError(f"{name} has dtype {dtype}; expected floating-point values in [0, 1]{hint}")


def unit_violation(x, name: str, tolerance: float = UNIT_TOLERANCE) -> str | None:
    """Why ``x`` breaks the finite-and-in-[0, 1] contract (the first offending index), or None."""
    x = np.asarray(x)
    # Fast path, two passes and no temporaries: min/max are NaN if any value is.
    lo, hi = (float(v) for v in (x.min(), x.max())) if x.size else (0.0, 0.0)
    if -tolerance <= lo and hi <= 1 + tolerance:  # False for NaN and inf
        return None
    finite = np.isfinite(x)
    if not finite.all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        return f"{name} holds a non-finite value {x[index]} at index {index}; expected finite values in [0, 1]"
    outside = (x < -tolerance) | (x > 1 + tolerance)
    if outside.any():
        index = tuple(int(i) for i in np.argwhere(outside)[0])
        return (f"{name} holds {float(x[index]):g} at index {index} (range {float(x.min()):g}.."
                f"{float(x.max()):g}); expected values in [0, 1] (scale 0..255 data by 1/255, "
                "-1..1 data by (x + 1) / 2)")
    return None


def in_unit_range(x, tolerance: float = UNIT_TOLERANCE, axis=None) -> jax.Array:
    """Traceable: True iff every value of ``x`` (along ``axis``) is finite and in [0, 1] (± ``tolerance``)."""
    return jnp.all(jnp.isfinite(x) & (x >= -tolerance) & (x <= 1 + tolerance), axis=axis)


_in_unit_range_jit = jax.jit(in_unit_range, static_argnames="tolerance")


def check_unit_range(x, name: str, tolerance: float = UNIT_TOLERANCE) -> None:
    """Raise ValueError unless ``x`` is a float array with finite values in [0, 1].

    numpy: checked on the host; a JAX array: one on-device reduction, then
    a host copy only to describe a violation. A tracer (inside the caller's
    jit) is not checked: see the module docstring.
    """
    check_float_dtype(x, name)
    if isinstance(x, jax.core.Tracer):
        return
    if isinstance(x, jax.Array) and bool(_in_unit_range_jit(x, tolerance=tolerance)):
        return
    message = unit_violation(x, name, tolerance)
    if message:
        raise ValueError(message)


def raise_unit_violation(ok, x, name: str, tolerance: float = UNIT_TOLERANCE) -> None:
    """Raise the ValueError describing ``x`` when the flag ``ok`` (from ``in_unit_range``) is False.

    ``ok`` computed inside the caller's jit is a tracer: nothing to check then.
    """
    if isinstance(ok, jax.core.Tracer) or bool(ok):
        return
    raise ValueError(unit_violation(x, name, tolerance)
                     or f"{name} breaks its contract (finite values in [0, 1])")
