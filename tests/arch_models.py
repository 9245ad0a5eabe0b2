"""Tiny transformers models of many families, built from configs with random weights (no downloads), for the
architecture sweep (tests/test_architectures.py).

Each ``Arch`` says how to build the model, what inputs it takes, which tensor of its output the checks compare, and
which layers the adapters target: ``None`` where lite_fn's default (every linear layer but the output head) is what a
user of that family adapts, else an explicit pattern (MoE experts by parameter path, a ConvNet's convolutions,
Wav2Vec2's convolutional feature encoder). Sizes: hidden 32, one or two layers, sequences of 6, batch 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as tf
from torch import Tensor, nn

VOCAB, SEQ, BATCH = 64, 6, 2

# decoder sizes shared by the Llama-like configs (their field names agree)
_DECODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_ENCODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
)
# MoE: 4 experts, 2 per token
_MOE: dict[str, Any] = dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
LINEAR_ONLY = None  # marker in `antipasto_targets`: the same layers as `targets` (they are all linear)


@dataclass(frozen=True)
class Arch:
    """One architecture of the sweep.

    ``targets``: the adapters' targets (None: lf.init's default). ``antipasto_targets``: AntiPaSTO's (linear layers
    only); LINEAR_ONLY: the same as ``targets``. ``skip``: check name -> the precise reason that check cannot run on
    this model (the test skips it with that reason; nothing is skipped silently)."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    targets: str | None = None
    antipasto_targets: str | None = LINEAR_ONLY
    output: Callable[[Any], Tensor] = lambda out: out.logits
    skip: dict[str, str] = field(default_factory=dict)
    # why torch.func.vmap cannot run this model's forward: the stacked adapters are then checked with route= (the
    # test first asserts that vmap does fail with ``vmap_error`` in its message, so the reason stays true)
    vmap_blocked: str = ""
    vmap_error: str = ""
    note: str = ""


def _seeded(cls, cfg) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(cfg).eval()

    return build


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def token_inputs() -> dict[str, Any]:
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=_gen(0))}


def _ssm_inputs() -> dict[str, Any]:
    # no recurrent cache: a scoring forward; the cache's in-place state update cannot take vmapped values
    return {**token_inputs(), "use_cache": False}


def seq2seq_inputs() -> dict[str, Tensor]:
    return {
        "input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=_gen(0)),
        "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, 4), generator=_gen(1)),
    }


def image_inputs(size: int = 16) -> Callable[[], dict[str, Tensor]]:
    return lambda: {"pixel_values": torch.randn(BATCH, 3, size, size, generator=_gen(2))}


def _text_image_inputs() -> dict[str, Tensor]:
    return {**token_inputs(), **image_inputs()()}


def _whisper_inputs() -> dict[str, Tensor]:
    return {
        "input_features": torch.randn(BATCH, 8, 16, generator=_gen(3)),  # (batch, mel bins, 2 · max_source_positions)
        "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, 4), generator=_gen(1)),
    }


def _audio_inputs() -> dict[str, Tensor]:
    return {"input_values": torch.randn(BATCH, 80, generator=_gen(4))}


def hidden(out) -> Tensor:
    return out.last_hidden_state


def encoded(out) -> Tensor:
    """An encoder's last hidden state and, where it has one, its pooled output (ALBERT's default targets include its
    pooler, an nn.Linear named ``pooler``)."""
    if getattr(out, "pooler_output", None) is None:
        return out.last_hidden_state
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=1)


def _pooled(out) -> Tensor:
    return out.pooler_output.flatten(1)


def _clip_like(out) -> Tensor:
    return torch.cat([out.text_embeds, out.image_embeds])


def _decoder(name: str, cls, config_cls, **more) -> Arch:
    return Arch(name, "decoder", _seeded(cls, config_cls(**{**_DECODER, **more})), token_inputs)


# MoE experts in transformers 5 are fused 3-D parameters (E, 2I, H) / (E, H, I): targeted by parameter path (one
# adapter per expert), together with the attention's q/v projections
_EXPERTS = r"(q_proj|v_proj)$|experts\.(gate_up_proj|down_proj)$"
_QV = r"(q_proj|v_proj)$"


def _moe(name: str, cls, config_cls, **more) -> Arch:
    cfg = config_cls(**{**_MOE, **more})
    return Arch(name, "moe", _seeded(cls, cfg), token_inputs, targets=_EXPERTS, antipasto_targets=_QV)


_T5 = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, pad_token_id=0)
_BART = tf.BartConfig(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
)
_WHISPER = tf.WhisperConfig(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_mel_bins=8,
    max_source_positions=8,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    suppress_tokens=None,
    begin_suppress_tokens=None,
)
_VISION: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
)
_TEXT: dict[str, Any] = dict(
    bos_token_id=1,
    eos_token_id=2,
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

ARCHS: list[Arch] = [
    # ------------------------------------------------------------------ decoders (causal LMs; logits compared)
    _decoder("llama", tf.LlamaForCausalLM, tf.LlamaConfig),
    _decoder("mistral", tf.MistralForCausalLM, tf.MistralConfig),
    _decoder("qwen2", tf.Qwen2ForCausalLM, tf.Qwen2Config),
    _decoder("qwen3", tf.Qwen3ForCausalLM, tf.Qwen3Config, head_dim=8),
    _decoder("gemma", tf.GemmaForCausalLM, tf.GemmaConfig, head_dim=8),
    _decoder("gemma2", tf.Gemma2ForCausalLM, tf.Gemma2Config, head_dim=8, sliding_window=4),
    _decoder("phi", tf.PhiForCausalLM, tf.PhiConfig, partial_rotary_factor=0.5),
    _decoder("phi3", tf.Phi3ForCausalLM, tf.Phi3Config),
    _decoder("stablelm", tf.StableLmForCausalLM, tf.StableLmConfig, partial_rotary_factor=0.5),
    _decoder("olmo", tf.OlmoForCausalLM, tf.OlmoConfig),
    _decoder("cohere", tf.CohereForCausalLM, tf.CohereConfig),
    _decoder("starcoder2", tf.Starcoder2ForCausalLM, tf.Starcoder2Config),
    Arch(
        "gpt2",
        "decoder",
        _seeded(
            tf.GPT2LMHeadModel,
            tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
        ),
        token_inputs,
        note="Conv1D layers",
    ),
    Arch(
        "gpt_neo",
        "decoder",
        _seeded(
            tf.GPTNeoForCausalLM,
            tf.GPTNeoConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                intermediate_size=64,
                attention_types=[[["global", "local"], 1]],
                window_size=4,
                max_position_embeddings=64,
            ),
        ),
        token_inputs,
    ),
    Arch(
        "gptj",
        "decoder",
        _seeded(
            tf.GPTJForCausalLM, tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)
        ),
        token_inputs,
    ),
    Arch(
        "gpt_neox",
        "decoder",
        _seeded(
            tf.GPTNeoXForCausalLM,
            tf.GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            ),
        ),
        token_inputs,
    ),
    Arch(
        "opt",
        "decoder",
        _seeded(
            tf.OPTForCausalLM,
            tf.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
            ),
        ),
        token_inputs,
    ),
    Arch(
        "falcon",
        "decoder",
        _seeded(
            tf.FalconForCausalLM,
            tf.FalconConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
            ),
        ),
        token_inputs,
        note="FalconLinear (an nn.Linear subclass with its own forward): substituted",
    ),
    Arch(
        "bloom",
        "decoder",
        _seeded(tf.BloomForCausalLM, tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
        token_inputs,
        vmap_blocked="BloomGelu runs transformers' GeLUFunction, a torch.autograd.Function without setup_context, "
        "which functorch transforms refuse",
        vmap_error="must override the setup_context staticmethod",
    ),
    # ------------------------------------------------------------------ mixtures of experts
    _moe("mixtral", tf.MixtralForCausalLM, tf.MixtralConfig, num_local_experts=4, intermediate_size=32),
    _moe(
        "qwen2_moe",
        tf.Qwen2MoeForCausalLM,
        tf.Qwen2MoeConfig,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
    ),
    _moe("qwen3_moe", tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, head_dim=8, decoder_sparse_step=1),
    _moe("olmoe", tf.OlmoeForCausalLM, tf.OlmoeConfig),
    # ------------------------------------------------------------------ state-space models
    Arch(
        "mamba",
        "ssm",
        _seeded(
            tf.MambaForCausalLM,
            tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
        ),
        _ssm_inputs,
        # dt_proj's weight is used as `dt_proj.weight @ x` (the layer is never called): targeted by its parameter path,
        # every use of it sees the adapted weight, with or without autograd (default targets: see
        # test_mamba_default_targets_need_autograd_for_dt_proj)
        targets=r"(in_proj|x_proj|out_proj)$|dt_proj\.weight$",
        antipasto_targets=r"(in_proj|x_proj|out_proj)$",
        note="dt_proj by its parameter path (its weight is used as dt_proj.weight @ x)",
    ),
    Arch(
        "mamba2",
        "ssm",
        _seeded(
            tf.Mamba2ForCausalLM,
            tf.Mamba2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                state_size=8,
                num_hidden_layers=2,
                expand=2,
                num_heads=4,
                head_dim=16,
                n_groups=1,
                conv_kernel=4,
                chunk_size=4,
            ),
        ),
        _ssm_inputs,
    ),
    # ------------------------------------------------------------------ encoders (last hidden state compared)
    Arch("bert", "encoder", _seeded(tf.BertModel, tf.BertConfig(**_ENCODER)), token_inputs, output=encoded),
    Arch(
        "roberta",
        "encoder",
        _seeded(tf.RobertaModel, tf.RobertaConfig(**{**_ENCODER, "pad_token_id": 1})),
        token_inputs,
        output=encoded,
    ),
    Arch(
        "distilbert",
        "encoder",
        _seeded(
            tf.DistilBertModel,
            tf.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64),
        ),
        token_inputs,
        output=encoded,
    ),
    Arch(
        "albert", "encoder", _seeded(tf.AlbertModel, tf.AlbertConfig(**_ENCODER, embedding_size=16)), token_inputs, output=encoded
    ),
    Arch(
        "deberta_v2",
        "encoder",
        _seeded(tf.DebertaV2Model, tf.DebertaV2Config(**_ENCODER, relative_attention=True)),
        token_inputs,
        output=encoded,
    ),
    Arch(
        "electra",
        "encoder",
        _seeded(tf.ElectraModel, tf.ElectraConfig(**_ENCODER, embedding_size=16)),
        token_inputs,
        output=encoded,
    ),
    # ------------------------------------------------------------------ encoder-decoders (decoder's last hidden state)
    Arch("t5", "encoder-decoder", _seeded(tf.T5Model, _T5), seq2seq_inputs, output=hidden),
    Arch("bart", "encoder-decoder", _seeded(tf.BartModel, _BART), seq2seq_inputs, output=hidden),
    Arch(
        "whisper",
        "encoder-decoder (audio)",
        _seeded(tf.WhisperModel, _WHISPER),
        _whisper_inputs,
        targets=r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$|encoder\.conv[12]$",
        antipasto_targets=r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$",
        output=hidden,
        note="its linear layers and the encoder's two Conv1d",
    ),
    # ------------------------------------------------------------------ vision
    Arch("vit", "vision", _seeded(tf.ViTModel, tf.ViTConfig(**_VISION)), image_inputs(), output=hidden),
    Arch(
        "clip",
        "vision+text",
        _seeded(tf.CLIPModel, tf.CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=16)),
        _text_image_inputs,
        output=_clip_like,
    ),
    Arch(
        "siglip",
        "vision+text",
        _seeded(tf.SiglipModel, tf.SiglipConfig(text_config=_TEXT, vision_config=_VISION)),
        _text_image_inputs,
        output=_clip_like,
    ),
    Arch(
        "resnet",
        "vision (ConvNet)",
        _seeded(tf.ResNetModel, tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
        image_inputs(),
        output=_pooled,
        skip={"antipasto": "ResNetModel has no linear layer (only convolutions); AntiPaSTO is checked on linear layers only"},
        note="no linear layer: lf.init's default targets its convolutions",
    ),
    Arch(
        "convnext",
        "vision (ConvNet)",
        _seeded(
            tf.ConvNextModel, tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, layer_scale_init_value=0.5)
        ),
        image_inputs(),
        targets=r"(dwconv|pwconv1|pwconv2|patch_embeddings)$|downsampling_layer\.1$",
        antipasto_targets=r"pwconv[12]$",
        output=_pooled,
        note="its depthwise 7x7 and strided convolutions plus the pointwise (linear) layers",
    ),
    # ------------------------------------------------------------------ audio
    Arch(
        "wav2vec2",
        "audio",
        _seeded(
            tf.Wav2Vec2Model,
            tf.Wav2Vec2Config(
                **{k: v for k, v in _ENCODER.items() if k not in ("vocab_size", "max_position_embeddings")},
                conv_dim=(16, 16),
                conv_kernel=(4, 3),
                conv_stride=(3, 2),
                num_conv_pos_embeddings=4,
                num_conv_pos_embedding_groups=2,
            ),
        ),
        _audio_inputs,
        targets=r"conv_layers\.\d+\.conv$|(q_proj|v_proj)$",
        antipasto_targets=_QV,
        output=hidden,
        note="its convolutional feature encoder and attention q/v",
    ),
]

BY_NAME = {a.name: a for a in ARCHS}
