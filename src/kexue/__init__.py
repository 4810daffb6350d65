"""kexue: eight techniques from Su Jianlin's Scientific Spaces articles, as tested PyTorch pieces.

Subpackages, one technique one home:

- :mod:`kexue.augment` — mixup, SamplePairing, CutMix, manifold mixup (article 1, kexue.fm/archives/5693)
- :mod:`kexue.attention` — attention masks (article 3, /6933) and the entropy-invariant scale (article 8, /8823)
- :mod:`kexue.init` — initialisation from the geometric view (article 4, /7180)
- :mod:`kexue.linalg` — the orthogonal map taking a to b (article 6, /8453)
- :mod:`kexue.losses` — margin softmax (article 7, /8656)
- :mod:`kexue.metrics`, :mod:`kexue.nn`, :mod:`kexue.train`, :mod:`kexue.data` — the shared pieces

>>> import torch, kexue
>>> m = kexue.orthogonal_map(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
>>> m(torch.tensor([1.0, 0.0, 0.0])).tolist()
[0.0, 1.0, 0.0]
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import attention, augment, data, init, linalg, losses, metrics, nn  # noqa: E402
from .attention import attention as attention_fn  # noqa: E402
from .linalg import OrthogonalMap, orthogonal_map  # noqa: E402

__all__ = ["OrthogonalMap", "__version__", "attention", "attention_fn", "augment", "data", "init", "linalg",
           "losses", "metrics", "nn", "orthogonal_map"]
