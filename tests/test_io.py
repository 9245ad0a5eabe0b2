"""Checkpoints (lite_fn.io): bit-exact round trips, integrity against corruption, crafted malformed files,
checks against a model, and the atomic writer (stale temp files, modes, symlinks, killed writers)."""

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from cases import all_cases, case_id
from helpers import moved, needs_calibration, steered
from models import logits, tiny, tokens
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lite_fn as lf
from lite_fn import _fs
from lite_fn import io as lio

CASES = all_cases()
IDS = [case_id(c) for c in CASES]
CALIB = [tokens(2, 6, seed=100 + i) for i in range(3)]
QV = r"(q_proj|v_proj)$"
Q0 = "model.layers.0.self_attn.q_proj"
REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, SIGKILL, umask and symlinks as on POSIX")


# ----------------------------------------------------------------------------- helpers
def model_params(cfg, model, targets=QV, key=0):
    return lf.init(key, model, cfg, targets=targets, calibration=CALIB if needs_calibration(cfg, model) else None, progress=False)


def lora(seed=1, model=None):
    return moved(lf.init(0, model or tiny("llama"), lf.LoRAConfig(r=4), targets=QV, progress=False), seed)


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)  # stacked frozen leaves may be stride-0 views


def assert_same(back, params):
    """back holds exactly params: same paths, variants and leaves, bit-identical, same dtype and trainability."""
    assert list(back) == list(params)
    for p in params:
        assert list(back[p]) == list(params[p])
        for n in params[p]:
            assert list(back[p][n]) == list(params[p][n])
            for k, v in params[p][n].items():
                w = back[p][n][k]
                assert w.dtype == v.dtype and w.shape == v.shape and torch.equal(bits(w), bits(v)), (p, n, k)
                assert w.requires_grad == v.requires_grad, (p, n, k)


def header_len(blob):
    return int.from_bytes(blob[:8], "little")


def craft(header, data=b"", pad=True, length=None):
    """A safetensors file from a header (dict, or raw bytes) and data bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return (len(h) if length is None else length).to_bytes(8, "little") + h + data


def split_file(blob):
    n = header_len(blob)
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def raises_naming(f, exc=ValueError, match=None):
    with pytest.raises(exc) as e:
        lf.load(f)
    assert type(e.value) is exc or isinstance(e.value, exc)
    assert str(f) in str(e.value), str(e.value)
    if match:
        assert re.search(match, str(e.value)), str(e.value)
    return str(e.value)


def temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".lite_fn-tmp"))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_round_trip_bit_identical_and_same_outputs(case, tmp_path):
    _, cfg = case
    model, x = tiny("llama"), tokens()
    params = steered(moved(model_params(cfg, model), 3), 0.7)
    f = tmp_path / "adapter.safetensors"
    lf.save(f, params, config=cfg)
    back = lf.load(f, model=model)
    assert_same(back, params)
    for bv in back.values():
        for lv in bv.values():
            for w in lv.values():
                assert w.is_contiguous() and w._base is None
                assert w.untyped_storage().nbytes() == w.numel() * w.element_size()  # its own memory, not the file's
    assert torch.equal(logits(lf.call(model, back, x)), logits(lf.call(model, params, x)))
    meta = lf.load_metadata(f)
    assert meta["lite_fn_version"] == lf.__version__
    assert {v["config"]["class"] for v in meta["layers"].values()} == {type(cfg).__name__}
    assert temps(tmp_path) == []


def test_metadata_format_keys_and_checksum_readable_by_safetensors(tmp_path):
    from safetensors import safe_open

    params = lora()
    f = tmp_path / "a.safetensors"
    lf.save(f, params, config=lf.LoRAConfig(r=4))
    with safe_open(str(f), "pt") as sf:
        meta = sf.metadata()
        names = set(sf.keys())
    assert meta["format"] == "lite_fn/1" and meta["lite_fn_version"] == lf.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])
    keys = json.loads(meta["keys"])
    assert names == set(keys)
    for key, (mpath, name, leaf, trainable) in keys.items():
        assert key == f"{mpath}.{name}.{leaf}"
        assert trainable == params[mpath][name][leaf].requires_grad
    layers = json.loads(meta["layers"])
    assert set(layers) == set(params) and all(v["variant"] == "lora" for v in layers.values())
    assert layers[Q0]["config"] == {"class": "LoRAConfig", "fields": {**layers[Q0]["config"]["fields"], "r": 4}}


def test_load_to_device_and_tensors_are_writable(tmp_path):
    params = lora()
    f = tmp_path / "a.safetensors"
    lf.save(f, params)
    back = lf.load(f, device="cpu")
    a = back[Q0]["lora"]["A"]
    before = a.detach().clone()
    with torch.no_grad():
        a.add_(1.0)  # writable, and changing it touches nothing else
    assert torch.equal(a, before + 1) and torch.equal(lf.load(f)[Q0]["lora"]["A"], params[Q0]["lora"]["A"].detach())
    meta = lf.load(f, device="meta")
    assert meta[Q0]["lora"]["A"].device.type == "meta" and meta[Q0]["lora"]["A"].requires_grad


def test_stacked_checkpoint_loads_and_checks_against_model(tmp_path):
    model, x = tiny("llama"), tokens(3, 5)
    ps = [lora(10 * k + 1) for k in range(3)]
    stacked = lf.stack(ps)
    f = tmp_path / "stacked.safetensors"
    lf.save(f, stacked)
    back = lf.load(f, model=model)
    assert_same(back, stacked)
    lf.check_against(model, back)
    route = torch.tensor([2, 0, 1])
    assert torch.equal(logits(lf.call(model, back, x, route=route)), logits(lf.call(model, stacked, x, route=route)))
    # read as stacked, a bad leaf is still named (not drowned in "every layer is wrong" unstacked noise)
    bad = {p: {n: dict(lv) for n, lv in bv.items()} for p, bv in stacked.items()}
    bad[Q0]["lora"]["B"] = bad[Q0]["lora"]["B"][:, :, :3]
    lf.save(f, bad)
    with pytest.raises(ValueError) as e:
        lf.load(f, model=model)
    msg = str(e.value)
    assert str(f) in msg and "stacked" in msg and f"[{Q0!r}]['lora']['B']" in msg and "1 problem" in msg
    # different numbers of adapters per layer
    uneven = {p: {n: dict(lv) for n, lv in bv.items()} for p, bv in stacked.items()}
    uneven[Q0]["lora"] = {k: v[:2] for k, v in uneven[Q0]["lora"].items()}
    with pytest.raises(ValueError, match="different numbers of adapters"):
        lf.check_against(model, uneven)


# ----------------------------------------------------------------------------- integrity
def test_single_bit_flips_in_header_never_load_different_params(tmp_path):
    params = {**lora(), **moved(lf.init(0, tiny("llama"), lf.IA3Config(), targets=r"k_proj$", progress=False), 7)}
    good = tmp_path / "good.safetensors"
    lf.save(good, params)
    blob = good.read_bytes()
    region = 8 + header_len(blob)
    rng = random.Random(1234)
    flips = [(i, b) for i in range(8) for b in range(8)]  # the whole length prefix
    flips += [(rng.randrange(region), rng.randrange(8)) for _ in range(1000)]
    f = tmp_path / "flipped.safetensors"
    outcomes = {"identical": 0, "refused": 0}
    for pos, bit in flips:
        bad = bytearray(blob)
        bad[pos] ^= 1 << bit
        f.write_bytes(bytes(bad))
        try:
            back = lf.load(f)
        except ValueError as e:
            assert str(f) in str(e), (pos, bit, str(e))
            outcomes["refused"] += 1
        else:
            assert_same(back, params)
            outcomes["identical"] += 1
    assert sum(outcomes.values()) == len(flips) >= 1064
    assert outcomes["refused"] > 0.9 * len(flips), outcomes


def test_data_bit_flips_are_checksum_mismatches(tmp_path):
    params = lora()
    good = tmp_path / "good.safetensors"
    lf.save(good, params)
    blob = good.read_bytes()
    region = 8 + header_len(blob)
    rng = random.Random(5)
    f = tmp_path / "flipped.safetensors"
    for _ in range(200):
        bad = bytearray(blob)
        bad[rng.randrange(region, len(blob))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(bad))
        raises_naming(f, match="damaged: checksum mismatch")
    with pytest.raises(ValueError, match="checksum mismatch"):
        lf.load_metadata(f)


def _tensors_meta(blob):
    """(tensors, metadata) of a valid lite_fn file, to re-serialize in altered form."""
    header, _ = split_file(blob)
    return st_load(blob), header["__metadata__"]


def _resealed(tensors, meta):
    """A file whose checksum is correct for its (altered) contents: only the structural checks can refuse it."""
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    meta["sha256"] = lio._checksum(meta, tensors)
    return st_save(tensors, metadata=meta)


def _malformed(name, blob):
    header, data = split_file(blob)
    n = header_len(blob)
    meta = header["__metadata__"]
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    first = sorted(entries, key=lambda k: entries[k]["data_offsets"])[:2]
    tensors, _ = _tensors_meta(blob)

    def with_entry(key, **change):
        h = json.loads(json.dumps(header))
        h[key].update(change)
        return craft(h, data)

    if name == "length_plus_one":
        return (n + 1).to_bytes(8, "little") + blob[8:]
    if name == "length_minus_one":
        return (n - 1).to_bytes(8, "little") + blob[8:]
    if name == "huge_header_length":
        return (2**63 + 5).to_bytes(8, "little") + blob[8:]
    if name == "negative_offsets":
        return with_entry(first[0], data_offsets=[-4, entries[first[0]]["data_offsets"][1]])
    if name == "overlapping_offsets":  # the second tensor reuses the first one's bytes
        return with_entry(first[1], data_offsets=entries[first[0]]["data_offsets"])
    if name == "trailing_bytes":
        return blob + b"\0" * 8
    if name == "truncated_data":
        return blob[:-4]
    if name == "header_not_json":
        return craft(b'{"a": not json}', data)
    if name == "header_not_utf8":
        return craft(b'{"\xff\xfe": 1}', data)
    if name == "header_json_array":
        return craft([1, 2, 3], data)
    if name == "missing_metadata":
        return st_save(tensors)
    if name == "foreign_metadata":
        return st_save(tensors, metadata={"format": "pt"})
    if name == "metadata_not_strings":
        return craft({**header, "__metadata__": {**meta, "format": 1}}, data)
    if name == "missing_checksum":
        return st_save(tensors, metadata={k: v for k, v in meta.items() if k != "sha256"})
    if name == "keys_disagree_with_tensors":
        return _resealed({k: v for k, v in tensors.items() if k != first[0]}, meta)
    if name == "key_entry_malformed":
        keys = json.loads(meta["keys"])
        keys[first[0]] = keys[first[0]][:3] + ["yes"]
        return _resealed(tensors, {**meta, "keys": json.dumps(keys)})
    if name == "key_not_joined_parts":
        keys = json.loads(meta["keys"])
        keys[first[0]] = [keys[first[0]][0], "lora", "Z", True]
        return _resealed(tensors, {**meta, "keys": json.dumps(keys)})
    if name == "unknown_variant":
        keys = json.loads(meta["keys"])
        renamed = {}
        for k, t in tensors.items():
            mpath, _, leaf, _ = keys[k]
            renamed[f"{mpath}.nova.{leaf}"] = t
        keys = {f"{v[0]}.nova.{v[2]}": [v[0], "nova", v[2], v[3]] for v in keys.values()}
        layers = {p: {"variant": "nova", "config": None} for p in json.loads(meta["layers"])}
        return _resealed(renamed, {**meta, "keys": json.dumps(keys), "layers": json.dumps(layers)})
    if name == "layers_disagree_with_keys":
        layers = json.loads(meta["layers"])
        layers[next(iter(layers))]["variant"] = "dora"
        return _resealed(tensors, {**meta, "layers": json.dumps(layers)})
    if name == "wrong_dtype_string":
        return with_entry(first[0], dtype="F33")
    if name == "other_valid_dtype":  # same byte count, other meaning: only the checksum can tell
        return with_entry(first[0], dtype="I32")
    if name == "dtype_lite_fn_does_not_store":
        return with_entry(first[0], dtype="F8_E5M2", shape=[entries[first[0]]["shape"][0], 4 * entries[first[0]]["shape"][1]])
    if name == "shape_byte_mismatch":
        shape = entries[first[0]]["shape"]
        return with_entry(first[0], shape=[shape[0] + 1, *shape[1:]])
    if name == "duplicate_header_key":
        text = blob[8 : 8 + n].rstrip(b" ")
        extra = b',"__metadata__":' + json.dumps(meta, separators=(",", ":")).encode()
        return craft(text[:-1] + extra + b"}", data)
    if name == "wrong_format":
        return st_save(tensors, metadata={**meta, "format": "lite_fn/0"})
    if name == "empty":
        return b""
    if name == "seven_bytes":
        return blob[:7]
    if name == "prefix_only":
        return blob[:8]
    raise KeyError(name)


MALFORMED = {
    "length_plus_one": "corrupt",
    "length_minus_one": "corrupt",
    "huge_header_length": "truncated",
    "negative_offsets": "corrupt",
    "overlapping_offsets": "corrupt",
    "trailing_bytes": "corrupt",
    "truncated_data": "corrupt",
    "header_not_json": "not valid JSON",
    "header_not_utf8": "not UTF-8",
    "header_json_array": "JSON list",
    "missing_metadata": "without lite_fn metadata",
    "foreign_metadata": "not a lite_fn checkpoint",
    "metadata_not_strings": "strings to strings",
    "missing_checksum": "lacks \\['sha256'\\]",
    "keys_disagree_with_tensors": "disagree",
    "key_entry_malformed": "\\[module_path, variant, leaf, trainable\\]",
    "key_not_joined_parts": "does not join",
    "unknown_variant": "'nova'.*known variants",
    "layers_disagree_with_keys": "'layers' says",
    "wrong_dtype_string": "F33",
    "other_valid_dtype": "checksum mismatch",
    "dtype_lite_fn_does_not_store": "float8",
    "shape_byte_mismatch": "corrupt",
    "duplicate_header_key": "duplicate JSON key",
    "wrong_format": "lite_fn/0",
    "empty": "empty",
    "seven_bytes": "only 7 bytes",
    "prefix_only": "truncated",
}


@pytest.fixture(scope="module")
def good_blob(tmp_path_factory):
    f = tmp_path_factory.mktemp("good") / "good.safetensors"
    lf.save(f, lora(), config=lf.LoRAConfig(r=4))
    return f.read_bytes()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_is_a_value_error_naming_it(name, good_blob, tmp_path):
    f = tmp_path / f"{name}.safetensors"
    f.write_bytes(_malformed(name, good_blob))
    raises_naming(f, match=MALFORMED[name])
    with pytest.raises(ValueError, match=re.escape(str(f))):
        lf.load_metadata(f)


def test_safetensors_itself_rejects_overlap_gap_and_trailing_bytes(good_blob):
    """Documented reliance: safetensors refuses these layouts (lite_fn checks them again, see _check_layout)."""
    from safetensors import SafetensorError

    for name in ("overlapping_offsets", "trailing_bytes", "length_minus_one"):
        with pytest.raises(SafetensorError):
            st_load(_malformed(name, good_blob))


@posix_only
def test_missing_file_fifo_and_directory(tmp_path):
    missing = tmp_path / "nope.safetensors"
    raises_naming(missing, FileNotFoundError)
    raises_naming(tmp_path / "file.txt" / "x.safetensors", FileNotFoundError)
    raises_naming(tmp_path, match="a directory")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = {}

    def attempt():
        try:
            lf.load(fifo)
        except BaseException as e:
            result["e"] = e

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "lf.load blocked on a FIFO"
    assert isinstance(result["e"], ValueError) and str(fifo) in str(result["e"]) and "FIFO" in str(result["e"])
    with pytest.raises(ValueError, match="FIFO"):
        lf.load_metadata(fifo)


def test_checkpoint_loaded_without_checks_when_no_model_but_checked_with_one(tmp_path):
    gpt2 = tiny("gpt2")
    f = tmp_path / "a.safetensors"
    lf.save(f, lora())
    assert lf.load(f)  # no model: no check
    with pytest.raises(ValueError) as e:
        lf.load(f, model=gpt2)
    assert str(f) in str(e.value) and "GPT2LMHeadModel" in str(e.value) and "no such module" in str(e.value)
    assert all(p in str(e.value) for p in lora())


# ----------------------------------------------------------------------------- checks against a model
def _broken(kind):
    model = tiny("llama")
    if kind.startswith("ia3"):
        p = moved(lf.init(0, model, lf.IA3Config(), targets=QV, progress=False), 2)
        p[Q0]["ia3"]["g"] = torch.ones(1)
        return p, "ia3", "g", "(1,)"
    p = lora()
    leaves = p[Q0]["lora"]
    if kind == "lora_scale":
        leaves["scale"] = torch.full((4,), 2.0)
        return p, "lora", "scale", "(4,)"
    if kind == "missing_leaf":
        del leaves["B"]
        return p, "lora", "B", "missing leaf"
    if kind == "extra_leaf":
        leaves["C"] = torch.zeros(4)
        return p, "lora", "C", "unexpected leaf"
    if kind == "dtype":
        leaves["A"] = leaves["A"].double()
        return p, "lora", "A", "float64"
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["ia3_g", "lora_scale", "missing_leaf", "extra_leaf", "dtype"])
def test_leaf_mismatch_against_model_names_file_path_and_leaf(kind, tmp_path):
    model = tiny("llama")
    params, _, leaf, detail = _broken(kind)
    f = tmp_path / "bad.safetensors"
    lf.save(f, params)
    with pytest.raises(ValueError) as e:
        lf.load(f, model=model)
    msg = str(e.value)
    assert str(f) in msg and Q0 in msg and repr(leaf) in msg and detail in msg, msg
    assert "1 problem" in msg, msg  # the other layers are fine; read consistently as one adapter
    with pytest.raises(ValueError, match=re.escape(Q0)):
        lf.check_against(model, params)


def test_check_against_collects_every_problem():
    model = tiny("llama")
    p = lora()
    paths = list(p)
    p[paths[0]]["lora"]["scale"] = torch.ones(3)
    p[paths[1]]["lora"]["A"] = p[paths[1]]["lora"]["A"].double()
    p["model.layers.0.self_attn.nope"] = p.pop(paths[2])
    p["model.embed_tokens"] = {"lora": dict(p[paths[3]]["lora"])}
    p["model.layers.1.mlp.up_proj"] = {"nova": {"x": torch.ones(1)}}
    with pytest.raises(ValueError) as e:
        lf.check_against(model, p, source="my params")
    msg = str(e.value)
    assert msg.startswith("my params does not match LlamaForCausalLM")
    assert "5 problem" in msg
    for part in (
        paths[0],
        "'scale'",
        paths[1],
        "float64",
        "self_attn.nope",
        "no such module",
        "embed_tokens",
        "'nova'",
    ):
        assert part in msg, part


# ----------------------------------------------------------------------------- the writer
def _tmp_name(target, pid):
    return f".{target.name}.{pid}.0123abcd.lite_fn-tmp"


@posix_only
def test_stale_temps_of_dead_writers_removed_live_ones_kept(tmp_path):
    target = tmp_path / "adapter.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": _tmp_name(target, dead.pid),
            "self": _tmp_name(target, os.getpid()),
            "sleeper": _tmp_name(target, sleeper.pid),
            "other_target": _tmp_name(tmp_path / "other.safetensors", dead.pid),
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"partial")
        lf.save(target, lora())
        left = set(temps(tmp_path))
        assert names["dead"] not in left
        assert {names["self"], names["sleeper"], names["other_target"]} <= left
        assert lf.load(target)
    finally:
        sleeper.kill()
        sleeper.wait()


_CHILD = """
import os, sys, time, torch, lite_fn as lf
def hang(fd):
    print("writing", flush=True)
    time.sleep(120)
os.fsync = hang
lf.save(sys.argv[1], {"model.layers.0.self_attn.q_proj": {"ia3": {"g": torch.full((32,), 2.0)}}})
"""


@posix_only
def test_writer_killed_mid_write_leaves_old_file_and_its_temp_is_cleaned(tmp_path):
    target = tmp_path / "adapter.safetensors"
    old = lora()
    lf.save(target, old)
    before = target.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == b"writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert target.read_bytes() == before
    assert_same(lf.load(target), old)
    orphan = temps(tmp_path)
    assert len(orphan) == 1 and f".{child.pid}." in orphan[0]
    lf.save(target, lora(2))
    assert temps(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError("disk on fire"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_removes_temp(failure, tmp_path, monkeypatch):
    target = tmp_path / "adapter.safetensors"
    lf.save(target, lora())
    before = target.read_bytes()

    def boom(*a, **k):
        raise failure

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(type(failure)):
        lf.save(target, lora(5))
    assert target.read_bytes() == before
    assert temps(tmp_path) == []


@posix_only
def test_new_file_mode_respects_umask_and_existing_mode_is_kept(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        f = tmp_path / "a.safetensors"
        lf.save(f, lora())
        assert stat.S_IMODE(f.stat().st_mode) == 0o640
        os.chmod(f, 0o604)
        lf.save(f, lora(2))
        assert stat.S_IMODE(f.stat().st_mode) == 0o604
        os.umask(0o002)
        g = tmp_path / "b.safetensors"
        lf.save(g, lora())
        assert stat.S_IMODE(g.stat().st_mode) == 0o664
        # without /proc the umask is read by setting and restoring it
        monkeypatch.setattr(_fs, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")), raising=False)
        assert _fs.umask() == 0o002 and os.umask(0o002) == 0o002
    finally:
        os.umask(old)


@posix_only
def test_save_through_symlink_updates_target_and_keeps_link(tmp_path):
    real = tmp_path / "store" / "real.safetensors"
    real.parent.mkdir()
    link = tmp_path / "link.safetensors"
    lf.save(real, lora(1))
    link.symlink_to(real)
    new = lora(9)
    lf.save(link, new)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert_same(lf.load(real), new)
    assert temps(tmp_path) == [] and temps(real.parent) == []
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "store" / "later.safetensors")
    lf.save(dangling, new)
    assert dangling.is_symlink() and (tmp_path / "store" / "later.safetensors").is_file()


@posix_only
def test_save_refuses_non_regular_targets(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "to_dir"
    link.symlink_to(folder)
    for target, what in ((folder, "a directory"), (fifo, "a FIFO"), (link, "a directory")):
        with pytest.raises(ValueError) as e:
            lf.save(target, lora())
        assert str(target) in str(e.value) and what in str(e.value) and "not a regular file" in str(e.value)
    assert folder.is_dir() and stat.S_ISFIFO(fifo.stat().st_mode) and temps(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lf.save(tmp_path / "no" / "such" / "a.safetensors", lora())


def test_save_refuses_bad_params(tmp_path):
    f = tmp_path / "a.safetensors"
    p = lora()
    with pytest.raises(ValueError, match="exactly one variant"):
        lf.save(f, {Q0: {**p[Q0], "ia3": {"g": torch.ones(32)}}})
    with pytest.raises(TypeError, match="not a tensor"):
        lf.save(f, {Q0: {"lora": {**p[Q0]["lora"], "A": [1.0]}}})
    with pytest.raises(TypeError, match="complex64"):
        lf.save(f, {Q0: {"lora": {**p[Q0]["lora"], "A": p[Q0]["lora"]["A"].detach().to(torch.complex64)}}})
    with pytest.raises(KeyError, match="unknown variant"):
        lf.save(f, {Q0: {"nova": {"x": torch.ones(1)}}})
    assert not f.exists() and temps(tmp_path) == []
    shared = torch.ones(8)
    lf.save(f, {Q0: {"ia3": {"g": shared}}, "model.layers.1.self_attn.q_proj": {"ia3": {"g": shared}}})  # tied leaves
    assert torch.equal(lf.load(f)["model.layers.1.self_attn.q_proj"]["ia3"]["g"], shared)
