"""Training a seq2seq model (:class:`~kexue.nn.seq2seq.UniLMSeq2Seq`, or the GRU baseline) on (source, target)
pairs: AdamW, linear warm-up, gradient clipping, atomic checkpoints with bit-exact resume, a progress bar with the
loss and tokens/s, and ROUGE on a dev split with sample outputs at chosen steps.

* :func:`read_pairs` reads a ``source<TAB>target`` file (errors name the line);
* :func:`split_pairs` makes a fixed train/dev/test split from a seed;
* :func:`train_seq2seq` trains; :func:`evaluate_seq2seq` decodes and scores.

A model only needs ``batch(sources, targets) -> dict of tensors``, ``loss(batch) -> scalar`` and
``generate(sources, ...) -> list[str]``.

Example:
    >>> import torch
    >>> from kexue.data.tokenizers import CharTokenizer
    >>> from kexue.nn.seq2seq import BertConfig, BertEncoder, UniLMSeq2Seq
    >>> pairs = [("abcd", "ab"), ("cdef", "cd"), ("efgh", "ef"), ("ghab", "gh")]
    >>> tok = CharTokenizer.from_corpus([s + t for s, t in pairs])
    >>> enc = BertEncoder(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
    ...                              num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    >>> model = UniLMSeq2Seq(enc, tok)
    >>> hist = train_seq2seq(model, pairs, steps=3, batch_size=2, lr=1e-3, eval_pairs=pairs[:2], eval_at=(3,),
    ...                      generate_kw={"max_new_tokens": 4}, progress=False,
    ...                      generator=torch.Generator().manual_seed(0))
    >>> len(hist["loss"]), hist["evals"][0]["step"]
    (3, 3)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kexue._checks import check_choice, check_positive
from kexue.train.checkpoint import CheckpointError, check_output_file, load_checkpoint, save_checkpoint
from kexue.train.mlm import _get_rng_states, _set_rng_states

SCHEDULES = ("constant", "linear")
CHECKPOINT = "last.pt"


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------
def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read ``source<TAB>target`` lines (UTF-8; blank lines skipped). A line without exactly one tab, or with an
    empty source or target, raises ``ValueError`` naming the file and the line number.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "pairs.tsv")
        >>> _ = open(p, "w").write("an abstract\\ta title\\n\\nanother\\tone\\n")
        >>> read_pairs(p)
        [('an abstract', 'a title'), ('another', 'one')]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist" if not path.exists() else
                                f"pairs file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise ValueError(f"{path} line {n}: expected source<TAB>target (2 tab-separated fields), got "
                             f"{len(cols)} field{'s' if len(cols) != 1 else ''}")
        src, tgt = cols[0].strip(), cols[1].strip()
        if not src:
            raise ValueError(f"{path} line {n}: the source is empty")
        if not tgt:
            raise ValueError(f"{path} line {n}: the target is empty")
        pairs.append((src, tgt))
    if not pairs:
        raise ValueError(f"{path} holds no source<TAB>target line")
    return pairs


def split_pairs(pairs: Sequence[tuple[str, str]], *, dev: int | float = 0.05, test: int | float = 0.0,
                seed: int = 0) -> tuple[list, list, list]:
    """Shuffle ``pairs`` with ``seed`` (a fixed permutation) and cut ``(train, dev, test)``; ``dev``/``test`` are
    counts or fractions of the whole.

    Example:
        >>> tr, dv, te = split_pairs([(str(i), str(i)) for i in range(10)], dev=2, test=0.3)
        >>> len(tr), len(dv), len(te)
        (5, 2, 3)
    """
    pairs = list(pairs)
    n = len(pairs)

    def count(name: str, v: int | float) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{name} must be a count >= 0 or a fraction in [0, 1), got {v!r}")
        if isinstance(v, float):
            if v >= 1:
                raise ValueError(f"{name} as a fraction must be < 1, got {v}")
            return int(round(v * n))
        return v

    nd, nt = count("dev", dev), count("test", test)
    if nd + nt >= n:
        raise ValueError(f"dev ({nd}) + test ({nt}) leave no training pair out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sh = [pairs[i] for i in perm]
    return sh[nd + nt:], sh[:nd], sh[nd:nd + nt]


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a batch: ``attention_mask`` (UniLM) or source + target tokens (GRU)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "src_mask" in batch:
        return int(batch["src_mask"].sum()) + int((batch["tgt_out"] >= 0).sum())
    return 0


# ------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------
def evaluate_seq2seq(model: nn.Module, pairs: Sequence[tuple[str, str]], *, lang: str = "en",
                     batch_size: int = 32, num_samples: int = 5, **generate_kw: Any) -> dict[str, Any]:
    """Decode the sources of ``pairs`` with ``model.generate(..., **generate_kw)`` and score them against the
    targets: ROUGE-1/2/L F1 (0..1) and BLEU (0..100) (:func:`kexue.metrics.text.text_metrics`), plus the first
    ``num_samples`` (source, reference, generated) triples and the decoding time.

    Example:
        >>> class Echo(nn.Module):
        ...     def generate(self, sources, **kw):
        ...         return list(sources)
        >>> r = evaluate_seq2seq(Echo(), [("a b", "a b"), ("c", "d")], num_samples=1)
        >>> r["rouge1"], len(r["samples"])
        (0.5, 1)
    """
    from kexue.metrics.text import text_metrics

    if not pairs:
        raise ValueError("pairs must not be empty")
    t0 = time.perf_counter()
    hyps = model.generate([s for s, _ in pairs], batch_size=batch_size, **generate_kw)
    dt = time.perf_counter() - t0
    refs = [t for _, t in pairs]
    out: dict[str, Any] = text_metrics(hyps, refs, lang=lang)
    out["decode_s"] = dt
    out["samples"] = [{"source": s, "reference": r, "generated": h}
                      for (s, r), h in zip(pairs[:num_samples], hyps[:num_samples])]
    return out


# ------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------
def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then ``"constant"`` (Su's recipe: a fixed Adam learning rate) or
    ``"linear"`` decay to 0 at ``total``.

    Example:
        >>> [lr_multiplier(s, warmup=2, total=6, schedule="linear") for s in range(6)]
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


class _Sampler:
    """Batches of pair indices: a fresh permutation from ``generator`` each epoch; its state is two numbers and a
    tensor (kept in the checkpoint)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self, b: int) -> list[int]:
        out: list[int] = []
        while len(out) < b:
            if self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
            take = self.perm[self.pos:self.pos + b - len(out)].tolist()
            out += take
            self.pos += len(take)
        return out

    def state(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load(self, st: dict[str, Any]) -> None:
        self.perm, self.pos = st["perm"].clone(), int(st["pos"])


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def train_seq2seq(model: nn.Module, pairs: Sequence[tuple[str, str]], *, steps: int, batch_size: int = 16,
                  lr: float = 5e-5, weight_decay: float = 0.01, warmup: int | None = None,
                  schedule: str = "constant", betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0,
                  generator: torch.Generator | None = None, checkpoint_dir: str | os.PathLike | None = None,
                  checkpoint_every: int = 100, eval_pairs: Sequence[tuple[str, str]] | None = None,
                  eval_every: int = 0, eval_at: Sequence[int] = (), lang: str = "en", num_samples: int = 5,
                  eval_batch_size: int = 32, generate_kw: dict[str, Any] | None = None,
                  stop_after: int | None = None, progress: bool | Callable[..., Any] = True,
                  device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
                  on_eval: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``pairs`` for ``steps`` optimizer steps of ``batch_size`` pairs.

    * AdamW (no weight decay on biases, LayerNorms and embeddings), linear warm-up over ``warmup`` steps (default
      5 % of ``steps``, at least 1), then ``schedule``: ``"constant"`` (default; the article's fixed learning rate)
      or ``"linear"`` decay; gradient norm clipped at ``grad_clip`` (0: off).
    * Batches: each epoch a permutation of the pairs drawn from ``generator``; the global torch RNG (dropout)
      is saved with the checkpoint.
    * ``checkpoint_dir``: the model, optimizer, schedule, sampler, generator, RNG states and history are saved
      atomically to ``checkpoint_dir/last.pt`` every ``checkpoint_every`` steps, after each evaluation and at the
      end; a later call with the same directory resumes from it and ends with the same weights, bit for bit, as
      an uninterrupted run. A checkpoint of another run (other settings, data size or model shapes) is refused with
      a :class:`~kexue.train.checkpoint.CheckpointError` naming what differs.
    * Evaluation on ``eval_pairs`` after the steps in ``eval_at`` and every ``eval_every`` steps
      (:func:`evaluate_seq2seq` with ``generate_kw``): ROUGE, BLEU and ``num_samples`` samples, appended to
      ``history["evals"]``, passed to ``on_eval`` and summarised through ``log``.
    * ``stop_after`` ends the call after that many total steps (to test resuming). ``progress``: a bool or a
      tqdm-like factory; the bar shows the loss and tokens per second.

    Returns the history: ``{"loss": [...], "steps", "tokens", "train_s", "evals": [...]}``.
    """
    steps = _pos_int("steps", steps)
    batch_size = _pos_int("batch_size", batch_size)
    check_positive("lr", lr)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    check_positive("grad_clip", grad_clip, allow_zero=True)
    check_choice("schedule", schedule, SCHEDULES)
    warmup = max(1, int(0.05 * steps)) if warmup is None else _pos_int("warmup", warmup, 0)
    checkpoint_every = _pos_int("checkpoint_every", checkpoint_every)
    eval_every = _pos_int("eval_every", eval_every, 0)
    eval_at = sorted({_pos_int("eval_at", s) for s in eval_at})
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs must not be empty")
    if (eval_at or eval_every) and not eval_pairs:
        raise ValueError("eval_at / eval_every need eval_pairs")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    generate_kw = dict(generate_kw or {})
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, warmup=warmup, total=steps, schedule=schedule))
    sampler = _Sampler(len(pairs), generator)
    run_info = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
                "schedule": schedule, "betas": list(betas), "grad_clip": grad_clip, "pairs": len(pairs),
                "model": type(model).__name__}
    history: dict[str, Any] = {"loss": [], "steps": 0, "tokens": 0, "train_s": 0.0, "evals": []}
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None:
        check_output_file(ckpt, what="checkpoint")
    if ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt, map_location=device)
        diff = [k for k in run_info if state.get("run_info", {}).get(k) != run_info[k]]
        if state.get("shapes") != _shapes(model):
            diff.append("model shapes")
        if diff:
            raise CheckpointError(f"checkpoint {ckpt} belongs to another run: {', '.join(diff)} differ "
                                  "(use another checkpoint folder, or delete it to start afresh)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        sampler.load(state["sampler"])
        history = state["history"]
        _set_rng_states(state)
    start = history["steps"]
    end = steps if stop_after is None else min(steps, _pos_int("stop_after", stop_after))

    def save() -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "generator": generator.get_state(),
                                   "sampler": sampler.state(), "history": history, "run_info": run_info,
                                   "shapes": _shapes(model), **_get_rng_states()})

    bar_factory = progress if callable(progress) else None
    if bar_factory is None:
        from tqdm.auto import tqdm

        def bar_factory(**kw: Any) -> Any:
            return tqdm(disable=not progress, leave=False, **kw)

    bar = bar_factory(total=end - start, desc="seq2seq")
    done_evals = {e["step"] for e in history["evals"]}
    model.train()
    t_start = time.perf_counter()
    tokens_here = 0
    for step in range(start, end):
        idx = sampler.next(batch_size)
        batch = model.batch([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
        n_tok = batch_tokens(batch)
        loss = model.loss({k: v.to(device) for k, v in batch.items()})
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        history["loss"].append(loss.item())
        history["steps"] = step + 1
        history["tokens"] += n_tok
        tokens_here += n_tok
        elapsed = time.perf_counter() - t_start
        bar.update(1)
        if hasattr(bar, "set_postfix") and (step % 5 == 0 or step + 1 == end):
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_here / max(elapsed, 1e-9):.0f}")
        s1 = step + 1
        if eval_pairs and s1 not in done_evals and (s1 in eval_at or (eval_every and s1 % eval_every == 0)):
            history["train_s"] += time.perf_counter() - t_start
            ev = evaluate_seq2seq(model, eval_pairs, lang=lang, batch_size=eval_batch_size, num_samples=num_samples,
                                  **generate_kw)
            model.train()
            ev.update(step=s1, loss=sum(history["loss"][-20:]) / len(history["loss"][-20:]),
                      train_s=history["train_s"])
            history["evals"].append(ev)
            done_evals.add(s1)
            if log is not None:
                log(f"step {s1}: ROUGE-1/2/L {100 * ev['rouge1']:.1f}/{100 * ev['rouge2']:.1f}/"
                    f"{100 * ev['rougeL']:.1f}, BLEU {ev['bleu']:.1f}; e.g. {ev['samples'][0]['generated']!r}"
                    if ev["samples"] else f"step {s1}: ROUGE-L {100 * ev['rougeL']:.1f}")
            if on_eval is not None:
                on_eval(ev)
            t_start = time.perf_counter()
            tokens_here = 0
            save()
        elif ckpt is not None and s1 % checkpoint_every == 0:
            history["train_s"] += time.perf_counter() - t_start
            t_start = time.perf_counter()
            save()
    history["train_s"] += time.perf_counter() - t_start
    if hasattr(bar, "close"):
        bar.close()
    save()
    model.eval()
    return history


def _pos_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


__all__ = ["SCHEDULES", "batch_tokens", "evaluate_seq2seq", "lr_multiplier", "read_pairs", "split_pairs",
           "train_seq2seq"]
