"""What a study is: a function from a :class:`StudyContext` to a :class:`Result`.

Each study module registers itself with :func:`register_study`; ``kexue reproduce`` finds it by name,
builds a context (mode, seed, device, data directory, figure folder) and hands the returned
:class:`Result` to :mod:`kexue.report`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write

VERDICTS = ("holds", "does not hold", "partly holds", "not tested")


@dataclass
class Table:
    """A table of numbers for the report. ``rows`` hold plain Python values (str, int, float, None)."""

    name: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self, floatfmt: str = ".4g") -> str:
        def cell(v: Any) -> str:
            if isinstance(v, float):
                return format(v, floatfmt)
            return "" if v is None else str(v)

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Figure:
    """A PNG figure already written to disk by :meth:`StudyContext.save_figure`."""

    name: str
    path: str
    caption: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": Path(self.path).name, "caption": self.caption}


@dataclass
class Result:
    """Everything a study reports.

    ``claim`` is the article's claim in one or two sentences; ``verdict`` is one of
    ``"holds"``, ``"does not hold"``, ``"partly holds"`` or ``"not tested"`` and ``verdict_detail`` gives the
    numbers behind it. ``data`` names the datasets used (and how they resolved); ``config`` is the exact
    configuration that ran.
    """

    study: str
    title: str
    article: str
    claim: str
    verdict: str
    verdict_detail: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    mode: str = "quick"

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("tables", "figures")}
        d["tables"] = [t.to_dict() for t in self.tables]
        d["figures"] = [f.to_dict() for f in self.figures]
        return d


@dataclass
class StudyContext:
    """What a study receives: the mode, seed, device, data directory and where to put figures."""

    mode: str = "quick"
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    fig_dir: Path = field(default_factory=lambda: Path("."))
    progress: bool = True
    figures: list[Figure] = field(default_factory=list)
    runs_dir: Path | None = None

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    def generator(self, offset: int = 0, device: str | None = None) -> torch.Generator:
        """A fresh ``torch.Generator`` seeded with ``seed + offset``."""
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(self.seed + offset)
        return g

    def save_figure(self, fig: Any, name: str, caption: str = "") -> Figure:
        """Write a matplotlib figure to ``fig_dir/name.png`` (atomically), close it and record it."""
        import matplotlib.pyplot as plt

        path = atomic_write(self.fig_dir / f"{name}.png",
                            lambda f: fig.savefig(f, dpi=110, bbox_inches="tight", format="png"))
        plt.close(fig)
        f = Figure(name=name, path=str(path), caption=caption)
        self.figures.append(f)
        return f

    def cached_run(self, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``fn()``, stored under ``runs_dir`` so that an interrupted study resumes where it stopped.

        A study calls this once per independent unit of work (one training run) with a ``key`` naming it
        fully (configuration, seed, setting). With ``runs_dir=None`` (the default; tests) it simply calls
        ``fn``. Otherwise the JSON result is written atomically to ``runs_dir/<study>/<hash>.json`` after
        ``fn`` returns and read back instead of recomputing when the same key is asked again. The hash covers
        the key, the mode, the device, the kexue version and the source of ``fn`` (of ``fn.func`` for a
        ``functools.partial``), so editing the function that does the run invalidates its stored results while
        editing the study's tables and figures does not. Changes deeper in the library are not tracked: use
        ``kexue reproduce --no-resume`` (or a fresh ``--runs-dir``) after them.
        """
        if self.runs_dir is None:
            return fn()
        caller = inspect.currentframe()
        module = inspect.getmodule(caller.f_back) if caller is not None and caller.f_back is not None else None
        study = module.__name__.rsplit(".", 1)[-1] if module else "study"
        target = fn.func if isinstance(fn, functools.partial) else fn
        try:
            source = inspect.getsource(target)
        except (OSError, TypeError):
            source = repr(target)
        from .. import __version__

        blob = json.dumps({"key": key, "mode": self.mode, "device": str(self.device), "version": __version__,
                           "source": hashlib.sha256(source.encode()).hexdigest()}, sort_keys=True, default=str)
        path = Path(self.runs_dir) / study / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("blob") == blob:
                    return stored["value"]
            except (OSError, ValueError, KeyError):
                pass  # unreadable or foreign: recompute and overwrite
        value = fn()
        text = json.dumps({"blob": blob, "value": value}, sort_keys=True)
        atomic_write(path, lambda f: f.write(text.encode()))
        return value

    def pbar(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", **kw: Any):
        """A tqdm progress bar that respects ``progress=False``."""
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not self.progress, leave=False, **kw)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op torch threads (``None``: leave as is), restoring the count afterwards.

    Studies of many small ops use one thread: a second one adds overhead, and several-fold slowdowns when
    the cores are shared.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def seeded_global_rng(seed: int, *, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run a block with torch's global RNG seeded from ``seed``; on exit the caller's RNG state is back.

    Studies draw their own randomness from ``torch.Generator`` objects (:meth:`StudyContext.generator`), but
    some of torch only reads the global RNG: module constructors (``nn.Linear``/``nn.Conv2d`` initialise their
    weights with it), ``nn.Dropout``, ``torch.randperm`` without ``generator=``. Wrap one whole training run
    -- from building the model to its last evaluation -- in this block so those draws depend only on the run's
    seed, never on what ran before, and leave nothing behind for what runs after (a study must not seed the
    global RNG: that would change every later study's draws and the user's own).

    It forks the CPU generator, and the CUDA generator of ``device`` when it is a CUDA device, with
    :func:`torch.random.fork_rng`; seeds them with ``seed`` (the CPU one exactly as ``torch.manual_seed(seed)``
    does, so code that used ``torch.manual_seed(seed)`` before a run draws the same numbers inside the block);
    and restores both states when the block ends, also by an exception. Other CUDA devices are neither seeded
    nor touched. Nesting is fine; a training loop that forks and reseeds per epoch (:func:`kexue.train.fit`)
    keeps working inside it.

    Example:
        >>> _ = torch.manual_seed(123)
        >>> state = torch.get_rng_state()
        >>> with seeded_global_rng(7):
        ...     a = torch.nn.Linear(3, 2).weight.detach().clone()
        >>> with seeded_global_rng(7):
        ...     b = torch.nn.Linear(3, 2).weight.detach().clone()
        >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), state)
        (True, True)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    dev = torch.device(device)
    cuda: list[int] = []
    if dev.type == "cuda":
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


@dataclass
class StudySpec:
    name: str
    article: int
    title: str
    run: Callable[[StudyContext], Result]
    quick_budget_s: float
    full_time: str
    datasets: Sequence[str] = ()


STUDIES: dict[str, StudySpec] = {}


def register_study(name: str, *, article: int, title: str, quick_budget_s: float, full_time: str,
                   datasets: Sequence[str] = ()) -> Callable:
    """Decorator registering ``run(ctx) -> Result`` as study ``name``.

    ``quick_budget_s`` is the wall-time budget of ``--quick`` on 2 CPU cores; ``full_time`` states the
    expected time of ``--full`` in words (e.g. ``"about 40 min on 2 CPU cores"``).
    """

    def deco(fn: Callable[[StudyContext], Result]) -> Callable[[StudyContext], Result]:
        STUDIES[name] = StudySpec(name, article, title, fn, quick_budget_s, full_time, tuple(datasets))
        return fn

    return deco


def run_study(name: str, ctx: StudyContext) -> Result:
    """Run one registered study and stamp its wall time, mode and figures on the result."""
    from . import load_all

    load_all()
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; known: {', '.join(sorted(STUDIES))}")
    ctx.figures = []
    t0 = time.perf_counter()
    result = STUDIES[name].run(ctx)
    result.wall_time_s = time.perf_counter() - t0
    result.mode = ctx.mode
    known = {f.path for f in result.figures}
    result.figures += [f for f in ctx.figures if f.path not in known]
    result.config.setdefault("seed", ctx.seed)
    result.config.setdefault("device", ctx.device)
    return result
