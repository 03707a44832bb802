"""Argument checks for the optimizers: each names the argument and echoes the caller's value."""
from __future__ import annotations

import math
import numbers

import torch


def number(name: str, value, *, low: float | None = None, low_open: bool = False, high: float | None = None,
           high_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a float after checking it is a finite real number in the given range (``None``
    passes when ``optional``). A one-element tensor is read once (a host sync)."""
    if value is None and optional:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "None or a number" if optional else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value!r}")
    return value


def positive(name: str, value, *, optional: bool = False) -> float | None:
    return number(name, value, low=0.0, low_open=True, optional=optional)


def non_negative(name: str, value) -> float:
    return number(name, value, low=0.0)


def choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def parameter_names(name: str, value, model) -> frozenset:
    """A collection of names of the model's trainable parameters."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a collection of parameter names, got the string {value!r}")
    names = frozenset(value)
    unknown = sorted(names - {n for n, p in model.named_parameters() if p.requires_grad})
    if unknown:
        raise ValueError(f"{name} names parameters that are not trainable parameters of the model: {unknown[:5]}")
    return names
