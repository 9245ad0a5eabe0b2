"""The LoRA family (LoRA, rsLoRA, DoRA; PiSSA, which peft stores as LoRA) on convolutions and embeddings.

* the ``merged`` hooks (lora, dora, pissa, eva) against the identity rule ``variants.dense_weights``;
* peft parity on copied, perturbed tensors: Conv1d / Conv2d / Conv3d (stride, padding, 'same', 1×1) and nn.Embedding
  (with and without padding_idx), LoRA / rsLoRA / DoRA — eval outputs and the gradients of a loss, both directions
  (lf.load_peft of peft's file; lf.save_peft read back by peft, tensor for tensor);
* what peft's form cannot hold, refused by name: grouped, dilated and non-zero-padded convolutions, PiSSA's residual
  init on a convolution, a lora_bias on an embedding, factors a codec wrote in the linear layout on a conv (AntiPaSTO's
  today), nn.MultiheadAttention (peft 0.21 adds its out_proj update twice — shown here);
* the contract on these kinds: identity at init, merge == call, vmap over stacked == loop, a train step leaves the
  base model untouched.
"""

import copy
from typing import Any

import peft
import pytest
import torch
from helpers import layer_params, moved, perturb, rel_err
from safetensors.torch import load_file
from torch import nn

import lite_fn as lf
from lite_fn import variants

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and much faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- merged hooks
MERGED = [
    ("lora", lf.LoRAConfig(r=3, alpha=5)),
    ("lora", lf.LoRAConfig(r=3, alpha=5, use_rslora=True)),
    ("lora", lf.LoRAConfig(r=3, lora_bias=True)),
    ("dora", lf.DoRAConfig(r=3, alpha=5)),
    ("dora", lf.DoRAConfig(r=3, use_rslora=True)),
    ("pissa", lf.PiSSAConfig(r=3, alpha=5)),
    ("eva", lf.EVAConfig(r=3)),
]


@pytest.mark.parametrize(("name", "cfg"), MERGED, ids=lambda c: c if isinstance(c, str) else repr(c)[:40])
def test_merged_hook_equals_the_identity_rule_with_its_gradients(name, cfg):
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)
    spec = variants.get(name)
    merged = spec.merged
    assert merged is not None
    p0 = layer_params(name, cfg, W)
    W0, b0 = merged(p0, W, b)
    assert b0 is not None and torch.equal(W0, W) and torch.equal(b0, b)  # identity at init, bit for bit
    p = perturb(p0, seed=2, scale=0.3)
    (Wm, bm), (Wd, bd) = merged(p, W, b), variants.dense_weights(spec, p, W, b)
    assert bm is not None and bd is not None
    assert rel_err(Wm, Wd) <= 1e-12 and rel_err(bm, bd) <= 1e-12
    assert rel_err(Wm, W) > 1e-3  # the perturbed adapter moves the weight
    C, c = torch.randn(W.shape, generator=g, dtype=F64), torch.randn(b.shape, generator=g, dtype=F64)
    trainable = sorted(k for k, v in p.items() if v.requires_grad)
    gm = torch.autograd.grad((Wm * C).sum() + (bm * c).sum(), [p[k] for k in trainable])
    gd = torch.autograd.grad((Wd * C).sum() + (bd * c).sum(), [p[k] for k in trainable])
    for k, x, y in zip(trainable, gm, gd):
        assert rel_err(x, y) <= 1e-12, (name, k)
    if "bias" not in p:  # a layer without a bias keeps none
        assert merged(p, W, None)[1] is None


def test_dora_merged_detaches_the_norm_as_apply_does():
    """∂W'/∂m and the factors' gradients with n held constant: a finite-difference check would include ∂n."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 4, generator=g, dtype=F64)
    p = perturb(layer_params("dora", lf.DoRAConfig(r=2), W), seed=4, scale=0.5)
    C = torch.randn(W.shape, generator=g, dtype=F64)
    merged = variants.get("dora").merged
    assert merged is not None
    (gB,) = torch.autograd.grad((merged(p, W)[0] * C).sum(), [p["B"]])
    n = (W + p["scale"] * p["B"].detach() @ p["A"].detach()).norm(dim=1)
    W_ref = (p["m"] / n)[:, None] * (W + p["scale"] * p["B"] @ p["A"])  # n a constant, written from SPEC.md
    (gB_ref,) = torch.autograd.grad((W_ref * C).sum(), [p["B"]])
    assert rel_err(gB, gB_ref) <= 1e-12


# ----------------------------------------------------------------------------- models
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
KERNEL = {1: 3, 2: (3, 2), 3: (2, 3, 2)}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 6, 5)}


class ConvNet(nn.Module):
    """A strided, padded conv, a 1×1 conv and a bias-free 'same'-padded conv, then a linear head."""

    def __init__(self, dim, **odd):
        super().__init__()
        Conv = CONV[dim]
        self.a = Conv(3, 6, KERNEL[dim], stride=2, padding=1)
        self.b = Conv(6, 4, 1)
        self.c = Conv(4, 4, 3, padding="same", bias=False, **odd)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))
        return self.head(h.flatten(2).mean(-1))


class EmbNet(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(12, 6, padding_idx=padding_idx)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def conv_net(dim, **odd):
    torch.manual_seed(dim)
    return ConvNet(dim, **odd).to(F64).eval()


def conv_input(dim):
    return torch.randn(2, 3, *SPATIAL[dim], generator=torch.Generator().manual_seed(5), dtype=F64)


def emb_net(padding_idx=None):
    torch.manual_seed(7)
    return EmbNet(padding_idx).to(F64).eval()


IDS = torch.tensor([[0, 3, 5, 0, 11], [7, 0, 2, 9, 1]])  # token 0 appears: the padding index when there is one


def peft_model(base, seed=0, **cfg):
    """peft's LoRA on a copy of base, every trainable tensor moved off its init."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in pm.named_parameters():
            if t.requires_grad:
                t.add_(0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return pm.eval()


def peft_layer(pm, path: str) -> Any:
    """The module peft put at ``path`` (its adapters are attributes peft adds, so it is typed Any here)."""
    return pm.base_model.model.get_submodule(path)


def peft_leaves(pm, params):
    """(name, lite_fn leaf, peft tensor) for every trainable leaf of params: A / B / m <- lora_A / lora_B /
    lora_magnitude_vector (conv-shaped on a conv), or lora_embedding_A / _B on an embedding."""
    out = []
    for path, by_variant in params.items():
        ((_, leaves),) = by_variant.items()
        layer = peft_layer(pm, path)
        emb = isinstance(layer.get_base_layer(), nn.Embedding)
        theirs = {
            "A": layer.lora_embedding_A["default"] if emb else layer.lora_A["default"].weight,
            "B": layer.lora_embedding_B["default"] if emb else layer.lora_B["default"].weight,
        }
        if "m" in leaves:
            theirs["m"] = layer.lora_magnitude_vector["default"].weight
        out += [(f"{path}.{k}", leaves[k], t) for k, t in theirs.items()]
    return out


def assert_parity(pm, base, params, x, seed=0):
    """peft's model and lf.call on the same input: outputs to 1e-5, and for one random cotangent the gradients of
    every trainable leaf (peft's tensor read in lite_fn's layout) to 1e-4."""
    y_ref, y_our = pm(x), lf.call(base, params, x)
    assert rel_err(y_our, y_ref) <= 1e-5, rel_err(y_our, y_ref)
    assert rel_err(y_ref, base(x)) > 1e-3  # the adapter changes the output
    cot = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=y_ref.dtype)
    leaves = peft_leaves(pm, params)
    g_ref = torch.autograd.grad((y_ref * cot).sum(), [t for *_, t in leaves])
    g_our = torch.autograd.grad((y_our * cot).sum(), [mine for _, mine, _ in leaves])
    for (name, mine, _), go, gr in zip(leaves, g_our, g_ref):
        assert rel_err(go, gr.reshape(mine.shape)) <= 1e-4, (name, rel_err(go, gr.reshape(mine.shape)))


def assert_round_trip(pm, base, params, x, tmp_path):
    """lf.save_peft of the loaded params: peft reads it back to the same outputs, and the file holds peft's tensors."""
    pm.save_pretrained(tmp_path / "theirs")
    lf.save_peft(tmp_path / "ours", params, model=base)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert rel_err(back(x), lf.call(base, params, x)) <= 1e-12
    theirs, ours = (
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"),
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert ours[k].shape == t.shape and torch.equal(ours[k].to(t.dtype), t), k


PEFT_FLAVOURS = {
    "lora": dict(r=2, lora_alpha=3),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, rank_pattern={"b": 2}),
    "dora": dict(r=2, lora_alpha=5, use_dora=True),
}


# ----------------------------------------------------------------------------- convolutions
@pytest.mark.parametrize("flavour", sorted(PEFT_FLAVOURS))
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_peft_conv_adapter_loads_trains_and_saves_like_peft(dim, flavour, tmp_path):
    base, x = conv_net(dim), conv_input(dim)
    pm = peft_model(base, target_modules=["a", "b", "c"], **PEFT_FLAVOURS[flavour])
    pm.save_pretrained(tmp_path / "in")
    params = lf.load_peft(tmp_path / "in", model=base)
    assert {next(iter(v)) for v in params.values()} == {"dora" if flavour == "dora" else "lora"}
    assert_parity(pm, base, params, x)
    assert_round_trip(pm, base, params, x, tmp_path)


@pytest.mark.parametrize(
    ("odd", "match"),
    [
        (dict(groups=2), r"'c' is a Conv2d .* groups=2: peft's conv LoRA convolves all 4 input channels"),
        (dict(dilation=2), r"'c' is a Conv2d .* dilation=\(2, 2\): peft builds lora_A .* without its dilation"),
        (dict(padding_mode="reflect"), r"'c' is a Conv2d .* padding_mode='reflect': peft's lora_A pads with zeros"),
    ],
)
def test_conv_geometry_peft_cannot_express_is_refused_both_ways(odd, match, tmp_path):
    base = conv_net(2, **odd)
    pm = peft_model(base, r=2, target_modules=["a", "c"])
    pm.save_pretrained(tmp_path / "in")
    with pytest.raises(ValueError, match=match):
        lf.load_peft(tmp_path / "in", model=base)
    params = lf.init(0, base, lf.LoRAConfig(r=2), targets=r"^(a|c)$")  # lite_fn adapts it (its own weight view)…
    with pytest.raises(ValueError, match=r"save_peft: " + match):  # …but writes no peft file that means otherwise
        lf.save_peft(tmp_path / "out", params, model=base)
    assert not (tmp_path / "out").exists()


def test_pissa_file_on_a_conv_is_refused_as_peft_refuses_it(tmp_path):
    base = conv_net(2)
    pm = peft_model(base, r=2, target_modules=["a"])
    pm.save_pretrained(tmp_path / "in")
    cfg_file = tmp_path / "in" / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"init_lora_weights": true', '"init_lora_weights": "pissa"'))
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' and targets the convolution 'a': peft itself"):
        lf.load_peft(tmp_path / "in", model=base)
    with pytest.raises(ValueError, match="Unknown initialization"):  # what peft does with it
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "in"))


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("flavour", ["lora", "dora"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_peft_embedding_adapter_loads_trains_and_saves_like_peft(padding_idx, flavour, tmp_path):
    base = emb_net(padding_idx)
    pm = peft_model(base, target_modules=["emb"], **PEFT_FLAVOURS[flavour])
    if padding_idx is not None:
        # peft's embedding init has A = 0 and A's padding column never gets a gradient (F.embedding(padding_idx)), so a
        # peft-trained adapter keeps it at zero; with it nonzero, peft would still send the padding tokens' gradient to
        # B (and m), which a merged weight's padding row (no gradient in F.embedding) does not: see the next test
        with torch.no_grad():
            peft_layer(pm, "emb").lora_embedding_A["default"][:, padding_idx] = 0
    pm.save_pretrained(tmp_path / "in")
    params = lf.load_peft(tmp_path / "in", model=base)
    assert_parity(pm, base, params, IDS)
    assert_round_trip(pm, base, params, IDS, tmp_path)


def test_embedding_padding_row_adds_the_adapter_as_peft_does(tmp_path):
    """peft adds s·B·A[:, pad] on padding tokens too (its F.embedding(ids, Aᵀ, padding_idx) only drops gradients),
    so do the merged weights; the padding column of A gets no gradient in either."""
    base = emb_net(padding_idx=0)
    pm = peft_model(base, target_modules=["emb"], r=2, lora_alpha=3)
    A = peft_layer(pm, "emb").lora_embedding_A["default"]
    assert A[:, 0].abs().min() > 0
    pm.save_pretrained(tmp_path / "in")
    params = lf.load_peft(tmp_path / "in", model=base)
    ids = torch.zeros(1, 3, dtype=torch.long)  # padding tokens only
    y_ref, y_our = pm(ids), lf.call(base, params, ids)
    assert rel_err(y_our, y_ref) <= 1e-12 and rel_err(y_ref, base(ids)) > 1e-3
    (gA_ref,) = torch.autograd.grad(y_ref.sum(), [A])
    (gA_our,) = torch.autograd.grad(y_our.sum(), [params["emb"]["lora"]["A"]])
    assert torch.equal(gA_ref, torch.zeros_like(gA_ref)) and torch.equal(gA_our, torch.zeros_like(gA_our))


def test_embedding_lora_bias_is_refused_on_save(tmp_path):
    base = emb_net()
    params = lf.init(0, base, lf.LoRAConfig(r=2, lora_bias=True), targets=r"^emb$")
    with pytest.raises(ValueError, match=r"'emb' is an embedding with a lora_bias leaf 'bias'; peft refuses"):
        lf.save_peft(tmp_path / "out", params, model=base)


# ----------------------------------------------------------------------------- lite_fn's own adapters -> peft
class Kinds(nn.Module):
    """An embedding and a conv of each dimension, fed from one token batch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, (2, 3), padding=(1, 0))
        self.c3 = nn.Conv3d(2, 6, 2, padding=1, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, 8)
        B, T, _ = h.shape
        a = self.c1(h.transpose(1, 2)).mean(-1)
        b = self.c2(h.reshape(B, 4, 2, T)).mean((-2, -1))
        c = self.c3(h.reshape(B, 2, 2, 2, T)).mean((-3, -2, -1))
        return self.head(torch.tanh(a + b + c))


TARGETS = r"^(emb|c1|c2|c3)$"
OWN = [
    ("lora", lf.LoRAConfig(r=2, alpha=3)),
    ("rslora", lf.LoRAConfig(r=2, alpha=3, use_rslora=True)),
    ("dora", lf.DoRAConfig(r=2)),
    ("pissa", lf.PiSSAConfig(r=2, alpha=3)),
]


def kinds():
    torch.manual_seed(11)
    return Kinds().to(F64).eval()


@pytest.mark.parametrize(("tag", "cfg"), OWN, ids=[t for t, _ in OWN])
def test_lite_fn_adapters_on_convs_and_an_embedding_save_for_peft(tag, cfg, tmp_path):
    base = kinds()
    params = moved(lf.init(0, base, cfg, targets=TARGETS), scale=0.3)
    lf.save_peft(tmp_path / "out", params, model=base)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    with torch.no_grad():
        y = lf.call(base, params, IDS)
        assert rel_err(back(IDS), y) <= 1e-10 and rel_err(y, base(IDS)) > 1e-3
    reread = lf.load_peft(tmp_path / "out", model=base)  # pissa comes back as the plain LoRA of rank 2r it wrote
    with torch.no_grad():
        assert rel_err(lf.call(base, reread, IDS), y) <= 1e-10


def test_a_codec_writing_the_linear_layout_on_a_conv_is_refused(tmp_path):
    """AntiPaSTO hands the format its factors with the layer's path only (lora.peft_lowrank(..., layer.path)): on a
    conv or an embedding that layout is not peft's, and the save says so instead of writing a file peft cannot load."""
    base = kinds()
    params = lf.init(0, base, lf.AntiPaSTOConfig(r=2, block_size=2), targets=r"^(c2|head)$")
    with pytest.raises(ValueError, match=r"save_peft: \['c2'\] are conv / embedding layers.*linear layout"):
        lf.save_peft(tmp_path / "out", params, model=base)


# ----------------------------------------------------------------------------- the contract on these kinds
@pytest.mark.parametrize(("tag", "cfg"), OWN, ids=[t for t, _ in OWN])
def test_identity_merge_vmap_and_a_train_step_on_convs_and_an_embedding(tag, cfg):
    base = kinds()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    y0 = base(IDS)
    p0 = lf.init(0, base, cfg, targets=TARGETS)
    assert torch.equal(lf.call(base, p0, IDS), y0)  # identity at init, bit for bit
    p1, p2 = moved(p0, seed=1, scale=0.3), moved(p0, seed=2, scale=0.3)
    y1 = lf.call(base, p1, IDS)
    assert rel_err(y1, y0) > 1e-3
    merged = lf.merge(base, p1)
    assert {k for k in merged if k.endswith(".weight")} == {f"{p}.weight" for p in ("emb", "c1", "c2", "c3")}
    assert all(torch.equal(merged[k], before[k]) for k in merged if k.endswith(".bias"))  # the biases pass unchanged
    assert rel_err(torch.func.functional_call(base, merged, (IDS,)), y1) <= 1e-12
    ys = torch.func.vmap(lambda q: lf.call(base, q, IDS))(lf.stack([p1, p2]))
    assert rel_err(ys[0], y1) <= 1e-12 and rel_err(ys[1], lf.call(base, p2, IDS)) <= 1e-12
    lf.call(base, p1, IDS).square().sum().backward()
    for path, by_variant in p1.items():
        ((name, leaves),) = by_variant.items()
        for k, t in leaves.items():
            assert (t.grad is not None) == (k in variants.get(name).TRAINABLE), (path, k)
    assert all(t.grad is None for t in base.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


# ----------------------------------------------------------------------------- nn.MultiheadAttention
class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_peft_mha_lora_adds_out_proj_twice_so_lite_fn_refuses_it(tmp_path):
    """peft 0.21's LoRA on nn.MultiheadAttention merges its out_proj update twice per forward (huggingface/peft#3774):
    shown against hand-merged models, so this fails (and MHA support can be added) once peft computes W + s·BA."""
    torch.manual_seed(0)
    base = WithAttention().to(F64).eval()
    x = torch.randn(2, 4, 8, dtype=F64)
    pm = peft_model(base, r=2, lora_alpha=3, target_modules=["attn"])
    wrapped = peft_layer(pm, "attn")
    s, out = wrapped.scaling["default"], wrapped.base_layer.out_proj

    def hand_merged(times):
        ref = copy.deepcopy(base)
        with torch.no_grad():
            ref.attn.in_proj_weight += s * wrapped.lora_B["default"].weight @ wrapped.lora_A["default"].weight
            ref.attn.out_proj.weight += times * s * out.lora_B["default"].weight @ out.lora_A["default"].weight
        return ref(x)

    with torch.no_grad():
        y = pm(x)
        assert rel_err(hand_merged(2), y) <= 1e-12 and rel_err(hand_merged(1), y) > 1e-3
    pm.save_pretrained(tmp_path / "in")
    with pytest.raises(ValueError, match=r"peft's LoRA on an nn.MultiheadAttention \(target 'attn'.*adds the out_proj"):
        lf.load_peft(tmp_path / "in", model=base)
    params = lf.init(0, base, lf.LoRAConfig(r=2), targets=r"^attn(\.out_proj)?$")
    with pytest.raises(ValueError, match=r"save_peft: peft's LORA is written by lite_fn for .* 'attn' is a MultiheadAttention"):
        lf.save_peft(tmp_path / "out", params, model=base)
