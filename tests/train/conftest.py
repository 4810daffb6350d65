"""tests/train on sys.path, so the tests and the scripts they start under torchrun import the shared
:mod:`_problems` helpers (pytest runs with --import-mode=importlib, which does not add test folders)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
