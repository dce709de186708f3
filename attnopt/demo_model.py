"""A Llama attention block written the way transformers writes it (eager SDPA path).

Projections, ``view -> transpose(1, 2)``, rotary embedding after the transpose, ``repeat_kv``
(``[:, :, None] -> expand -> reshape``), ``.contiguous()`` before SDPA, and the output back
through ``transpose(1, 2) -> contiguous -> reshape``. Used by ``python -m attnopt demo``, the
examples and the tests, so that the rewrite is shown on code as real models spell it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def repeat_kv(hidden_states: Tensor, n_rep: int) -> Tensor:
    """transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary(seq_len: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, hidden_size: int = 256, num_heads: int = 8, num_kv_heads: int = 2, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.attention_dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, hidden_states: Tensor) -> Tensor:
        bsz, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary(q_len, self.head_dim, hidden_states.device, hidden_states.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        attn = F.scaled_dot_product_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attn = attn.transpose(1, 2).contiguous().reshape(bsz, q_len, -1)
        return self.o_proj(attn)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: attention and a SwiGLU MLP, each with a residual."""

    def __init__(self, hidden_size: int = 256, num_heads: int = 8, num_kv_heads: int = 2, mlp: int = 512):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden_size)
        self.self_attn = LlamaAttention(hidden_size, num_heads, num_kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(hidden_size)
        self.gate_proj = nn.Linear(hidden_size, mlp, bias=False)
        self.up_proj = nn.Linear(hidden_size, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
