"""Threshold schedules: the marking threshold as a function of the denoising step.

Early denoising steps shape the whole video, so errors made there propagate furthest; a schedule
lets them stay strict (low threshold, or ``-inf`` = mark nothing) while later steps skip more.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Union

ThresholdLike = Union[float, int, Sequence[float], Callable[[int], float], "ThresholdSchedule"]


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (int, float, numpy scalar...), bool excluded."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int; raise a ValueError naming ``name`` unless ``minimum <= value (<= maximum)``."""
    high = "" if maximum is None else f" and <= {maximum}"
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (is_int and minimum <= value and (maximum is None or value <= maximum)):
        raise ValueError(f"{name}: expected an integer >= {minimum}{high}, got {value!r}")
    return int(value)


def check_threshold(value: float, name: str = "threshold") -> float:
    """Return ``value`` as a float, or raise if it cannot be a marking threshold.

    Thresholds are in log2 units of attention weight relative to the running row maximum, so
    ``-inf`` (never mark) and any finite number are meaningful; NaN and ``+inf`` are not.
    """
    if not is_real(value):
        raise TypeError(f"{name} must be a real number (log2 units, e.g. -10.0), got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN; use -inf to disable marking")
    if value == math.inf:
        raise ValueError(f"{name} must be finite or -inf, got +inf")
    return value


class ThresholdSchedule:
    """Marking threshold per step.

    Built from a single float (the same every step), a sequence (value ``i`` at step ``i``; steps
    past the end keep the last value) or a callable ``step -> threshold``.
    """

    def __init__(self, threshold: ThresholdLike) -> None:
        if isinstance(threshold, ThresholdSchedule):
            self._values: tuple[float, ...] | None = threshold._values
            self._fn: Callable[[int], float] | None = threshold._fn
        elif is_real(threshold):
            self._values, self._fn = (check_threshold(threshold),), None
        elif isinstance(threshold, Sequence) and not isinstance(threshold, (str, bytes)):
            if len(threshold) == 0:
                raise ValueError("threshold sequence must not be empty")
            self._values = tuple(check_threshold(t, f"threshold[{i}]") for i, t in enumerate(threshold))
            self._fn = None
        elif callable(threshold):
            self._values, self._fn = None, threshold
        else:
            raise TypeError(
                "threshold must be a float, a sequence of floats (one per step) or a callable "
                f"step -> float, got {type(threshold).__name__}"
            )

    def __call__(self, step: int) -> float:
        step = check_int("step", step, 0)
        if self._fn is not None:
            return check_threshold(self._fn(step), f"threshold({step})")
        assert self._values is not None
        return self._values[min(step, len(self._values) - 1)]

    def __repr__(self) -> str:
        if self._fn is not None:
            return f"ThresholdSchedule({self._fn!r})"
        values = self._values or ()
        return f"ThresholdSchedule({values[0] if len(values) == 1 else list(values)})"
