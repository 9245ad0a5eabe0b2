"""K adapters trained in one step (lite_fn.train): a vmapped loss over stacked params with one optimizer
equals K separate trainings; per-adapter clipping equals K separate clip_grad_norm_ calls; per-adapter
learning rates equal K trainings at those rates; the K results save and load one by one."""

import pytest
import torch
from helpers import perturb
from models import tiny, tokens

import lite_fn as lf

TARGETS = r"(q_proj|v_proj|down_proj)$"
K, STEPS = 3, 5


def adapters(model, cfg, k=K):
    """k adapters of one config, each off its init in its own way."""
    out = []
    for i in range(k):
        p = lf.init(i, model, cfg, targets=TARGETS)
        out.append({path: {n: perturb(lv, 100 * i + j) for n, lv in bv.items()} for j, (path, bv) in enumerate(p.items())})
    return out


def own_copy(params):
    return {
        p: {n: {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in lv.items()} for n, lv in bv.items()}
        for p, bv in params.items()
    }


def max_diff(stacked, separate):
    return max(
        (s[k] - v).abs().max().item() for k, one in enumerate(separate) for s, v in zip(lf.trainable(stacked), lf.trainable(one))
    )


def batches(k=K, steps=STEPS):
    return [torch.stack([tokens(2, 8, seed=1000 * s + i) for i in range(k)]) for s in range(steps)]  # (k, 2, 8)


def train_separately(model, params_list, data, lr, lr_scale=None, max_norm=None, weight_decay=0.1):
    out = []
    for k, params in enumerate(params_list):
        params = own_copy(params)
        scale = 1.0 if lr_scale is None else float(lr_scale[k])
        opt = torch.optim.AdamW(lf.trainable(params), lr=lr * scale, weight_decay=weight_decay)
        for x in data:
            loss = lf.call(model, params, x[k], labels=x[k]).loss
            opt.zero_grad()
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(lf.trainable(params), max_norm)
            opt.step()
        out.append(params)
    return out


@pytest.mark.parametrize(
    "cfg", [lf.LoRAConfig(r=4), lf.DoRAConfig(r=4), lf.AntiPaSTOConfig(r=8, block_size=4)], ids=lambda c: type(c).__name__
)
def test_k_adapters_in_one_step_equal_k_separate_trainings(cfg):
    model = tiny("llama")
    params_list, data = adapters(model, cfg), batches()
    stacked = lf.stack(params_list)
    losses_of = lf.train.stacked_loss(model)
    opt = torch.optim.AdamW(lf.trainable(stacked), lr=1e-2, weight_decay=0.1)
    first = None
    for x in data:
        losses = losses_of(stacked, x, labels=x)
        assert losses.shape == (K,)
        first = losses.detach() if first is None else first
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    separate = train_separately(model, params_list, data, lr=1e-2)
    assert max_diff(stacked, params_list) > 1e-3  # the steps moved the leaves
    assert max_diff(stacked, separate) <= 1e-4
    want = torch.stack([lf.call(model, p, data[0][k], labels=data[0][k]).loss for k, p in enumerate(params_list)])
    assert torch.allclose(first, want, atol=1e-5)


def test_clipping_and_learning_rates_per_adapter_equal_separate_trainings():
    model = tiny("llama")
    params_list, data = adapters(model, lf.LoRAConfig(r=4)), batches()
    stacked = lf.stack(params_list)
    lr_scale = torch.tensor([1.0, 0.25, 3.0])
    max_norm = 0.05  # below the gradient norms, so every adapter is clipped, each by its own factor

    def loss_fn(forward, ids, labels):  # a custom loss: next-token cross-entropy on the logits (= the model's)
        logits = forward(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    losses_of = lf.train.stacked_loss(model, loss_fn)
    opt = torch.optim.AdamW(lf.trainable(stacked), lr=1e-2, weight_decay=0.1)
    norms = []
    for x in data:
        losses = losses_of(stacked, x, labels=x)
        opt.zero_grad()
        losses.sum().backward()
        norms.append(lf.train.clip_grad_norm_per_adapter(stacked, max_norm))
        lf.train.lr_scaled_step(opt, stacked, lr_scale)
    assert all(n.shape == (K,) and (n > max_norm).all() for n in norms)
    separate = train_separately(model, params_list, data, lr=1e-2, lr_scale=lr_scale, max_norm=max_norm)
    assert max_diff(stacked, separate) <= 1e-4
    # global clipping would couple the adapters: it gives a different result
    coupled = lf.stack(params_list)
    opt = torch.optim.AdamW(lf.trainable(coupled), lr=1e-2, weight_decay=0.1)
    for x in data:
        opt.zero_grad()
        losses_of(coupled, x, labels=x).sum().backward()
        torch.nn.utils.clip_grad_norm_(lf.trainable(coupled), max_norm)
        opt.step()
    assert max_diff(coupled, train_separately(model, params_list, data, lr=1e-2, max_norm=max_norm)) > 1e-3


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
def test_clip_grad_norm_per_adapter_equals_k_separate_clip_grad_norm(norm_type):
    g = torch.Generator().manual_seed(0)
    shapes = [(K, 4, 6), (K, 5), (K,)]
    grads = [torch.randn(s, generator=g) * torch.tensor([0.01, 1.0, 10.0]).reshape(K, *[1] * (len(s) - 1)) for s in shapes]
    stacked = [torch.zeros(s, requires_grad=True) for s in shapes]
    for t, gr in zip(stacked, grads):
        t.grad = gr.clone()
    no_grad = torch.zeros(K, 2, requires_grad=True)  # skipped, as torch skips parameters without .grad
    max_norm = torch.tensor([1.0, 0.5, 2.0])
    norms = lf.train.clip_grad_norm_per_adapter([*stacked, no_grad], max_norm, norm_type=norm_type)
    for k in range(K):
        sep = [torch.zeros(s[1:], requires_grad=True) for s in shapes]
        for t, gr in zip(sep, grads):
            t.grad = gr[k].clone()
        want = torch.nn.utils.clip_grad_norm_(sep, float(max_norm[k]), norm_type=norm_type)
        assert torch.allclose(norms[k], want, rtol=1e-6), (k, norms[k], want)
        for t, s in zip(stacked, sep):
            assert torch.allclose(t.grad[k], s.grad, rtol=1e-6, atol=0), k
    assert no_grad.grad is None
    assert torch.equal(stacked[0].grad[0], grads[0][0])  # adapter 0 is under its limit: untouched


def test_clip_takes_a_stacked_tree_and_refuses_mixed_or_missing_adapter_axes():
    model = tiny("llama")
    stacked = lf.stack(adapters(model, lf.LoRAConfig(r=4), k=2))
    assert torch.equal(lf.train.clip_grad_norm_per_adapter(stacked, 1.0), torch.zeros(2))  # no grads yet
    x = torch.stack([tokens(2, 6, seed=i) for i in range(2)])
    lf.train.stacked_loss(model)(stacked, x, labels=x).sum().backward()
    norms = lf.train.clip_grad_norm_per_adapter(stacked, 1e-3)
    grads = [t.grad for t in lf.trainable(stacked)]
    clipped = torch.stack([torch.linalg.vector_norm(torch.cat([g[k].flatten() for g in grads])) for k in range(2)])
    assert (norms > 1e-3).all() and torch.allclose(clipped, torch.full((2,), 1e-3), rtol=1e-3)
    with pytest.raises(ValueError, match="same leading adapter axis"):
        lf.train.clip_grad_norm_per_adapter([torch.zeros(2, 3), torch.zeros(3, 3)], 1.0)
    with pytest.raises(ValueError, match=r"one value per adapter \(shape \(2,\)\)"):
        lf.train.clip_grad_norm_per_adapter([torch.zeros(2, 3)], [1.0, 2.0, 3.0])
    t = torch.zeros(2, 3, requires_grad=True)
    t.grad = torch.tensor([[1.0, 0, 0], [float("nan"), 0, 0]])
    with pytest.raises(RuntimeError, match=r"adapters \[1\]"):
        lf.train.clip_grad_norm_per_adapter([t], 1.0, error_if_nonfinite=True)


def test_shared_inputs_and_flags_pass_to_every_adapter():
    model = tiny("llama")
    params_list = adapters(model, lf.IA3Config(), k=2)
    stacked = lf.stack(params_list)
    x = tokens(2, 6)
    losses = lf.train.stacked_loss(model)(stacked, x.expand(2, *x.shape), labels=x.expand(2, *x.shape), use_cache=False)
    want = torch.stack([lf.call(model, p, x, labels=x).loss for p in params_list])
    assert torch.allclose(losses, want, atol=1e-6)
    with pytest.raises(TypeError, match="no .loss"):
        lf.train.stacked_loss(model)(stacked, x.expand(2, *x.shape))


def test_save_each_writes_one_checkpoint_per_adapter(tmp_path):
    model = tiny("llama")
    cfg = lf.LoRAConfig(r=4)
    params_list = adapters(model, cfg)
    stacked = lf.stack(params_list)
    paths = lf.train.save_each(str(tmp_path / "adapter_{k}.safetensors"), stacked, config=cfg)
    assert paths == [str(tmp_path / f"adapter_{k}.safetensors") for k in range(K)]
    for k, path in enumerate(paths):
        loaded = lf.load(path, model=model)
        assert all(torch.equal(a, b) for a, b in zip(lf.trainable(loaded), lf.trainable(params_list[k])))
        assert lf.load_metadata(path)["layers"]["model.layers.0.self_attn.q_proj"]["config"]["fields"]["r"] == 4
    named = lf.train.save_each(
        [tmp_path / f"{n}.safetensors" for n in "xyz"], stacked, configs=[lf.LoRAConfig(r=4, alpha=a) for a in (1.0, 2.0, 3.0)]
    )
    alphas = [lf.load_metadata(p)["layers"]["model.layers.0.self_attn.q_proj"]["config"]["fields"]["alpha"] for p in named]
    assert alphas == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"no '\{k\}'"):
        lf.train.save_each(str(tmp_path / "one.safetensors"), stacked)
    with pytest.raises(ValueError, match="need 3 distinct paths"):
        lf.train.save_each([tmp_path / "a", tmp_path / "a", tmp_path / "b"], stacked)
    with pytest.raises(ValueError, match="not both"):
        lf.train.save_each(str(tmp_path / "{k}"), stacked, config=cfg, configs=[cfg] * K)
