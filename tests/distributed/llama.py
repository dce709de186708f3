"""The tiny transformers Llama the distributed tests train, its tensor-parallel plan and its data,
shared by the ranks and by the single-process reference so that both start from the same state."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

STEPS, BATCH, SEQ, VOCAB = 20, 4, 32, 128
HEADS, KV_HEADS = 4, 2


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def batches() -> Tensor:
    """[STEPS, BATCH, SEQ] token ids: a repeating pattern with noise, so the loss has something to learn."""
    g = torch.Generator().manual_seed(1)
    base = torch.arange(SEQ).remainder(7).repeat(STEPS, BATCH, 1)
    return (base + torch.randint(0, 3, base.shape, generator=g)) % VOCAB


def tp_plan() -> dict[str, nn.Module]:
    """Megatron-style: q/k/v and gate/up split by output features (whole heads per rank), o/down by input."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    col, row = ColwiseParallel, RowwiseParallel
    return {"self_attn.q_proj": col(), "self_attn.k_proj": col(), "self_attn.v_proj": col(), "self_attn.o_proj": row(),
            "mlp.gate_proj": col(), "mlp.up_proj": col(), "mlp.down_proj": row()}


def train(model: nn.Module, data: Tensor, forward: Callable[..., object]) -> list[float]:
    """AdamW on the causal-LM loss of each batch through ``forward`` (the model, or it compiled); the
    losses as floats. An all-ones padding mask is passed, as a padded batch would be: transformers then
    builds the mask in the graph and repeats K/V with repeat_kv (without one it calls SDPA with
    ``enable_gqa`` and nothing is repeated), so attnopt has the repetition to remove."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for tokens in data:
        loss = forward(tokens, attention_mask=torch.ones_like(tokens), labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def reference_losses(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[float]:
    """The same training in one process, eager."""
    model = build().to(device, dtype)
    return train(model, batches().to(device), model)
