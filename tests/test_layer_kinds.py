"""Every registered variant on every substitution layer kind (Conv1d/2d/3d, Embedding, MultiheadAttention's packed
projection, a raw 3-D parameter of E experts): identity at init, the call equals the model with lf.merge's weights
put in (functional_call), vmap over stacked adapters equals the loop, and a train step leaves the model untouched.
peft parity for the kinds peft has lives in each variant's own tests; this is the generic contract."""

import pytest
import torch
from torch import nn

import lite_fn as lf
from lite_fn import _layers, _plan
from tests.cases import all_cases, case_id
from tests.helpers import moved, steered


class Experts(nn.Module):
    """E experts' weights in one fused (E, d_out, d_in) parameter, as transformers' MoE blocks store them."""

    def __init__(self, E, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, d, d) / d**0.5)

    def forward(self, x):
        return sum(nn.functional.linear(x, self.w[e]) for e in range(self.w.shape[0]))


class Kinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 16, padding_idx=0)
        self.c1 = nn.Conv1d(8, 16, 2, padding=1)
        self.c2 = nn.Conv2d(4, 16, 2, padding=1)
        self.c3 = nn.Conv3d(2, 16, 2, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.experts = Experts(2, 16)

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, 16)
        B, T, _ = h.shape
        a = self.c1(h.reshape(B, 8, 2 * T)).mean(-1)  # (B, 16)
        b = self.c2(h.reshape(B, 4, 2, 2 * T)).mean((-2, -1))
        c = self.c3(h.reshape(B, 2, 2, 2, 2 * T)).mean((-3, -2, -1))
        h = h + (a + b + c)[:, None, :]
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.experts(h)


TARGETS = r"^(emb|c1|c2|c3|attn|attn\.out_proj|experts\.w)$"
DATA_DRIVEN = ("eva",)  # calibrated on linear-layer inputs: refused on substitution layers (tested below)
CASES = [c for c in all_cases() if c[0] not in DATA_DRIVEN and getattr(c[1], "select", None) != "data"]
_seen: set[str] = set()
CASES = [c for c in CASES if not (c[0] in _seen or _seen.add(c[0]))]  # one config per variant keeps this fast


def _model():
    torch.manual_seed(0)
    return Kinds().double().eval()


def _ids():
    return torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(1))


def _identity_rule_weights(model, params):
    """W' and b' of every layer by variants.dense_weights (apply on the identity: no merged hook involved)."""
    out = {}
    for path, bv in params.items():
        ((name, leaves),) = bv.items()
        variant = lf.variants.get(name)
        module, kind = _plan.resolve(model, path)
        w, b = _layers.weight_of(module, kind), _layers.bias_of(module, kind)
        W = kind.dense(w)
        if W.ndim == 3:
            W_new = torch.stack(
                [lf.variants.dense_weights(variant, {k: v[e] for k, v in leaves.items()}, W[e])[0] for e in range(W.shape[0])]
            )
            b_new = None
        else:
            W_new, b_new = lf.variants.dense_weights(variant, leaves, W, b)
        prefix = path if kind is _layers.raw_kind(kind.param) else f"{path}.{kind.param}"
        out[prefix] = kind.store(W_new, w)
        if b_new is not None:
            out[f"{path}.{kind.bias_param}"] = b_new
    return out


def _leaves(params):
    return [t for bv in params.values() for lv in bv.values() for t in lv.values() if t.requires_grad]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_variant_on_every_substitution_kind(case):
    _, cfg = case
    model, ids = _model(), _ids()
    params = lf.init(0, model, cfg, targets=TARGETS)
    assert sorted(params) == ["attn", "attn.out_proj", "c1", "c2", "c3", "emb", "experts.w"]
    base = model(ids)
    assert torch.allclose(lf.call(model, steered(params, 0.0), ids), base, atol=1e-10), "identity at init (alpha 0)"

    params = moved(params, 3)
    out = lf.call(model, params, ids)
    assert not torch.allclose(out, base, atol=1e-6)
    merged = torch.func.functional_call(model, lf.merge(model, params), (ids,))
    assert torch.allclose(out, merged, atol=1e-10), "merge == call"
    ref = torch.func.functional_call(model, _identity_rule_weights(model, params), (ids,))
    assert torch.allclose(out, ref, atol=1e-10), "the variant's merged hook == its apply (identity rule)"

    other = moved(lf.init(1, model, cfg, targets=TARGETS), 5)
    ys = torch.func.vmap(lambda p: lf.call(model, p, ids))(lf.stack([params, other]))
    assert torch.allclose(ys[0], out, atol=1e-10) and torch.allclose(ys[1], lf.call(model, other, ids), atol=1e-10)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    leaves = _leaves(params)
    opt = torch.optim.SGD(leaves, lr=0.1)
    lf.call(model, params, ids).square().mean().backward()
    assert all(t.grad is not None for t in leaves)
    opt.step()
    assert not torch.allclose(lf.call(model, params, ids), out, atol=1e-8), "the step moved the output"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_data_driven_init_is_refused_on_substitution_layers():
    model = _model()
    with pytest.raises(ValueError, match=r"initialises from the inputs of linear layers.*Embedding"):
        lf.init(0, model, lf.EVAConfig(r=2), targets=r"^emb$", calibration=[_ids()])
