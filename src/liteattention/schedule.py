"""Threshold schedules: the marking threshold as a function of the denoising step.

Early denoising steps shape the whole video, so errors made there propagate furthest; a schedule
lets them stay strict (low threshold, or ``-inf`` = mark nothing) while later steps skip more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

ThresholdLike = Union[float, int, Sequence[float], Callable[[int], float], "ThresholdSchedule"]


def check_threshold(value: float, name: str = "threshold") -> float:
    """Return ``value`` as a float, or raise if it cannot be a marking threshold.

    Thresholds are in log2 units of attention weight relative to the running row maximum, so
    ``-inf`` (never mark) and any finite number are meaningful; NaN and ``+inf`` are not.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float (log2 units, e.g. -10.0), got {type(value).__name__}")
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
        elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
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
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self._fn is not None:
            return check_threshold(self._fn(step), f"threshold({step})")
        assert self._values is not None
        return self._values[min(step, len(self._values) - 1)]

    def __repr__(self) -> str:
        if self._fn is not None:
            return f"ThresholdSchedule({self._fn!r})"
        values = self._values or ()
        return f"ThresholdSchedule({values[0] if len(values) == 1 else list(values)})"
