"""kexue.train.seq2seq and ``kexue seq2seq``: reading pairs, the split, the schedule, bit-exact resume, evaluations,
and the command line with its errors."""

from __future__ import annotations

import json

import pytest
import torch

from kexue.cli import main as kexue_main
from kexue.data.tokenizers import CharTokenizer
from kexue.nn.seq2seq import BertConfig, BertEncoder, UniLMSeq2Seq
from kexue.train.checkpoint import CheckpointError
from kexue.train.seq2seq import evaluate_seq2seq, lr_multiplier, read_pairs, split_pairs, train_seq2seq

PAIRS = [("abcdefg", "abc"), ("bcdefgh", "bcd"), ("cdefgha", "cde"), ("defghab", "def"), ("efghabc", "efg"),
         ("fghabcd", "fgh"), ("ghabcde", "gha"), ("habcdef", "hab")]


def tiny(dropout: float = 0.1, seed: int = 0) -> UniLMSeq2Seq:
    tok = CharTokenizer(list("abcdefgh"))
    torch.manual_seed(seed)
    enc = BertEncoder(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    return UniLMSeq2Seq(enc, tok, max_length=24, max_target_length=6)


def test_read_pairs_and_its_errors(tmp_path):
    p = tmp_path / "pairs.tsv"
    p.write_text("src one\ttgt one\n\n  src two \t tgt two\n")
    assert read_pairs(p) == [("src one", "tgt one"), ("src two", "tgt two")]
    for body, msg in (("a\tb\nno tab here\n", "line 2: expected source<TAB>target"),
                      ("a\tb\tc\n", "line 1: expected .* got 3 fields"),
                      ("a\tb\n\t b\n", "line 2: the source is empty"),
                      ("a\t \n", "line 1: the target is empty"),
                      ("\n\n", "no source<TAB>target line")):
        p.write_text(body)
        with pytest.raises(ValueError, match=msg):
            read_pairs(p)
    p.write_bytes(b"\xff\xfe\tx\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_pairs(p)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "missing.tsv")


def test_split_is_fixed_and_disjoint():
    pairs = [(str(i), str(i)) for i in range(50)]
    a = split_pairs(pairs, dev=5, test=0.2, seed=3)
    assert a == split_pairs(pairs, dev=5, test=0.2, seed=3) and a != split_pairs(pairs, dev=5, test=0.2, seed=4)
    tr, dv, te = a
    assert (len(tr), len(dv), len(te)) == (35, 5, 10)
    assert sorted(tr + dv + te) == sorted(pairs)
    with pytest.raises(ValueError, match="leave no training pair"):
        split_pairs(pairs, dev=30, test=20)


def test_schedule():
    assert [lr_multiplier(s, warmup=3, total=10, schedule="constant") for s in (0, 1, 2, 3, 9)] == \
        [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert lr_multiplier(9, warmup=3, total=10, schedule="linear") == pytest.approx(1 / 7)


def test_resume_is_bit_exact_with_dropout(tmp_path):
    kw = dict(steps=6, batch_size=3, lr=1e-3, progress=False, checkpoint_every=2)
    a = tiny()
    ha = train_seq2seq(a, PAIRS, generator=torch.Generator().manual_seed(5), **kw)
    b = tiny()
    train_seq2seq(b, PAIRS, generator=torch.Generator().manual_seed(5), checkpoint_dir=tmp_path, stop_after=3, **kw)
    torch.manual_seed(123)                          # the global RNG moves on between the two calls
    c = tiny()
    hc = train_seq2seq(c, PAIRS, generator=torch.Generator().manual_seed(5), checkpoint_dir=tmp_path, **kw)
    assert hc["loss"] == ha["loss"] and hc["steps"] == 6 and hc["tokens"] == ha["tokens"]
    for (n, p), q in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(p, q), n
    # a checkpoint of another run is refused, naming what differs
    with pytest.raises(CheckpointError, match="lr"):
        train_seq2seq(tiny(), PAIRS, generator=torch.Generator().manual_seed(5), checkpoint_dir=tmp_path,
                      **{**kw, "lr": 2e-3})


def test_evaluations_and_logging():
    m = tiny(dropout=0.0)
    lines, seen = [], []
    h = train_seq2seq(m, PAIRS, steps=4, batch_size=4, lr=1e-3, eval_pairs=PAIRS[:3], eval_at=(2,), eval_every=4,
                      num_samples=2, generate_kw={"beam_size": 2, "max_new_tokens": 5}, progress=False,
                      log=lines.append, on_eval=seen.append)
    assert [e["step"] for e in h["evals"]] == [2, 4] and len(seen) == 2 and len(lines) == 2
    ev = h["evals"][-1]
    assert 0 <= ev["rougeL"] <= 1 and len(ev["samples"]) == 2 and ev["samples"][0]["reference"] == "abc"
    again = evaluate_seq2seq(m, PAIRS[:3], beam_size=2, max_new_tokens=5)
    assert again["rougeL"] == ev["rougeL"]                   # decoding is deterministic
    with pytest.raises(ValueError, match="eval_pairs"):
        train_seq2seq(m, PAIRS, steps=2, eval_at=(1,), progress=False)


# ------------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------------
def _tsv(path, pairs):
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


def test_cli_train_then_generate(tmp_path, capsys, monkeypatch):
    pairs = _tsv(tmp_path / "p.tsv", PAIRS * 6)
    out = tmp_path / "run"
    args = ["seq2seq", "train", "--pairs", str(pairs), "--scratch", "--out", str(out), "--steps", "4",
            "--batch-size", "4", "--dim", "16", "--layers", "1", "--heads", "2", "--max-length", "32",
            "--max-target-length", "6", "--min-count", "1", "--eval-every", "2", "--no-progress", "--lr", "1e-3"]
    assert kexue_main(args) == 0
    text = capsys.readouterr().out
    assert "step 2: ROUGE-1/2/L" in text and "model written to" in text
    hist = json.loads((out / "history.json").read_text())
    assert hist["steps"] == 4 and [e["step"] for e in hist["evals"]] == [2, 4] and hist["dev_pairs"] == 2
    assert kexue_main(["seq2seq", "generate", "--model", str(out), "abcdefg", "hgfedcb", "--beam-size", "2",
                       "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("abcdefg\n\nbcdefgh\n"))
    assert kexue_main(["seq2seq", "generate", "--model", str(out), "-", "--beam-size", "2",
                       "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == lines[0]
    # an existing run is not overwritten without --resume; with it, a finished run is left as it is
    assert kexue_main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert kexue_main(args + ["--resume"]) == 0


def test_cli_errors(tmp_path, capsys):
    def err(argv):
        assert kexue_main(argv) == 2
        e = capsys.readouterr().err.strip()
        assert e.count("\n") == 0, e
        return e

    bad = tmp_path / "bad.tsv"
    bad.write_text("a b\tc\nno tab\n")
    assert "bad.tsv line 2: expected source<TAB>target" in err(
        ["seq2seq", "train", "--pairs", str(bad), "--scratch", "--out", str(tmp_path / "r")])
    bad.write_text("a b\tc\n\tc\n")
    assert "line 2: the source is empty" in err(
        ["seq2seq", "train", "--pairs", str(bad), "--scratch", "--out", str(tmp_path / "r")])
    good = _tsv(tmp_path / "good.tsv", PAIRS)
    nowt = tmp_path / "noweights"
    nowt.mkdir()
    BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                           num_hidden_layers=1)).save_pretrained(nowt)
    (nowt / "model.safetensors").unlink()
    (nowt / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    assert "has no weights" in err(["seq2seq", "train", "--pairs", str(good), "--bert", str(nowt), "--out",
                                    str(tmp_path / "r")])
    mism = tmp_path / "mismatch"
    mism.mkdir()
    BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                           num_hidden_layers=1)).save_pretrained(mism)
    (mism / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    assert "vocabulary/weights mismatch" in err(["seq2seq", "train", "--pairs", str(good), "--bert", str(mism),
                                                "--out", str(tmp_path / "r")])
    assert "no such folder" in err(["seq2seq", "train", "--pairs", str(good), "--bert", str(tmp_path / "x"),
                                    "--out", str(tmp_path / "r")])
    assert "exactly one of --bert" in err(["seq2seq", "train", "--pairs", str(good), "--out", str(tmp_path / "r")])
    assert "has no weights" in err(["seq2seq", "generate", "--model", str(nowt), "text"])
    assert "no such folder" in err(["seq2seq", "generate", "--model", str(tmp_path / "nope"), "text"])
    assert "--steps" in err(["seq2seq", "train", "--pairs", str(good), "--scratch", "--out", "r", "--steps", "0"])
