"""Shared linear algebra, written once and out of place so it runs under vmap / grad / compile."""

from __future__ import annotations

import functools
import math

import torch
from einops import einsum, rearrange
from torch import Tensor

from . import _keys


def row_norm(W: Tensor) -> Tensor:
    """‖W[o, :]‖₂ for each output row: (d_out, d_in) -> (d_out,)."""
    return torch.linalg.vector_norm(W, dim=-1)


def col_norm(W: Tensor) -> Tensor:
    """‖W[:, i]‖₂ for each input column: (d_out, d_in) -> (d_in,)."""
    return torch.linalg.vector_norm(W, dim=-2)


def kaiming_uniform(gen: torch.Generator, shape: tuple[int, ...], fan_in: int) -> Tensor:
    """torch/peft's kaiming_uniform_(a=√5): U(-1/√fan_in, 1/√fan_in), drawn from ``gen`` (fp32, CPU)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound


def truncated_normal(gen: torch.Generator, shape: tuple[int, ...], std: float, mean: float = 0.0, bound: float = 2.0) -> Tensor:
    """mean + std·N(0,1) truncated to ±bound·std, by resampling out-of-range draws (fp32, CPU)."""
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    for _ in range(100):
        bad = z.abs() > bound
        if not bool(bad.any()):
            break
        z = torch.where(bad, torch.randn(shape, generator=gen, dtype=torch.float32), z)
    return mean + std * z.clamp(-bound, bound)


def top_svd(W: Tensor, r: int, *, niter: int | None = None, key: _keys.Key = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r singular triplets of W in fp32: U (d_out, r), S (r,), V (d_in, r), W ≈ U diag(S) Vᵀ.

    ``niter=None`` is the exact SVD; an int runs a randomized SVD with that many power
    iterations (Halko et al. 2011; what peft's ``pissa_niter_K`` does), seeded from ``key``.
    """
    W32 = W.detach().to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].T
    d_out, d_in = W32.shape
    q = min(r + 10, d_out, d_in)  # oversampling, as torch.svd_lowrank
    omega = torch.randn(d_in, q, generator=_keys.generator(key), dtype=torch.float32).to(W32.device)
    Y = W32 @ omega
    Q = torch.linalg.qr(Y).Q
    for _ in range(niter):
        Z = torch.linalg.qr(W32.T @ Q).Q
        Q = torch.linalg.qr(W32 @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ W32, full_matrices=False)
    return (Q @ Ub)[:, :r], S[:r], Vh[:r].T


def add_product(y: Tensor, h: Tensor, M: Tensor) -> Tensor:
    """y + h Mᵀ for h (..., r) and M (d_out, r): an adapter's low-rank product added to a layer output.

    With a stack M (K, d_out, r), y (K, ..., d_out) and h (K, ..., r): each slice k gets its own M_k.
    ``y`` must be a fresh output that the caller owns (e.g. just returned by ``F.linear``). In plain
    eager code the product is accumulated into ``y`` in place (one GEMM with β = 1, or one
    ``baddbmm_`` for a stack): no temporary of y's size to allocate, fill and add — on CPU that
    temporary (fresh pages) costs more than the rank-r GEMM itself. Under one ``vmap`` level (K
    adapters, an alpha sweep) the same holds for the whole batch when ``y`` is batched there: one
    ``baddbmm_`` on the batched values, or one GEMM when M is shared (``_batched_sum``). Exact either way (autograd never
    needs a linear layer's output). In place only on ``y`` itself when autograd records: writing
    through a reshaping view of it would make backward copy the whole output, so an N-d ``y`` then
    gets one fused out-of-place product (the runtime hands variants row matrices, see
    ``_call_mode.row_handler``). Out of place under ``torch.compile`` (inductor fuses the add itself), under
    ``grad``/nested transforms and when ``y`` is not batched but the product is.
    """
    stacked = M.ndim == 3
    rows = (y.shape[0], -1) if stacked else (-1,)
    fits = y.dtype == h.dtype == M.dtype and y.shape[:-1] == h.shape[:-1] and y.ndim >= 1
    recording = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or M.requires_grad)
    if fits and y.is_contiguous() and eager_values(y, h, M):
        if y.ndim == len(rows) + 1:  # already a matrix (a stack of them): accumulate into it, no view
            (y.baddbmm_ if stacked else y.addmm_)(h, M.mT)
            return y
        y3, h3 = y.view(*rows, y.shape[-1]), h.reshape(*rows, h.shape[-1])
        if recording:  # in place on a view would make autograd copy the whole output in backward
            return (torch.baddbmm if stacked else torch.addmm)(y3, h3, M.mT).view(y.shape)
        (y3.baddbmm_ if stacked else y3.addmm_)(h3, M.mT)
        return y
    batched = _vmapped_values(y, h, M) if fits and not stacked else None
    if batched is not None:
        level, yv, hv, Mv = batched
        return _batched_sum(level, yv.view(yv.shape[0], -1, y.shape[-1]), hv, Mv, M, y.shape)
    if stacked:
        return y + torch.bmm(h.reshape(*rows, h.shape[-1]), M.mT).view(y.shape)
    return y + torch.nn.functional.linear(h, M)


def linear_add(x: Tensor, W: Tensor, b: Tensor | None, h: Tensor, M: Tensor) -> Tensor:
    """x Wᵀ + b + h Mᵀ: a layer's own product plus an adapter's low-rank product (h (..., r), M (d_out, r)).

    Under one ``vmap`` level with x batched there (K adapters, an alpha sweep past the first adapted
    layer) and W, b shared, the layer's product runs on the batched values as one ``addmm`` over all
    K·rows — the bias inside the GEMM as in plain eager (torch's batching rule for ``linear`` adds
    it in a separate pass over the output) — and h Mᵀ is accumulated into it by one ``baddbmm_``, or
    by one GEMM over all K·rows when M is shared (out of place while autograd records). Everywhere
    else ``add_product(F.linear(x, W, b), h, M)``.
    """
    F = torch._C._functorch  # pyright: ignore[reportAttributeAccessIssue]
    if (
        not torch.compiler.is_compiling()
        and F.is_batchedtensor(x)
        and type(W) in (Tensor, torch.nn.Parameter)  # a plain weight (not e.g. a quantized layer's stand-in)
        and M.ndim == 2
        and x.dtype == W.dtype == h.dtype == M.dtype
        and x.shape[:-1] == h.shape[:-1]
        and not F.is_functorch_wrapped_tensor(W)
        and (b is None or not F.is_functorch_wrapped_tensor(b))
    ):
        level = F.maybe_get_level(x)
        values = _level_values(level, x, h, M)
        if values is not None:
            xv, hv, Mv = values
            K, d_out = xv.shape[0], W.shape[0]
            rows = xv.reshape(-1, xv.shape[-1])
            y = (torch.mm(rows, W.mT) if b is None else torch.addmm(b, rows, W.mT)).view(K, -1, d_out)
            return _batched_sum(level, y, hv, Mv, M, (*x.shape[:-1], d_out))
    return add_product(torch.nn.functional.linear(x, W, b), h, M)


def _batched_sum(level: int, y: Tensor, hv: Tensor, Mv: Tensor, M: Tensor, shape) -> Tensor:
    """y + h Mᵀ for every entry of one ``vmap`` level, on the batched values: y (K, rows, d_out) a
    fresh output, hv (K, ..., r) and Mv (K, d_out, r) from ``_level_values``, ``M`` the tensor the
    caller passed (unbatched: one GEMM over all K·rows instead of K). In place unless autograd
    records (then no in-place write through a view of y). Returns the sum batched again at
    ``level``, each entry of ``shape``."""
    F = torch._C._functorch  # pyright: ignore[reportAttributeAccessIssue]
    K, d_out, r = y.shape[0], y.shape[-1], hv.shape[-1]
    recording = torch.is_grad_enabled() and (y.requires_grad or hv.requires_grad or Mv.requires_grad)
    if not F.is_batchedtensor(M):  # one M for every entry
        flat, hv = y.view(-1, d_out), hv.reshape(-1, r)
        y = torch.addmm(flat, hv, M.mT) if recording else flat.addmm_(hv, M.mT)
    else:
        hv = hv.reshape(K, -1, r)
        y = torch.baddbmm(y, hv, Mv.mT) if recording else y.baddbmm_(hv, Mv.mT)
    return F._add_batch_dim(y.view(K, *shape), 0, level)


def _level_values(level: int, *tensors: Tensor) -> list[Tensor] | None:
    """The plain values behind tensors at one ``vmap`` level, each with the vmapped dimension first
    (one not batched there expanded along it; the first must be batched), or None when any is
    wrapped otherwise (another level, a ``grad`` transform)."""
    F = torch._C._functorch  # pyright: ignore[reportAttributeAccessIssue]
    out: list[Tensor | None] = []
    for t in tensors:
        if F.is_batchedtensor(t):
            v, d = F.get_unwrapped(t), F.maybe_get_bdim(t)
            if F.maybe_get_level(t) != level or F.is_functorch_wrapped_tensor(v):
                return None
            out.append(v if d == 0 else v.movedim(d, 0))
        elif F.is_functorch_wrapped_tensor(t):
            return None
        else:
            out.append(None)
    first = out[0]
    if first is None:
        return None
    K = first.shape[0]
    return [t.expand(K, *t.shape) if v is None else v for t, v in zip(tensors, out)]


def _vmapped_values(y: Tensor, h: Tensor, M: Tensor) -> tuple[int, Tensor, Tensor, Tensor] | None:
    """(level, y, h, M values) inside one ``vmap`` level, each with the vmapped dimension first (an
    unbatched h or M expanded along it), when ``y`` is batched at that level and its values are
    contiguous — so a product accumulated into them is the product for every batch entry at once.
    None otherwise (not under vmap, a ``grad`` transform, nested levels, ``torch.compile``)."""
    F = torch._C._functorch  # pyright: ignore[reportAttributeAccessIssue]
    if torch.compiler.is_compiling() or not F.is_batchedtensor(y):
        return None
    level = F.maybe_get_level(y)
    values = _level_values(level, y, h, M)
    if values is None or not values[0].is_contiguous():
        return None
    return level, values[0], values[1], values[2]


def eager_values(*tensors: Tensor) -> bool:
    """Whether these are plain eager tensors: not traced by ``torch.compile`` and not wrapped by a
    functorch transform (vmap/grad), so their values can be read and they can be written in place."""
    if torch.compiler.is_compiling():
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)  # pyright: ignore[reportAttributeAccessIssue]


def skew_from_triu(p: Tensor, bs: int) -> Tensor:
    """Strict upper-triangle params (..., bs(bs-1)/2) -> A = ½(P − Pᵀ), (..., bs, bs).

    One gather of the params (a zero prepended for the diagonal) times a constant ±½ sign
    (``_skew_index``) instead of an in-place scatter, so it vmaps; memory and work grow with bs², not
    with the bs⁴ of a dense map.
    """
    build = _skew_index.__wrapped__ if torch.compiler.is_compiling() else _skew_index  # compile: traced, no cache
    index, sign = build(bs, p.device)
    padded = torch.cat([p.new_zeros(*p.shape[:-1], 1), p], dim=-1)
    return (padded[..., index] * sign.to(p.dtype)).unflatten(-1, (bs, bs))


@functools.lru_cache(maxsize=64)
def _skew_index(bs: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the flattened (bs·bs) matrix: which param each entry takes (0: the prepended zero, k + 1:
    param k) and its sign (+½ above the diagonal, −½ below). Built once per (bs, device), outside any
    inference mode (an inference tensor could not be saved for a later backward)."""
    with torch.inference_mode(False), torch.no_grad():
        rows, cols = torch.triu_indices(bs, bs, offset=1, device=device)
        k = torch.arange(1, rows.numel() + 1, device=device)
        index = torch.zeros(bs, bs, dtype=torch.long, device=device)
        sign = torch.zeros(bs, bs, device=device)
        index[rows, cols], index[cols, rows] = k, k
        sign[rows, cols], sign[cols, rows] = 0.5, -0.5
    return index.flatten(), sign.flatten()


def cayley(X: Tensor) -> Tensor:
    """R = (I − X)⁻¹ (I + X) for skew-symmetric X (..., n, n): orthogonal, R(−X) = R(X)⁻¹, R(0) = I."""
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return torch.linalg.solve(eye - X, eye + X)


def block_rotate(h: Tensor, R: Tensor) -> Tensor:
    """h · blockdiag(R_0, …, R_{n−1}) on an r-wide projection, never forming the r×r matrix.

    h: (..., n·bs), R: (n, bs, bs) -> (..., n·bs)
    """
    n, bs = R.shape[-3], R.shape[-1]
    hb = rearrange(h, "... (n i) -> ... n i", n=n, i=bs)
    return rearrange(einsum(hb, R, "... n i, n i j -> ... n j"), "... n j -> ... (n j)")


def block_diag(K: Tensor) -> Tensor:
    """blockdiag(K_0, …, K_{n−1}): (..., n, bs, bs) -> (..., n·bs, n·bs), vmappable (no unbind)."""
    n = K.shape[-3]
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    return rearrange(einsum(K, eye, "... n i j, n m -> ... n i m j"), "... n i m j -> ... (n i) (m j)")


def householder_chain(x: Tensor, U: Tensor) -> Tensor:
    """x H_{r−1} ⋯ H_0 with H_i = I − 2 û_i û_iᵀ (û_i = u_i / ‖u_i‖): x · (H_0 ⋯ H_{r−1})ᵀ.

    x: (..., d), U: (r, d). Compact "UT" form of the product (Joffrain, Low, Quintana-Ortí,
    van de Geijn & Van Zee 2006): H_0 ⋯ H_{r−1} = I − Û T⁻¹ Ûᵀ with T = ½ I + striu(ÛᵀÛ)
    (upper triangular, r×r), so
        x (H_0 ⋯ H_{r−1})ᵀ = x − ((x Û) T⁻ᵀ) Ûᵀ
    — two rank-r products per token instead of r sequential passes over x, and never a d×d matrix.
    The r×r solve runs in at least fp32 (no half-precision triangular solve in torch).
    """
    Un = U / torch.linalg.vector_norm(U, dim=-1, keepdim=True)  # (r, d) rows û_i
    dt = torch.promote_types(U.dtype, torch.float32)
    G = (Un @ Un.T).to(dt)  # (r, r) Gram matrix ÛᵀÛ in column convention
    eye = torch.eye(U.shape[0], dtype=dt, device=U.device)
    T = 0.5 * eye + torch.triu(G, diagonal=1)
    Tinv = torch.linalg.solve_triangular(T, eye, upper=True).to(x.dtype)  # T⁻¹ (r, r)
    h = torch.nn.functional.linear(x, Un)  # (..., r)  x Û
    return x - torch.nn.functional.linear(torch.nn.functional.linear(h, Tinv), Un.T)  # F.linear(h, T⁻¹) = h T⁻ᵀ


def hash_uniform(seed: int, shape: tuple[int, ...] | torch.Size, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) numbers that are a pure function of (seed, position): a 32-bit integer hash
    (lowbias32, two rounds keyed by the seed's two halves) of the flat index, in plain int64 tensor
    ops that never overflow. No generator and no random op, so it is the same under ``vmap``
    (default ``randomness="error"`` is not tripped), ``torch.func.grad`` and ``torch.compile``."""
    n = math.prod(shape)
    x = torch.arange(n, dtype=torch.int64, device=device)
    x = _mix32(_mix32(x ^ (seed & 0xFFFFFFFF)) ^ ((seed >> 32) & 0xFFFFFFFF))
    return (x >> 8).to(dtype).mul_(1.0 / (1 << 24)).reshape(shape)  # the top 24 of 32 bits


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for 0 ≤ x, c < 2³², in 16-bit halves so no int64 product overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons' integer hash): a bijection of [0, 2³²) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
