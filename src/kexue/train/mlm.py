"""Masked-language-model data, masking, training and evaluation.

* :class:`TokenStream` holds tokenised documents and cuts contiguous windows of any length from them
  (random windows for training, non-overlapping windows for evaluation; never across documents).
* :func:`split_documents` splits every document by region (the first part trains, the tail is held out),
  so training and held-out windows never overlap.
* :func:`mask_tokens`: BERT masking, 15% of the positions, of which 80% become ``[MASK]``, 10% a random
  token and 10% stay; every draw comes from ``generator``.
* :func:`train_mlm`: AdamW, linear warmup then cosine decay, progress bar, optional checkpoints written
  atomically with exact resume.
* :func:`make_eval_set` / :func:`mlm_accuracy` / :func:`evaluate_mlm`: accuracy over masked positions at a
  given length with fixed, seeded masks, so that two models are scored on the very same masks (the
  Attention-O vs Attention-E comparison of kexue.fm/archives/8823).

Example:
    >>> import torch
    >>> from kexue.data.tokenizers import CharTokenizer
    >>> from kexue.nn.transformer import Transformer
    >>> tok = CharTokenizer.from_corpus("the quick brown fox jumps over the lazy dog " * 20)
    >>> train, held = split_documents([tok.encode_tensor("the quick brown fox jumps over the lazy dog " * 20)])
    >>> model = Transformer(tok.vocab_size, dim=32, depth=1, heads=2)
    >>> hist = train_mlm(model, TokenStream(train), tok, steps=3, batch_size=4, seq_len=16, progress=False,
    ...                  generator=torch.Generator().manual_seed(0))
    >>> 0.0 <= evaluate_mlm(model, TokenStream(held), tok, length=16)["accuracy"] <= 1.0
    True
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kexue._checks import check_positive, check_tensor
from kexue.train.checkpoint import check_output_file, load_checkpoint, save_checkpoint

IGNORE_INDEX = -100


class MaskingVocab(Protocol):
    """What masking needs from a tokenizer: ``vocab_size``, ``mask_id``, ``special_ids``."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]


# ------------------------------------------------------------------------------------------------------
# Data: documents, splits and windows
# ------------------------------------------------------------------------------------------------------
def split_documents(docs: Sequence[torch.Tensor], held_out_fraction: float = 0.1
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split each 1-D token document by region: the first ``1 - held_out_fraction`` trains, the tail is
    held out. The two parts share no token position.

    Example:
        >>> tr, ho = split_documents([torch.arange(10)], 0.2)
        >>> tr[0].tolist(), ho[0].tolist()
        ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    if len(docs) == 0:
        raise ValueError("docs must contain at least one document")
    train, held = [], []
    for i, d in enumerate(docs):
        check_tensor(f"docs[{i}]", d, floating=False, dim=1)
        cut = int(round(d.numel() * (1.0 - held_out_fraction)))
        train.append(d[:cut])
        held.append(d[cut:])
    return train, held


class TokenStream:
    """Tokenised documents from which contiguous windows are cut (never across a document boundary).

    Example:
        >>> s = TokenStream([torch.arange(100), torch.arange(100, 150)])
        >>> s.windows(40).shape, s.sample(3, 8, generator=torch.Generator().manual_seed(0)).shape
        (torch.Size([3, 40]), torch.Size([3, 8]))
    """

    def __init__(self, docs: Sequence[torch.Tensor]) -> None:
        if len(docs) == 0:
            raise ValueError("docs must contain at least one document")
        self.docs = [check_tensor(f"docs[{i}]", d, floating=False, dim=1).long() for i, d in enumerate(docs)]

    @property
    def num_tokens(self) -> int:
        return sum(d.numel() for d in self.docs)

    def sample(self, batch_size: int, length: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``batch_size`` random windows ``[B, length]``; a document is picked with probability proportional
        to its number of start positions, then a start uniformly."""
        _check_int("batch_size", batch_size)
        _check_int("length", length)
        starts = torch.tensor([max(d.numel() - length + 1, 0) for d in self.docs], dtype=torch.float64)
        if starts.sum() == 0:
            raise ValueError(f"length={length} is longer than every document")
        doc_idx = torch.multinomial(starts, batch_size, replacement=True, generator=generator)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        out = torch.empty(batch_size, length, dtype=torch.long)
        for b in range(batch_size):
            i = int(doc_idx[b])
            s = int(u[b] * starts[i])
            out[b] = self.docs[i][s:s + length]
        return out

    def windows(self, length: int, max_windows: int | None = None) -> torch.Tensor:
        """Non-overlapping windows ``[N, length]`` in document order; with ``max_windows`` an evenly spaced
        subset of them (deterministic)."""
        _check_int("length", length)
        parts = [d[: (d.numel() // length) * length].view(-1, length) for d in self.docs]
        w = torch.cat(parts) if parts else torch.zeros(0, length, dtype=torch.long)
        if w.shape[0] == 0:
            raise ValueError(f"no document holds a window of length {length}")
        if max_windows is not None:
            _check_int("max_windows", max_windows)
            if max_windows < w.shape[0]:
                idx = torch.linspace(0, w.shape[0] - 1, max_windows).round().long()
                w = w[idx]
        return w


def _check_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------------------
# BERT masking
# ------------------------------------------------------------------------------------------------------
def mask_tokens(input_ids: torch.Tensor, vocab: MaskingVocab, *, mask_prob: float = 0.15,
                mask_token_prob: float = 0.8, random_token_prob: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each non-special position is selected with ``mask_prob``; a selected position becomes
    ``[MASK]`` with ``mask_token_prob``, a random non-special token with ``random_token_prob`` and stays
    otherwise. Returns ``(inputs, labels)`` with ``labels = -100`` where not selected, on ``input_ids``' device
    (the draws are made on ``generator``'s device, the CPU by default, so masks do not depend on where the batch
    lives). ``input_ids`` must lie
    in ``[0, vocab.vocab_size)``; the three probabilities must be real numbers in ``[0, 1]``.

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> tok = CharTokenizer(list("abcdef"))
        >>> x = torch.randint(5, 11, (4, 32))
        >>> inp, lab = mask_tokens(x, tok, generator=torch.Generator().manual_seed(0))
        >>> bool(((lab == -100) | (lab == x)).all())
        True
    """
    check_tensor("input_ids", input_ids, floating=False)
    for name, p in (("mask_prob", mask_prob), ("mask_token_prob", mask_token_prob),
                    ("random_token_prob", random_token_prob)):
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"{name} must be a number in [0, 1], got {type(p).__name__}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab.vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab.vocab_size}) (the vocabulary), got range "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if mask_token_prob + random_token_prob > 1.0 + 1e-12:
        raise ValueError("mask_token_prob + random_token_prob must be <= 1, got "
                         f"{mask_token_prob} + {random_token_prob}")
    # the draws are made on the generator's device (the CPU without one), so a batch gets the same masks
    # wherever it lives; the results go back to input_ids' device
    dev = torch.device("cpu") if generator is None else generator.device
    special = torch.tensor(sorted(set(vocab.special_ids)), dtype=torch.long, device=dev)
    candidates = torch.tensor([i for i in range(vocab.vocab_size) if i not in set(vocab.special_ids)],
                              dtype=torch.long, device=dev)
    if candidates.numel() == 0:
        raise ValueError("vocab must contain at least one non-special token")
    x = input_ids.long().to(dev)
    eligible = ~torch.isin(x, special)
    u = torch.rand(x.shape, generator=generator, device=dev)
    selected = (u < mask_prob) & eligible
    v = torch.rand(x.shape, generator=generator, device=dev)
    rnd = candidates[torch.randint(candidates.numel(), x.shape, generator=generator, device=dev)]
    to_mask = selected & (v < mask_token_prob)
    to_rand = selected & (v >= mask_token_prob) & (v < mask_token_prob + random_token_prob)
    inputs = torch.where(to_mask, torch.full_like(x, vocab.mask_id), x)
    inputs = torch.where(to_rand, rnd, inputs)
    labels = torch.where(selected, x, torch.full_like(x, IGNORE_INDEX))
    return inputs.to(input_ids.device), labels.to(input_ids.device)


# ------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------
def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``.

    Example:
        >>> warmup_cosine(0, 100, 10), warmup_cosine(10, 100, 10), round(warmup_cosine(100, 100, 10), 6)
        (0.1, 1.0, 0.0)
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _get_rng_states() -> dict[str, Any]:
    """The global torch RNG states (dropout draws from them) for a checkpoint: the CPU one, and one per CUDA
    device when CUDA is initialised."""
    states: dict[str, Any] = {"torch_rng_state": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_rng_states"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(state: dict[str, Any]) -> None:
    """Restore what :func:`_get_rng_states` saved; a checkpoint without the fields (written before they were
    saved) leaves the RNGs as they are."""
    if "torch_rng_state" in state:
        torch.set_rng_state(state["torch_rng_state"].cpu())
    cuda_states = state.get("cuda_rng_states")
    if cuda_states and torch.cuda.is_available():
        for i, s in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def mlm_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled (masked) positions (a :class:`~kexue.nn.Transformer` computes
    the logits only there). With no labelled position (all labels ``-100``) it is an exact ``0.0`` that is
    still part of the graph (``backward()`` works and gives zero gradients), not the NaN of a mean over
    nothing."""
    from kexue.nn.transformer import Transformer

    sel = labels != IGNORE_INDEX
    if isinstance(model, Transformer):
        logits = model(inputs, logits_positions=sel).logits
        targets = labels[sel]
    else:
        logits = model(inputs).logits
        logits, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not bool(sel.any()):
        return logits.float().reshape(-1)[:0].sum()       # a sum over no element: 0, connected to the graph
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


def train_mlm(model: nn.Module, stream: TokenStream, vocab: MaskingVocab, *, steps: int, batch_size: int,
              seq_len: int, lr: float = 1e-3, weight_decay: float = 0.01, warmup: int | None = None,
              min_lr_ratio: float = 0.0, betas: tuple[float, float] = (0.9, 0.98), grad_clip: float = 1.0,
              mask_prob: float = 0.15, generator: torch.Generator | None = None,
              checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100,
              stop_after: int | None = None, progress: bool | Callable[..., Any] = True,
              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train ``model`` as an MLM on random windows of ``seq_len`` tokens from ``stream``.

    AdamW (weight decay on weight matrices only, not on biases, norms or embeddings), linear warmup (default 5% of the
    steps) then cosine decay to ``min_lr_ratio``. All data order and masking come from ``generator``, so
    two models trained with equal generators see exactly the same batches. With ``checkpoint_dir``, the
    model, optimizer, schedule, generator, the global torch RNG states (CPU, and CUDA when CUDA is
    initialised; dropout draws from them) and history are saved atomically to ``last.pt`` every
    ``checkpoint_every`` steps and at the end; a later call with the same directory resumes from it (restoring
    the global RNG states, where the checkpoint has them) and reaches the same weights as an uninterrupted
    run. ``last.pt`` is loaded by :func:`kexue.train.checkpoint.load_checkpoint`: its CRC-32s are checked and
    it is unpickled with ``weights_only=True``, so a corrupt or crafted file is refused with a
    ``CheckpointError`` naming it; whether ``last.pt`` can be written is checked before the first step.
    ``stop_after`` ends the call early after that many total steps (used to test resuming). ``progress`` is a
    bool or a tqdm-like factory (e.g. ``ctx.pbar``).

    A batch in which masking selected no position has no loss: its step makes no optimizer update (no
    weight decay or momentum move), while the schedule still advances and the batch is still drawn, so the
    step count and data stream stay those of every other run.

    Returns ``{"loss": [...], "skipped": [...], "steps": steps done}``: ``loss`` holds the loss of every step
    that updated the model, in order (a step with nothing masked records no loss, so averages over ``loss``
    are averages of real losses); ``skipped`` lists the indices of the steps that had nothing masked, so
    ``len(loss) + len(skipped) == steps``.

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> from kexue.nn.transformer import Transformer
        >>> tok = CharTokenizer.from_corpus("abcdefgh" * 10)
        >>> m = Transformer(tok.vocab_size, dim=16, depth=1, heads=2)
        >>> h = train_mlm(m, TokenStream([tok.encode_tensor("abcdefgh" * 10)]), tok, steps=2, batch_size=2,
        ...               seq_len=8, progress=False)
        >>> len(h["loss"])
        2
    """
    _check_int("steps", steps)
    _check_int("batch_size", batch_size)
    _check_int("seq_len", seq_len)
    check_positive("lr", lr)
    warmup = max(1, int(0.05 * steps)) if warmup is None else _check_int("warmup", warmup, 0)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup, min_lr_ratio))
    history: dict[str, Any] = {"loss": [], "skipped": [], "steps": 0}
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    if ckpt is not None:
        check_output_file(ckpt, what="checkpoint")    # a folder there, or an unwritable one, fails now
    if ckpt is not None and ckpt.exists():
        # CRC-checked, weights_only=True (no code runs), errors name the file: see kexue.train.checkpoint
        state = load_checkpoint(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history = state["history"]
        history.setdefault("skipped", [])           # (a checkpoint written before skipped steps were listed)
        _set_rng_states(state)
    start = history["steps"]
    end = steps if stop_after is None else min(steps, stop_after)

    def save() -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "generator": generator.get_state(),
                                   "history": history, **_get_rng_states()})

    bar_factory = progress if callable(progress) else None
    if bar_factory is None:
        from tqdm.auto import tqdm

        def bar_factory(**kw: Any) -> Any:
            return tqdm(disable=not progress, leave=False, **kw)

    bar = bar_factory(total=end - start, desc="mlm")
    model.train()
    for step in range(start, end):
        batch = stream.sample(batch_size, seq_len, generator=generator)
        inputs, labels = mask_tokens(batch, vocab, mask_prob=mask_prob, generator=generator)
        if bool((labels != IGNORE_INDEX).any()):
            loss = mlm_loss(model, inputs.to(device), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            sched.step()
            history["loss"].append(loss.item())
        else:                       # nothing masked: no loss, no update; the schedule still moves on
            with warnings.catch_warnings():     # (torch warns when the schedule steps before the optimizer)
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler", category=UserWarning)
                sched.step()
            history["skipped"].append(step)
        history["steps"] = step + 1
        bar.update(1)
        if hasattr(bar, "set_postfix") and step % 20 == 0 and history["loss"]:
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
        if ckpt is not None and (step + 1) % checkpoint_every == 0:
            save()
    if hasattr(bar, "close"):
        bar.close()
    save()
    model.eval()
    return history


# ------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------
def make_eval_set(windows: torch.Tensor, vocab: MaskingVocab, mask_prob: float = 0.15, seed: int = 0,
                  **mask_kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, seeded masks for ``windows`` ``[N, L]``: the same ``seed`` gives the same ``(inputs,
    labels)``, so several models can be evaluated on identical masks.

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> tok = CharTokenizer(list("ab"))
        >>> w = torch.randint(5, 7, (2, 50))
        >>> torch.equal(make_eval_set(w, tok)[0], make_eval_set(w, tok)[0])
        True
    """
    check_tensor("windows", windows, floating=False, dim=2)
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(windows, vocab, mask_prob=mask_prob, generator=g, **mask_kw)


@torch.no_grad()
def mlm_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16,
                 device: str | torch.device = "cpu") -> tuple[float, int]:
    """Fraction of labelled positions (``labels != -100``) where ``argmax(logits) == label``.
    Returns ``(accuracy, number of labelled positions)``.

    Example:
        >>> class Oracle(nn.Module):
        ...     def forward(self, x):
        ...         from types import SimpleNamespace
        ...         return SimpleNamespace(logits=F.one_hot(x, 10).float())
        >>> x = torch.tensor([[1, 2, 3]]); lab = torch.tensor([[1, -100, 4]])
        >>> mlm_accuracy(Oracle(), x, lab)
        (0.5, 2)
    """
    check_tensor("inputs", inputs, floating=False, dim=2)
    check_tensor("labels", labels, floating=False, dim=2)
    if inputs.shape != labels.shape:
        raise ValueError(f"inputs and labels must have the same shape, got {tuple(inputs.shape)} "
                         f"and {tuple(labels.shape)}")
    from kexue.nn.transformer import Transformer

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    correct = total = 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        sel = y != IGNORE_INDEX
        if not sel.any():
            continue
        if isinstance(model, Transformer):
            pred = model(x, logits_positions=sel).logits.argmax(-1)
        else:
            pred = model(x).logits.argmax(-1)[sel]
        correct += int((pred == y[sel]).sum())
        total += int(sel.sum())
    if was_training:
        model.train()
    if total == 0:
        raise ValueError("labels contain no masked position (all -100)")
    return correct / total, total


def evaluate_mlm(model: nn.Module, stream: TokenStream, vocab: MaskingVocab, length: int,
                 max_windows: int | None = None, seed: int = 0, batch_size: int = 16,
                 device: str | torch.device = "cpu") -> dict[str, float | int]:
    """MLM accuracy at sequence ``length`` on non-overlapping windows of ``stream`` with fixed masks
    (seed ``seed``). Returns ``{"accuracy", "masked", "windows"}``.

    Example:
        >>> from kexue.data.tokenizers import CharTokenizer
        >>> from kexue.nn.transformer import Transformer
        >>> tok = CharTokenizer(list("abcd"))
        >>> m = Transformer(tok.vocab_size, dim=16, depth=1, heads=2)
        >>> r = evaluate_mlm(m, TokenStream([torch.randint(5, 9, (300,))]), tok, length=64)
        >>> r["windows"]
        4
    """
    w = stream.windows(length, max_windows)
    inputs, labels = make_eval_set(w, vocab, seed=seed)
    acc, n = mlm_accuracy(model, inputs, labels, batch_size=batch_size, device=device)
    return {"accuracy": acc, "masked": n, "windows": int(w.shape[0])}


__all__ = ["IGNORE_INDEX", "TokenStream", "evaluate_mlm", "make_eval_set", "mask_tokens", "mlm_accuracy",
           "mlm_loss", "split_documents", "train_mlm", "warmup_cosine"]
