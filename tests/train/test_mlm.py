"""Tests for kexue.data.tokenizers and kexue.train.mlm: tokenizer, windows, masking, training, evaluation."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kexue.data.tokenizers import SPECIAL_TOKENS, CharTokenizer
from kexue.nn.transformer import Transformer
from kexue.train.mlm import (
    IGNORE_INDEX,
    TokenStream,
    evaluate_mlm,
    make_eval_set,
    mask_tokens,
    mlm_accuracy,
    mlm_loss,
    split_documents,
    train_mlm,
    warmup_cosine,
)

TEXT = "白切鸡好吃。To be, or not to be: that is the question.\n" * 5

pytestmark = pytest.mark.usefixtures("one_thread")



# -- tokenizer -------------------------------------------------------------------------------------------
def test_tokenizer_roundtrip_and_specials(tmp_path):
    tok = CharTokenizer.from_corpus(TEXT, min_count=1)
    assert tok.tokens[:5] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and min(ids) >= 5
    assert tok.decode(ids) == TEXT
    assert tok.encode_tensor(TEXT).tolist() == ids
    assert tok.encode("鸭", add_special_tokens=True) == [2, 1, 3]
    assert tok.encode_tensor("鸭a").tolist() == [1, tok.token_to_id["a"]]
    assert tok.decode([2, tok.mask_id], skip_special_tokens=False) == "[CLS][MASK]"
    assert tok.convert_tokens_to_ids(["[CLS]", "白", "[SEP]"]) == [2, tok.token_to_id["白"], 3]
    # most frequent first
    counts = {c: TEXT.count(c) for c in set(TEXT)}
    assert counts[tok.tokens[5]] == max(counts.values())
    # save/load, atomically (no temp files left behind)
    path = tmp_path / "sub" / "vocab.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]
    tok2 = CharTokenizer.load(path)
    assert tok2.tokens == tok.tokens and tok2.encode(TEXT) == ids
    assert json.loads(path.read_text(encoding="utf-8"))["type"] == "CharTokenizer"


def test_tokenizer_min_count_and_errors(tmp_path):
    tok = CharTokenizer.from_corpus(["aaab", "bc"], min_count=2)
    assert tok.tokens[5:] == ["a", "b"]
    assert tok.encode("c") == [tok.unk_id]
    assert CharTokenizer.from_corpus("aaabbc", max_vocab=1).tokens[5:] == ["a"]
    with pytest.raises(ValueError, match="min_count"):
        CharTokenizer.from_corpus("abc", min_count=0)
    with pytest.raises(TypeError, match="text"):
        tok.encode(123)
    with pytest.raises(ValueError, match="ids"):
        tok.decode([99])
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "other"}')
    with pytest.raises(ValueError, match="CharTokenizer"):
        CharTokenizer.load(bad)


# -- data ------------------------------------------------------------------------------------------------
def test_split_and_windows_do_not_overlap():
    docs = [torch.arange(0, 1000), torch.arange(5000, 5600)]
    train, held = split_documents(docs, 0.1)
    assert [t.numel() for t in train] == [900, 540] and [h.numel() for h in held] == [100, 60]
    tr, ho = TokenStream(train), TokenStream(held)
    seen_train = set(torch.cat(train).tolist())
    g = torch.Generator().manual_seed(0)
    batch = tr.sample(64, 50, generator=g)
    assert not set(batch.flatten().tolist()) & set(torch.cat(held).tolist())
    assert set(batch.flatten().tolist()) <= seen_train
    # windows are contiguous and never straddle a document boundary
    assert (batch.diff(dim=1) == 1).all()
    w = ho.windows(30)
    assert w.shape == (3 + 2, 30) and (w.diff(dim=1) == 1).all()
    assert ho.windows(30, max_windows=2).shape == (2, 30)
    # same generator seed, same batches
    assert torch.equal(tr.sample(8, 20, generator=torch.Generator().manual_seed(3)),
                       tr.sample(8, 20, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="length"):
        ho.sample(2, 1000)
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_documents(docs, 1.5)


# -- masking ---------------------------------------------------------------------------------------------
def test_masking_statistics_80_10_10():
    tok = CharTokenizer([chr(0x4E00 + i) for i in range(200)])
    x = torch.randint(5, tok.vocab_size, (200, 500), generator=torch.Generator().manual_seed(1))
    x[:, :10] = tok.pad_id  # special tokens are never selected
    inp, lab = mask_tokens(x, tok, generator=torch.Generator().manual_seed(2))
    sel = lab != IGNORE_INDEX
    n_eligible = (x != tok.pad_id).sum().item()
    assert not sel[:, :10].any()
    assert sel.sum().item() / n_eligible == pytest.approx(0.15, abs=0.005)
    assert torch.equal(lab[sel], x[sel])
    as_mask = (inp[sel] == tok.mask_id).float().mean().item()
    kept = (inp[sel] == x[sel]).float().mean().item()
    replaced = ((inp[sel] != x[sel]) & (inp[sel] != tok.mask_id)).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert replaced == pytest.approx(0.1 * 199 / 200, abs=0.01)  # a random token may equal the original
    assert kept == pytest.approx(0.1 + 0.1 / 200, abs=0.01)
    assert (inp[sel & (inp != tok.mask_id)] >= 5).all()  # random replacements are never special tokens
    assert torch.equal(inp[~sel], x[~sel])


def test_masking_generator_reproducibility():
    tok = CharTokenizer(list("abcdefgh"))
    x = torch.randint(5, 13, (8, 64))
    a = mask_tokens(x, tok, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(x, tok, generator=torch.Generator().manual_seed(7))
    c = mask_tokens(x, tok, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(make_eval_set(x, tok, seed=3)[1], make_eval_set(x, tok, seed=3)[1])
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(x, tok, mask_prob=1.5)
    with pytest.raises(TypeError, match="input_ids"):
        mask_tokens(x.float(), tok)
    with pytest.raises(TypeError, match="positional"):  # options and the generator are keyword-only
        mask_tokens(x, tok, 0.15, 0.8, 0.1, torch.Generator())


# -- evaluation ------------------------------------------------------------------------------------------
class _Lookup(nn.Module):
    """Predicts ``table[input]`` at every position (a hand-made model with known accuracy)."""

    def __init__(self, table: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=F.one_hot(self.table[x], self.vocab).float())


def test_mlm_accuracy_hand_made_case():
    table = torch.tensor([0, 1, 2, 3, 9, 5, 6, 7, 8, 9])  # [MASK]=4 is predicted as 9
    model = _Lookup(table, 10)
    inputs = torch.tensor([[5, 4, 6, 4], [7, 8, 4, 4]])
    labels = torch.tensor([[-100, 9, 6, 3], [-100, -100, 9, 9]])
    # scored positions: (0,1) 9==9 ok, (0,2) 6==6 ok, (0,3) 9!=3, (1,2) ok, (1,3) ok -> 4/5
    assert mlm_accuracy(model, inputs, labels, batch_size=1) == (0.8, 5)
    with pytest.raises(ValueError, match="no masked"):
        mlm_accuracy(model, inputs, torch.full_like(labels, -100))
    with pytest.raises(ValueError, match="same shape"):
        mlm_accuracy(model, inputs, labels[:, :2])


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


# -- training --------------------------------------------------------------------------------------------
def test_training_learns_and_resumes_exactly(tmp_path):
    text = "abcdefghij" * 60
    tok = CharTokenizer.from_corpus(text)
    stream = TokenStream([tok.encode_tensor(text)])

    def fresh() -> Transformer:
        torch.manual_seed(0)
        return Transformer(tok.vocab_size, dim=32, depth=1, heads=2)

    kw = dict(steps=60, batch_size=8, seq_len=20, lr=3e-3, progress=False)
    m1 = fresh()
    acc0 = evaluate_mlm(m1, stream, tok, length=20)["accuracy"]
    h1 = train_mlm(m1, stream, tok, generator=torch.Generator().manual_seed(0), **kw)
    assert sum(h1["loss"][-5:]) / 5 < 0.9 * sum(h1["loss"][:5]) / 5  # it learns something of the text
    acc = evaluate_mlm(m1, stream, tok, length=20)["accuracy"]
    assert acc > acc0 + 0.05
    # interrupted after 25 steps, then resumed from the checkpoint: same weights as the uninterrupted run
    m2 = fresh()
    h2a = train_mlm(m2, stream, tok, generator=torch.Generator().manual_seed(0), checkpoint_dir=tmp_path,
                    checkpoint_every=10, stop_after=25, **kw)
    assert h2a["steps"] == 25 and (tmp_path / "last.pt").exists()
    m3 = fresh()
    h2 = train_mlm(m3, stream, tok, generator=torch.Generator().manual_seed(0), checkpoint_dir=tmp_path,
                   checkpoint_every=10, **kw)
    assert h2["steps"] == 60 and h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m3.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # with dropout the global torch RNG is in the checkpoint too: a resumed run still ends on the same weights
    # (the caller re-seeds the same way before both calls; the resumed call restores the saved state)
    dkw = dict(steps=6, batch_size=4, seq_len=20, lr=3e-3, progress=False, checkpoint_every=2)

    def dropped() -> Transformer:
        torch.manual_seed(0)
        return Transformer(tok.vocab_size, dim=32, depth=1, heads=2, dropout=0.2)

    runs = []
    for name, stops in (("whole", [None]), ("split", [4, None])):
        model = dropped()
        for stop in stops:
            torch.manual_seed(7)
            train_mlm(model, stream, tok, generator=torch.Generator().manual_seed(0),
                      checkpoint_dir=tmp_path / name, stop_after=stop, **dkw)
        runs.append(model)
    for (n, a), (_, b) in zip(runs[0].state_dict().items(), runs[1].state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    # a checkpoint written before the RNG state (and the skipped steps) were saved still resumes
    model = dropped()
    train_mlm(model, stream, tok, generator=torch.Generator().manual_seed(0), checkpoint_dir=tmp_path / "old",
              stop_after=4, **dkw)
    state = torch.load(tmp_path / "old" / "last.pt", weights_only=True)  # a genuine last.pt is plain data
    assert state["torch_rng_state"].dtype == torch.uint8
    del state["torch_rng_state"], state["history"]["skipped"]
    torch.save(state, tmp_path / "old" / "last.pt")
    h = train_mlm(model, stream, tok, generator=torch.Generator().manual_seed(0), checkpoint_dir=tmp_path / "old",
                  **dkw)
    assert h["steps"] == 6 and len(h["loss"]) == 6 and h["skipped"] == []


def test_mlm_loss_with_nothing_masked_is_a_connected_zero():
    torch.manual_seed(0)
    m = Transformer(15, dim=16, depth=1, heads=2)
    ids = torch.randint(5, 15, (1, 4))
    loss = mlm_loss(m, ids, torch.full((1, 4), IGNORE_INDEX))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    # any model with .logits: the same
    table = _Lookup(torch.arange(15), 15)
    assert mlm_loss(table, ids, torch.full((1, 4), IGNORE_INDEX)).item() == 0.0
    # one masked position: the usual cross-entropy
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 2] = ids[0, 2]
    want = F.cross_entropy(m(ids).logits[0, 2:3], ids[0, 2:3])
    torch.testing.assert_close(mlm_loss(m, ids, labels), want)


def test_train_mlm_skips_the_update_when_nothing_is_masked(tmp_path):
    text = "abcdefghij" * 30
    tok = CharTokenizer.from_corpus(text)
    stream = TokenStream([tok.encode_tensor(text)])
    torch.manual_seed(0)
    m = Transformer(tok.vocab_size, dim=16, depth=1, heads=2)
    before = {n: p.detach().clone() for n, p in m.state_dict().items()}
    h = train_mlm(m, stream, tok, steps=3, batch_size=2, seq_len=8, mask_prob=0.0, progress=False)
    assert h["steps"] == 3 and h["loss"] == [] and h["skipped"] == [0, 1, 2]
    for n, p in m.state_dict().items():                 # no weight decay, no momentum step on empty batches
        torch.testing.assert_close(p, before[n], rtol=0, atol=0, msg=n)
    # a mix of batches with and without masked positions: the loss list holds the real (finite) losses, the
    # skipped steps are listed, and a resumed run still ends on the same weights
    kw = dict(steps=12, batch_size=1, seq_len=2, mask_prob=0.3, progress=False, checkpoint_every=1)

    def run(stops: list) -> tuple[Transformer, dict]:
        torch.manual_seed(0)
        model = Transformer(tok.vocab_size, dim=16, depth=1, heads=2)
        for stop in stops:
            hist = train_mlm(model, stream, tok, generator=torch.Generator().manual_seed(1),
                             checkpoint_dir=tmp_path / str(len(stops)), stop_after=stop, **kw)
        return model, hist

    (m1, h1), (m2, h2) = run([None]), run([5, None])
    assert 0 < len(h1["skipped"]) < 12 and len(h1["loss"]) + len(h1["skipped"]) == 12
    assert all(math.isfinite(v) and v > 0 for v in h1["loss"])
    assert h2["skipped"] == h1["skipped"] and h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_mask_tokens_checks_ids_and_probabilities():
    tok = CharTokenizer(list("abc"))                     # vocab_size 8
    x = torch.randint(5, 8, (2, 10))
    for bad in (torch.tensor([[5, 8]]), torch.tensor([[-1, 5]])):
        with pytest.raises(ValueError, match=r"input_ids.*\[0, 8\)"):
            mask_tokens(bad, tok)
    for name in ("mask_prob", "mask_token_prob", "random_token_prob"):
        for bad in ("0.15", None):
            with pytest.raises(TypeError, match=name):
                mask_tokens(x, tok, **{name: bad})
        with pytest.raises(ValueError, match=name):
            mask_tokens(x, tok, **{name: float("nan")})
    assert mask_tokens(torch.zeros(0, 4, dtype=torch.long), tok)[1].shape == (0, 4)


def test_encode_tensor_matches_encode_on_lone_surrogates():
    tok = CharTokenizer.from_corpus("abc")
    for text in ("a\ud800b", "\udfff", "x\ud83d\ude00c", "a\udc80\ud800"):
        assert tok.encode_tensor(text).tolist() == tok.encode(text)
    # a surrogate that is in the vocabulary keeps its id in both
    tok2 = CharTokenizer(["a", "\ud800"])
    assert tok2.encode_tensor("a\ud800b").tolist() == tok2.encode("a\ud800b") == [5, 6, tok2.unk_id]


def test_a_vocabulary_with_a_lone_surrogate_saves_and_loads(tmp_path):
    tok = CharTokenizer.from_corpus(["ab\ud800你"])
    tok.save(tmp_path / "v.json")
    back = CharTokenizer.load(tmp_path / "v.json")
    assert back.tokens == tok.tokens and back.encode("a\ud800你") == tok.encode("a\ud800你")
    plain = CharTokenizer.from_corpus(["ab你"])
    plain.save(tmp_path / "p.json")
    assert "你" in (tmp_path / "p.json").read_text(encoding="utf-8")     # readable when it can be


# -- last.pt is loaded safely (issue 18) -----------------------------------------------------------------
def _tiny_mlm(tmp_path, **kw):
    text = "abcdefghij" * 20
    tok = CharTokenizer.from_corpus(text)
    torch.manual_seed(0)
    model = Transformer(tok.vocab_size, dim=16, depth=1, heads=2)
    return lambda: train_mlm(model, TokenStream([tok.encode_tensor(text)]), tok, steps=4, batch_size=2, seq_len=8,
                             progress=False, checkpoint_dir=tmp_path, generator=torch.Generator().manual_seed(0), **kw)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        import shlex

        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_train_mlm_refuses_a_crafted_last_pt_and_runs_nothing(tmp_path):
    from kexue.train.checkpoint import CheckpointError

    marker = tmp_path / "pwned"
    last = tmp_path / "last.pt"
    torch.save({"model": _RunsCode(marker), "history": {"steps": 0}}, last)
    with pytest.raises(CheckpointError) as err:
        _tiny_mlm(tmp_path)()
    assert str(last) in str(err.value)
    assert not marker.exists()


def test_train_mlm_last_pt_is_plain_data_and_a_corrupt_one_is_refused(tmp_path):
    from kexue.train.checkpoint import CheckpointError, load_checkpoint

    _tiny_mlm(tmp_path, stop_after=2)()
    last = tmp_path / "last.pt"
    state = load_checkpoint(last)  # CRC-checked, weights_only=True: with the generator and RNG states
    assert state["history"]["steps"] == 2 and state["generator"].dtype == torch.uint8
    assert state["torch_rng_state"].dtype == torch.uint8
    weight = next(v for v in state["model"].values() if v.numel() >= 64)
    data = bytearray(last.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 10] ^= 0x80
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC") as err:
        _tiny_mlm(tmp_path)()
    assert str(last) in str(err.value)
    last.unlink()
    last.mkdir()  # a folder where last.pt goes: refused before the first step
    with pytest.raises(ValueError, match="is a folder"):
        _tiny_mlm(tmp_path)()


# ------------------------------------------------------------------------------------------------ on a CUDA device
# (marked cuda: skipped without a GPU, as in CI; ``pytest -m cuda`` on a GPU machine)
CUDA = "cuda"


@pytest.mark.cuda
def test_mlm_masking_of_a_cuda_batch_is_the_cpu_batch_s():
    """mask_tokens draws on its generator's device: a CUDA batch gets the CPU batch's masks, on its device."""
    from kexue.data.tokenizers import CharTokenizer
    from kexue.train.mlm import mask_tokens

    tok = CharTokenizer(list("abcdefgh"))
    ids = torch.randint(len(tok.special_ids), tok.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    want = mask_tokens(ids, tok, generator=torch.Generator().manual_seed(2))
    got = mask_tokens(ids.to(CUDA), tok, generator=torch.Generator().manual_seed(2))
    assert all(g.device.type == "cuda" for g in got)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    ga, gb = (torch.Generator(device=CUDA).manual_seed(3) for _ in range(2))
    assert torch.equal(mask_tokens(ids.to(CUDA), tok, generator=ga)[0], mask_tokens(ids.to(CUDA), tok, generator=gb)[0])
