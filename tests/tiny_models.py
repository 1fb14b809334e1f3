"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

VOCAB = 97
HIDDEN = 32
WIDTH = 64  # MLP width where the config has a field for it (Bloom and MPT use 4 x hidden)

_COMMON = dict(
    hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=64,
    n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=WIDTH, n_positions=64, ffn_dim=WIDTH,
    ffn_hidden_size=WIDTH, d_model=HIDDEN, n_heads=4, n_layers=2, word_embed_proj_dim=HIDDEN,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_EXTRA = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], attention_layers=["global", "local"]),
    "gptj": dict(rotary_dim=4),
    "falcon": dict(num_kv_heads=4, new_decoder_architecture=False, multi_query=False),
}

MODEL_TYPES = [
    "gpt2", "llama", "gpt_neox", "gpt_neo", "gptj", "opt", "falcon", "phi", "phi3", "qwen2", "qwen3",
    "mistral", "gemma", "gemma2", "bloom", "mpt", "starcoder2", "olmo2", "stablelm", "gpt_bigcode",
]


def tiny_config(model_type: str, **overrides):
    config = AutoConfig.for_model(model_type)
    for key, value in {**_COMMON, **_EXTRA.get(model_type, {}), **overrides}.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                pass  # derived properties (e.g. Falcon's head_dim)
    for key in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "resid_dropout",
                "embed_dropout", "summary_first_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    return model.eval()


def batch(size: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (size, length), generator=g)


# Transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names stay as
# deprecated aliases); the compat tests run on releases before it too.
CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")


def checkpointing_enable(model, kwargs: dict | None = None) -> None:
    """``model.activation_checkpointing_enable(kwargs)``, by its name in the installed Transformers."""
    getattr(model, f"{CHECKPOINTING_ARG}_enable")(kwargs)
