"""Schedules: how a hyper-parameter (sparsity, drop fraction, mask decay, ...) moves with the optimizer step.

Every schedule is a small frozen dataclass callable on the step (``schedule(step) -> float``). Outside its
``[begin_step, end_step]`` window a schedule holds its start value before and its end value after. Anywhere
the library takes a hyper-parameter it also takes a plain number, turned into a :class:`Constant` by
:func:`as_schedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class Schedule(Protocol):
    """Anything callable on the step that returns the hyper-parameter's value at that step."""

    def __call__(self, step: int) -> float: ...


def _check_window(begin_step: int, end_step: int) -> None:
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}")
    if end_step <= begin_step:
        raise ValueError(f"end_step must be > begin_step ({begin_step}), got {end_step}")


def _progress(step: int, begin_step: int, end_step: int) -> float:
    """Fraction of the window [begin_step, end_step] elapsed at ``step``, clipped to [0, 1]."""
    return min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)


@dataclass(frozen=True)
class Constant:
    """The same value at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Linear:
    """Straight line from ``start`` at ``begin_step`` to ``end`` at ``end_step``."""

    start: float
    end: float
    begin_step: int
    end_step: int

    def __post_init__(self) -> None:
        _check_window(self.begin_step, self.end_step)

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * _progress(step, self.begin_step, self.end_step)


@dataclass(frozen=True)
class Cosine:
    """Half cosine from ``start`` to ``end``: end + (start - end)/2 * (1 + cos(pi * progress)); RigL's drop rate."""

    start: float
    end: float
    begin_step: int
    end_step: int

    def __post_init__(self) -> None:
        _check_window(self.begin_step, self.end_step)

    def __call__(self, step: int) -> float:
        progress = _progress(step, self.begin_step, self.end_step)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Cubic:
    """Zhu & Gupta's gradual pruning curve: end + (start - end) * (1 - progress)^3, updated every ``every`` steps.

    With ``every > 1`` the value only changes on multiples of ``every`` after ``begin_step`` (a staircase that
    meets the curve at each pruning step), as in the paper's t = t_0 + k * dt; the end value is reached at
    ``end_step`` itself.
    """

    start: float
    end: float
    begin_step: int
    end_step: int
    every: int = 1

    def __post_init__(self) -> None:
        _check_window(self.begin_step, self.end_step)
        if self.every < 1:
            raise ValueError(f"every must be >= 1 step, got {self.every}")

    def __call__(self, step: int) -> float:
        if step >= self.end_step:
            return float(self.end)
        if step > self.begin_step:
            step = self.begin_step + (step - self.begin_step) // self.every * self.every
        progress = _progress(step, self.begin_step, self.end_step)
        return self.end + (self.start - self.end) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class Exponential:
    """start * exp(-rate * (step - begin_step)) after ``begin_step`` (start before), never below ``floor``."""

    start: float
    rate: float
    begin_step: int = 0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"rate must be >= 0, got {self.rate}")
        if self.begin_step < 0:
            raise ValueError(f"begin_step must be >= 0, got {self.begin_step}")

    def __call__(self, step: int) -> float:
        elapsed = max(step - self.begin_step, 0)
        return max(self.start * math.exp(-self.rate * elapsed), self.floor)


SCHEDULES = {"constant": Constant, "linear": Linear, "cosine": Cosine, "cubic": Cubic, "exponential": Exponential}


def as_schedule(value: float | Schedule, name: str = "value") -> Schedule:
    """A schedule for ``value``: schedules pass through, numbers become :class:`Constant`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a schedule, got {value!r}")
    if isinstance(value, int | float):
        return Constant(float(value))
    if callable(value):
        return value
    raise TypeError(f"{name} must be a number or a schedule (callable on the step), got {type(value).__name__}")
