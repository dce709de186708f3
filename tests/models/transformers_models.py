"""Tiny randomly initialised transformers models, built from configs in code (nothing downloaded)."""
from __future__ import annotations

from typing import Callable

import torch
import transformers as T
from torch import nn

VOCAB, HIDDEN, SEQ, BATCH = 64, 64, 8, 2


class EmbedsToLogits(nn.Module):
    """A causal LM called on ``inputs_embeds`` (so the input has a gradient), no cache."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds, use_cache=False).logits


def _decoder(config_cls, model_cls, **overrides) -> nn.Module:
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    kw.update(overrides)
    config = config_cls(**kw)
    config._attn_implementation = "sdpa"
    return model_cls(config)


def llama() -> nn.Module:
    return _decoder(T.LlamaConfig, T.LlamaForCausalLM)


def qwen3() -> nn.Module:
    return _decoder(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=16)


def mistral() -> nn.Module:
    return _decoder(T.MistralConfig, T.MistralForCausalLM, sliding_window=4)


def deepseek_v3() -> nn.Module:
    """MLA: q/k head dim 24 (16 nope + 8 rope), v head dim 12; dense MLPs only."""
    return _decoder(T.DeepseekV3Config, T.DeepseekV3ForCausalLM, num_key_value_heads=4, q_lora_rank=None,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                    moe_intermediate_size=32, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                    n_group=1, topk_group=1)


def gpt2() -> nn.Module:
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                          resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    return T.GPT2LMHeadModel(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": llama, "qwen3": qwen3, "mistral": mistral, "gpt2": gpt2, "deepseek_v3": deepseek_v3,
}


def build(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """(model, example inputs) for a tiny transformers LM in ``dtype``."""
    torch.manual_seed(0)
    model = EmbedsToLogits(BUILDERS[name]()).to(dtype)
    embeds = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype, requires_grad=True)
    return model, (embeds,)


# Causal LMs on token ids, two layers, 4 query heads over 2 KV heads (GQA), vocabulary 100.
_TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
_SPECIAL_TOKENS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
CAUSAL_LM_CONFIGS: dict[str, Callable[[], T.PreTrainedConfig]] = {
    "llama": lambda: T.LlamaConfig(**_TINY),
    "qwen3": lambda: T.Qwen3Config(head_dim=16, **_TINY),
    "mistral": lambda: T.MistralConfig(sliding_window=5, **_TINY),
    # one sliding-window layer, one global layer
    "gemma3": lambda: T.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                         layer_types=["sliding_attention", "full_attention"], **_TINY,
                                         **_SPECIAL_TOKENS),
    "olmo2": lambda: T.Olmo2Config(**_TINY, **_SPECIAL_TOKENS),
}


class TokensToLogits(nn.Module):
    """A causal LM on token ids plus, optionally, the one batch tensor that shapes its mask
    (``attention_mask`` for padding, ``position_ids`` for packing), without a cache, as in training."""

    def __init__(self, lm: nn.Module, extra: str | None = None):
        super().__init__()
        self.lm, self.extra = lm, extra

    def forward(self, ids: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        kwargs = {self.extra: extra[0]} if self.extra else {}
        return self.lm(input_ids=ids, use_cache=False, **kwargs).logits


def causal_lm(config: T.PreTrainedConfig, attn_implementation: str, dtype: torch.dtype,
              extra: str | None = None) -> TokensToLogits:
    """A randomly initialised (seed 0) causal LM for ``config`` with the given attention code path."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return TokensToLogits(T.AutoModelForCausalLM.from_config(config).to(dtype), extra)
