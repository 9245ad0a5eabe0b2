"""Adapters on 4-bit (nf4, fp4, double quantisation) and 8-bit bitsandbytes bases, on CPU: the base
product runs through the layer's own kernel, the adapter math is the variant's."""

import functools
import tempfile

import pytest
import torch
import transformers as tf
from helpers import moved, rel_err
from models import small_config

import lite_fn as lf

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

TARGETS = r"(q_proj|v_proj|down_proj)$"
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-double": dict(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    ),
    # LLM.int8's outlier threshold (default 6.0) splits off the input columns that hold an outlier anywhere in
    # the batch, so a row's output depends on the other rows (peft's mixed batches too); 0 keeps rows independent
    "int8": dict(load_in_8bit=True, llm_int8_threshold=0.0),
}


@functools.cache
def _saved(kind: str) -> str:
    torch.manual_seed(0)
    cls, cfg = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config)}[kind]
    # 64 wide: bitsandbytes' CPU blocks need ≥ 64
    config = small_config(cfg, hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64)
    folder = tempfile.mkdtemp(prefix=f"lite_fn-{kind}-")
    cls(config).eval().save_pretrained(folder)
    return folder


def quantized(quant: str, kind: str = "llama", train: bool = False):
    """A fresh quantized model (each test may wrap or train it). For inference it is warmed up once:
    bitsandbytes repacks 4-bit weights in place on its first CPU inference call, so "unchanged" is
    measured after that. For training it stays in train mode and is never run for inference first:
    a repacked CPU 4-bit layer passes no gradient to its input (lite_fn raises when it sees that)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_pretrained(
            _saved(kind), quantization_config=tf.BitsAndBytesConfig(**QUANT[quant]), device_map="cpu"
        )
        if train:
            return model.train()
        model.eval()
        with torch.no_grad():
            model(tokens())
    return model


def tokens(batch=3, seq=6, seed=0):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def state(model):
    # the stored (packed) weights and biases; bitsandbytes' serialised quant-state entries in state_dict()
    # are re-derived on every plain forward of the CPU 4-bit layers, with or without lite_fn
    return {k: v.detach().clone() for k, v in model.named_parameters()}


CFGS = [
    lf.LoRAConfig(r=4),
    lf.LoRAConfig(r=4, use_rslora=True),
    lf.DoRAConfig(r=4),
    lf.DeLoRAConfig(r=4),
    lf.IA3Config(),
    lf.IA3FFConfig(),
    lf.HRAConfig(r=4),
    lf.ROADConfig(group_size=8),
    lf.PiSSAConfig(r=4),
    lf.AntiPaSTOConfig(r=8, block_size=4),
]


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: type(c).__name__)
def test_identity_route_and_loop_on_quantized_bases(quant, cfg):
    model, x = quantized(quant), tokens()
    before = state(model)
    targets = r"(q_proj|v_proj|down_proj)$" if not isinstance(cfg, lf.IA3FFConfig) else r"down_proj$"
    p = lf.init(0, model, cfg, targets=targets)
    if isinstance(cfg, lf.AntiPaSTOConfig):
        p = lf.with_alpha(p, 0.0)
    with torch.no_grad():
        base = model(x).logits
        out = lf.call(model, p, x).logits
        if isinstance(cfg, lf.HRAConfig):
            assert rel_err(out, base) <= 1e-6  # reflection pairs cancel to rounding
        else:
            assert torch.equal(out, base)  # bit-exact: the layer's own output is the base product
        adapters = [moved(p, 10 * k) for k in range(3)]
        if isinstance(cfg, lf.AntiPaSTOConfig):
            adapters = [lf.with_alpha(a, 1.0) for a in adapters]
        loop = torch.stack([lf.call(model, a, x).logits for a in adapters])
        assert (loop[0] - base).abs().max() > 1e-4  # the adapters act
        route = torch.tensor([2, 0, 1])
        mixed = lf.call(model, lf.stack(adapters), x, route=route).logits
        # HRA and IA3-FF run the 4-bit kernel again on their transformed input; on CPUs with AVX512-BF16 that
        # kernel rounds activations to bf16, so float32 noise of the order of 1e-7 can move an element by one bf16 step
        tol = 1e-3 if isinstance(cfg, (lf.HRAConfig, lf.IA3FFConfig)) else 1e-5
        assert rel_err(mixed, loop[route, torch.arange(3)]) <= tol
    after = state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("quant", ["nf4", "fp4-double"])
def test_vmap_over_stacked_adapters_on_4bit(quant):
    from torch.func import vmap

    model, x = quantized(quant), tokens()
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=TARGETS), k) for k in range(3)]
    with torch.no_grad():
        batched = vmap(lambda p: lf.call(model, p, x).logits)(lf.stack(adapters))
        loop = torch.stack([lf.call(model, a, x).logits for a in adapters])
    assert rel_err(batched, loop) <= 1e-5


def test_vmap_that_the_8bit_kernel_cannot_run_suggests_route():
    from torch.func import vmap

    model, x = quantized("int8"), tokens()
    stacked = lf.stack([moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=TARGETS), k) for k in range(2)])
    with pytest.raises(RuntimeError, match="route=route"):
        vmap(lambda p: lf.call(model, p, x).logits)(stacked)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("use_dora", [False, True])
def test_parity_with_peft_qlora(quant, use_dora):
    import peft

    if use_dora and quant == "int8":
        pytest.skip("covered by the 4-bit cases; peft's 8-bit DoRA dequantizes with its own rounding")
    ours_model, x = quantized(quant, train=True), tokens()
    pm = peft.get_peft_model(
        quantized(quant, train=True),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora),
    )
    params = lf.init(0, ours_model, (lf.DoRAConfig if use_dora else lf.LoRAConfig)(r=4, alpha=8), targets=TARGETS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, bv in params.items():
            layer = pm.base_model.model.get_submodule(path)
            leaves = next(iter(bv.values()))
            for leaf, t in (("A", layer.lora_A["default"].weight), ("B", layer.lora_B["default"].weight)):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
                leaves[leaf] = t.detach().clone().requires_grad_(True)
            if use_dora:
                m = layer.lora_magnitude_vector["default"].weight
                m.mul_(1.0 + 0.1 * torch.randn(m.shape, generator=gen))
                leaves["m"] = m.detach().clone().requires_grad_(True)
    ref = pm(x).logits
    ours = lf.call(ours_model, params, x).logits
    assert rel_err(ours, ref) <= 1e-5
    ref.square().mean().backward()
    ours.square().mean().backward()
    for path, bv in params.items():
        layer = pm.base_model.model.get_submodule(path)
        leaves = next(iter(bv.values()))
        assert rel_err(leaves["A"].grad, layer.lora_A["default"].weight.grad) <= 1e-4
        assert rel_err(leaves["B"].grad, layer.lora_B["default"].weight.grad) <= 1e-4


def test_a_layer_repacked_for_inference_is_refused_for_training():
    model = quantized("nf4")  # ran once in eval mode without gradients: bitsandbytes repacked its CPU weights
    if not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if type(m).__name__ == "Linear4bit"
    ):
        pytest.skip("this CPU has no AVX512-BF16 repacking")
    params = lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS)
    with pytest.raises(RuntimeError, match=r"returns an output with no gradient to its input"):
        lf.call(model, params, tokens()).logits.sum().backward()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_training_on_a_quantized_base_reduces_the_loss_and_touches_nothing(quant):
    model, x = quantized(quant, train=True), tokens(4, 12, seed=3)
    before = state(model)
    params = lf.init(0, model, lf.LoRAConfig(r=4, alpha=8), targets=TARGETS)
    opt = torch.optim.AdamW(lf.trainable(params), lr=3e-2)
    losses = []
    for _ in range(8):
        loss = lf.call(model, params, x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(p.grad is None for p in model.parameters())
    after = state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_calibration_and_data_aware_init_on_a_quantized_model():
    model = quantized("nf4")
    data = [tokens(2, 8, seed=s) for s in range(3)]
    eva = lf.init(0, model, lf.EVAConfig(r=2), targets=TARGETS, calibration=data, progress=False)
    assert eva and all(v["eva"]["A"].shape[1] == model.get_submodule(p).in_features for p, v in eva.items())
    aware = lf.init(
        0, model, lf.AntiPaSTOConfig(r=8, block_size=4, select="data"), targets=r"o_proj$", calibration=data, progress=False
    )
    with torch.no_grad():
        assert torch.equal(lf.call(model, lf.with_alpha(aware, 0.0), tokens()).logits, model(tokens()).logits)


def test_merge_on_a_quantized_base_gives_dense_weights():
    model = quantized("nf4")
    p = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=r"q_proj$"), 1)
    merged = lf.merge(model, p)
    path = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(path)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    leaves = p[path]["lora"]
    expected = dense + leaves["scale"] * leaves["B"] @ leaves["A"]
    assert merged[f"{path}.weight"].shape == (64, 64)
    assert rel_err(merged[f"{path}.weight"], expected) <= 1e-5


def test_qwen2_4bit_with_biases():
    model, x = quantized("nf4", "qwen2"), tokens()
    p = moved(lf.init(0, model, lf.DoRAConfig(r=4), targets=r"(q_proj|k_proj|v_proj)$"), 2)  # qwen2's q/k/v carry biases
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    adapters = [p, moved(p, 5)]
    with torch.no_grad():
        mixed = lf.call(model, lf.stack(adapters), x, route=torch.tensor([1, 0, 1])).logits
        loop = torch.stack([lf.call(model, a, x).logits for a in adapters])
    assert rel_err(mixed, loop[torch.tensor([1, 0, 1]), torch.arange(3)]) <= 1e-5


def test_peft_files_on_a_quantized_base(tmp_path):
    import peft

    # train mode throughout: after bitsandbytes' CPU repacking (its first eval forward), a model that peft then
    # loads an adapter into computes another base output than the same model unwrapped (0.22 relative, seen here)
    model = quantized("nf4", train=True)
    params = moved(lf.init(0, model, lf.LoRAConfig(r=4, alpha=8), targets=TARGETS), 3)
    lf.save_peft(tmp_path / "qlora", params, model=model)
    back = lf.load_peft(tmp_path / "qlora", model=model)
    x = tokens()
    with torch.no_grad():
        ours = lf.call(model, params, x).logits
        assert torch.equal(lf.call(model, back, x).logits, ours)
        ref = peft.PeftModel.from_pretrained(quantized("nf4", train=True), str(tmp_path / "qlora"), is_trainable=True)(x).logits
    assert rel_err(ref, ours) <= 1e-5  # peft's QLoRA on the same 4-bit base reads the same adapter


@pytest.mark.parametrize("cfg", [lf.DoRAConfig(r=2), lf.LoRAConfig(r=2), lf.OFTConfig(oft_block_size=8), lf.IA3FFConfig()])
def test_a_trainable_bias_of_a_quantized_layer_gets_no_gradient(cfg, tmp_path):
    """Qwen2's q/k/v carry biases, which stay trainable parameters in a 4-bit model: the adapters must see the
    bias's value only (DoRA subtracts it from the layer's output), so no gradient reaches the base model."""
    import warnings

    torch.manual_seed(0)
    config = tf.Qwen2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    )
    tf.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=tf.BitsAndBytesConfig(**QUANT["nf4"]), device_map="cpu"
        ).train()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.bias is not None and q.bias.requires_grad
    params = moved(lf.init(0, model, cfg, targets=r"(q_proj|v_proj)$"), seed=1)
    lf.call(model, params, tokens()).logits.square().mean().backward()
    assert all(t.grad is not None for t in lf.trainable(params))
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
