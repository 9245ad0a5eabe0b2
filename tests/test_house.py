"""The house rules, as tests: a variant written here (outside the library) brings its own peft mapping
and round-trips through lf.save_peft / lf.load_peft; nothing outside lite_fn/variants/ names a variant;
no import circle in lite_fn (lazy imports included); no module reaches into another's private names."""

import ast
import dataclasses
import json
import pathlib
import types
import typing

import pytest
import torch

import lite_fn as lf
from lite_fn import _contract
from lite_fn.variants import lora

PACKAGE = pathlib.Path(lf.__file__).parent


# ----------------------------------------------------------------------------- a user variant with a peft codec
@dataclasses.dataclass(frozen=True)
class ShiftConfig:
    variant_name: typing.ClassVar[str] = "test_shift"


def _shift_config(layers, facts, writer):
    return {"exclude_modules": None, "shift_init": writer.number(0.0)}


SHIFT_FORMAT = _contract.PeftFormat(
    peft_type="TEST_SHIFT",
    suffixes=("shift_d",),
    fields=frozenset({"target_modules", "exclude_modules"}),
    ignores=frozenset({"shift_init"}),
    config=_shift_config,
)


def _shift_read(cfg, layer):
    d = layer.tensors["shift_d"]
    if tuple(d.shape) != (layer.W.shape[0],):
        raise ValueError(f"{cfg.file!r}: {layer.path}.shift_d has shape {tuple(d.shape)}, expected ({layer.W.shape[0]},)")
    return {"d": d}


SHIFT = types.SimpleNamespace(
    NAME="test_shift",
    TRAINABLE=frozenset({"d"}),
    Config=ShiftConfig,
    init=lambda key, W, cfg, statistic=None: {"d": torch.zeros(W.shape[0], dtype=W.dtype, requires_grad=True)},
    apply=lambda params, W, x, b=None: torch.nn.functional.linear(x, W, b) + params["d"],
    shapes=lambda leaves, d_out, d_in: {"d": (d_out,)},
    PEFT=_contract.PeftCodec(
        format=SHIFT_FORMAT,
        claims=lambda cfg, path: True,
        tensors=lambda cfg, layer: ("shift_d",),
        read=_shift_read,
        write=lambda leaves, layer: ({"shift_d": leaves["d"].detach()}, {}),
    ),
)


@dataclasses.dataclass(frozen=True)
class HalfLoRAConfig:
    variant_name: typing.ClassVar[str] = "test_half_lora"


HALF_LORA = types.SimpleNamespace(  # s·BA with s = 1/2 and B initialised off zero; peft writes it as a LoRA
    NAME="test_half_lora",
    TRAINABLE=frozenset({"A", "B"}),
    Config=HalfLoRAConfig,
    init=lambda key, W, cfg, statistic=None: {
        "A": torch.randn(2, W.shape[1], generator=torch.Generator().manual_seed(int(key))).requires_grad_(),
        "B": torch.randn(W.shape[0], 2, generator=torch.Generator().manual_seed(int(key) + 1)).requires_grad_(),
    },
    apply=lambda params, W, x, b=None: torch.nn.functional.linear(x, W, b) + 0.5 * (x @ params["A"].T) @ params["B"].T,
    shapes=lambda leaves, d_out, d_in: {"A": (2, d_in), "B": (d_out, 2)},
    PEFT=_contract.PeftCodec(
        format=lora.PEFT_LORA,
        write=lambda leaves, layer: lora.peft_lowrank(leaves["A"], leaves["B"], 0.5, layer.path),
    ),
)


@pytest.fixture
def registered():
    specs = [lf.register_variant(SHIFT), lf.register_variant(HALF_LORA)]
    yield specs
    for spec in specs:
        lf.REGISTRY.pop(spec.NAME)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).eval()


def test_a_variant_defined_here_round_trips_through_peft_files(registered, tmp_path):
    net, x = _net(), torch.randn(4, 6)
    params = lf.init(0, net, ShiftConfig(), targets=r"^(0|2)$")
    params = {p: {"test_shift": {"d": torch.randn_like(v["test_shift"]["d"]).requires_grad_()}} for p, v in params.items()}
    lf.save_peft(tmp_path / "shift", params, model=net)
    cfg = json.loads((tmp_path / "shift" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TEST_SHIFT" and sorted(cfg["target_modules"]) == ["0", "2"]
    back = lf.load_peft(tmp_path / "shift", model=net)
    assert list(back) == ["0", "2"] and all(torch.equal(back[p]["test_shift"]["d"], params[p]["test_shift"]["d"]) for p in back)
    assert back["0"]["test_shift"]["d"].requires_grad  # trainability as the variant declares it
    assert torch.equal(lf.call(net, back, x), lf.call(net, params, x))
    assert not torch.equal(lf.call(net, back, x), net(x))  # a perturbed adapter, not the identity

    (tmp_path / "shift" / "adapter_config.json").write_text(json.dumps({**cfg, "shift_mode": "fancy"}))
    with pytest.raises(ValueError, match=r"shift_mode='fancy'.*does not know the field"):
        lf.load_peft(tmp_path / "shift", model=net)


def test_a_variant_defined_here_writes_peft_lora_that_peft_loads(registered, tmp_path):
    peft = pytest.importorskip("peft")
    net, x = _net(), torch.randn(4, 6)
    params = lf.init(3, net, HalfLoRAConfig(), targets=r"^0$")
    lf.save_peft(tmp_path / "half", params, model=net)
    reference = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "half")).eval()
    torch.testing.assert_close(reference(x), lf.call(net, params, x), rtol=1e-5, atol=1e-6)
    back = lf.load_peft(tmp_path / "half", model=net)  # a write-only codec: LoRA's codec reads it back
    assert list(back["0"]) == ["lora"]
    torch.testing.assert_close(lf.call(net, back, x), lf.call(net, params, x), rtol=1e-5, atol=1e-6)


def test_a_codec_must_be_a_peft_codec():
    bad = types.SimpleNamespace(**{**vars(SHIFT), "NAME": "test_bad", "PEFT": {"peft_type": "X"}})
    bad.Config = dataclasses.make_dataclass("BadConfig", [], frozen=True)
    bad.Config.variant_name = "test_bad"
    with pytest.raises(TypeError, match=r"test_bad: PEFT must be a lite_fn._contract.PeftCodec"):
        lf.register_variant(bad)
    assert "test_bad" not in lf.REGISTRY


# ----------------------------------------------------------------------------- structure
def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(f.read_text(encoding="utf-8"))
    return out


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """lite_fn modules ``name`` imports anywhere in its body (functions included: lazy imports count)."""
    base = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{root}.{node.module}" if node.module else root
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_circle_in_the_package():
    modules = _modules()
    graph = {n: _imports(n, t, set(modules)) for n, t in modules.items()}
    for n in list(graph):  # importing a.b.c runs a.b's __init__ first; the package's own import of its parts is fine
        graph[n] = {m for m in graph[n] if not n.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if m not in state:
                visit(m, [*stack, m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert "lite_fn.peft_io" in graph and "lite_fn.demo.run" in graph  # the scan sees the packages


def test_no_library_module_imports_the_demo_programs():
    modules = _modules()
    for n, t in modules.items():
        if not n.startswith("lite_fn.demo"):
            assert not {m for m in _imports(n, t, set(modules)) if m.startswith("lite_fn.demo")}, n


def test_nothing_outside_the_variants_names_a_variant():
    names = set(lf.REGISTRY)
    found = []
    for n, t in _modules().items():
        if n.startswith(("lite_fn.variants", "lite_fn.demo")):
            continue
        for node in ast.walk(t):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{n}:{node.lineno} {node.value!r}")
    assert not found, found


def test_no_module_reaches_into_another_modules_private_names():
    modules = _modules()
    found = []
    for n, t in modules.items():
        aliases = {}  # local name -> lite_fn module
        for node in ast.walk(t):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(t):
            if isinstance(node, ast.ImportFrom) and node.level:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and not _is_module(n, node, a.name):
                        found.append(f"{n}:{node.lineno} imports {a.name}")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{n}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, found


def _is_module(name: str, node: ast.ImportFrom, attr: str) -> bool:
    """Whether ``from <node> import attr`` (relative, inside module ``name``) names a module (a private
    module such as lite_fn._fs may be imported; its private names may not)."""
    base = name if _is_package(name) else name.rpartition(".")[0]
    parts = base.split(".")
    root = ".".join(parts[: len(parts) - node.level + 1])
    pkg = f"{root}.{node.module}" if node.module else root
    path = PACKAGE.parent / pkg.replace(".", "/") / attr
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()
