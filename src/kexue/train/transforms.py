"""Standard image augmentations done in torch on whole batches: random horizontal flip and random crop
with padding, drawn per sample from a ``torch.Generator`` (no torchvision, no NumPy RNG).

Both work on float or integer (e.g. uint8) batches ``[N, C, H, W]`` on any device and return a new tensor
of the same dtype; the random draws are made on the CPU with the given generator (so a CPU generator works
for CUDA batches and the result does not depend on the device).
"""

from __future__ import annotations

import torch

from kexue._checks import check_choice, check_tensor

__all__ = ["random_horizontal_flip", "random_crop", "FlipCrop"]

_PAD_MODES = ("reflect", "zero", "replicate")


def _check_batch(x: torch.Tensor) -> None:
    check_tensor("x", x, dim=4)
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"x must be a real image batch (float or integer), got dtype {x.dtype}")


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")


def random_horizontal_flip(x: torch.Tensor, *, p: float = 0.5, generator: torch.Generator | None = None
                           ) -> torch.Tensor:
    """Flip each image of ``x`` ``[N, C, H, W]`` left-right with probability ``p`` (one draw per sample).

    Example:
        >>> import torch
        >>> x = torch.arange(8.).reshape(2, 1, 2, 2)
        >>> g = torch.Generator().manual_seed(0)
        >>> random_horizontal_flip(x, p=1.0, generator=g)[0, 0]
        tensor([[1., 0.],
                [3., 2.]])
    """
    _check_batch(x)
    _check_generator(generator)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    flip = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def _source_index(pos: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map padded-frame positions (may be < 0 or >= size) to source indices, plus a validity mask for zero."""
    if mode == "reflect":
        pos = pos.abs()
        pos = torch.where(pos >= size, 2 * (size - 1) - pos, pos)
        return pos, None
    if mode == "replicate":
        return pos.clamp(0, size - 1), None
    valid = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), valid


def random_crop(x: torch.Tensor, *, size: int | tuple[int, int] | None = None, padding: int = 4,
                mode: str = "reflect", generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad ``x`` ``[N, C, H, W]`` by ``padding`` on each side and cut a random ``size`` window per sample
    (default: the original ``H x W``, the usual CIFAR "pad 4 and crop 32" augmentation).

    ``mode`` is how the border is filled: ``"reflect"`` (mirror without repeating the edge, like
    ``F.pad(mode="reflect")``), ``"zero"``, or ``"replicate"``. Offsets are uniform over all positions.

    Example:
        >>> import torch
        >>> x = torch.rand(4, 3, 32, 32)
        >>> g = torch.Generator().manual_seed(0)
        >>> random_crop(x, padding=4, generator=g).shape
        torch.Size([4, 3, 32, 32])
    """
    _check_batch(x)
    _check_generator(generator)
    check_choice("mode", mode, _PAD_MODES)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    n, _, h, w = x.shape
    if size is None:
        ch, cw = h, w
    elif isinstance(size, int) and not isinstance(size, bool):
        ch = cw = size
    elif isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) for s in size):
        ch, cw = size
    else:
        raise TypeError(f"size must be an int, a (height, width) tuple or None, got {size!r}")
    if not (0 < ch <= h + 2 * padding and 0 < cw <= w + 2 * padding):
        raise ValueError(f"size {(ch, cw)} must be positive and fit the padded image "
                         f"{(h + 2 * padding, w + 2 * padding)}")
    if mode == "reflect" and (padding >= h or padding >= w):
        raise ValueError(f"reflect padding must be smaller than the image side, got padding={padding} for {h}x{w}")
    oy = torch.randint(0, h + 2 * padding - ch + 1, (n,), generator=generator)
    ox = torch.randint(0, w + 2 * padding - cw + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(ch) - padding).to(x.device)  # [N, ch] positions in the source frame
    cols = (ox[:, None] + torch.arange(cw) - padding).to(x.device)
    rsrc, rvalid = _source_index(rows, h, mode)
    csrc, cvalid = _source_index(cols, w, mode)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rsrc[:, :, None], csrc[:, None, :]]  # [N, ch, cw, C]
    if rvalid is not None:
        keep = rvalid[:, :, None] & cvalid[:, None, :]
        out = out * keep[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2).contiguous()


class FlipCrop:
    """The standard training augmentation as one callable for :func:`kexue.train.fit`'s ``augment=``:
    random crop with ``padding`` (``mode`` border), then a random horizontal flip (``flip=False`` to
    skip it, e.g. for digits).

    Example:
        >>> import torch
        >>> aug = FlipCrop(padding=4)
        >>> aug(torch.rand(8, 3, 32, 32), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, *, padding: int = 4, mode: str = "reflect", flip: bool = True, p: float = 0.5) -> None:
        check_choice("mode", mode, _PAD_MODES)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {padding!r}")
        self.padding, self.mode, self.flip, self.p = padding, mode, bool(flip), p

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.padding > 0:
            x = random_crop(x, padding=self.padding, mode=self.mode, generator=generator)
        if self.flip:
            x = random_horizontal_flip(x, p=self.p, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"FlipCrop(padding={self.padding}, mode={self.mode!r}, flip={self.flip}, p={self.p})"
