"""Megatron attention on TransformerEngine's FlashAttention backend, as they write it.

- ``MegatronSBHD``: megatron-core's self-attention on [S, B, hidden] (fused QKV viewed
  [S, B, G, (R + 2) * D] and split, query groups for GQA) handing q, k, v in ``sbhd`` to TE's
  ``FlashAttention``, which makes them [B, S, H, D] with ``transpose(0, 1).contiguous()`` for
  ``flash_attn_func`` and brings the output back with ``view(B, S, -1).transpose(0, 1).contiguous()``
  (transformer_engine/pytorch/attention/dot_product_attention/backends.py).
- ``MLAPackedTHD``: DeepSeek-style MLA on packed ``thd`` tokens (q/k head dim 24 = 16 + 8 of
  rotary key shared by all heads, v head dim 16): TE pads V to the q/k head dim for
  FlashAttention-2 (``_pad_qkv_head_dim``), calls ``flash_attn_varlen_func``, flattens the output
  to [T, H * Dqk] and trims it back (``_trim_output``).

``attend`` is the flash-attn entry point: the package's functions (declared for CPU in
tests/patterns/flash_kernels.py), or on CUDA torch's ``aten._flash_attention_forward`` with the
same arguments.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.patterns.flash_kernels import flash_attn_func, flash_attn_varlen_func

HIDDEN, HEADS, GROUPS, HEAD_DIM = 64, 4, 2, 16
NOPE, ROPE, V_DIM = 16, 8, 16


def aten_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """``flash_attn_func`` through torch's own FlashAttention kernel ([B, S, H, D])."""
    return torch.ops.aten._flash_attention_forward(q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, causal,
                                                   False, scale=softmax_scale)[0]


def aten_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                softmax_scale=None, causal=False):
    """``flash_attn_varlen_func`` through torch's own FlashAttention kernel ([T, H, D])."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                   dropout_p, causal, False, scale=softmax_scale)[0]


class TEFlashAttention(nn.Module):
    """TE's FlashAttention for ``qkv_format="sbhd"`` and a causal mask."""

    def __init__(self, attend: Callable = flash_attn_func):
        super().__init__()
        self.attend, self.softmax_scale = attend, HEAD_DIM ** -0.5

    def forward(self, query_layer, key_layer, value_layer):
        batch_size, max_seqlen_q = query_layer.shape[1], query_layer.shape[0]
        query_layer, key_layer, value_layer = [x.transpose(0, 1).contiguous()
                                               for x in (query_layer, key_layer, value_layer)]
        output = self.attend(query_layer, key_layer, value_layer, 0.0, softmax_scale=self.softmax_scale, causal=True)
        output = output.view(batch_size, max_seqlen_q, -1).transpose(0, 1)
        return output.contiguous()


class MegatronSBHD(nn.Module):
    """megatron-core's SelfAttention (fused QKV, query groups) on [S, B, hidden]."""

    def __init__(self, attend: Callable = flash_attn_func):
        super().__init__()
        self.linear_qkv = nn.Linear(HIDDEN, (HEADS + 2 * GROUPS) * HEAD_DIM)
        self.core_attention = TEFlashAttention(attend)
        self.linear_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        sq, b = hidden_states.shape[:2]
        per_group = HEADS // GROUPS
        mixed = self.linear_qkv(hidden_states).view(sq, b, GROUPS, (per_group + 2) * HEAD_DIM)
        query, key, value = torch.split(mixed, [per_group * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=3)
        query = query.reshape(sq, b, -1, HEAD_DIM)
        return self.linear_proj(self.core_attention(query, key, value))


def _pad_qkv_head_dim(query_layer, key_layer, value_layer):
    """TE: pad Q/K/V to the same head dimension for FlashAttention-2 MLA."""
    orig_head_dim_qk, orig_head_dim_v = query_layer.shape[-1], value_layer.shape[-1]
    padded_head_dim = max(orig_head_dim_qk, orig_head_dim_v)
    if orig_head_dim_qk < padded_head_dim:
        query_layer = F.pad(query_layer, (0, padded_head_dim - orig_head_dim_qk))
        key_layer = F.pad(key_layer, (0, padded_head_dim - key_layer.shape[-1]))
    if orig_head_dim_v < padded_head_dim:
        value_layer = F.pad(value_layer, (0, padded_head_dim - orig_head_dim_v))
    return query_layer, key_layer, value_layer, orig_head_dim_qk, orig_head_dim_v


def _unalias_cu_seqlens(cu_q: torch.Tensor, cu_kv: torch.Tensor):
    """TE: copy kv's offsets when they are q's as well (Dynamo cannot trace one tensor passed to
    two inputs of an autograd.Function)."""
    if cu_q is cu_kv and torch.compiler.is_compiling():
        return cu_q, cu_kv.clone()
    return cu_q, cu_kv


def _trim_output(attn_out, num_attention_heads, padded_head_dim_v, orig_head_dim_v):
    """TE: trim FlashAttention output after padding V to a larger head dimension."""
    out_shape = attn_out.shape[:-1]
    attn_out = attn_out.reshape(*out_shape, num_attention_heads, padded_head_dim_v)
    return attn_out[..., :orig_head_dim_v].reshape(*out_shape, -1)


class MLAPackedTHD(nn.Module):
    """MLA self-attention on packed tokens [T, hidden] cut into documents by ``cu_seqlens``."""

    def __init__(self, attend: Callable = flash_attn_varlen_func):
        super().__init__()
        self.attend = attend
        self.linear_q = nn.Linear(HIDDEN, HEADS * (NOPE + ROPE))
        self.linear_kv = nn.Linear(HIDDEN, HEADS * (NOPE + V_DIM))
        self.linear_k_rope = nn.Linear(HIDDEN, ROPE)
        self.linear_proj = nn.Linear(HEADS * V_DIM, HIDDEN)
        self.softmax_scale = (NOPE + ROPE) ** -0.5

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        t = x.shape[0]
        query = self.linear_q(x).view(t, HEADS, NOPE + ROPE)
        k_nope, value = self.linear_kv(x).view(t, HEADS, NOPE + V_DIM).split([NOPE, V_DIM], dim=-1)
        k_rope = self.linear_k_rope(x).view(t, 1, ROPE).expand(-1, HEADS, -1)
        key = torch.cat([k_nope, k_rope], dim=-1)
        query, key, value, _, orig_v = _pad_qkv_head_dim(query, key, value)
        cu_q, cu_kv = _unalias_cu_seqlens(cu_seqlens, cu_seqlens)
        output = self.attend(query, key, value, cu_q, cu_kv, max_seqlen, max_seqlen, 0.0,
                             softmax_scale=self.softmax_scale, causal=True)
        output = output.reshape(output.shape[0], -1).contiguous()  # FlashAttention's thd output: t(hd)
        output = _trim_output(output, HEADS, query.shape[-1], orig_v)
        return self.linear_proj(output)
