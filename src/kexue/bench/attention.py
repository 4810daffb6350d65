"""``kexue bench attention``: entropy-scaled attention against plain SDPA, and bool-mask SDPA against FlexAttention.

1. ``attention(q, k, v, mask, scale="entropy")`` (per-row ``log_512(n_i)`` pre-multiplied into q, then the fused
   SDPA kernel) against ``F.scaled_dot_product_attention`` with the same mask and the standard scale, at
   L in {512, 2048, 8192} ({512, 2048} with ``--quick``), causal (``is_causal=True``, no mask materialised)
   and with a UniLM mask (half source, half target) in two situations: a new ``unilm_mask`` every call (the
   first layer of a model: the mask is converted and its rows counted in the call; two masks taken in turn) and
   a :class:`~kexue.attention.PreparedMask` passed again (every later layer of a model, which prepares its
   mask once per forward and hands it to each layer).
   Target: at most 1.05x the time of plain SDPA, i.e. a "speedup" column >= 0.95. Forward passes, plus
   forward+backward at L <= 2048 (L = 512 with ``--quick``), plus a whole 4-layer model.
2. The same under ``torch.compile`` (each side compiled on its own, static shapes, one graph; one-off compile
   times in ``extra``): causal, a new UniLM mask per call, and the 4-layer model, at L <= 2048 (L = 512 with
   ``--quick``).
3. The same UniLM mask as a FlexAttention ``BlockMask`` (:func:`kexue.attention.to_block_mask`) through
   ``flex_attention`` against SDPA with the dense bool mask (forward only; eager, and compiled without
   ``--quick``), at L <= 2048 (L = 512 with ``--quick``).
4. On a GPU: ``attention(..., backend="fused")``, the experimental Triton kernel of
   :mod:`kexue.attention.kernels` that works out the UniLM mask from a :class:`~kexue.attention.RankMask` and the
   entropy scale inside the kernel, against the same SDPA calls; in the ``compiled`` row group, the kernel inside
   a compiled graph. Not on a CPU: there the kernels only run in Triton's interpreter (for the tests).

Every entropy row first checks our output against SDPA on an explicitly pre-scaled q (max abs difference in
``extra``). Shapes: on a CPU B=1, H=2, D=64, fp32 -- few heads, so the per-call costs that do not scale with the
heads weigh the most; on a GPU (``--device cuda``) B=8, H=12, D=64, bf16. At L = 8192 (about 1-3 s per call
on 2 CPU cores) only the entropy rows run, with fewer samples.

Timing: :func:`kexue.bench.base.compare` alternates samples of the two sides (ABBA), 60 pairs (30 with
``--quick``), and the speedup is the median of the paired ratios; ``speedup_iqr`` gives their quartiles and
an A/A control row times plain SDPA against itself (the noise floor of the run). What our path adds per call:
one multiply of q by the per-row factor, the Python around it, and for a mask seen for the first time one read
of it to count each row's keys (:func:`kexue.attention._cpu.row_counts`, ~2 ms at L = 8192 against SDPA's
0.5-1 s). Against that, the mask reaches SDPA in its additive float form made by
:func:`~kexue.attention.to_additive_mask`, which costs less than the conversion SDPA makes inside the call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from kexue.attention import (
    RankMask,
    attention,
    prepare_mask,
    render_mask,
    to_block_mask,
    unilm,
    unilm_mask,
)
from kexue.bench.base import BenchOptions, BenchRow, compare, register_bench, time_once

TARGET = "<= 1.05x SDPA time (speedup >= 0.95)"


def _shape(device: str) -> tuple[int, int, int, torch.dtype]:
    """(B, H, D, dtype): few heads in fp32 on a CPU; on a GPU a training-sized batch in bf16 (B=8, H=12, as
    BERT-base), since one or two heads there time little more than kernel launches."""
    return (8, 12, 64, torch.bfloat16) if str(device).startswith("cuda") else (1, 2, 64, torch.float32)


def _qkv(L: int, device: str, grad: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    B, H, D, dtype = _shape(device)
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3))


def _fwd_bwd(fn: Callable[[], torch.Tensor], tensors: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def step() -> None:
        for t in tensors:
            t.grad = None
        fn().sum().backward()

    return step


def _entropy_reference_check(ours: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None, causal: bool) -> float:
    """Max |ours - SDPA on explicitly log_512(n_i)-scaled q| (same kernel family, independent counts)."""
    L = q.shape[2]
    if causal:
        n = torch.arange(1, L + 1, device=q.device)
    else:
        assert mask is not None
        n = mask.sum(-1)
    mult = (torch.log(n.double().clamp_min(16)) / torch.log(torch.tensor(512.0, dtype=torch.float64)))
    qs = q * mult.to(q.dtype).reshape(*mult.shape, 1)
    ref = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=causal)
    return float((ours - ref).abs().max())


def _timing_kwargs(L: int, opts: BenchOptions) -> dict:
    # Ratios near 1.00x need many sample pairs to be read to a per cent on a noisy machine: 60 pairs (30 with
    # --quick) of >= 20 ms samples. The largest size costs ~1 s per call on 2 CPU cores: 6 pairs there.
    if L >= 8192:
        return {"repeats": 6, "rounds": 1}
    if opts.quick:
        return {"repeats": 10, "rounds": 3}
    return {"repeats": max(opts.repeats, 20), "rounds": 3}


def _in_turn(masks: list[torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``next(side)``: the two masks in turn, separately for each side ("ours", "peer"), so that no call of a
    side sees the mask of that side's previous call."""
    turn = {"ours": 0, "peer": 0}

    def next_mask(side: str) -> torch.Tensor:
        turn[side] ^= 1
        return masks[turn[side]]

    return next_mask


def _fused_available(dev: str) -> bool:
    """Whether the experimental fused kernel can run on ``dev`` (imported only here, for the GPU rows)."""
    if not str(dev).startswith("cuda"):
        return False
    try:
        from kexue.attention.kernels import fused_available
    except ImportError:
        return False
    return fused_available(dev)


@register_bench("attention", groups=("eager", "fused", "control", "model", "backward", "compiled", "flex"))
def run(opts: BenchOptions) -> Iterator[BenchRow]:
    for L in (512, 2048) if opts.quick else (512, 2048, 8192):
        yield from _rows_for_length(L, opts)


def _rows_for_length(L: int, opts: BenchOptions) -> Iterator[BenchRow]:
    dev = opts.device
    tk = _timing_kwargs(L, opts)
    q, k, v = _qkv(L, dev)
    seg = (torch.arange(L) >= L // 2).long()[None].to(dev)
    umask = unilm_mask(seg)                                   # [1, 1, L, L] bool
    sdpa_mask = "SDPA bool mask (1/sqrt d)"

    def add(case: str, ours_name: str, peer_name: str, ours: Callable[[], object], peer: Callable[[], object],
            target: str = TARGET, **extra: str) -> BenchRow:
        return BenchRow.of(case, ours_name, peer_name, compare(ours, peer, device=dev, **tk), target, extra)

    # A new mask on every call, as the first layer of a model sees it: two masks from unilm_mask taken in turn;
    # SDPA gets the same two masks.
    next_mask = _in_turn([umask, unilm_mask(seg)])
    if opts.wants("eager"):
        yield from _eager_rows(L, q, k, v, umask, next_mask, add)

    # ---- the fused Triton kernel (CUDA only: the interpreter that runs it on a CPU times nothing useful)
    if opts.wants("fused") and _fused_available(dev):
        yield from _fused_rows(L, q, k, v, seg, next_mask, opts, tk)
    if L >= 8192:
        return
    if opts.wants("control"):
        # A/A control: the peer against itself, timed the same way -- how far from 1.00x noise alone moves a ratio
        yield add(f"unilm mask L={L} fwd", "SDPA bool mask (control)", sdpa_mask,
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=umask),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=umask),
            target="report only: the noise floor (ideal 1.00x)", note="the same call on both sides")
        yield add(f"unilm mask L={L} fwd", "attention(standard)", sdpa_mask,
            lambda: attention(q, k, v, umask, scale="standard"),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=umask),
            note="the wrapper alone (checks, mask conversion)")

    # ---- what a user pays: a whole model forward, new UniLM mask every call, entropy vs standard scale
    if opts.wants("model"):
        yield _model_row(L, seg, opts, tk)

    small = L <= (512 if opts.quick else 2048)
    # ---- forward + backward (training) at the smaller sizes (only the smallest with --quick)
    if small and opts.wants("backward"):
        qg, kg, vg = _qkv(L, dev, grad=True)
        yield add(f"causal L={L} fwd+bwd", "attention(entropy)", "SDPA is_causal (1/sqrt d)",
            _fwd_bwd(lambda: attention(qg, kg, vg, is_causal=True, scale="entropy"), (qg, kg, vg)),
            _fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg)))
        yield add(f"unilm mask L={L} fwd+bwd", "attention(entropy) new mask", sdpa_mask,
            _fwd_bwd(lambda: attention(qg, kg, vg, next_mask("ours"), scale="entropy"), (qg, kg, vg)),
            _fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=next_mask("peer")),
                     (qg, kg, vg)),
            note="a new unilm_mask object every call")

    # ---- the same calls under torch.compile (attention() traces to one graph; the compiler fuses the row
    # counts, the float mask and the q multiplier), and the compiled model
    if small and opts.wants("compiled"):
        yield from _compiled_rows(L, q, k, v, seg, opts, tk)
        if _fused_available(dev):
            yield from _fused_compiled_rows(L, q, k, v, seg, opts, tk)

    # ---- FlexAttention BlockMask vs dense bool mask (eager flex materialises the scores: small L only)
    if small and opts.wants("flex"):
        yield from _flex_rows(L, q, k, v, seg, umask, opts, tk)


def _eager_rows(L: int, q, k, v, umask, next_mask: Callable[[str], torch.Tensor],
                add: Callable[..., BenchRow]) -> Iterator[BenchRow]:
    """attention(scale="entropy") on SDPA against SDPA: causal, and a UniLM mask new (from the builder, or
    user-made) or reused."""
    sdpa_mask = "SDPA bool mask (1/sqrt d)"
    # ---- causal: is_causal fast path, n_i = i + 1 computed arithmetically
    with torch.no_grad():
        err = _entropy_reference_check(attention(q, k, v, is_causal=True, scale="entropy"), q, k, v, None, True)
    yield add(f"causal L={L} fwd", "attention(entropy)", "SDPA is_causal (1/sqrt d)",
        lambda: attention(q, k, v, is_causal=True, scale="entropy"),
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        max_abs_diff_vs_prescaled_sdpa=f"{err:.2e}")

    # ---- UniLM bool mask: n_i = keys each row may see
    with torch.no_grad():
        err = _entropy_reference_check(attention(q, k, v, umask, scale="entropy"), q, k, v, umask, False)
    yield add(f"unilm mask L={L} fwd", "attention(entropy) new mask", sdpa_mask,
        lambda: attention(q, k, v, next_mask("ours"), scale="entropy"),
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=next_mask("peer")),
        max_abs_diff_vs_prescaled_sdpa=f"{err:.2e}", note="a new unilm_mask object every call")

    # a PreparedMask passed again, as every layer after the first of a model gets it: its additive form and row
    # counts were worked out by the first call
    pm = prepare_mask(umask, q_len=L, device=q.device)
    yield add(f"unilm mask L={L} fwd", "attention(entropy) prepared", sdpa_mask,
        lambda: attention(q, k, v, pm, scale="entropy"),
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=umask),
        note="one PreparedMask passed again (every layer after a model's first): prepared once")


def _fused_rows(L: int, q, k, v, seg, next_mask: Callable[[str], torch.Tensor], opts: BenchOptions,
                tk: dict) -> Iterator[BenchRow]:
    """``attention(..., backend="fused")``: the mask (from the builder's RankMask) and the entropy scale inside
    one Triton kernel, against SDPA with the standard scale and the same mask (causal: SDPA's flash kernel;
    UniLM: SDPA given the dense bool mask, new mask objects every call on both sides). Also the kernel with the
    standard scale against SDPA (the kernel alone, report only), the 4-layer model with Attention-E on the kernel
    against Attention-O on SDPA, forward+backward at L <= 2048, and the peak memory of one UniLM call on each
    side."""
    dev = opts.device

    def add(case: str, ours_name: str, peer_name: str, ours, peer, target: str = TARGET, **extra) -> BenchRow:
        return BenchRow.of(case, ours_name, peer_name, compare(ours, peer, device=dev, **tk), target, extra)

    with torch.no_grad():
        err_c = _entropy_reference_check(attention(q, k, v, is_causal=True, scale="entropy", backend="fused"),
                                         q, k, v, None, True)
        um = unilm_mask(seg)
        err_u = _entropy_reference_check(attention(q, k, v, RankMask.unilm(seg), scale="entropy", backend="fused"),
                                         q, k, v, um, False)
    yield add(f"causal L={L} fwd", "fused(entropy)", "SDPA is_causal (1/sqrt d)",
              lambda: attention(q, k, v, is_causal=True, scale="entropy", backend="fused"),
              lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
              max_abs_diff_vs_prescaled_sdpa=f"{err_c:.2e}")
    yield add(f"causal L={L} fwd", "fused(standard)", "SDPA is_causal (1/sqrt d)",
              lambda: attention(q, k, v, is_causal=True, backend="fused"),
              lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
              target="report only: the kernel itself against SDPA's")
    next_rank = _in_turn([RankMask.unilm(seg), RankMask.unilm(seg)])
    peaks = {}
    for side, fn in (("ours", lambda: attention(q, k, v, next_rank("ours"), scale="entropy", backend="fused")),
                     ("peer", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=next_mask("peer")))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        peaks[side] = (torch.cuda.max_memory_allocated() - base) / 2**20
    yield add(f"unilm mask L={L} fwd", "fused(entropy) new mask", "SDPA bool mask (1/sqrt d)",
              lambda: attention(q, k, v, next_rank("ours"), scale="entropy", backend="fused"),
              lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=next_mask("peer")),
              max_abs_diff_vs_prescaled_sdpa=f"{err_u:.2e}",
              peak_extra_mib=f"{peaks['ours']:.1f} vs {peaks['peer']:.1f}",
              note="a new RankMask every call; the kernel reads its ranks, not an L x L mask")
    yield _model_row(L, seg, opts, tk, backend="fused")
    if L <= (512 if opts.quick else 2048):
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        yield add(f"causal L={L} fwd+bwd", "fused(entropy)", "SDPA is_causal (1/sqrt d)",
                  _fwd_bwd(lambda: attention(qg, kg, vg, is_causal=True, scale="entropy", backend="fused"),
                           (qg, kg, vg)),
                  _fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), (qg, kg, vg)))
        yield add(f"unilm mask L={L} fwd+bwd", "fused(entropy) new mask", "SDPA bool mask (1/sqrt d)",
                  _fwd_bwd(lambda: attention(qg, kg, vg, next_rank("ours"), scale="entropy", backend="fused"),
                           (qg, kg, vg)),
                  _fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, attn_mask=next_mask("peer")),
                           (qg, kg, vg)))


def _fused_compiled_rows(L: int, q, k, v, seg, opts: BenchOptions, tk: dict) -> Iterator[BenchRow]:
    """The fused kernel inside a compiled graph (the custom op ``kexue::fused_attention_fwd``; no graph break)
    against compiled SDPA: causal, and UniLM with a new RankMask per call (SDPA: a new bool mask), and the
    compiled 4-layer model on each backend."""
    dev = opts.device
    next_rank, next_dense = _in_turn([RankMask.unilm(seg), RankMask.unilm(seg)]), _in_turn([unilm_mask(seg),
                                                                                           unilm_mask(seg)])
    cases = [
        (f"causal L={L} fwd", "compiled fused(entropy)", "compiled SDPA is_causal",
         lambda q, k, v: attention(q, k, v, is_causal=True, scale="entropy", backend="fused"),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), None),
        (f"unilm mask L={L} fwd", "compiled fused(entropy) new RankMask", "compiled SDPA bool mask",
         lambda q, k, v, m: attention(q, k, v, m, scale="entropy", backend="fused"),
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
         lambda side: next_rank(side) if side == "ours" else next_dense(side)),
    ]
    for case, ours_name, peer_name, ours_fn, peer_fn, masks in cases:
        try:
            timing, compile_s = _compile_and_compare(ours_fn, peer_fn, (q, k, v), masks, dev, tk)
            yield BenchRow.of(case, ours_name, peer_name, timing, TARGET, {"compile_s": compile_s})
        except Exception as exc:  # report, never fake
            yield BenchRow(case, ours_name, peer_name, float("nan"), None, TARGET,
                           {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    yield _model_row(L, seg, opts, tk, compiled=True, backend="fused")


def _model_row(L: int, seg: torch.Tensor, opts: BenchOptions, tk: dict, compiled: bool = False,
               backend: str = "sdpa") -> BenchRow:
    """A 4-layer Transformer (dim 128, 2 heads) forward on a fresh UniLM mask per call, Attention-E vs -O: the
    model prepares the mask once per forward and every layer reuses it. ``compiled``: both
    models under ``torch.compile`` (one graph each; the mask is built outside it, as a data loader would).
    ``backend="fused"``: the Attention-E model on the fused kernel, against the Attention-O model on SDPA."""
    from kexue.nn import Transformer

    dev = opts.device
    models = {}
    for scale in ("entropy", "standard"):
        torch.manual_seed(0)
        models[scale] = Transformer(256, dim=128, depth=4, heads=2, attention_scale=scale,
                                    attention_backend=backend if scale == "entropy" else "sdpa").to(dev).eval()
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(1)).to(dev)
    prefix, extra = "", {"note": "4 layers, dim 128, 2 heads; unilm_mask built anew in every call"}
    peer_name = "same, scale='standard'"
    if backend != "sdpa":
        prefix, peer_name = f"{backend} ", "Transformer(scale='standard') on SDPA"

    def fwd(scale: str) -> Callable[[], torch.Tensor]:
        # (the fused kernel reads ranks: its model gets a RankMask)
        build = RankMask.unilm if backend == "fused" and scale == "entropy" else unilm_mask

        def call() -> torch.Tensor:
            with torch.no_grad():
                return models[scale](ids, mask=build(seg)).logits
        return call

    if compiled:
        prefix = "compiled " + prefix
        try:
            times = []
            torch._dynamo.reset()
            for scale in models:
                models[scale] = torch.compile(models[scale], dynamic=False, fullgraph=True)
                times.append(time_once(fwd(scale), device=dev))
            extra["compile_s"] = " / ".join(f"{t:.1f}" for t in times)
        except Exception as exc:  # no C++ toolchain on a CPU: report, never fake
            return BenchRow(f"unilm model L={L} fwd", f"{prefix}Transformer(scale='entropy')", peer_name,
                            float("nan"), None, TARGET, {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    timing = compare(fwd("entropy"), fwd("standard"), device=dev, **tk)
    return BenchRow.of(f"unilm model L={L} fwd", f"{prefix}Transformer(scale='entropy')", peer_name,
                       timing, TARGET, extra)


def _compiled_rows(L: int, q, k, v, seg, opts: BenchOptions, tk: dict) -> Iterator[BenchRow]:
    """Each side compiled on its own (``torch.compile``, default backend, static shapes): entropy attention
    against SDPA, causal and with a new UniLM mask per call, and the 4-layer model. The one-off compile times
    are in ``extra``; a failed compile (no C++ toolchain on a CPU) is reported as such, never faked."""
    dev = opts.device
    next_mask = _in_turn([unilm_mask(seg), unilm_mask(seg)])
    cases = [
        (f"causal L={L} fwd", "compiled attention(entropy)", "compiled SDPA is_causal",
         lambda q, k, v: attention(q, k, v, is_causal=True, scale="entropy"),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), None),
        (f"unilm mask L={L} fwd", "compiled attention(entropy) new mask", "compiled SDPA bool mask",
         lambda q, k, v, m: attention(q, k, v, m, scale="entropy"),
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), next_mask),
    ]
    for case, ours_name, peer_name, ours_fn, peer_fn, masks in cases:
        try:
            timing, compile_s = _compile_and_compare(ours_fn, peer_fn, (q, k, v), masks, dev, tk)
            yield BenchRow.of(case, ours_name, peer_name, timing, TARGET, {"compile_s": compile_s})
        except Exception as exc:  # compilation needs a working C++ toolchain on a CPU: report, never fake
            yield BenchRow(case, ours_name, peer_name, float("nan"), None, TARGET,
                           {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    yield _model_row(L, seg, opts, tk, compiled=True)


def _compile_and_compare(ours_fn: Callable, peer_fn: Callable, qkv: tuple, masks: Callable | None, dev: str,
                         tk: dict):
    """Compile each side (static shapes, one graph), time its first call (the compile), then compare; with
    ``masks`` each call gets the side's next mask as a fourth argument."""
    compiled = {}
    compile_s = []
    torch._dynamo.reset()             # (not between the two sides: a reset drops every compiled function)
    for side, fn in (("ours", ours_fn), ("peer", peer_fn)):
        compiled[side] = torch.compile(fn, dynamic=False, fullgraph=True)

        def first(side: str = side) -> object:
            with torch.no_grad():
                return compiled[side](*qkv, *(() if masks is None else (masks(side),)))

        compile_s.append(time_once(first, device=dev))

    def call(side: str) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return compiled[side](*qkv, *(() if masks is None else (masks(side),)))
        return run

    return compare(call("ours"), call("peer"), device=dev, **tk), " / ".join(f"{t:.1f}" for t in compile_s)


def _flex_rows(L: int, q, k, v, seg, umask, opts: BenchOptions, tk: dict) -> list[BenchRow]:
    from torch.nn.attention.flex_attention import flex_attention

    rows: list[BenchRow] = []
    dev = opts.device
    nb = q.shape[0]
    seg = seg.expand(nb, -1)                     # the predicate reads seg[b] for every batch row flex visits
    built = []
    t_build = time_once(lambda: built.append(to_block_mask(unilm(seg), nb, None, L, L, device=dev)), device=dev)
    bm = built[0]
    dense = render_mask(unilm(seg), nb, 1, L, L, dev)
    extra_common = {"block_mask_build_s": f"{t_build:.3f}", "block_sparsity": f"{bm.sparsity():.1f}%"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "flex_attention called without torch.compile": the point of the row
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
            err = float((flex_attention(q, k, v, block_mask=bm) - ref).abs().max())
        eager_kw = tk if L < 2048 else {"repeats": 3, "rounds": 1}
        timing = compare(lambda: flex_attention(q, k, v, block_mask=bm),
                         lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=umask),
                         device=dev, **eager_kw)
    rows.append(BenchRow.of(f"unilm mask L={L} fwd", "flex_attention eager", "SDPA bool mask", timing,
                            "report only (eager flex is a debug path on CPU)",
                            {**extra_common, "max_abs_diff": f"{err:.2e}"}))
    if opts.quick:
        return rows
    try:
        compiled = torch.compile(flex_attention, dynamic=False)
        outs = []

        def first() -> None:
            with torch.no_grad():
                outs.append(compiled(q, k, v, block_mask=bm))

        t_compile = time_once(first, device=dev)
        out = outs[0]
        err = float((out - ref).abs().max())
        with torch.no_grad():
            timing = compare(lambda: compiled(q, k, v, block_mask=bm),
                             lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=umask),
                             device=dev, **tk)
        rows.append(BenchRow.of(f"unilm mask L={L} fwd", "flex_attention compiled", "SDPA bool mask", timing,
                                "report only",
                                {**extra_common, "compile_s": f"{t_compile:.1f}", "max_abs_diff": f"{err:.2e}"}))
    except Exception as exc:  # compilation needs a working C++ toolchain; report, never fake
        rows.append(BenchRow(f"unilm mask L={L} fwd", "flex_attention compiled", "SDPA bool mask", float("nan"),
                             None, "report only", {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}))
    return rows
