"""Attention: masks as predicates (article 3), linear attention (article 5), length-aware scales (article 8), a
stateless SDPA entry point.

* :mod:`kexue.attention.masks` — predicates, combinators, renderers and builders (article 3);
* :mod:`kexue.attention.ranks` — :class:`RankMask`, the same masks as O(L) rank vectors;
* :mod:`kexue.attention.scaling` — the entropy-invariant scale, attention entropy, :func:`resolve_scale` (article 8);
* :mod:`kexue.attention.prepared` — :class:`PreparedMask` / :func:`prepare_mask`: a mask made ready once per forward;
* :mod:`kexue.attention.core` — :func:`attention`, stateless, on SDPA;
* :mod:`kexue.attention.reference` — :func:`attention_reference`, what every fast path is tested against;
* :mod:`kexue.attention.linear` — linear attention (article 5): feature maps (exp, elu+1, relu, FAVOR+, hyperbolic),
  :func:`linear_attention` (chunked causal, recurrent state), :func:`linear_attention_step`,
  :func:`linear_attention_reference` and the :class:`LinearAttention` layer;
* :mod:`kexue.attention.kernels` — the experimental fused Triton kernel (not imported here).

Example:
    >>> import torch
    >>> from kexue.attention import attention, prepare_mask, unilm_mask
    >>> q = k = v = torch.randn(1, 2, 6, 8)
    >>> pm = prepare_mask(unilm_mask(torch.tensor([[0, 0, 0, 1, 1, 1]])), q_len=6)   # once per forward
    >>> attention(q, k, v, pm, scale="entropy").shape
    torch.Size([1, 2, 6, 8])
"""

from __future__ import annotations

from .core import attention
from .linear import (
    FEATURE_MAPS,
    Elu1FeatureMap,
    ExpFeatureMap,
    FavorPlus,
    FavorPlusHyperbolic,
    FeatureMap,
    LinearAttention,
    LinearAttentionCache,
    LinearAttentionState,
    ReluFeatureMap,
    linear_attention,
    linear_attention_reference,
    linear_attention_step,
    linear_attention_weights,
    make_feature_map,
    random_features,
)
from .masks import (
    MaskMod,
    and_masks,
    causal,
    causal_mask,
    document_mask,
    documents,
    from_dense,
    full,
    or_masks,
    padding,
    padding_mask,
    permutation,
    permutation_mask,
    permute_for_plm,
    prefix_lm,
    prefix_lm_mask,
    render_mask,
    sliding_window,
    sliding_window_mask,
    to_additive_mask,
    to_block_mask,
    unilm,
    unilm_mask,
)
from .prepared import PreparedMask, prepare_mask
from .ranks import RankMask
from .reference import attention_reference
from .scaling import (
    BASE,
    MIN_N,
    LogNScale,
    attention_entropy,
    entropy_invariant_scale,
    keys_per_row,
    logn_factor,
    resolve_scale,
)

__all__ = [
    "MaskMod", "and_masks", "or_masks", "render_mask", "to_block_mask", "to_additive_mask",
    "full", "causal", "padding", "sliding_window", "unilm", "prefix_lm", "permutation", "documents", "from_dense",
    "causal_mask", "padding_mask", "unilm_mask", "prefix_lm_mask", "permutation_mask", "sliding_window_mask",
    "document_mask", "permute_for_plm", "RankMask",
    "BASE", "MIN_N", "entropy_invariant_scale", "logn_factor", "keys_per_row", "attention_entropy", "LogNScale",
    "resolve_scale",
    "PreparedMask", "prepare_mask", "attention", "attention_reference",
    "FEATURE_MAPS", "FeatureMap", "ExpFeatureMap", "Elu1FeatureMap", "ReluFeatureMap", "FavorPlus",
    "FavorPlusHyperbolic",
    "make_feature_map", "random_features", "LinearAttentionState", "linear_attention", "linear_attention_step",
    "linear_attention_reference", "linear_attention_weights", "LinearAttention", "LinearAttentionCache",
]
