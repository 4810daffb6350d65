"""Softmax attention: masks as predicates (article 3), length-aware scales (article 8), an SDPA entry point.

See :mod:`kexue.attention.masks`, :mod:`kexue.attention.scaling` and :mod:`kexue.attention.core`.
"""

from __future__ import annotations

from .core import attention, attention_reference
from .fused import fused_attention, fused_available
from .masks import (
    MaskMod,
    RankMask,
    and_masks,
    causal,
    causal_mask,
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
from .scaling import LogNScale, attention_entropy, entropy_invariant_scale, keys_per_row, logn_factor

__all__ = [
    "MaskMod", "and_masks", "or_masks", "render_mask", "to_block_mask", "to_additive_mask", "full", "causal",
    "padding",
    "sliding_window_mask", "sliding_window", "unilm", "prefix_lm", "permutation", "from_dense",
    "causal_mask", "padding_mask", "unilm_mask", "prefix_lm_mask", "permutation_mask", "permute_for_plm",
    "entropy_invariant_scale", "logn_factor", "keys_per_row", "attention_entropy", "LogNScale",
    "attention", "attention_reference", "RankMask", "fused_attention", "fused_available",
]
