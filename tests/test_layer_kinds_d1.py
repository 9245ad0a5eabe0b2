"""(IA)³ (output and feed-forward side), HRA (and its Gram–Schmidt form), OFT and BOFT on convolutions, and OFT on an
embedding (the kinds peft 0.21 has for them).

* the ``merged`` hooks against the identity rule ``variants.dense_weights``, with their gradients, on perturbed leaves
  (the forms lf.init gives and those only peft files give: IA3-FF's per-channel g_channel, OFT's output-side Q_out);
* peft parity on copied, perturbed tensors, float64: nn.Conv2d / nn.Conv3d (strided, padded, 1×1, grouped for IA3) and
  nn.Embedding — eval outputs and the gradients of a loss, both directions (lf.load_peft of peft's file; lf.save_peft
  read back by peft, tensor for tensor);
* what peft computes otherwise, refused by name: OFT on a k × k kernel (peft's forward is not its merge, shown
  here), HRA / BOFT on convolutions whose geometry peft's own F.conv2d call drops, IA3 on nn.Conv1d, and an IA3-FF
  g whose gains differ across a channel's kernel positions (peft has one gain per channel);
* the contract on these kinds: identity at init, merge == call, vmap over stacked == loop, a train step leaves the
  base model untouched and reaches exactly the trainable leaves.
"""

import copy
from typing import Any

import peft
import pytest
import torch
from helpers import moved, perturb, rel_err
from safetensors.torch import load_file
from torch import nn

import lite_fn as lf
from lite_fn import variants
from lite_fn.variants import ia3_ff, oft

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and much faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- merged hooks
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _hand(name, leaves, d=12):
    """A leaf set lf.init does not build (a peft file's form), for a d × d layer."""
    return name, lambda W: {k: v.to(F64).requires_grad_(k in variants.get(name).TRAINABLE) for k, v in leaves.items()}, d


MERGED = [
    ("ia3", lf.IA3Config(), 12),
    ("ia3_ff", lf.IA3FFConfig(), 12),
    _hand("ia3_ff", {"g_channel": torch.ones(3, 4)}),  # 3 groups of 4 channels, 3 kernel positions each
    _hand("ia3_ff", {"g_channel": torch.ones(1, 6)}),  # one group, 2 kernel positions per channel
    ("hra", lf.HRAConfig(r=4), 12),
    ("hra", lf.HRAConfig(r=3, init_weights=False), 12),
    ("hra", lf.HRAConfig(r=3, init_weights=False, apply_GS=True), 12),
    ("oft", lf.OFTConfig(oft_block_size=4), 12),
    ("oft", lf.OFTConfig(r=3, use_cayley_neumann=False, block_share=True), 12),
    ("oft", lf.OFTConfig(oft_block_size=6, coft=True, eps=0.3), 12),
    _hand("oft", {"Q_out": torch.zeros(3, 6), "neumann": torch.tensor([2.0, 2.0, 2.0, 1.0])}),  # 3 blocks of 4
    _hand("oft", {"Q_out": torch.zeros(1, 28)}, d=16),  # one shared 8 × 8 block, exact Cayley
    ("boft", lf.BOFTConfig(block_size=4), 12),
    ("boft", lf.BOFTConfig(block_size=2, n_butterfly_factor=3), 16),
    ("boft", lf.BOFTConfig(block_num=4, n_butterfly_factor=2), 16),
]


def _merged_id(c):
    return c if isinstance(c, str) else ("hand" if callable(c) else repr(c)[:48] if not isinstance(c, int) else f"d{c}")


@pytest.mark.parametrize(("name", "cfg", "d"), MERGED, ids=_merged_id)
def test_merged_hook_equals_the_identity_rule_with_its_gradients(name, cfg, d):
    g = _gen(0)
    W, b = torch.randn(d, d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    spec = variants.get(name)
    merged = spec.merged
    assert merged is not None
    p0 = cfg(W) if callable(cfg) else spec.init(0, W, cfg)
    W0, b0 = merged(p0, W, b)
    if name != "hra":
        assert torch.equal(W0, W) and b0 is not None and torch.equal(b0, b)  # identity at init, bit for bit
    elif cfg.init_weights:
        assert rel_err(W0, W) <= 1e-14 and b0 is b  # pairs of equal reflections: the identity up to rounding
    p = perturb(p0, seed=2, scale=0.3)
    (Wm, bm), (Wd, bd) = merged(p, W, b), variants.dense_weights(spec, p, W, b)
    assert bm is not None and bd is not None
    assert rel_err(Wm, Wd) <= 1e-12 and rel_err(bm, bd) <= 1e-12
    assert rel_err(Wm, W) > 1e-3  # the perturbed adapter moves the weight
    C, c = torch.randn(W.shape, generator=g, dtype=F64), torch.randn(b.shape, generator=g, dtype=F64)
    trainable = sorted(k for k, v in p.items() if v.requires_grad)
    assert trainable and set(trainable) <= spec.TRAINABLE
    gm = torch.autograd.grad((Wm * C).sum() + (bm * c).sum(), [p[k] for k in trainable])
    gd = torch.autograd.grad((Wd * C).sum() + (bd * c).sum(), [p[k] for k in trainable])
    for k, x, y in zip(trainable, gm, gd):
        assert rel_err(x, y) <= 1e-10, (name, k, rel_err(x, y))
    assert merged(p, W, None)[1] is None


def test_ia3_ff_channel_form_is_peft_conv_input_scaling():
    """g_channel on a grouped conv's flattened kernel: the conv of x scaled per input channel (float64 reference)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, groups=2, padding=1).to(F64)
    x = torch.randn(2, 6, 5, 5, dtype=F64)
    gc = torch.randn(2, 3, dtype=F64)  # (groups, in_channels / groups): peft's (1, 6, 1, 1) vector
    W_new, b_new = ia3_ff.merged({"g_channel": gc}, conv.weight.reshape(4, -1), conv.bias)
    y = nn.functional.conv2d(x, W_new.reshape(conv.weight.shape), b_new, padding=1, groups=2)
    assert rel_err(y, conv(x * gc.reshape(1, 6, 1, 1))) <= 1e-13


# ----------------------------------------------------------------------------- models
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 6, 5)}


class ConvNet(nn.Module):
    """A strided, padded conv, a 1×1 conv, a padded bias-free conv, a grouped conv (IA3 only), then a linear head."""

    def __init__(self, dim, **odd):
        super().__init__()
        Conv = CONV[dim]
        self.a = Conv(4, 6, 3, stride=2, padding=1)
        self.b = Conv(6, 4, 1)
        self.c = Conv(4, 4, 3, padding=1, bias=False, **odd)
        self.g = Conv(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))
        h = torch.tanh(self.g(h))
        return self.head(h.flatten(2).mean(-1))


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)  # padding row zero, as nn.Embedding builds it
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def conv_net(dim=2, **odd):
    torch.manual_seed(dim)
    return ConvNet(dim, **odd).to(F64).eval()


def conv_input(dim=2):
    return torch.randn(2, 4, *SPATIAL[dim], generator=_gen(5), dtype=F64)


def emb_net():
    torch.manual_seed(7)
    return EmbNet().to(F64).eval()


IDS = torch.tensor([[0, 3, 5, 0, 11], [7, 0, 2, 9, 1]])  # the padding token 0 appears


def peft_model(base, cfg, seed=0):
    """peft's adapter on a copy of base, every trainable tensor moved off its init."""
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = _gen(seed)
    with torch.no_grad():
        for _, t in pm.named_parameters():
            if t.requires_grad:
                t.add_(0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return pm.eval()


def _peft_tensor(layer: Any, leaf: str) -> torch.Tensor:
    """peft's parameter holding lite_fn's ``leaf`` at one adapted layer."""
    return {
        "g": lambda: layer.ia3_l["default"],
        "g_channel": lambda: layer.ia3_l["default"],
        "U": lambda: layer.hra_u["default"],
        "U_gs": lambda: layer.hra_u["default"],
        "R": lambda: layer.boft_R["default"],
        "s": lambda: layer.boft_s["default"],
        "Q": lambda: layer.oft_R["default"].weight,
        "Q_out": lambda: layer.oft_embedding_R["default"].weight,
    }[leaf]()


def _ours(leaf: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """peft's tensor (or its gradient) in lite_fn's layout: hra_u is Uᵀ, the rest a reshape."""
    return t.T if leaf in ("U", "U_gs") else t.reshape(like.shape)


def peft_pairs(pm, params):
    """(name, lite_fn leaf, peft tensor) for every trainable leaf of params."""
    out = []
    for path, by_variant in params.items():
        ((name, leaves),) = by_variant.items()
        layer = pm.base_model.model.get_submodule(path)
        out += [(f"{path}.{k}", k, v, _peft_tensor(layer, k)) for k, v in leaves.items() if k in variants.get(name).TRAINABLE]
    return out


def assert_parity(pm, base, params, x, seed=0):
    """peft's model and lf.call on the same input: the loaded leaves are peft's tensors, outputs agree to 1e-5 and,
    for one random cotangent, the gradients of every trainable leaf (peft's read in lite_fn's layout) to 1e-4."""
    pairs = peft_pairs(pm, params)
    for name, leaf, mine, theirs in pairs:
        assert torch.equal(mine, _ours(leaf, theirs.detach(), mine)), name
    y_ref, y_our = pm(x), lf.call(base, params, x)
    assert rel_err(y_our, y_ref) <= 1e-5, rel_err(y_our, y_ref)
    assert rel_err(y_ref, base(x)) > 1e-3  # the adapter changes the output
    cot = torch.randn(y_ref.shape, generator=_gen(seed), dtype=y_ref.dtype)
    g_ref = torch.autograd.grad((y_ref * cot).sum(), [t for *_, t in pairs])
    g_our = torch.autograd.grad((y_our * cot).sum(), [mine for _, _, mine, _ in pairs])
    for (name, leaf, mine, _), go, gr in zip(pairs, g_our, g_ref):
        assert rel_err(go, _ours(leaf, gr, mine)) <= 1e-4, (name, rel_err(go, _ours(leaf, gr, mine)))


def assert_round_trip(pm, base, params, x, tmp_path):
    """lf.save_peft of the loaded params: peft reads it back to the same outputs, and the file holds peft's tensors."""
    pm.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)
    lf.save_peft(tmp_path / "ours", params, model=base)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert rel_err(back(x), lf.call(base, params, x)) <= 1e-12
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert ours[k].shape == t.shape and torch.equal(ours[k].to(t.dtype), t), k


# ----------------------------------------------------------------------------- peft parity, both ways
PLAIN = ["a", "b", "c", "head"]
PEFT_CASES = {
    "ia3-conv2d": (2, peft.IA3Config(target_modules=[*PLAIN, "g"], feedforward_modules=["b", "g", "head"])),
    "ia3-conv3d": (3, peft.IA3Config(target_modules=["a", "b", "g"], feedforward_modules=["a", "g"])),
    "hra": (2, peft.HRAConfig(r=2, target_modules=PLAIN)),
    "hra-gram-schmidt": (2, peft.HRAConfig(r=3, apply_GS=True, init_weights=False, target_modules=PLAIN)),
    "boft-block-size": (2, peft.BOFTConfig(boft_block_size=2, target_modules=PLAIN)),
    "boft-block-num": (2, peft.BOFTConfig(boft_block_size=0, boft_block_num=2, target_modules=PLAIN)),
    "oft-1x1": (2, peft.OFTConfig(oft_block_size=2, target_modules=["b", "head"])),
    "oft-1x1-exact-cayley": (2, peft.OFTConfig(r=2, oft_block_size=0, use_cayley_neumann=False, target_modules=["b"])),
}
LOADED_AS = {"ia3": {"ia3", "ia3_ff"}, "hra": {"hra"}, "boft": {"boft"}, "oft": {"oft"}}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_conv_adapter_loads_trains_and_saves_like_peft(case, tmp_path):
    dim, cfg = PEFT_CASES[case]
    base, x = conv_net(dim), conv_input(dim)
    pm = peft_model(base, cfg)
    pm.save_pretrained(tmp_path / "in")
    params = lf.load_peft(tmp_path / "in", model=base)
    assert {next(iter(v)) for v in params.values()} == LOADED_AS[case.split("-")[0]]
    if case.startswith("ia3"):  # peft's per-channel gains stay per channel: g_channel (groups, channels)
        assert params["g"]["ia3_ff"]["g_channel"].shape == (2, 2)
    assert_parity(pm, base, params, x)
    assert_round_trip(pm, base, params, x, tmp_path)


def test_peft_oft_embedding_loads_trains_and_saves_like_peft(tmp_path):
    """peft's OFT on an nn.Embedding rotates the looked-up vectors: the output-side leaf Q_out."""
    base = emb_net()
    pm = peft_model(base, peft.OFTConfig(oft_block_size=4, target_modules=["emb", "head"]))
    pm.save_pretrained(tmp_path / "in", save_embedding_layers=False)
    params = lf.load_peft(tmp_path / "in", model=base)
    assert set(params["emb"]["oft"]) == {"Q_out", "neumann"} and set(params["head"]["oft"]) == {"Q", "neumann"}
    assert_parity(pm, base, params, IDS)
    assert_round_trip(pm, base, params, IDS, tmp_path)


# ----------------------------------------------------------------------------- what peft computes otherwise
def test_peft_oft_on_a_3x3_kernel_is_not_its_own_merge_so_it_is_refused_both_ways(tmp_path):
    base, x = conv_net(), conv_input()
    pm = peft_model(base, peft.OFTConfig(oft_block_size=2, target_modules=["a"]))
    layer = pm.base_model.model.a
    with torch.no_grad():
        zero = copy.deepcopy(layer)
        zero.oft_R["default"].weight.zero_()
        assert rel_err(zero(x), base.a(x)) > 0.5  # peft's forward at R = I (fold of unfold sums overlapping patches)
        unmerged = layer(x)
        layer.merge()
        assert rel_err(layer(x), unmerged) > 0.5  # and its merge (the rotated kernel) computes another function
        layer.unmerge()
    pm.save_pretrained(tmp_path / "in")
    match = r"'a' is an nn.Conv2d with kernel_size=\(3, 3\).*F.fold of the rotated F.unfold"
    with pytest.raises(ValueError, match=match):
        lf.load_peft(tmp_path / "in", model=base)
    params = lf.init(0, base, lf.OFTConfig(oft_block_size=2), targets=r"^a$")  # lite_fn adapts it (W·Rᵀ)…
    with pytest.raises(ValueError, match=r"save_peft: " + match):  # …but writes no file peft would read otherwise
        lf.save_peft(tmp_path / "out", params, model=base)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["HRA", "BOFT"])
@pytest.mark.parametrize(
    ("odd", "what"),
    [(dict(dilation=2), r"dilation=\(2, 2\)"), (dict(padding_mode="reflect"), r"padding_mode='reflect'")],
)
def test_hra_boft_conv_geometry_peft_drops_is_refused_both_ways(method, odd, what, tmp_path):
    cfg = (
        peft.HRAConfig(r=2, target_modules=["c"]) if method == "HRA" else peft.BOFTConfig(boft_block_size=2, target_modules=["c"])
    )
    peft_model(conv_net(), cfg).save_pretrained(tmp_path / "in")  # a file for the plain layer, same shapes
    match = rf"'c' is an nn.Conv2d with {what}: peft's {method} forward calls F.conv2d"
    with pytest.raises(ValueError, match=match):
        lf.load_peft(tmp_path / "in", model=conv_net(**odd))
    ours = lf.HRAConfig(r=2) if method == "HRA" else lf.BOFTConfig(block_size=2)
    params = lf.init(0, conv_net(**odd), ours, targets=r"^c$")
    with pytest.raises(ValueError, match=r"save_peft: " + match):
        lf.save_peft(tmp_path / "out", params, model=conv_net(**odd))


SAVE_REFUSED = {
    "hra-groups": (lf.HRAConfig(r=2), 2, "g", r"'g' has groups=2, which peft's HRA refuses"),
    "boft-groups": (lf.BOFTConfig(block_size=2), 2, "g", r"'g' has groups=2, which peft's BOFT refuses"),
    "oft-groups": (lf.OFTConfig(oft_block_size=2), 2, "g", r"'g' is an nn.Conv2d with kernel_size=\(3, 3\)"),
    "hra-conv3d": (lf.HRAConfig(r=2), 3, "a", r"'a' is an nn.Conv3d, but peft's HRA adapts nn.Linear and nn.Conv2d only"),
    "oft-conv3d": (lf.OFTConfig(oft_block_size=2), 3, "b", r"'b' is an nn.Conv3d, but peft's OFT adapts nn.Linear, nn.Conv2d"),
    "ia3-conv1d": (lf.IA3Config(), 1, "a", r"'a' is an nn.Conv1d, but peft's IA3 adapts .* nn.Conv2d and nn.Conv3d only"),
}


@pytest.mark.parametrize("case", sorted(SAVE_REFUSED))
def test_save_refuses_convolutions_peft_does_not_adapt(case, tmp_path):
    cfg, dim, target, match = SAVE_REFUSED[case]
    base = conv_net(dim)
    params = lf.init(0, base, cfg, targets=rf"^{target}$")
    with pytest.raises(ValueError, match=r"save_peft: " + match):
        lf.save_peft(tmp_path / "out", params, model=base)
    assert not (tmp_path / "out").exists()


def test_ia3_ff_conv_gains_save_only_when_peft_can_hold_them(tmp_path):
    """lf.init's g on a conv has a gain per (channel, kernel position): saved only while each channel's gains are
    equal (exact; repeated over the groups), refused once they differ; g_channel (peft's form) saves as it is."""
    base, x = conv_net(), conv_input()
    params = lf.init(0, base, lf.IA3FFConfig(), targets=r"^(g|c)$")
    with torch.no_grad():
        for path in ("g", "c"):
            g = params[path]["ia3_ff"]["g"]
            g.copy_(torch.linspace(0.5, 1.5, g.shape[0] // 9, dtype=F64).repeat_interleave(9))  # one value per channel
    lf.save_peft(tmp_path / "equal", params, model=base)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "equal")).eval()
    with torch.no_grad():
        y = lf.call(base, params, x)
        assert rel_err(back(x), y) <= 1e-12 and rel_err(y, base(x)) > 1e-3
    with torch.no_grad():
        params["g"]["ia3_ff"]["g"][4] += 0.1  # channel 0's kernel position 4
    with pytest.raises(ValueError, match=r"save_peft: 'g' is a convolution whose ia3_ff gains g differ across the 9"):
        lf.save_peft(tmp_path / "differ", params, model=base)
    params["g"]["ia3_ff"] = {"g_channel": torch.full((2, 2), 0.7, dtype=F64, requires_grad=True)}
    lf.save_peft(tmp_path / "channel", params, model=base)
    reread = lf.load_peft(tmp_path / "channel", model=base)
    assert torch.equal(reread["g"]["ia3_ff"]["g_channel"], params["g"]["ia3_ff"]["g_channel"])


# ----------------------------------------------------------------------------- the contract on these kinds
def _with_channel_form(params):
    """The IA3-FF layers of params in peft's per-channel form (what lf.load_peft gives for a conv)."""
    out = {}
    for path, bv in params.items():
        if "ia3_ff" in bv and path == "g":
            bv = {"ia3_ff": {"g_channel": torch.ones(2, 2, dtype=F64, requires_grad=True)}}
        out[path] = bv
    return out


OWN = [
    ("ia3", lf.IA3Config(), r"^(a|b|c|g)$"),
    ("ia3_ff", lf.IA3FFConfig(), r"^(a|b|c|g)$"),
    ("ia3_ff-channel", lf.IA3FFConfig(), r"^(a|g)$"),
    ("hra", lf.HRAConfig(r=2), r"^(a|b|c|g)$"),
    ("oft", lf.OFTConfig(oft_block_size=2), r"^(a|b|c|g)$"),
    ("boft", lf.BOFTConfig(block_size=2), r"^(a|b|c|g)$"),
    ("boft-butterfly", lf.BOFTConfig(block_size=2, n_butterfly_factor=2), r"^(a|c)$"),
]


@pytest.mark.parametrize(("tag", "cfg", "targets"), OWN, ids=[t for t, *_ in OWN])
def test_identity_merge_vmap_and_a_train_step_on_convs(tag, cfg, targets):
    base, x = conv_net(), conv_input()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    y0 = base(x)
    p0 = lf.init(0, base, cfg, targets=targets)
    if tag.endswith("channel"):
        p0 = _with_channel_form(p0)
    y_init = lf.call(base, p0, x)
    if tag == "hra":
        assert rel_err(y_init, y0) <= 1e-14  # pairs of equal reflections: the identity up to rounding
    else:
        assert torch.equal(y_init, y0)  # identity at init, bit for bit
    p1, p2 = moved(p0, seed=1, scale=0.3), moved(p0, seed=2, scale=0.3)
    y1 = lf.call(base, p1, x)
    assert rel_err(y1, y0) > 1e-3
    merged = lf.merge(base, p1)
    assert rel_err(torch.func.functional_call(base, merged, (x,)), y1) <= 1e-12
    ys = torch.func.vmap(lambda q: lf.call(base, q, x))(lf.stack([p1, p2]))
    assert rel_err(ys[0], y1) <= 1e-12 and rel_err(ys[1], lf.call(base, p2, x)) <= 1e-12
    lf.call(base, p1, x).square().sum().backward()
    for path, by_variant in p1.items():
        ((name, leaves),) = by_variant.items()
        for k, t in leaves.items():
            assert (t.grad is not None) == (k in variants.get(name).TRAINABLE), (path, k)
    assert all(t.grad is None for t in base.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_oft_output_side_on_an_embedding_merge_vmap_and_a_train_step():
    base = emb_net()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    p0 = {"emb": {"oft": {"Q_out": torch.zeros(2, 6, dtype=F64, requires_grad=True)}}}  # 2 blocks of 4 on dim 8
    assert torch.equal(lf.call(base, p0, IDS), base(IDS))
    p1, p2 = moved(p0, seed=1, scale=0.3), moved(p0, seed=2, scale=0.3)
    y1 = lf.call(base, p1, IDS)
    assert rel_err(y1, base(IDS)) > 1e-3
    Q = p1["emb"]["oft"]["Q_out"].detach()
    S = torch.zeros(2, 4, 4, dtype=F64)
    rows, cols = torch.triu_indices(4, 4, 1)
    S[:, rows, cols] = Q
    S = S - S.mT
    eye = torch.eye(4, dtype=F64)
    R = torch.block_diag(*torch.linalg.solve(eye + S, eye - S, left=False))  # (I − S)(I + S)⁻¹, the exact Cayley
    ref = base.head(torch.tanh(base.emb(IDS) @ R))  # the looked-up vectors rotated: y = (x Wᵀ) R, float64
    assert rel_err(y1, ref) <= 1e-12
    assert rel_err(torch.func.functional_call(base, lf.merge(base, p1), (IDS,)), y1) <= 1e-12
    ys = torch.func.vmap(lambda q: lf.call(base, q, IDS))(lf.stack([p1, p2]))
    assert rel_err(ys[0], y1) <= 1e-12 and rel_err(ys[1], lf.call(base, p2, IDS)) <= 1e-12
    lf.call(base, p1, IDS).sum().backward()
    assert p1["emb"]["oft"]["Q_out"].grad is not None
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_output_side_oft_and_grouped_channel_gains_refuse_to_act_on_a_linear_input():
    """Neither transforms a layer's input alone, so the light path's input hook refuses them by name."""
    x = torch.randn(2, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"output-side form \(leaf Q_out.*rotates the layer's output"):
        oft.apply_input({"Q_out": torch.zeros(2, 6, dtype=F64)}, x)
    with pytest.raises(ValueError, match=r"g_channel of shape \(2, 4\) gives each of 2 output groups its own input gains"):
        ia3_ff.apply_input({"g_channel": torch.ones(2, 4, dtype=F64)}, x)


def test_oft_embedding_gradient_from_a_nonzero_padding_row_is_the_documented_deviation(tmp_path):
    """peft rotates the looked-up vectors, so padding tokens send Q_out a gradient through a nonzero padding row; the
    merged table's padding row gets none (F.embedding's padding_idx). Outputs still agree (oft.py: Deviation)."""
    base = emb_net()
    with torch.no_grad():
        base.emb.weight[0].normal_(generator=_gen(3))
    pm = peft_model(base, peft.OFTConfig(oft_block_size=4, target_modules=["emb"]))
    pm.save_pretrained(tmp_path / "in", save_embedding_layers=False)
    params = lf.load_peft(tmp_path / "in", model=base)
    ids = torch.zeros(1, 3, dtype=torch.long)  # padding tokens only
    y_ref, y_our = pm(ids), lf.call(base, params, ids)
    assert rel_err(y_our, y_ref) <= 1e-12 and rel_err(y_ref, base(ids)) > 1e-3
    (g_ref,) = torch.autograd.grad(y_ref.sum(), [pm.base_model.model.emb.oft_embedding_R["default"].weight])
    (g_our,) = torch.autograd.grad(y_our.sum(), [params["emb"]["oft"]["Q_out"]])
    assert g_ref.abs().max() > 1e-3 and torch.equal(g_our, torch.zeros_like(g_our))
