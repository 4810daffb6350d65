"""Study "masks" (article 3, kexue.fm/archives/6933): LM, MLM, UniLM seq2seq and permutation LM are one
Transformer under four attention masks.

It draws each mask as a matrix (the article's ``[CLS] 你 想 吃 啥 [SEP] 白 切 鸡 [SEP]`` example for UniLM, the
``<s> → 迎 → 京 → 你 → 欢 → 北`` order for the permutation LM) and runs the article's invariance claims on a
small RoPE Transformer trained briefly as an MLM on the Chinese novels:

* LM mask: changing tokens after position ``t`` never changes the outputs at positions ``<= t``;
* UniLM mask: changing the target never changes the source outputs;
* permutation LM: the shuffled lower-triangular mask on the original order and the reordered input with
  original position ids under a plain causal mask give the same log-likelihood;
* the cumsum form of the UniLM mask equals the 2019 product form for every suffix segment vector.

Each check reports the max abs difference, next to the same measurement under a wrong mask (which must
differ, so the check can fail). The check functions are public so the unit tests run them too.
"""

from __future__ import annotations

import functools
import itertools
import time
from typing import Any

import torch

from kexue.attention import RankMask, causal_mask, permutation_mask, permute_for_plm, unilm_mask
from kexue.data.tokenizers import CharTokenizer
from kexue.nn.transformer import Transformer
from kexue.studies.base import Result, StudyContext, Table, register_study, seeded_global_rng
from kexue.train.mlm import TokenStream, train_mlm

# The article's UniLM example, with pinyin labels for the figures (no CJK font is assumed).
UNILM_TOKENS = ["[CLS]", "你", "想", "吃", "啥", "[SEP]", "白", "切", "鸡", "[SEP]"]
UNILM_LABELS = ["[CLS]", "ni", "xiang", "chi", "sha", "[SEP]", "bai", "qie", "ji", "[SEP]"]
UNILM_SEGMENTS = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
# The article's permutation example: <s> 北 京 欢 迎 你 generated as <s> -> 迎 -> 京 -> 你 -> 欢 -> 北.
PLM_TOKENS = ["<s>", "北", "京", "欢", "迎", "你"]
PLM_LABELS = ["<s>", "bei", "jing", "huan", "ying", "ni"]
PLM_ORDER = [0, 4, 2, 5, 3, 1]

QUICK: dict[str, Any] = dict(dim=64, depth=2, heads=2, steps=120, batch_size=16, seq_len=64, lr=2e-3,
                             novel="hongloumeng", check_batch=4, check_len=48)
FULL: dict[str, Any] = dict(dim=128, depth=4, heads=4, steps=600, batch_size=32, seq_len=64, lr=1e-3,
                            novel="hongloumeng", check_batch=16, check_len=128)


# ------------------------------------------------------------------------------------------------------
# The invariance checks (used by the study and by tests/studies/test_masks.py)
# ------------------------------------------------------------------------------------------------------
def _perturb(ids: torch.Tensor, where: torch.Tensor, low: int, high: int, generator: torch.Generator
             ) -> torch.Tensor:
    """Replace ``ids`` where ``where`` is True by different random tokens in ``[low, high)``."""
    shift = torch.randint(1, high - low, ids.shape, generator=generator)
    new = (ids - low + shift) % (high - low) + low
    return torch.where(where, new, ids)


@torch.no_grad()
def lm_causality_gap(model: Transformer, ids: torch.Tensor, t: int, *, generator: torch.Generator,
                     causal: bool = True) -> float:
    """Max abs change of the outputs (hidden states and logits) at positions ``<= t`` when every token after
    ``t`` is replaced; under the LM mask (``causal=True``) it must be 0.

    Example:
        >>> m = Transformer(20, dim=16, depth=1, heads=2)
        >>> lm_causality_gap(m, torch.randint(5, 20, (2, 9)), 3, generator=torch.Generator().manual_seed(0)) < 1e-6
        True
    """
    pos = torch.arange(ids.shape[1])
    ids2 = _perturb(ids, (pos > t).expand_as(ids), 5, model.vocab_size, generator)
    a, b = model(ids, is_causal=causal), model(ids2, is_causal=causal)
    return max(float((a.hidden[:, :t + 1] - b.hidden[:, :t + 1]).abs().max()),
               float((a.logits[:, :t + 1] - b.logits[:, :t + 1]).abs().max()))


@torch.no_grad()
def unilm_source_gap(model: Transformer, ids: torch.Tensor, segment_ids: torch.Tensor, *,
                     generator: torch.Generator, use_unilm_mask: bool = True) -> float:
    """Max abs change of the source outputs (segment 0) when every target token (segment 1) is replaced;
    under :func:`kexue.attention.unilm_mask` it must be 0 (``use_unilm_mask=False``: no mask, as a contrast).

    Example:
        >>> m = Transformer(20, dim=16, depth=1, heads=2)
        >>> s = torch.tensor([[0, 0, 0, 1, 1]])
        >>> unilm_source_gap(m, torch.randint(5, 20, (1, 5)), s, generator=torch.Generator().manual_seed(0)) < 1e-6
        True
    """
    seg = segment_ids.expand_as(ids)
    ids2 = _perturb(ids, seg.bool(), 5, model.vocab_size, generator)
    mask = unilm_mask(seg) if use_unilm_mask else None
    a, b = model(ids, mask=mask), model(ids2, mask=mask)
    src = ~seg.bool()
    return max(float((a.hidden[src] - b.hidden[src]).abs().max()),
               float((a.logits[src] - b.logits[src]).abs().max()))


@torch.no_grad()
def plm_loglik_mask(model: Transformer, ids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Permutation-LM log-likelihood ``[B]`` on the ORIGINAL order with the shuffled lower-triangular mask
    :func:`kexue.attention.permutation_mask`: the output at position ``order[t]`` predicts the token at
    ``order[t+1]`` (``order[0]`` is the start token, generated first)."""
    logp = model(ids, mask=permutation_mask(order)).logits.float().log_softmax(-1)  # [B, L, V]
    src, tgt = order[:-1], order[1:]
    return logp[:, src].gather(-1, ids[:, tgt][..., None])[..., 0].sum(-1)


@torch.no_grad()
def plm_loglik_reorder(model: Transformer, ids: torch.Tensor, order: torch.Tensor,
                       keep_positions: bool = True) -> torch.Tensor:
    """The same log-likelihood from :func:`kexue.attention.permute_for_plm`: tokens reordered into
    generation order, their ORIGINAL position ids, a plain causal mask; step ``t`` predicts step ``t+1``.
    ``keep_positions=False`` uses positions ``0..L-1`` instead (a wrong implementation, as a contrast)."""
    xr, pos = permute_for_plm(ids, order)
    logp = model(xr, position_ids=pos if keep_positions else None, is_causal=True).logits.float()
    logp = logp.log_softmax(-1)
    return logp[:, :-1].gather(-1, xr[:, 1:, None])[..., 0].sum(-1)


def unilm_product_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The 2019 form ``M_ij = (1 - s_i)(1 - s_j) + s_i [j <= i]`` of the UniLM mask, ``[B, 1, L, L]`` bool."""
    s = segment_ids.long()
    L = s.shape[-1]
    tri = causal_mask(L).long()
    m = (1 - s)[:, :, None] * (1 - s)[:, None, :] + s[:, :, None] * tri
    return (m > 0)[:, None]


def unilm_forms_mismatches(max_len: int = 12) -> tuple[int, int]:
    """Compare :func:`kexue.attention.unilm_mask` with :func:`unilm_product_mask` on every segment vector
    whose ones form a suffix, for lengths ``1..max_len``; returns ``(cases, mismatching entries)``."""
    cases = bad = 0
    for L in range(1, max_len + 1):
        segs = torch.tensor([[0] * (L - k) + [1] * k for k in range(L + 1)])
        bad += int((unilm_mask(segs) != unilm_product_mask(segs)).sum())
        cases += segs.shape[0]
    return cases, bad


def rank_forms() -> list[list]:
    """Each mask of the figure as a comparison of ranks (query i sees key j iff rank[j] <= rank[i],
    :class:`kexue.attention.RankMask`): ``[name, ranks, mismatching entries against the dense builder]``.
    The four masks differ only in the rank vector: positions (LM), all equal (MLM), the cumsum of the segment
    ids (UniLM) and the generation step (permutation LM)."""
    L = len(UNILM_TOKENS)
    seg = torch.tensor([UNILM_SEGMENTS])
    order = torch.tensor(PLM_ORDER)
    cases = [
        ("LM", torch.arange(L), causal_mask(L)),
        ("MLM", torch.zeros(L, dtype=torch.long), torch.ones(L, L, dtype=torch.bool)),
        ("UniLM", seg.cumsum(-1)[0], unilm_mask(seg)[0, 0]),
        ("permutation LM", RankMask.permutation(order).q_rank[0], permutation_mask(order)),
    ]
    rows = []
    for name, rank, dense in cases:
        got = RankMask(rank, rank).to_dense()[0, 0]
        rows.append([name, " ".join(str(int(r)) for r in rank), int((got != dense).sum())])
    return rows


# ------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------
def _mask_figure(ctx: StudyContext) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(UNILM_TOKENS)
    seg = torch.tensor([UNILM_SEGMENTS])
    panels = [
        ("LM (lower triangular)", causal_mask(L), UNILM_LABELS, UNILM_LABELS),
        ("MLM (no mask)", torch.ones(L, L, dtype=torch.bool), UNILM_LABELS, UNILM_LABELS),
        ("UniLM seq2seq (cumsum of segment ids)", unilm_mask(seg)[0, 0], UNILM_LABELS, UNILM_LABELS),
        ("Permutation LM: <s>, ying, jing, ni, huan, bei", permutation_mask(torch.tensor(PLM_ORDER)),
         PLM_LABELS, PLM_LABELS),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    for ax, (title, m, rows, cols) in zip(axes, panels):
        ax.imshow(m.float().numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel("key (input)")
        ax.set_ylabel("query (output)")
        ax.set_title(title, fontsize=9)
        for i, j in itertools.product(range(m.shape[0]), range(m.shape[1])):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if m[i, j] else "gray")
    ctx.save_figure(fig, "masks_matrices",
                    "Attention masks (1 = may attend; rows = outputs, columns = inputs) on the article's "
                    "examples: [CLS] 你 想 吃 啥 [SEP] 白 切 鸡 [SEP] (pinyin labels) with segment ids "
                    "0000001111, and <s> 北 京 欢 迎 你 generated in the order <s>→迎→京→你→欢→北.")


# ------------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------------
def train_tiny_model(ctx: StudyContext, cfg: dict[str, Any]
                     ) -> tuple[Transformer, CharTokenizer, TokenStream, dict]:
    """A small RoPE Transformer trained briefly as a character MLM on one Chinese novel."""
    from kexue.data import load_chinese_novels

    text = load_chinese_novels(ctx.data_dir)[cfg["novel"]]
    tok = CharTokenizer.from_corpus(text, min_count=3)
    stream = TokenStream([tok.encode_tensor(text)])
    with seeded_global_rng(ctx.seed, device=ctx.device):       # (the model's init reads the global RNG)
        model = Transformer(tok.vocab_size, dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"])
    t0 = time.perf_counter()
    hist = train_mlm(model, stream, tok, steps=cfg["steps"], batch_size=cfg["batch_size"],
                     seq_len=cfg["seq_len"], lr=cfg["lr"], generator=ctx.generator(1),
                     progress=lambda **kw: ctx.pbar(**kw), device=ctx.device)
    model.to("cpu").eval()
    info = {"train_s": time.perf_counter() - t0, "vocab": tok.vocab_size, "tokens": stream.num_tokens,
            "loss_first": sum(hist["loss"][:10]) / 10, "loss_last": sum(hist["loss"][-10:]) / 10}
    return model, tok, stream, info


@register_study("masks", article=3, title="One Transformer, four masks: LM, MLM, UniLM seq2seq, permutation LM",
                quick_budget_s=45, full_time="about 5 min on 2 CPU cores (600 MLM steps, dim 128, 4 layers)",
                datasets=("chinese_novels",))
def run(ctx: StudyContext) -> Result:
    return run_config(ctx, QUICK if ctx.quick else FULL)


def train_and_check(ctx: StudyContext, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train the tiny model and run the three invariance checks on it: plain JSON-able values (what
    ``ctx.cached_run`` stores, so a rerun reads them back instead of training again)."""
    model, tok, stream, info = train_tiny_model(ctx, cfg)
    g = ctx.generator(2)
    B, L = cfg["check_batch"], cfg["check_len"]
    ids = stream.sample(B, L, generator=g)
    ids[:, 0] = tok.cls_id
    t = L // 2
    out: dict[str, Any] = {"info": info}
    out["lm"] = lm_causality_gap(model, ids, t, generator=g)
    out["lm_wrong"] = lm_causality_gap(model, ids, t, generator=g, causal=False)
    src_len = L // 3
    seg = torch.tensor([[0] * src_len + [1] * (L - src_len)])
    out["uni"] = unilm_source_gap(model, ids, seg, generator=g)
    out["uni_wrong"] = unilm_source_gap(model, ids, seg, generator=g, use_unilm_mask=False)
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(L - 1, generator=g)])
    ll_mask = plm_loglik_mask(model, ids, order)
    ll_re = plm_loglik_reorder(model, ids, order)
    ll_wrong = plm_loglik_reorder(model, ids, order, keep_positions=False)
    out["plm"] = float((ll_mask - ll_re).abs().max())
    out["plm_wrong"] = float((ll_mask - ll_wrong).abs().max())
    out["ll_mean"] = float(ll_mask.mean())
    return out


def run_config(ctx: StudyContext, cfg: dict[str, Any]) -> Result:
    """Run the study with an explicit configuration (``QUICK``, ``FULL`` or a variant of them)."""
    cfg = dict(cfg)
    _mask_figure(ctx)
    res = ctx.cached_run({"study": "masks", "seed": ctx.seed, "cfg": cfg}, functools.partial(train_and_check, ctx, cfg))
    info, B, L = res["info"], cfg["check_batch"], cfg["check_len"]
    lm, lm_wrong, uni, uni_wrong = res["lm"], res["lm_wrong"], res["uni"], res["uni_wrong"]
    plm, plm_wrong = res["plm"], res["plm_wrong"]
    cases, mism = unilm_forms_mismatches()
    tol = 1e-4
    rows = [
        ["LM: change tokens after t, outputs at <= t", "causal", lm, "none (MLM)", lm_wrong,
         lm <= 1e-6 and lm_wrong > tol],
        ["UniLM: change the target, source outputs", "unilm_mask (cumsum)", uni, "none (MLM)", uni_wrong,
         uni <= 1e-6 and uni_wrong > tol],
        ["PLM: log-likelihood, mask vs reorder (nats per sequence)", "permutation_mask vs permute_for_plm + "
         "causal", plm, "reorder with positions 0..L-1", plm_wrong, plm <= tol and plm_wrong > tol],
        [f"UniLM cumsum form vs 2019 product form ({cases} suffix segment vectors, L<=12)", "unilm_mask",
         float(mism), "-", None, mism == 0],
    ]
    checks = Table("masks_invariance", ["check", "mask", "max abs diff", "wrong mask / implementation",
                                        "max abs diff (wrong)", "holds"], rows,
                   caption=f"On a {cfg['depth']}-layer, dim-{cfg['dim']} RoPE Transformer trained {cfg['steps']} "
                           f"MLM steps on {cfg['novel']} (loss {info['loss_first']:.2f} -> "
                           f"{info['loss_last']:.2f}); batch {B} x {L} windows of the novel; fp32. "
                           f"Mean PLM log-likelihood {res['ll_mean']:.2f} nats.")
    forms = rank_forms()
    ranks = Table("masks_as_ranks", ["mask", "rank of each token (query i sees key j iff rank j <= rank i)",
                                     "entries differing from the dense builder"], forms,
                  caption="The four masks of the figure are one comparison, rank[j] <= rank[i], with four rank "
                          "vectors (LM: the position; MLM: all equal; UniLM: the cumsum of the segment ids; "
                          "permutation LM: the step at which a token is generated). kexue.attention.RankMask "
                          "stores a mask this way, O(L) numbers, and the fused GPU kernel reads it instead of "
                          "the L x L matrix.")
    rows.append(["every mask above as a rank comparison (RankMask) vs the dense builder", "RankMask",
                 float(sum(r[-1] for r in forms)), "-", None, all(r[-1] == 0 for r in forms)])
    ok = [r[-1] for r in rows]
    verdict = "holds" if all(ok) else ("does not hold" if not any(ok) else "partly holds")
    detail = (f"LM causality max diff {lm:.3g} (no mask: {lm_wrong:.3g}); UniLM source max diff {uni:.3g} "
              f"(no mask: {uni_wrong:.3g}); PLM log-likelihood mask vs reorder {plm:.3g} nats (reorder without "
              f"original positions: {plm_wrong:.3g}); cumsum vs product UniLM mask: {mism} mismatches in "
              f"{cases} cases")
    return Result(
        study="masks", title="One Transformer, four masks (LM, MLM, UniLM, permutation LM)",
        article="kexue.fm/archives/6933",
        claim="The attention mask alone turns one Transformer into an LM, an MLM, a UniLM seq2seq model or a "
              "permutation LM: under the LM mask outputs ignore later tokens, under the UniLM mask source "
              "outputs ignore the target, and the permutation LM by shuffled mask equals reordered input with "
              "original position ids under a causal mask.",
        verdict=verdict, verdict_detail=detail, tables=[checks, ranks],
        data={"chinese_novels": f"{cfg['novel']} ({info['tokens']} characters, vocab {info['vocab']})"},
        config={**cfg, "train_s": info["train_s"]},
    )
