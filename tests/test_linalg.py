"""linalg.add_product: in place where that is exact (plain eager, one vmap level), out of place
elsewhere; every path equals the float64 reference y + h Mᵀ, in value and in gradient."""

import pytest
import torch
from helpers import rel_err
from torch.func import grad, vmap

from lite_fn import linalg

K, ROWS, D_IN, D_OUT, R = 3, 5, 6, 7, 2


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(K, ROWS, D_IN, generator=g),
        torch.randn(D_OUT, D_IN, generator=g),
        torch.randn(K, ROWS, R, generator=g),
        torch.randn(K, D_OUT, R, generator=g),
    )


def _layer(W):
    return lambda x, h, M: linalg.add_product(torch.nn.functional.linear(x, W), h, M)


def _reference(x, W, h, M):
    return (x.double() @ W.double().mT + h.double() @ M.double().mT).float()


# in_dims of (x, h, M): which of them carry the vmapped axis
IN_DIMS = {"all batched": (0, 0, 0), "shared h": (0, None, 0), "shared M": (0, 0, None), "unbatched y": (None, 0, 0)}


@pytest.mark.parametrize("in_dims", IN_DIMS.values(), ids=list(IN_DIMS))
def test_vmapped_add_product_equals_reference(in_dims):
    x, W, h, M = _data()
    args = [t if d == 0 else t[0] for t, d in zip((x, h, M), in_dims)]
    got = vmap(_layer(W), in_dims=in_dims)(*args)
    per_k = [[a if d is None else a[k] for a, d in zip(args, in_dims)] for k in range(K)]
    want = torch.stack([_reference(xk, W, hk, Mk) for xk, hk, Mk in per_k])
    assert rel_err(got, want) <= 1e-6


def test_vmapped_in_place_path_is_taken_and_leaves_inputs_alone(monkeypatch):
    x, W, h, M = _data()
    taken = []
    real = linalg._vmapped_values
    monkeypatch.setattr(linalg, "_vmapped_values", lambda *a: taken.append(real(*a) is not None) or real(*a))
    h0, M0 = h.clone(), M.clone()
    vmap(_layer(W))(x, h, M)
    assert taken == [True]
    assert torch.equal(h, h0) and torch.equal(M, M0)
    taken.clear()
    vmap(_layer(W), in_dims=(None, 0, 0))(x[0], h, M)  # y not batched, the product is: out of place
    assert taken == [False]


def test_vmapped_add_product_gradients():
    x, W, h, M = _data(1)

    def loss_ref(x, h, M):
        return (x @ W.mT + h @ M.mT).square().sum()

    # plain autograd through the vmapped (in-place) product
    leaves = [t.clone().requires_grad_(True) for t in (x, h, M)]
    vmap(_layer(W))(*leaves).square().sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, h, M)]
    loss_ref(*ref_leaves).backward()
    assert all(rel_err(a.grad, b.grad) <= 1e-5 for a, b in zip(leaves, ref_leaves))
    # a grad transform around the vmap (out of place there)
    g = grad(lambda M: vmap(_layer(W))(x, h, M).square().sum())(M)
    assert rel_err(g, grad(lambda M: loss_ref(x, h, M))(M)) <= 1e-5


def test_nested_vmap_add_product():
    x, W, h, M = _data(2)
    two = lambda t: t.unsqueeze(0).expand(2, *t.shape).contiguous()
    got = vmap(vmap(_layer(W)))(two(x), two(h), two(M))
    assert rel_err(got, two(_reference(x, W, h, M))) <= 1e-6
    got = vmap(vmap(_layer(W)), in_dims=(0, None, None))(two(x), h, M)  # inner level batches all; outer only x
    assert rel_err(got, two(_reference(x, W, h, M))) <= 1e-6


@pytest.mark.parametrize("shape", [(ROWS,), (2, ROWS)], ids=["matrix", "3-d"])
def test_eager_add_product_under_autograd(shape):
    """In place on a matrix y, one fused out-of-place product on an N-d y (never in place through a
    view of it): equal to the reference in value and gradient either way."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, D_IN, generator=g, requires_grad=True)
    W = torch.randn(D_OUT, D_IN, generator=g)
    h = torch.randn(*shape, R, generator=g, requires_grad=True)
    M = torch.randn(D_OUT, R, generator=g, requires_grad=True)
    out = _layer(W)(x, h, M)
    assert type(out.grad_fn).__name__ != "CopySlices"  # no in-place write through a view of y
    want = _reference(x.detach(), W, h.detach(), M.detach())
    assert rel_err(out, want) <= 1e-6
    grads = torch.autograd.grad(out.square().sum(), (x, h, M))
    ref = torch.autograd.grad((x @ W.mT + h @ M.mT).square().sum(), (x, h, M))
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(grads, ref))


def _linear_add(W, b):
    return lambda x, h, M: linalg.linear_add(x, W, b, h, M)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("in_dims", IN_DIMS.values(), ids=list(IN_DIMS))
def test_vmapped_linear_add_equals_the_loop(in_dims, with_bias):
    """Each vmapped entry is the unvmapped layer (the bias inside the GEMM either way)."""
    x, W, h, M = _data(4)
    b = torch.randn(D_OUT) if with_bias else None
    args = [t if d == 0 else t[0] for t, d in zip((x, h, M), in_dims)]
    got = vmap(_linear_add(W, b), in_dims=in_dims)(*args)
    per_k = [[a if d is None else a[k] for a, d in zip(args, in_dims)] for k in range(K)]
    assert rel_err(got, torch.stack([linalg.linear_add(xk, W, b, hk, Mk) for xk, hk, Mk in per_k])) <= 1e-6
    ref = torch.stack([_reference(xk, W, hk, Mk) + (0 if b is None else b) for xk, hk, Mk in per_k])
    assert rel_err(got, ref) <= 1e-6


def test_vmapped_linear_add_gradients():
    x, W, h, M = _data(5)
    b = torch.randn(D_OUT)
    leaves = [t.clone().requires_grad_(True) for t in (x, h, M)]
    vmap(_linear_add(W, b))(*leaves).square().sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (x, h, M)]
    (ref[0] @ W.mT + b + ref[1] @ ref[2].mT).square().sum().backward()
    assert all(rel_err(a.grad, r.grad) <= 1e-5 for a, r in zip(leaves, ref))
    g = grad(lambda M: vmap(_linear_add(W, b))(x, h, M).square().sum())(M)  # grad transform: the plain path
    assert rel_err(g, grad(lambda M: (x @ W.mT + b + h @ M.mT).square().sum())(M)) <= 1e-5
