"""The classification training loop: :class:`TrainConfig`, :func:`fit`, :class:`TrainHistory`.

One loop serves the studies: SGD or AdamW, per-step cosine (or constant) learning rate with linear warm-up,
per-batch input augmentation and batch transforms (mixup, SamplePairing), losses with their own parameters
(margin-loss class centres), per-epoch evaluation, an atomic checkpoint every epoch, exact resume, and DDP
under ``torchrun``.

Determinism. Every random draw of epoch ``e`` comes from generators seeded by ``(config.seed, e, stream,
rank)``: the shuffle (one permutation of the whole training set per epoch, shared by all ranks), the
augmentation / batch-transform generator (per rank), and the global torch RNG inside the epoch (dropout),
which is forked so the caller's RNG state is left untouched. Resuming at an epoch boundary therefore
replays exactly the draws an uninterrupted run makes, and the final weights are bitwise equal on CPU.

Distributed. ``config.batch_size`` is the *global* batch. Each step takes the next ``batch_size`` indices of
the epoch's permutation and rank ``r`` trains on the ``r``-th contiguous chunk of them, so the gradient that
DDP averages is the gradient of the same global batch a single process would use (BatchNorm statistics and
per-rank augmentation draws are the only differences). A final partial batch is cut to a multiple of the
world size so the chunks stay equal.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kexue._checks import check_betas, check_choice, check_device
from kexue.train import distributed as D
from kexue.train.checkpoint import (
    CheckpointError,
    check_output_file,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["TrainConfig", "TrainHistory", "fit", "evaluate", "lr_factor", "derive_seed"]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("cosine", "constant")
_AMP = (None, "bf16")
# Fields that shape the trajectory: a checkpoint is only resumed when they match.
_TRAJECTORY_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                      "warmup_epochs", "seed", "drop_last", "nesterov", "grad_clip", "amp", "min_lr_ratio",
                      "betas")
_FORMAT = 2  # 2: the checkpoint also records run_info, the data digests and the model's tensor shapes


@dataclass
class TrainConfig:
    """Hyper-parameters and run settings for :func:`fit` (validated on creation and again by ``fit``).

    - ``epochs``, ``batch_size`` (the global batch under DDP), ``drop_last`` (drop a final partial batch).
    - ``optimizer``: ``"sgd"`` (``momentum``, ``nesterov``) or ``"adamw"`` (``betas``); ``lr``,
      ``weight_decay`` (applied to all parameters).
    - ``schedule``: ``"cosine"`` (per step, from ``lr`` down to ``lr * min_lr_ratio``) or ``"constant"``,
      both after ``warmup_epochs`` of linear warm-up (fractions allowed).
    - ``seed``: every random draw of the loop derives from it (see the module docstring).
    - ``device``: ``"cpu"``, ``"cuda"`` (under torchrun each rank takes ``cuda:LOCAL_RANK``) or ``"cuda:N"``.
    - ``checkpoint_dir``: when set, ``checkpoint.pt`` is written there atomically after every epoch;
      ``resume=True`` continues from it when it exists.
    - ``run_info``: the settings that shape the result but that :func:`fit` does not see, as a dict of plain
      values (str keys; None, bool, int, finite float, str, and lists/dicts of them), e.g. the dataset's name,
      subset sizes and seed, the augmentation, the model. It is stored in the checkpoint, and resuming refuses a
      checkpoint whose ``run_info`` differs, naming the keys (the training/evaluation tensors and the model's
      tensor shapes are compared as well, without being named here).
    - ``progress``: a tqdm bar (rank 0 only); ``log``: one metrics line per epoch on stdout (rank 0 only;
      default: the same as ``progress``).
    - ``eval_batch_size``; ``grad_clip`` (max global grad norm, or None); ``amp``: None or ``"bf16"``
      (autocast on the forward pass).

    Example:
        >>> cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05)
        >>> cfg.optimizer, cfg.schedule
        ('sgd', 'cosine')
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    drop_last: bool = False
    log: bool | None = None
    eval_batch_size: int = 1024
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    amp: str | None = None
    min_lr_ratio: float = 0.0
    run_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        for name in ("epochs", "batch_size", "eval_batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "min_lr_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or math.isinf(v):
                raise TypeError(f"{name} must be a finite number, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        check_choice("schedule", self.schedule, _SCHEDULES)
        if self.amp not in _AMP:
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov=True needs optimizer='sgd' and momentum > 0")
        self.betas = check_betas(self.betas)
        if self.grad_clip is not None and (isinstance(self.grad_clip, bool)
                                           or not isinstance(self.grad_clip, (int, float)) or not self.grad_clip > 0):
            raise ValueError(f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        check_device(self.device)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, Path)):
            raise TypeError(f"checkpoint_dir must be a path or None, got {type(self.checkpoint_dir).__name__}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if not isinstance(self.run_info, dict):
            raise TypeError(f"run_info must be a dict, got {type(self.run_info).__name__}")
        self.run_info = _plain_info(self.run_info, "run_info")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy (stored in checkpoints)."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["device"] = str(self.device)
        d["checkpoint_dir"] = None if self.checkpoint_dir is None else str(self.checkpoint_dir)
        return d


def _plain_info(value: Any, where: str) -> Any:
    """``value`` as plain data (tuples become lists), or a TypeError naming where it is not."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where} must be a finite number, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_info(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}")
            out[k] = _plain_info(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where} must hold only None, bool, int, float, str, lists and dicts, "
                    f"got {type(value).__name__}")


class Records:
    """Sequence access to a history's ``records`` (one dict each): ``len``, iteration, indexing, :meth:`column`
    and :attr:`last`; the base of :class:`TrainHistory` and ``kexue.train.gan.GANHistory``."""

    records: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]

    def column(self, key: str) -> list[Any]:
        """The values of ``key`` across records (``None`` where a record lacks it)."""
        return [r.get(key) for r in self.records]

    @property
    def last(self) -> dict[str, Any]:
        """The final record."""
        if not self.records:
            raise IndexError("history is empty")
        return self.records[-1]


@dataclass
class TrainHistory(Records):
    """What :func:`fit` returns: one dict per epoch in ``records`` (keys ``epoch`` — the 0-based epoch
    index, the same number ``batch_transform`` and ``metrics_fn`` receive — ``train_loss``, ``lr`` (at the
    epoch's first step), ``time`` (seconds), with ``eval_data`` also ``test_loss``, ``test_acc``,
    ``test_error``, plus whatever ``metrics_fn`` returned) and the trained ``model`` (unwrapped).

    Example:
        >>> h = TrainHistory([{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5}], None)
        >>> h.column("train_loss"), h.last["epoch"], len(h)
        ([1.0, 0.5], 1, 2)
    """

    records: list[dict[str, Any]]
    model: nn.Module | None
    loss_fn: Any = None
    resumed_from: int | None = field(default=None)



# ----------------------------------------------------------------------------------------------- helpers

_MASK64 = (1 << 64) - 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer ``keys`` with the SplitMix64 finaliser (stable across runs and
    platforms; unlike ``hash`` of a tuple it is not salted).

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


# streams of derive_seed(seed, epoch, stream, ...)
_SHUFFLE, _AUGMENT, _TORCH = 0, 1, 2


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """The multiplier on the base learning rate at optimizer step ``step`` (0-based): linear warm-up
    ``(step + 1) / warmup_steps``, then cosine from 1 to ``min_ratio`` over the remaining steps (or 1).

    Example:
        >>> [round(lr_factor(s, 4, 0, "cosine"), 3) for s in range(4)]
        [1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class _Data:
    """Random access to a ``(x, y)`` tensor pair or a map-style Dataset returning ``(x, y)``."""

    def __init__(self, data: Any, name: str, device: torch.device) -> None:
        self.device = device
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            x, y = data
            if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"{name} must be (x, y) with the same first dimension, got shapes "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
            if x.is_complex() or x.dtype == torch.bool:
                raise TypeError(f"{name} inputs must be float or integer images, got dtype {x.dtype}")
            if device.type != "cpu":  # keep the whole set on the accelerator: indexing there is cheap
                x, y = x.to(device), y.to(device)
            self.x, self.y, self.dataset = x, y, None
            self.n = x.shape[0]
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes)):
            self.x = self.y = None
            self.dataset = data
            self.n = len(data)
        else:
            raise TypeError(f"{name} must be an (x, y) tuple of tensors or a map-style Dataset of (x, y) "
                            f"pairs, got {type(data).__name__}")
        if self.n == 0:
            raise ValueError(f"{name} is empty")

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dataset is None:
            i = idx.to(self.x.device)
            x, y = self.x[i], self.y[i]
        else:
            items = [self.dataset[j] for j in idx.tolist()]
            x, y = torch.utils.data.default_collate(items)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if isinstance(y, torch.Tensor) else y
        if not x.is_floating_point():
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x, y


class _Joint(nn.Module):
    """Model and loss in one module, so DDP averages the gradients of both (e.g. margin-loss centres)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, targets: Any) -> torch.Tensor:
        return self.loss_fn(self.model(x), targets)


def _batches(n: int, batch_size: int, drop_last: bool, world: int) -> list[tuple[int, int]]:
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        size = stop - start
        if size < batch_size:
            if drop_last:
                break
            size -= size % world
            if size == 0:
                break
        out.append((start, start + size))
    return out


def _resolve_device(device: str, info: D.DistInfo) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank if info.world_size > 1 else torch.cuda.current_device())
    return dev


def _plain(value: Any, key: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metrics_fn value {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)  # numpy scalars
    except (TypeError, ValueError) as e:
        raise TypeError(f"metrics_fn value {key!r} must be a number or string, got {type(value).__name__}") from e


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 1024, device: str | torch.device = "cpu",
             logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, amp: str | None = None
             ) -> dict[str, float]:
    """Mean cross-entropy, accuracy and error of ``model`` on ``data`` (``(x, y)`` tensors or a Dataset;
    uint8 images are scaled to [0, 1]). ``logits_fn`` maps the model's outputs to class logits (e.g. an
    embedder's cosine logits). Under DDP each rank scores a shard and the sums are all-reduced.
    The model is left in eval mode.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(4, 3)
        >>> sorted(evaluate(net, (torch.randn(10, 4), torch.randint(0, 3, (10,)))))
        ['test_acc', 'test_error', 'test_loss']
    """
    dev = torch.device(device)
    ds = data if isinstance(data, _Data) else _Data(data, "eval_data", dev)
    model.eval()
    idx = torch.arange(ds.n)
    mine = D.shard(idx) if D.is_distributed() else idx
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    for start in range(0, len(mine), batch_size):
        x, y = ds.get(mine[start:start + batch_size])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(x)
        logits = (logits_fn(out) if logits_fn is not None else out).float()
        if logits.dim() != 2:
            raise ValueError(f"evaluation needs logits of shape [N, classes], got {tuple(logits.shape)}; "
                             "pass eval_logits= to map the model's outputs to logits")
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum().double()
    stats = D.all_reduce_sum(torch.stack([loss_sum, correct]))
    loss, acc = (stats / ds.n).tolist()
    return {"test_loss": loss, "test_acc": acc, "test_error": 1.0 - acc}


def _data_digest(data: Any) -> str | None:
    """sha256 over the dtypes, shapes and bytes of an ``(x, y)`` tensor pair; None for a Dataset."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        return None
    h = hashlib.sha256()
    for t in data:
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        flat = t.reshape(-1).contiguous().cpu()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _model_signature(model: nn.Module, loss_module: nn.Module | None) -> dict[str, list[Any]]:
    """``{state-dict key: [dtype, shape]}`` of the model (and of a loss with parameters, prefixed ``loss_fn.``)."""
    sig = {k: [str(v.dtype), list(v.shape)] for k, v in model.state_dict().items()}
    if loss_module is not None:
        sig.update({f"loss_fn.{k}": [str(v.dtype), list(v.shape)] for k, v in loss_module.state_dict().items()})
    return sig


def _signature_diff(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    missing = [k for k in saved if k not in now]
    extra = [k for k in now if k not in saved]
    changed = [k for k in saved if k in now and list(saved[k]) != list(now[k])]
    parts = []
    if changed:
        k = changed[0]
        parts.append(f"tensor {k!r} is {saved[k][0]} {saved[k][1]} in the checkpoint, {now[k][0]} {now[k][1]} now"
                     + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the checkpoint are not in the model now (e.g. {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} tensor(s) of the model now are not in the checkpoint (e.g. {extra[0]!r})")
    return ", ".join(parts) or None


_ABSENT = object()


def _show(v: Any) -> str:
    return "(not set)" if v is _ABSENT else repr(v)


def _check_compatible(state: dict[str, Any], config: TrainConfig, world: int, steps: int, path: Path,
                      digests: dict[str, str | None], signature: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming every way this run differs from the one that wrote ``state``."""
    fmt = state.get("format")
    if fmt != _FORMAT:
        if fmt == 1:
            raise CheckpointError(
                f"cannot resume from {path}: it was written by an earlier kexue (checkpoint format 1), which did not "
                "record the data, the model and the run settings, so this run cannot be checked against it; "
                "start afresh (without resume, or in another checkpoint folder)")
        raise CheckpointError(f"cannot resume from {path}: not a checkpoint written by kexue.train.fit "
                              f"(format {fmt!r}, expected {_FORMAT})")
    need = ("epoch", "model", "optimizer", "scheduler", "history", "config", "run_info", "data", "model_signature")
    lacking = [k for k in need if k not in state]
    if lacking:
        raise CheckpointError(f"cannot resume from {path}: the checkpoint lacks {', '.join(lacking)}")
    saved = state["config"]
    now_cfg = config.to_dict()
    diffs = []
    for k in _TRAJECTORY_FIELDS:
        old = saved.get(k, _ABSENT)
        if old != now_cfg[k]:
            diffs.append(f"{k}: checkpoint {_show(old)}, now {now_cfg[k]!r}")
    old_info, new_info = state["run_info"], config.run_info
    for k in list(old_info) + [k for k in new_info if k not in old_info]:
        old, new = old_info.get(k, _ABSENT), new_info.get(k, _ABSENT)
        if old != new:
            diffs.append(f"{k}: checkpoint {_show(old)}, now {_show(new)}")
    if state.get("world_size") != world:
        diffs.append(f"world_size: checkpoint {state.get('world_size')}, now {world}")
    if state.get("steps_per_epoch") != steps:
        diffs.append(f"steps_per_epoch (training-set size): checkpoint {state.get('steps_per_epoch')}, now {steps}")
    for key, label in (("train", "training data"), ("eval", "evaluation data")):
        old, new = state["data"].get(key, _ABSENT), digests[key]
        if old != new:
            how = ("given now but not then" if old is None else "given then but not now" if new is None
                   else "different tensors")
            diffs.append(f"{label}: {how}")
    model_diff = _signature_diff(state["model_signature"], signature)
    if model_diff:
        diffs.append(f"model: {model_diff}")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: the run differs from the checkpoint in "
                              + "; ".join(diffs))


def _print(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def _format(rec: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {rec['epoch'] + 1}/{epochs}"]
    for k, v in rec.items():
        if k == "epoch":
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------- fit

def fit(model: nn.Module, train: Any, config: TrainConfig | None = None, *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        batch_transform: Callable[[torch.Tensor, Any, torch.Generator, int], tuple[torch.Tensor, Any]] | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        eval_data: Any = None,
        metrics_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None,
        eval_logits: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainHistory:
    """Train ``model`` on ``train`` with ``config``; return the per-epoch :class:`TrainHistory`.

    - ``train``: ``(x, y)`` tensors (``x`` float, or uint8 images converted to float in [0, 1] per batch)
      or a map-style Dataset of ``(x, y)``.
    - ``loss_fn(outputs, targets) -> scalar``: default cross-entropy. If it is an ``nn.Module`` its
      parameters (e.g. margin-loss class centres) are optimised with the model, synchronised under DDP,
      and checkpointed.
    - ``augment(x, *, generator) -> x``: per-batch input augmentation, e.g.
      :class:`~kexue.train.transforms.FlipCrop`.
    - ``batch_transform(x, y, *, generator, epoch) -> (x, targets)``: e.g. mixup returning
      ``(x_mixed, (y_a, y_b, lam))`` for a ``loss_fn`` that consumes that. Runs after ``augment``.
      Both receive the same CPU ``torch.Generator``, seeded from ``(config.seed, epoch, rank)``: draw on the
      CPU with it (``torch.rand(n, generator=g)``) and move the result to ``x.device``.
    - ``eval_data``: ``(x, y)`` scored after each epoch (``test_loss``, ``test_acc``, ``test_error``);
      ``eval_logits(outputs) -> logits`` adapts an embedder's outputs for that.
    - ``metrics_fn(model, epoch) -> dict``: extra per-epoch numbers, computed with the model in eval mode
      (called on every rank, rank 0's kept; the next epoch sets train mode again).

    With ``config.checkpoint_dir`` an atomic checkpoint (model, loss parameters, optimizer, scheduler, epoch,
    history, config with its ``run_info``, sha256 digests of the ``train`` and ``eval_data`` tensors, the
    model's tensor shapes) is written after every epoch by rank 0; before the first epoch ``fit`` checks that
    it can be written there (``ValueError`` naming the path otherwise). ``config.resume=True`` continues from
    it and reaches the same final weights as an uninterrupted run; a checkpoint that is corrupt, or that was
    written by a run differing in any hyper-parameter of the trajectory, ``run_info``, the data, the world size
    or the model's shapes, is refused with a :class:`~kexue.train.checkpoint.CheckpointError` (a
    ``ValueError``) naming the file and every difference. Under ``torchrun`` the model is wrapped in DDP
    (gloo on CPU, NCCL on CUDA) and ``config.batch_size`` is the global batch. The model is returned in
    eval mode.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 5, generator=g); y = (x[:, 0] > 0).long()
        >>> net = torch.nn.Linear(5, 2)
        >>> h = fit(net, (x, y), TrainConfig(epochs=3, batch_size=16, lr=0.5, progress=False), eval_data=(x, y))
        >>> h.last["test_acc"] > 0.8
        True
    """
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss()
    for name, fn in (("loss_fn", loss_fn), ("batch_transform", batch_transform), ("augment", augment),
                     ("metrics_fn", metrics_fn), ("eval_logits", eval_logits)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")

    info = D.init_from_env(str(config.device))
    rank, world = info.rank, info.world_size
    main = rank == 0
    device = _resolve_device(str(config.device), info)
    if config.batch_size % world:
        raise ValueError(f"batch_size (the global batch) must be divisible by the world size {world}, "
                         f"got {config.batch_size}")
    data = _Data(train, "train", device)
    evald = _Data(eval_data, "eval_data", device) if eval_data is not None else None
    batches = _batches(data.n, config.batch_size, config.drop_last, world)
    if not batches:
        raise ValueError(f"train has {data.n} examples: fewer than one batch of {config.batch_size} "
                         "with drop_last=True (or fewer than the world size)")
    steps = len(batches)
    total_steps = steps * config.epochs
    warmup_steps = round(config.warmup_epochs * steps)

    model.to(device)
    loss_module = loss_fn if isinstance(loss_fn, nn.Module) else None
    if loss_module is not None:
        loss_module.to(device)
    params, seen = [], set()
    for p in list(model.parameters()) + (list(loss_module.parameters()) if loss_module is not None else []):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError("model (and loss_fn) have no trainable parameters")
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            nesterov=config.nesterov)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, config.schedule, config.min_lr_ratio))

    history: list[dict[str, Any]] = []
    start_epoch = 0
    resumed_from = None
    ckpt = checkpoint_path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    digests: dict[str, str | None] = {}
    signature: dict[str, Any] = {}
    if ckpt is not None:
        if main:  # before any training: a checkpoint that cannot be written fails now, not after an epoch
            check_output_file(ckpt, what="checkpoint")
        digests = {"train": _data_digest(train), "eval": _data_digest(eval_data)}
        signature = _model_signature(model, loss_module)
    if config.resume and ckpt is not None and ckpt.is_file():
        state = load_checkpoint(ckpt, map_location=device)
        _check_compatible(state, config, world, steps, ckpt, digests, signature)
        model.load_state_dict(state["model"])
        if loss_module is not None and state.get("loss_fn") is not None:
            loss_module.load_state_dict(state["loss_fn"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start_epoch = resumed_from = int(state["epoch"])
        if main and (config.progress if config.log is None else config.log):
            _print(f"resumed from {ckpt} after epoch {start_epoch}/{config.epochs}")

    elif ckpt is not None and ckpt.is_file() and main and (config.progress if config.log is None else config.log):
        _print(f"note: {ckpt} exists and resume=False: starting from scratch and overwriting it")

    joint = _Joint(model, loss_fn)
    runner: nn.Module = joint
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            joint, device_ids=[device.index] if device.type == "cuda" else None)

    cuda_devices = [device.index] if device.type == "cuda" else []
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=cuda_devices):
            epoch_seed = derive_seed(config.seed, epoch, _TORCH, rank)
            torch.default_generator.manual_seed(epoch_seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(epoch_seed)
            lr0 = optimizer.param_groups[0]["lr"]
            train_loss = _train_epoch(runner, joint, optimizer, scheduler, data, batches, config, epoch, rank,
                                      world, device, params, augment, batch_transform, main)
            record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": lr0}
            if evald is not None:
                record.update(evaluate(model, evald, batch_size=config.eval_batch_size, device=device,
                                       logits_fn=eval_logits, amp=config.amp))
            if metrics_fn is not None:
                model.eval()
                extra = metrics_fn(model, epoch)
                if not isinstance(extra, dict):
                    raise TypeError(f"metrics_fn must return a dict, got {type(extra).__name__}")
                for k, v in extra.items():
                    if k in ("epoch",):
                        raise ValueError(f"metrics_fn may not return the reserved key {k!r}")
                    record[str(k)] = _plain(v, k)
        record["time"] = time.perf_counter() - t0
        history.append(record)
        if ckpt is not None and main:
            save_checkpoint(ckpt, {
                "format": _FORMAT, "epoch": epoch + 1, "model": model.state_dict(),
                "loss_fn": loss_module.state_dict() if loss_module is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "history": history, "config": config.to_dict(), "world_size": world, "steps_per_epoch": steps,
                "run_info": config.run_info, "data": digests, "model_signature": signature,
                "rng": {"seed": config.seed, "scheme": "derive_seed(seed, epoch, stream, rank)"},
            })
        D.barrier()
        if main and (config.progress if config.log is None else config.log):
            _print(_format(record, config.epochs))
    model.train(False)
    return TrainHistory(history, model, loss_fn, resumed_from)


def _train_epoch(runner: nn.Module, joint: _Joint, optimizer: torch.optim.Optimizer, scheduler: Any, data: _Data,
                 batches: Sequence[tuple[int, int]], config: TrainConfig, epoch: int, rank: int, world: int,
                 device: torch.device, params: list[nn.Parameter], augment: Any, batch_transform: Any,
                 main: bool) -> float:
    from tqdm.auto import tqdm

    perm = torch.randperm(data.n, generator=_generator(config.seed, epoch, _SHUFFLE))
    gen = _generator(config.seed, epoch, _AUGMENT, rank)
    joint.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not (config.progress and main))
    try:
        for step, (start, stop) in enumerate(batches):
            idx = perm[start:stop]
            if world > 1:
                idx = D.shard(idx, rank, world)
            x, y = data.get(idx)
            if augment is not None:
                x = augment(x, generator=gen)
            targets: Any = y
            if batch_transform is not None:
                out = batch_transform(x, y, generator=gen, epoch=epoch)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError("batch_transform must return a pair (x, targets)")
                x, targets = out
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"):
                loss = runner(x, targets)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            n = idx.numel()
            loss_sum += loss.detach().double() * n
            count += n
            if bar.disable is False and (step % 10 == 0 or step == len(batches) - 1):
                v = loss.item()
                if not math.isfinite(v):
                    raise FloatingPointError(f"training loss became {v} at epoch {epoch}, step {step}")
                bar.set_postfix(loss=f"{v:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
            bar.update(1)
    finally:
        bar.close()
    stats = D.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64,
                                                                    device=device)]))
    train_loss = (stats[0] / stats[1]).item()
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch}")
    return train_loss
