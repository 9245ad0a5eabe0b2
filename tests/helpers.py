"""Shared test helpers: params for a layer, perturbation of trainable leaves, relative error, peft wrapping and
parity, sizes of new tensors, config/rank/statistic error checks, threads run together."""

import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lite_fn import variants


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layer(d_out, d_in, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    b = (torch.randn(d_out, generator=g) * 0.1).to(dtype)
    return W, b


def layer_params(name, cfg, W, key=0, seed=1):
    """init for one layer; data-driven variants get a random calibration statistic."""
    variant = variants.get(name)
    stat = None
    if variant.stat is not None:
        g = torch.Generator().manual_seed(seed)
        stat = variant.stat(cfg, W)  # None when this config needs no data
        for _ in range(3 if stat is not None else 0):
            stat.update(torch.randn(64, W.shape[1], generator=g).to(W.dtype) * torch.linspace(2.0, 0.1, W.shape[1]).to(W.dtype))
    return variant.init(key, W, cfg, stat)


def perturb(params, seed, scale=0.1):
    """Move every trainable leaf off its init (and steering leaves to 1) so tests are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        if v.requires_grad:
            v = (v.detach() + scale * torch.randn(v.shape, generator=g).to(v.dtype)).requires_grad_(True)
        out[k] = v
    return out


def with_steering(name, params, value):
    leaf = variants.get(name).STEERING_LEAF
    if leaf is None:
        return params
    return {**params, leaf: torch.tensor(value, dtype=params[leaf].dtype)}


def peft_linear(W, b, peft_config_cls, **kwargs):
    """peft's adapter peft_config_cls(**kwargs) around one nn.Linear holding copies of W and b; the adapted layer."""
    import peft  # only the peft parity tests need it

    net = nn.Sequential(nn.Linear(W.shape[1], W.shape[0]))
    with torch.no_grad():
        net[0].weight.copy_(W)
        net[0].bias.copy_(b)
    return peft.get_peft_model(net, peft_config_cls(target_modules=["0"], **kwargs)).base_model.model[0]


def assert_matches_reference(ref, ours, x, leaves, cotangent, to_ours=None, tag=()):
    """ref and ours each run on its own copy of x: outputs agree to 1e-5; for one random cotangent the gradients of
    every (name, our leaf, reference leaf) in leaves and of x agree to 1e-4.

    cotangent: a seed, or a generator to draw it from. to_ours(name, g): the reference's gradient for that leaf in
    our leaf's layout (default: as is). Failure messages start with tag. Returns (y_ref, y_ours)."""
    x_ref, x_our = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y_our = ref(x_ref), ours(x_our)
    assert rel_err(y_our, y_ref) <= 1e-5, (*tag, rel_err(y_our, y_ref))
    if not isinstance(cotangent, torch.Generator):
        cotangent = torch.Generator().manual_seed(cotangent)
    cot = torch.randn(y_ref.shape, generator=cotangent)
    *g_ref, gx_ref = torch.autograd.grad((y_ref * cot).sum(), [theirs for _, _, theirs in leaves] + [x_ref])
    *g_our, gx_our = torch.autograd.grad((y_our * cot).sum(), [mine for _, mine, _ in leaves] + [x_our])
    for (name, _, _), go, gr in zip(leaves, g_our, g_ref):
        gr = gr if to_ours is None else to_ours(name, gr)
        assert rel_err(go, gr) <= 1e-4, (*tag, name, rel_err(go, gr))
    assert rel_err(gx_our, gx_ref) <= 1e-4, (*tag, "x", rel_err(gx_our, gx_ref))
    return y_ref, y_our


class NewTensorSizes(TorchDispatchMode):
    """Record the number of elements of every new (non-view) tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # views (detach, transpose) share an input's storage: no new memory
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numels.append(t.numel())
        return out


def assert_config_refused(config_cls, kwargs, match):
    """config_cls(**kwargs) raises a ValueError whose message matches `match`."""
    with pytest.raises(ValueError, match=match):
        config_cls(**kwargs)


def assert_rank_above_min_dim_refused(mod, config_cls, d_out, d_in):
    """mod.init on a (d_out, d_in) weight refuses r = min(d_out, d_in) + 1 and names the bound."""
    W, _ = make_layer(d_out, d_in)
    r = min(d_out, d_in) + 1
    with pytest.raises(ValueError, match=f"r={r} exceeds min\\(d_out, d_in\\)={min(d_out, d_in)}"):
        mod.init(0, W, config_cls(r=r))


def assert_stat_refuses_bad_batches(st, d_in, wrong_width, non_finite):
    """A calibration statistic refuses a batch of the wrong width (naming d_in) and one holding a single NaN/inf,
    and counts the tokens of neither."""
    with pytest.raises(ValueError, match=f"expects d_in={d_in}"):
        st.update(wrong_width)
    with pytest.raises(ValueError, match="1 NaN/inf"):
        st.update(non_finite)
    assert st.tokens == 0


def needs_calibration(cfg, model) -> bool:
    """Whether lf.init needs calibration data for this config on this model (a data-driven variant)."""
    variant = variants.module_for(cfg)
    if variant.stat is None:
        return False
    W = next(m.weight for m in model.modules() if isinstance(m, nn.Linear))
    return variant.stat(cfg, W.detach()) is not None


def moved(params, seed=1, scale=0.1):
    """A params tree with every trainable leaf perturbed (``perturb``), each layer with its own seed."""
    return {p: {n: perturb(lv, seed + i, scale) for n, lv in bv.items()} for i, (p, bv) in enumerate(params.items())}


def in_threads(worker, n: int, *others) -> None:
    """Runs worker(0), …, worker(n - 1) and each callable of ``others`` on a thread of its own; returns when all have ended."""
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n)] + [threading.Thread(target=o) for o in others]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def steered(params, value):
    """``lf.with_alpha(params, value)`` for steerable params; other params as they are."""
    import lite_fn as lf

    try:
        return lf.with_alpha(params, value)
    except ValueError:
        return params
