"""Tiny Hugging Face models with random weights, built from configs (no downloads)."""

import functools

import torch
import transformers as tf


def _build(cls, cfg, seed):
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    return m


# the sizes of every tiny model built from a config with these names (GPT-2's config names them otherwise)
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def small_config(config_cls, **more):
    """config_cls with the SMALL sizes; ``more`` adds to or overrides them."""
    return config_cls(**{**SMALL, **more})


@functools.cache
def _cached(kind, seed):
    decoder = dict(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        return _build(tf.LlamaForCausalLM, small_config(tf.LlamaConfig, **decoder), seed)
    if kind == "qwen2":
        return _build(tf.Qwen2ForCausalLM, small_config(tf.Qwen2Config, **decoder), seed)
    if kind == "gpt2":
        return _build(tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64), seed)
    if kind == "bert":
        return _build(tf.BertModel, small_config(tf.BertConfig, intermediate_size=64, max_position_embeddings=64), seed)
    raise KeyError(kind)


def tiny(kind, seed=0):
    """A cached tiny model; tests must not mutate it (and the runtime never does)."""
    return _cached(kind, seed)


def tokens(batch=2, seq=6, seed=0, vocab=64):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tied_llama(device=None):
    """A one-layer Llama whose lm_head shares the embedding's weight (tie_word_embeddings)."""
    torch.manual_seed(0)
    cfg = small_config(tf.LlamaConfig, num_hidden_layers=1, num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    with torch.device(device or "cpu"):
        model = tf.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model
