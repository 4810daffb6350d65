"""Optional GPU kernels for :mod:`kexue.attention` -- experimental, imported only when asked for.

:func:`fused_attention` (``attention(..., backend="fused")``, ``Transformer(attention_backend="fused")``) computes
the masks of article 3 from O(L) rank vectors and the entropy scale of article 8 inside one Triton
flash-attention kernel. The kernels are compile-checked for sm_80 and sm_90 and tested in Triton's interpreter
(``pytest -m kernels``), but have not yet run on a GPU; :func:`~kexue.attention.attention` on SDPA is the
supported path.
"""

from .fused import fused_attention, fused_available

__all__ = ["fused_attention", "fused_available"]
