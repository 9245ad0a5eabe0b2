"""Shared test helpers: params for a layer, perturbation of trainable leaves, relative error."""
import torch

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
    mod = variants.get(name)
    stat = None
    if hasattr(mod, "stat"):
        g = torch.Generator().manual_seed(seed)
        stat = mod.stat(cfg, W)  # None when this config needs no data
        for _ in range(3 if stat is not None else 0):
            stat.update(torch.randn(64, W.shape[1], generator=g).to(W.dtype) * torch.linspace(2.0, 0.1, W.shape[1]).to(W.dtype))
    return mod.init(key, W, cfg, stat)


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
    mod = variants.get(name)
    leaf = getattr(mod, "STEERING_LEAF", None)
    if leaf is None:
        return params
    return {**params, leaf: torch.tensor(value, dtype=params[leaf].dtype)}
