"""Small argument checks shared by the library, so every bad input fails the same clear way."""

from __future__ import annotations

from typing import Any

import torch


def check_tensor(name: str, value: Any, *, floating: bool | None = None, min_dim: int | None = None,
                 dim: int | None = None) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a suitable tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating is True and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(value.shape)}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """Raise unless ``value`` is a finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if value == float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_betas(value: Any) -> tuple[float, float]:
    """Adam's ``betas``: two numbers (not bools) in [0, 1), returned as floats."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in value)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {value!r}")
    return float(value[0]), float(value[1])


def check_device(value: Any) -> None:
    """A device given as a string or ``torch.device`` that torch can parse."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"device must be a string like 'cpu' or 'cuda', got {type(value).__name__}")
    try:
        torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"device must be a torch device string, got {value!r}") from e


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in where precision matters: floating types narrower than 32 bits (fp16, bf16, the
    fp8 types) are promoted to fp32; fp32, fp64 and non-floating dtypes are kept.

    The one place this rule is written: the library computes in ``compute_dtype(x.dtype)`` and returns results
    in the input dtype.

    Example:
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype


def import_modules(package: str, names: tuple[str, ...]) -> None:
    """Import ``package.name`` for each name (used to register every study and benchmark module)."""
    import importlib

    for name in names:
        importlib.import_module(f"{package}.{name}")
