"""kexue: eight techniques from Su Jianlin's Scientific Spaces articles, as tested PyTorch pieces."""

from __future__ import annotations

__version__ = "0.1.0"
