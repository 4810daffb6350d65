"""One study per article. Importing a study module registers it in :data:`STUDIES`."""

from __future__ import annotations

import importlib

from .base import STUDIES, Figure, Result, StudyContext, Table, register_study, run_study

# Study modules, in the order of the articles they reproduce. A module that is not there yet is skipped.
STUDY_MODULES = ("mixup", "masks", "init", "orthogonal", "margin", "entropy")


def load_all() -> dict:
    """Import every study module so that all studies are registered; return the registry."""
    for mod in STUDY_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise
    return STUDIES


__all__ = ["STUDIES", "Figure", "Result", "StudyContext", "Table", "load_all", "register_study", "run_study"]
