"""A catalogue of bad inputs across the public API: each ends in a clear error that names the bad
value (the regex) — never a bare KeyError/TypeError from deep inside, never a silent result."""

import copy

import pytest
import torch
from models import tiny, tokens
from torch import nn

import lite_fn as lf

M = tiny("llama")
Q = "model.layers.0.self_attn.q_proj"


def lora(**kw):
    return lf.init(0, M, lf.LoRAConfig(r=4, **kw), targets=r"q_proj$")


def with_leaf(leaf, value, cfg=None, name="lora"):
    p = lf.init(0, M, cfg or lf.LoRAConfig(r=4), targets=r"q_proj$")
    p[Q][name] = {**p[Q][name], leaf: value}
    return p


def without_leaf(leaf):
    p = lora()
    p[Q]["lora"] = {k: v for k, v in p[Q]["lora"].items() if k != leaf}
    return p


def steer():
    return lf.init(0, M, lf.AntiPaSTOConfig(r=8, block_size=4), targets=r"o_proj$")


def _cast_inside_a_block():
    model = copy.deepcopy(M)
    with lf.applied(model, lora()):
        model.double()
        model(tokens())


def stacked(k=3):
    return lf.stack([lora() for _ in range(k)])


SKELETON = copy.deepcopy(M).to("meta")
WEIGHTS = {**{k: v.detach() for k, v in M.named_parameters()}, **dict(M.named_buffers())}

CATALOGUE = [
    # --- configs
    ("LoRAConfig r=0", lambda: lf.LoRAConfig(r=0), ValueError, r"r=0 must be a positive int"),
    ("LoRAConfig r=-2", lambda: lf.LoRAConfig(r=-2), ValueError, r"r=-2"),
    ("LoRAConfig r=2.5", lambda: lf.LoRAConfig(r=2.5), ValueError, r"r=2.5"),
    ("LoRAConfig r=True", lambda: lf.LoRAConfig(r=True), ValueError, r"r=True"),
    ("LoRAConfig alpha=nan", lambda: lf.LoRAConfig(alpha=float("nan")), ValueError, r"alpha=nan"),
    ("LoRAConfig alpha='16'", lambda: lf.LoRAConfig(alpha="16"), ValueError, r"alpha='16'"),
    ("LoRAConfig init", lambda: lf.LoRAConfig(init="xavier"), ValueError, r"init='xavier'"),
    ("LoRAConfig dropout=1", lambda: lf.LoRAConfig(dropout=1.0), ValueError, r"dropout=1.0"),
    ("LoRAConfig dropout<0", lambda: lf.LoRAConfig(dropout=-0.5), ValueError, r"dropout=-0.5"),
    ("PiSSAConfig alpha=0", lambda: lf.PiSSAConfig(alpha=0), ValueError, r"alpha=0"),
    ("PiSSAConfig niter=-1", lambda: lf.PiSSAConfig(niter=-1), ValueError, r"niter=-1"),
    ("HRAConfig odd r", lambda: lf.init(0, M, lf.HRAConfig(r=3), targets=r"q_proj$"), ValueError, r"r=3"),
    ("EVAConfig rho<1", lambda: lf.EVAConfig(rho=0.5), ValueError, r"rho=0.5"),
    ("EVAConfig tau>1", lambda: lf.EVAConfig(tau=2.0), ValueError, r"tau=2.0"),
    ("AntiPaSTO block_size=1", lambda: lf.AntiPaSTOConfig(block_size=1), ValueError, r"block_size=1"),
    ("AntiPaSTO r not multiple", lambda: lf.AntiPaSTOConfig(r=10, block_size=4), ValueError, r"r=10 is not a multiple"),
    ("AntiPaSTO max_angle", lambda: lf.AntiPaSTOConfig(max_angle=4.0), ValueError, r"max_angle=4.0"),
    ("AntiPaSTO select", lambda: lf.AntiPaSTOConfig(select="best"), ValueError, r"select='best'"),
    ("AntiPaSTO nothing to rotate", lambda: lf.AntiPaSTOConfig(rotate_v=False), ValueError, r"rotate_v=False"),
    ("ROAD variant", lambda: lf.ROADConfig(variant="road_3"), ValueError, r"road_3"),
    ("ROAD group size", lambda: lf.init(0, M, lf.ROADConfig(group_size=7), targets=r"q_proj$"), ValueError, r"group_size=7"),
    # --- init
    ("init: not a config", lambda: lf.init(0, M, {"r": 8}), TypeError, r"not a lite_fn config"),
    ("init: bool key", lambda: lf.init(True, M, lf.LoRAConfig(r=4)), TypeError, r"key=True"),
    ("init: float key", lambda: lf.init(1.5, M, lf.LoRAConfig(r=4)), TypeError, r"key=1.5"),
    ("init: regex error", lambda: lf.init(0, M, lf.LoRAConfig(r=4), targets="(q_proj"), ValueError, r"targets='\(q_proj'"),
    ("init: no match", lambda: lf.init(0, M, lf.LoRAConfig(r=4), targets="nothing_here$"), ValueError, r"matches no module"),
    ("init: not linear", lambda: lf.init(0, M, lf.LoRAConfig(r=4), targets=r"input_layernorm$"), TypeError, r"LlamaRMSNorm"),
    ("init: a norm", lambda: lf.init(0, M, lf.LoRAConfig(r=4), targets=r"model\.norm$"), TypeError, r"RMSNorm"),
    ("init: rank too big", lambda: lf.init(0, M, lf.LoRAConfig(r=64), targets=r"q_proj$"), ValueError, r"r=64 exceeds"),
    (
        "init: unused calibration",
        lambda: lf.init(0, M, lf.LoRAConfig(r=4), calibration=[tokens()]),
        ValueError,
        r"does not use calibration",
    ),
    ("init: missing calibration", lambda: lf.init(0, M, lf.EVAConfig(r=2), targets=r"q_proj$"), ValueError, r"pass calibration="),
    (
        "init: empty calibration",
        lambda: lf.init(0, M, lf.EVAConfig(r=2), targets=r"q_proj$", calibration=[], progress=False),
        ValueError,
        r"calibration data was empty",
    ),
    (
        "init: max_batches=0",
        lambda: lf.init(0, M, lf.EVAConfig(r=2), targets=r"q_proj$", calibration=[tokens()], max_batches=0),
        ValueError,
        r"max_batches=0",
    ),
    (
        "init: too few tokens",
        lambda: lf.init(0, M, lf.EVAConfig(r=16), targets=r"q_proj$", calibration=[tokens(1, 2)], progress=False),
        ValueError,
        r"fewer than r=16",
    ),
    ("init: meta skeleton", lambda: lf.init(0, SKELETON, lf.LoRAConfig(r=4), targets=r"q_proj$"), ValueError, r"meta device"),
    # --- call: params structure
    ("call: params a list", lambda: lf.call(M, [1], tokens()), TypeError, r"got list"),
    ("call: unknown path", lambda: lf.call(M, {"model.layers.0.self_attn.qq_proj": lora()[Q]}, tokens()), KeyError, r"qq_proj"),
    ("call: two variants", lambda: lf.call(M, {Q: {**lora()[Q], "dora": {}}}, tokens()), ValueError, r"exactly one variant"),
    (
        "call: unknown variant",
        lambda: lf.call(M, {Q: {"lorax": lora()[Q]["lora"]}}, tokens()),
        KeyError,
        r"unknown variant 'lorax'",
    ),
    ("call: leaf not a tensor", lambda: lf.call(M, with_leaf("scale", 2.0), tokens()), TypeError, r"\['scale'\] is a float"),
    ("call: missing scale", lambda: lf.call(M, without_leaf("scale"), tokens()), ValueError, r"missing leaf 'scale'"),
    ("call: missing A", lambda: lf.call(M, without_leaf("A"), tokens()), ValueError, r"missing leaf 'A'"),
    ("call: extra leaf", lambda: lf.call(M, with_leaf("C", torch.ones(2)), tokens()), ValueError, r"unexpected leaf 'C'"),
    (
        "call: scale (4,)",
        lambda: lf.call(M, with_leaf("scale", torch.ones(4)), tokens()),
        ValueError,
        r"\['scale'\] has shape \(4,\)",
    ),
    (
        "call: A transposed",
        lambda: lf.call(M, with_leaf("A", torch.zeros(32, 4)), tokens()),
        ValueError,
        r"\['A'\] has shape \(32, 4\)",
    ),
    (
        "call: B wrong rank",
        lambda: lf.call(M, with_leaf("B", torch.zeros(32, 5)), tokens()),
        ValueError,
        r"\['B'\] has shape \(32, 5\)",
    ),
    (
        "call: ia3 g (1,)",
        lambda: lf.call(M, with_leaf("g", torch.ones(1), lf.IA3Config(), "ia3"), tokens()),
        ValueError,
        r"\['g'\] has shape \(1,\)",
    ),
    (
        "call: dora m (1,)",
        lambda: lf.call(M, with_leaf("m", torch.ones(1), lf.DoRAConfig(r=4), "dora"), tokens()),
        ValueError,
        r"\['m'\] has shape \(1,\)",
    ),
    (
        "call: road alpha (1,)",
        lambda: lf.call(M, with_leaf("alpha", torch.ones(1), lf.ROADConfig(group_size=8), "road"), tokens()),
        ValueError,
        r"\['alpha'\] has shape \(1,\)",
    ),
    (
        "call: road theta form",
        lambda: lf.call(M, with_leaf("theta", torch.zeros(3, 1, 2), lf.ROADConfig(group_size=8), "road"), tokens()),
        ValueError,
        r"theta of shape \(3, 1, 2\) is not a RoAd layout",
    ),
    (
        "call: antipasto S",
        lambda: lf.call(M, with_leaf("S", torch.ones(7), lf.AntiPaSTOConfig(r=8, block_size=4), "antipasto"), tokens()),
        ValueError,
        r"antipasto",
    ),
    (
        "call: hra U",
        lambda: lf.call(M, with_leaf("U", torch.ones(4, 31), lf.HRAConfig(r=4), "hra"), tokens()),
        ValueError,
        r"\['U'\] has shape \(4, 31\)",
    ),
    (
        "call: float64 leaf",
        lambda: lf.call(M, with_leaf("A", torch.zeros(4, 32, dtype=torch.float64)), tokens()),
        TypeError,
        r"float64",
    ),
    (
        "call: stacked without route",
        lambda: lf.call(M, stacked(), tokens()),
        ValueError,
        r"the leaves are stacked \(a leading axis of 3 adapters.*torch.func.vmap.*route=",
    ),
    (
        "call: int64 leaf",
        lambda: lf.call(M, with_leaf("A", torch.zeros(4, 32, dtype=torch.int64)), tokens()),
        TypeError,
        r"\['A'\] has dtype torch.int64; adapter leaves are floating point",
    ),
    (
        "call: model cast inside a block",
        lambda: _cast_inside_a_block(),
        TypeError,
        r"q_proj: the layer's weight is now torch.float64",
    ),
    # --- call: route
    ("route: bool", lambda: lf.call(M, stacked(), tokens(), route=torch.tensor([True, False])), ValueError, r"boolean mask"),
    (
        "route: negative",
        lambda: lf.call(M, stacked(), tokens(), route=torch.tensor([0, -1])),
        ValueError,
        r"index -1.*3 adapters",
    ),
    (
        "route: out of range",
        lambda: lf.call(M, stacked(), tokens(), route=torch.tensor([0, 3])),
        ValueError,
        r"index 3.*3 adapters",
    ),
    ("route: float", lambda: lf.call(M, stacked(), tokens(), route=torch.tensor([0.0, 1.0])), ValueError, r"integer tensor"),
    ("route: 2-D", lambda: lf.call(M, stacked(), tokens(), route=torch.tensor([[0, 1]])), ValueError, r"shape \(1, 2\)"),
    (
        "route: wrong length",
        lambda: lf.call(M, stacked(), tokens(), route=torch.tensor([0, 1, 2])),
        ValueError,
        r"route has 3 entries",
    ),
    ("route: unstacked", lambda: lf.call(M, lora(), tokens(), route=torch.tensor([0, 0])), ValueError, r"leading adapter axis"),
    ("route: str", lambda: lf.call(M, stacked(), tokens(), route="0,1"), TypeError, r"got str"),
    (
        "route: shorter than the batch by a whole factor",
        lambda: lf.call(M, stacked(), tokens(4), route=torch.tensor([0, 1])),
        ValueError,
        r"route has 2 entries but the batch \(args\[0\]\) has 4 examples",
    ),
    (
        "route: one index for a batch of two",
        lambda: lf.call(M, stacked(), input_ids=tokens(2), route=torch.tensor([1])),
        ValueError,
        r"route has 1 entries but the batch \(input_ids\) has 2 examples",
    ),
    # --- call: base=
    ("base: not a dict", lambda: lf.call(SKELETON, lora(), tokens(), base=[1]), TypeError, r"base must be a dict"),
    (
        "base: extra name",
        lambda: lf.call(SKELETON, lora(), tokens(), base={**WEIGHTS, "nope.weight": torch.ones(1)}),
        ValueError,
        r"'nope.weight'",
    ),
    (
        "base: missing",
        lambda: lf.call(SKELETON, lora(), tokens(), base={k: v for k, v in WEIGHTS.items() if k != "model.norm.weight"}),
        ValueError,
        r"model\.norm\.weight",
    ),
    (
        "base: wrong shape",
        lambda: lf.call(SKELETON, lora(), tokens(), base={**WEIGHTS, "model.norm.weight": torch.ones(3)}),
        ValueError,
        r"has shape \(3,\)",
    ),
    (
        "base: not a tensor",
        lambda: lf.call(SKELETON, lora(), tokens(), base={**WEIGHTS, "model.norm.weight": [1.0]}),
        TypeError,
        r"is a list",
    ),
    # --- call: key
    ("key without dropout", lambda: lf.call(M, lora(), tokens(), key=1), ValueError, r"no layer of params has a dropout rate"),
    ("key a float", lambda: lf.call(M, lora(dropout=0.1), tokens(), key=0.5), TypeError, r"key=0.5"),
    # --- trees
    ("stack: empty", lambda: lf.stack([]), ValueError, r"at least one params tree"),
    (
        "stack: different targets",
        lambda: lf.stack([lora(), lf.init(0, M, lf.LoRAConfig(r=4), targets=r"v_proj$")]),
        ValueError,
        r"different structure",
    ),
    (
        "stack: different ranks",
        lambda: lf.stack([lora(), lf.init(0, M, lf.LoRAConfig(r=2), targets=r"q_proj$")]),
        ValueError,
        r"cannot stack leaves of shapes",
    ),
    ("with_alpha: nan", lambda: lf.with_alpha(steer(), float("nan")), ValueError, r"alpha=nan"),
    ("with_alpha: inf", lambda: lf.with_alpha(steer(), float("inf")), ValueError, r"alpha=inf"),
    ("with_alpha: str", lambda: lf.with_alpha(steer(), "1"), ValueError, r"alpha='1'"),
    ("with_alpha: bool", lambda: lf.with_alpha(steer(), True), ValueError, r"alpha=True"),
    ("with_alpha: None", lambda: lf.with_alpha(steer(), None), ValueError, r"alpha=None"),
    ("with_alpha: int tensor", lambda: lf.with_alpha(steer(), torch.tensor(1)), ValueError, r"dtype torch.int64"),
    ("with_alpha: 1-D tensor", lambda: lf.with_alpha(steer(), torch.ones(3)), ValueError, r"shape \(3,\)"),
    ("with_alpha: nan tensor", lambda: lf.with_alpha(steer(), torch.tensor(float("nan"))), ValueError, r"alpha=nan"),
    ("with_alpha: nothing steerable", lambda: lf.with_alpha(lora(), 0.5), ValueError, r"no steerable variant"),
    ("with_alpha: params a list", lambda: lf.with_alpha([1], 0.5), TypeError, r"got list"),
    # --- merge and save
    ("merge: wrong leaf", lambda: lf.merge(M, with_leaf("scale", torch.ones(4))), ValueError, r"\['scale'\] has shape \(4,\)"),
    ("save: not a tensor", lambda: lf.save("/tmp/lite_fn_bad.safetensors", with_leaf("A", [1.0])), TypeError, r"'A'"),
    (
        "save: unknown variant",
        lambda: lf.save("/tmp/lite_fn_bad.safetensors", {Q: {"lorax": lora()[Q]["lora"]}}),
        KeyError,
        r"lorax",
    ),
    (
        "load: missing file",
        lambda: lf.load("/nonexistent/dir/adapter.safetensors"),
        FileNotFoundError,
        r"/nonexistent/dir/adapter\.safetensors",
    ),
    ("load: a directory", lambda: lf.load("/tmp"), ValueError, r"'/tmp'"),
]


def test_catalogue_is_large():
    assert len(CATALOGUE) >= 60


@pytest.mark.parametrize("name, make, exc, pattern", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_gives_a_clear_error(name, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()
    assert torch._C._len_torch_function_stack() == 0  # nothing left active


def test_unsupported_module_names_its_parameters_as_targets():
    m = nn.Sequential(nn.LSTM(4, 4))
    with pytest.raises(TypeError, match=r"module '0' is a torch.nn.modules.rnn.LSTM.*weight_ih_l0"):
        lf.init(0, m, lf.LoRAConfig(r=2), targets=r"^0$")
    with pytest.raises(TypeError, match=r"parameter '0.bias_ih_l0' has shape \(16,\).*2-D"):
        lf.init(0, m, lf.LoRAConfig(r=2), targets=r"^0\.bias_ih_l0$")


def test_a_layout_that_passed_does_not_let_a_bad_one_through():
    """lf.call remembers layouts whose leaves passed the checks; a bad layout afterwards still raises."""
    x = tokens(1, 4)
    good = lora()
    lf.call(M, good, x)
    lf.call(M, good, x)  # the remembered pass
    A = good[Q]["lora"]["A"]
    bad = [
        (with_leaf("A", A[:, :-1]), ValueError, r"\['A'\] has shape"),
        (with_leaf("A", A.double()), TypeError, r"dtype torch.float64"),
        (with_leaf("A", A.detach().numpy()), TypeError, r"every leaf must be a torch.Tensor"),
        (without_leaf("B"), ValueError, r"missing leaf 'B'"),
    ]
    for params, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            lf.call(M, params, x)
    lf.call(M, good, x)
