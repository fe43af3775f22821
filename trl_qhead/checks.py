"""The one validator of a tilt or soft-target temperature `beta`, shared by every module that takes one."""

from __future__ import annotations

import math
from numbers import Real


def check_beta(beta: object, *, name: str = "beta", allow_inf: bool = False) -> float:
    """`beta` as a float: a real number > 0, finite unless `allow_inf` (where `inf` means "no tilt").

    Args:
        beta: the value to check (a Python or NumPy real; `bool` is refused).
        name: the argument or field named in the error.
        allow_inf: accept `float("inf")` (the processors: an infinite beta adds nothing).

    Raises:
        TypeError: `beta` is not a real number.
        ValueError: `beta` is NaN, <= 0, or infinite where `allow_inf` is False.
    """
    if isinstance(beta, bool) or not isinstance(beta, Real):
        raise TypeError(f"`{name}` must be a number > 0, got {type(beta).__name__} {beta!r}.")
    value = float(beta)
    if math.isnan(value) or value <= 0.0 or (math.isinf(value) and not allow_inf):
        allowed = "a number > 0 (float('inf') disables the tilt)" if allow_inf else "a finite number > 0"
        raise ValueError(f"`{name}` must be {allowed}, got {beta!r}.")
    return value
