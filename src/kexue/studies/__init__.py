"""One study per article. Importing a study module registers it in :data:`STUDIES`."""

from __future__ import annotations

from .._checks import import_modules
from .base import STUDIES, Figure, Result, StudyContext, Table, register_study, run_study, seeded_global_rng

# Study modules, in the order of the articles they reproduce.
STUDY_MODULES = ("mixup", "gan", "masks", "seq2seq", "init", "linear", "orthogonal", "margin", "entropy")


def load_all() -> dict:
    """Import every study module so that all studies are registered; return the registry."""
    import_modules(__name__, STUDY_MODULES)
    return STUDIES


__all__ = ["STUDIES", "Figure", "Result", "StudyContext", "Table", "load_all", "register_study", "run_study",
           "seeded_global_rng"]
