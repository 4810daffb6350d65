"""The orthogonal matrix taking one unit vector to another (Su Jianlin, kexue.fm/archives/8453).

Given directions ``a`` and ``b`` in R^d, :func:`orthogonal_map` returns an :class:`OrthogonalMap` ``T`` with
``T a = b``. Every kind is stored as at most two Householder reflections and a sign,

    T = s * H(v_k) ... H(v_1),        H(v) = I - 2 v v^T / (v^T v),

so applying it to a vector costs O(d) and the d x d matrix is never formed unless :meth:`OrthogonalMap.matrix`
is asked for. The kinds are the article's three closed forms plus a stable chooser:

* ``"householder"`` -- the reflection about the hyperplane orthogonal to ``a - b`` (det -1, symmetric).
* ``"symmetric"`` -- Su's form ``(a+b)(a+b)^T / (1 + a.b) - I``, which equals ``-H(a + b)``
  (det (-1)^(d-1), symmetric, also maps ``b`` to ``a``).
* ``"rotation"`` -- the proper rotation in the plane of ``a`` and ``b`` (det +1), equal to the article's
  ``I + 2 b a^T - (a+b)(a+b)^T / (1 + a.b)``. It is built as ``H(b + m) H(a + m)``: with ``m = b`` when
  ``a.b >= 0`` (then it is ``H(b) H(a + b)``), and with ``m`` the unit vector of the (a, b) plane orthogonal
  to ``a`` on ``b``'s side when ``a.b < 0``. Both normals then have norm >= sqrt(2), so no denominator comes
  near 0, even next to ``a = -b``.
* ``"auto"`` -- ``-H(a + b)`` when ``a.b >= 0`` and ``H(a - b)`` when ``a.b < 0``: the normal always has
  squared norm >= 2. Use it when any orthogonal T with ``T a = b`` will do.

Degenerate pairs. Where a kind's own normal vanishes (``a = b`` for Householder, ``a = -b`` for symmetric,
``a = -b`` for the plane of the rotation), the map is completed with a fixed unit vector ``p(a)`` orthogonal
to ``a``: ``p(a)`` is ``e_k - a_k a`` normalised, where ``k`` is the first index of the smallest ``|a_k|``.
Then Householder is the reflection ``H(p(a))`` (it fixes ``a``), symmetric is ``-H(p(a))`` and the rotation
at ``a = -b`` turns by pi in the plane spanned by ``a`` and ``p(a)``. The switch happens when the normal
(or, for the rotation, the component of ``b`` orthogonal to ``a``) is shorter than sqrt(eps) of the
coefficient dtype (about 1.5e-8 in fp64), where the map error of the fallback is below that same bound.

Precision. The unit vectors and the reflection normals are computed in float64 (they cost O(d) per pair),
which is what keeps ``"householder"`` accurate even for ``a.b = 1 - 1e-7`` in float32; the map is then
applied in the working dtype (fp16/bf16 are applied in fp32) and returned in the input dtype.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_tensor, compute_dtype

KINDS = ("auto", "householder", "rotation", "symmetric")

__all__ = ["KINDS", "OrthogonalMap", "naive_matrix", "orthogonal_map"]


def _coef_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the O(d) set-up is done in float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _validate_pair(a: object, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    a = check_tensor("a", a, floating=True, min_dim=1)
    b = check_tensor("b", b, floating=True, min_dim=1)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b must have the same last dimension, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.shape[-1] < 2:
        raise ValueError(f"a and b must have last dimension >= 2, got {a.shape[-1]}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError as exc:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not broadcast: {exc}") from None
    return a, b


def _unit(name: str, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    v = v.to(dtype)
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    with torch.no_grad():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got a non-finite entry")
        if bool((n == 0).any()):
            raise ValueError(f"{name} must be a nonzero vector (it is normalised), got a zero vector")
    return v / n


def _perp(a: torch.Tensor) -> torch.Tensor:
    """A fixed unit vector orthogonal to unit ``a``: e_k - a_k a normalised, k = first argmin |a_k|."""
    k = a.detach().abs().argmin(dim=-1, keepdim=True)
    ak = torch.gather(a, -1, k)
    e = torch.zeros_like(a).scatter(-1, k, 1.0)
    p = e - ak * a
    # ||p||^2 = 1 - a_k^2 >= 1 - 1/d >= 1/2, so this division is always safe
    return p / torch.linalg.vector_norm(p, dim=-1, keepdim=True)


def _safe_normalise(w: torch.Tensor, fallback: torch.Tensor, tol: float) -> torch.Tensor:
    n = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    small = n < tol
    return torch.where(small, fallback, w / torch.where(small, torch.ones_like(n), n))


def _normals(a: torch.Tensor, b: torch.Tensor, kind: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reflection normals (applied first to last) and the sign, for unit a, b already broadcast."""
    tol = math.sqrt(torch.finfo(a.dtype).eps)
    dot = (a * b).sum(-1, keepdim=True)
    one = torch.ones_like(dot)
    # After rounding, ||a||^2 - ||b||^2 = (a - b).(a + b) is a few eps rather than 0, and a single reflection
    # amplifies it by 1 / ||normal||. Aiming at r b with r^2 = ||a||^2 / ||b||^2 (r ~ 1 + delta / 2) removes
    # that first-order error, so H(a - b) stays accurate to ~eps even for a.b = 1 - 1e-7 in float64.
    half_delta = 0.5 * ((a - b) * (a + b)).sum(-1, keepdim=True)
    # the fallback normal p(a) is only built where some pair needs it (one host check per map)
    if kind == "householder":
        v = (a - b) - half_delta * b
        small = torch.linalg.vector_norm(v, dim=-1, keepdim=True) < tol
        if bool(small.any()):
            v = torch.where(small, _perp(a), v)
        return [v], one
    if kind == "symmetric":
        u = (a + b) + half_delta * b
        small = torch.linalg.vector_norm(u, dim=-1, keepdim=True) < tol
        if bool(small.any()):
            u = torch.where(small, _perp(a), u)
        return [u], -one
    if kind == "rotation":
        if not bool((dot < 0).any()):
            return [a + b, b + b], one
        w = b - dot * a
        nw = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        if bool((nw < tol).any()):
            c = _safe_normalise(w, _perp(a), tol)
        else:
            c = w / nw
        m = torch.where(dot >= 0, b, c)
        return [a + m, b + m], one
    # auto
    pos = dot >= 0
    v = torch.where(pos, (a + b) + half_delta * b, (a - b) - half_delta * b)
    return [v], torch.where(pos, -one, one)


class OrthogonalMap:
    """An orthogonal map ``T`` with ``T a = b``, stored as ``sign * H(v_k) ... H(v_1)``.

    Build it with :func:`orthogonal_map`. ``m(x)`` applies ``T`` to the last dimension of ``x`` in O(d) per
    vector (``x`` broadcasts against the batch shape of ``a`` and ``b``); ``m.matrix()`` forms the d x d
    matrix (batched); ``m.inverse()`` is ``T^T``; ``m.det()`` is the determinant, known in closed form.

    Example:
        >>> import torch
        >>> m = orthogonal_map(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), kind="rotation")
        >>> m(torch.tensor([1.0, 0.0, 0.0]))
        tensor([0., 1., 0.])
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, kind: str, normals: list[torch.Tensor],
                 sign: torch.Tensor, dtype: torch.dtype) -> None:
        self.a = a
        self.b = b
        self.kind = kind
        self.normals = normals
        self.sign = sign
        self.dtype = dtype
        self._betas = [2.0 / (v * v).sum(-1) for v in normals]
        # for a single (unbatched) map the sign is one number, folded into the last rank-1 update
        self._sign_value = float(sign.reshape(-1)[0]) if a.dim() == 1 else 1.0

    @property
    def dim(self) -> int:
        """The dimension d of the vectors the map acts on."""
        return self.a.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        """The leading (batch) shape of the map."""
        return self.a.shape[:-1]

    def _apply(self, x: torch.Tensor, work: torch.dtype, unsqueeze: bool = False) -> torch.Tensor:
        """y = sign * H(v_k) ... H(v_1) x with H(v) x = x - beta v (v . x), beta = 2 / (v . v)."""
        d = self.dim
        vs = [v.to(work) for v in self.normals]
        betas = [beta.to(work) for beta in self._betas]
        if self.a.dim() == 1 and not unsqueeze:
            # one map, many vectors: a matrix-vector product and a rank-1 update per reflection, no temporaries
            shape = x.shape
            y = x.to(work).reshape(-1, d)
            # after the first update y is our own buffer: update it in place when no graph needs it
            inplace = not (torch.is_grad_enabled() and (y.requires_grad or any(v.requires_grad for v in vs)))
            for i, (v, beta) in enumerate(zip(vs, betas)):
                s = self._sign_value if i == len(vs) - 1 else 1.0
                p = (y @ v) * beta
                y = y.addr_(p, v, beta=s, alpha=-s) if inplace and i > 0 else torch.addr(y, p, v, beta=s, alpha=-s)
            return y.reshape(shape)
        # batched maps: broadcast x against the batch shape; (x . v) as a batched matmul
        y = x.to(work)
        for v, beta in zip(vs, betas):
            if unsqueeze:
                v, beta = v.unsqueeze(-2), beta.unsqueeze(-1)
            proj = (y.unsqueeze(-2) @ v.unsqueeze(-1)).squeeze(-1)  # (..., 1)
            y = torch.addcmul(y, proj * beta.unsqueeze(-1), v, value=-1.0)
        sign = self.sign.to(work)
        return y * (sign.unsqueeze(-1) if unsqueeze else sign)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply T to the last dimension of ``x`` (O(d) per vector); returns the promoted input dtype."""
        x = check_tensor("x", x, floating=True, min_dim=1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {tuple(x.shape)}")
        try:
            torch.broadcast_shapes(x.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"x of shape {tuple(x.shape)} does not broadcast against the map's batch shape "
                             f"{tuple(self.batch_shape)}") from None
        out = torch.promote_types(x.dtype, self.dtype)
        return self._apply(x, compute_dtype(out)).to(out)

    def matrix(self) -> torch.Tensor:
        """The dense matrix T, of shape ``batch_shape + (d, d)``, in the map's dtype."""
        d = self.dim
        work = compute_dtype(self.dtype)
        eye = torch.eye(d, dtype=work, device=self.a.device)
        # rows of the result are T e_j, so transpose to get columns; a single map uses the rank-1 path
        rows = self._apply(eye, work, unsqueeze=self.a.dim() > 1)
        return rows.transpose(-1, -2).to(self.dtype)

    def inverse(self) -> OrthogonalMap:
        """T^{-1} = T^T: the same reflections in reverse order (it maps b to a)."""
        return OrthogonalMap(self.b, self.a, self.kind, self.normals[::-1], self.sign, self.dtype)

    def det(self) -> torch.Tensor:
        """det T in closed form: (-1)^(number of reflections) * sign^d, shape ``batch_shape``."""
        s = self.sign.squeeze(-1).to(torch.float64)
        return ((-1.0) ** len(self.normals)) * s ** self.dim

    def __repr__(self) -> str:
        return (f"OrthogonalMap(kind={self.kind!r}, dim={self.dim}, batch_shape={tuple(self.batch_shape)}, "
                f"dtype={self.dtype})")


def orthogonal_map(a: torch.Tensor, b: torch.Tensor, *, kind: str = "auto") -> OrthogonalMap:
    """The orthogonal map taking the direction of ``a`` to the direction of ``b`` (kexue.fm/archives/8453).

    ``a`` and ``b`` have shape ``(..., d)`` (batch dimensions broadcast) and are normalised first. ``kind`` is
    ``"householder"`` (reflection about the hyperplane orthogonal to a - b, det -1), ``"rotation"`` (proper
    rotation in the (a, b) plane, det +1), ``"symmetric"`` (Su's ``(a+b)(a+b)^T/(1+a.b) - I``, det
    (-1)^(d-1)) or ``"auto"`` (``-H(a+b)`` if a.b >= 0 else ``H(a-b)``, never a denominator below 2). At
    ``a = -b`` the rotation turns by pi in the plane of ``a`` and ``p(a) = normalise(e_k - a_k a)``, ``k`` the
    first index of the smallest ``|a_k|``; see the module docstring for every degenerate case.

    Raises ``TypeError`` for non-tensors or non-floating tensors and ``ValueError`` for a zero or non-finite
    vector, mismatched last dimensions, non-broadcastable batch shapes or ``d < 2``.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
        >>> m = orthogonal_map(a, b, kind="symmetric")
        >>> bool(torch.allclose(m(a / a.norm()), b / b.norm(), atol=1e-6))
        True
        >>> round(float(m.det()), 3)
        1.0
    """
    a, b = _validate_pair(a, b)
    kind = check_choice("kind", kind, KINDS)
    dtype = torch.promote_types(a.dtype, b.dtype)
    cdt = _coef_dtype(a.device)
    ua, ub = _unit("a", a, cdt), _unit("b", b, cdt)
    shape = torch.broadcast_shapes(ua.shape, ub.shape)
    ua, ub = ua.expand(shape), ub.expand(shape)
    normals, sign = _normals(ua, ub, kind)
    return OrthogonalMap(ua, ub, kind, normals, sign, dtype)


def naive_matrix(a: torch.Tensor, b: torch.Tensor, *, kind: str = "householder") -> torch.Tensor:
    """The article's closed forms, computed literally in the input dtype (the baseline the study measures).

    ``kind`` is ``"householder"`` (``I - (a-b)(a-b)^T / (1 - a.b)``), ``"rotation"``
    (``I + 2 b a^T - (a+b)(a+b)^T / (1 + a.b)``) or ``"symmetric"`` (``(a+b)(a+b)^T / (1 + a.b) - I``), after
    normalising ``a`` and ``b`` in their own dtype. There is no degenerate-case handling: a = b gives NaN
    for Householder and a = -b gives NaN for the other two, as the formulas do.

    Example:
        >>> import torch
        >>> T = naive_matrix(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), kind="rotation")
        >>> T @ torch.tensor([1.0, 0.0])
        tensor([0., 1.])
    """
    a, b = _validate_pair(a, b)
    kind = check_choice("kind", kind, ("householder", "rotation", "symmetric"))
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    a, b = torch.broadcast_tensors(a, b)
    d = a.shape[-1]
    eye = torch.eye(d, dtype=a.dtype, device=a.device)
    cos = (a * b).sum(-1)[..., None, None]
    outer = lambda u, w: u.unsqueeze(-1) * w.unsqueeze(-2)  # noqa: E731
    if kind == "householder":
        v = a - b
        return eye - outer(v, v) / (1 - cos)
    u = a + b
    if kind == "rotation":
        return eye + 2 * outer(b, a) - outer(u, u) / (1 + cos)
    return outer(u, u) / (1 + cos) - eye
