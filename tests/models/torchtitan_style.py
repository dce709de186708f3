"""torchtitan's Llama 3 and Qwen 3 attention with its varlen backend, as torchtitan writes them
(torchtitan/models/attention.py and models/{llama3,qwen3}/model/model.py, before K/V repetition
moved into the kernel): projections viewed [B, S, H, D], rotary embedding (complex for Llama 3,
``rotate_half`` for Qwen 3, which also normalises q and k per head), ``repeat_kv`` on
[B, S, Hkv, D], transposes to [B, H, S, D], and ``VarlenAttentionWrapper`` packing them to
[B*S, H, D] for ``torch.nn.attention.varlen.varlen_attn`` with the documents' offsets, the output
viewed back to [B, S, H*D].

``VarlenAttentionWrapper.attend`` is the call; the reference model swaps it for
``reference_attention`` (torch's varlen kernels run on CUDA only).
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.attention.varlen import varlen_attn

from tests.patterns.flash_kernels import reference_attention

DIM, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16


class VarlenMetadata(NamedTuple):
    """Cumulative sequence positions for queries and keys/values (torchtitan's)."""

    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int


def create_varlen_metadata_for_document(input_batch: torch.Tensor, eos_id: int) -> VarlenMetadata:
    """torchtitan's offsets of the documents in a batch of token rows: each row cut after every
    ``eos_id``, rows packed one after the other (computed eagerly, before the model)."""
    batch_size, seq_len = input_batch.shape
    cu_seqlens_list, all_seq_lengths, offset = [], [], 0
    for b in range(batch_size):
        eos_positions = (input_batch[b] == eos_id).nonzero(as_tuple=True)[0].to(torch.int32)
        sample_cu_seqlens = torch.cat([torch.tensor([0], dtype=torch.int32), eos_positions + 1,
                                       torch.tensor([seq_len], dtype=torch.int32)])
        sample_cu_seqlens = torch.unique_consecutive(sample_cu_seqlens)
        all_seq_lengths.append(torch.diff(sample_cu_seqlens))
        cu_seqlens_list.append(sample_cu_seqlens[:-1] + offset)
        offset += seq_len
    packed = torch.cat(cu_seqlens_list + [torch.tensor([offset], dtype=torch.int32)])
    max_seqlen = int(torch.cat(all_seq_lengths).max())
    return VarlenMetadata(packed, packed, max_seqlen, max_seqlen)


def torch_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, window_size=(-1, 0)):
    return varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


def reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, window_size=(-1, 0)):
    return reference_attention(q, k, v, layout="thd", causal=tuple(window_size) == (-1, 0), window=window_size,
                               scale=scale, cu_seqlens_q=cu_seq_q, cu_seqlens_k=cu_seq_k)


class VarlenAttentionWrapper(nn.Module):
    """torchtitan's wrapper: [B, H, S, D] operands packed to [B*S, H, D]."""

    def __init__(self, attend: Callable = torch_varlen, window_size: tuple[int, int] = (-1, 0)):
        super().__init__()
        self.attend, self.window_size = attend, window_size

    def forward(self, xq, xk, xv, head_dim, attention_masks: VarlenMetadata, scale=None):
        n_local_heads = xq.shape[1]
        xq_packed = xq.transpose(1, 2).reshape(-1, n_local_heads, head_dim)
        xk_packed = xk.transpose(1, 2).reshape(-1, n_local_heads, head_dim)
        xv_packed = xv.transpose(1, 2).reshape(-1, n_local_heads, head_dim)
        return self.attend(xq_packed, xk_packed, xv_packed, attention_masks.cu_seq_q, attention_masks.cu_seq_k,
                           attention_masks.max_q, attention_masks.max_k, scale=scale, window_size=self.window_size)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep)"""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (torch.unsqueeze(x, dim=3).expand(bs, slen, n_kv_heads, n_rep, head_dim)
            .reshape(bs, slen, n_kv_heads * n_rep, head_dim))


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    freqs = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb_complex(xq, xk, freqs_cis):
    """Llama 3: rotary embedding as complex products (in float32, cast back)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def precompute_rope_cache(dim: int, max_seq_len: int, base: float = 1_000_000.0) -> torch.Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2)[: (dim // 2)].double() / dim))
    idx_theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    freqs = torch.cat([idx_theta, idx_theta], dim=-1)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb_cos_sin(xq, xk, rope_cache):
    """Qwen 3: rotary embedding with cos/sin and ``rotate_half``."""
    head_dim, seqlen = xq.shape[-1], xq.shape[1]
    rope_cache = rope_cache[0:seqlen].view(-1, seqlen, 1, head_dim * 2)
    cos, sin = rope_cache[..., :head_dim].to(dtype=xq.dtype), rope_cache[..., head_dim:].to(dtype=xq.dtype)
    xq_out = (xq * cos) + (rotate_half(xq) * sin)
    xk_out = (xk * cos) + (rotate_half(xk) * sin)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class Llama3Attention(nn.Module):
    def __init__(self, max_seq_len: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = HEADS, KV_HEADS, HEAD_DIM
        self.n_rep = HEADS // KV_HEADS
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.inner_attention = VarlenAttentionWrapper()
        self.register_buffer("freqs_cis", precompute_freqs_cis(HEAD_DIM, max_seq_len), persistent=False)

    def forward(self, x: torch.Tensor, attention_masks: VarlenMetadata) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bs, seqlen, -1, self.head_dim)
        xk = xk.view(bs, seqlen, -1, self.head_dim)
        xv = xv.view(bs, seqlen, -1, self.head_dim)
        xq, xk = apply_rotary_emb_complex(xq, xk, self.freqs_cis)
        keys, values = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        xq, xk, xv = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        output = self.inner_attention(xq, xk, xv, self.head_dim, attention_masks)
        return self.wo(output.view(bs, seqlen, -1))


class Qwen3Attention(nn.Module):
    def __init__(self, max_seq_len: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = HEADS, KV_HEADS, HEAD_DIM
        self.n_rep = HEADS // KV_HEADS
        self.scaling = HEAD_DIM ** -0.5
        self.q_norm = nn.RMSNorm(HEAD_DIM, eps=1e-6)
        self.k_norm = nn.RMSNorm(HEAD_DIM, eps=1e-6)
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.inner_attention = VarlenAttentionWrapper()
        self.register_buffer("rope_cache", precompute_rope_cache(HEAD_DIM, max_seq_len), persistent=False)

    def forward(self, x: torch.Tensor, attention_masks: VarlenMetadata) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bs, seqlen, -1, self.head_dim)
        xk = xk.view(bs, seqlen, -1, self.head_dim)
        xv = xv.view(bs, seqlen, -1, self.head_dim)
        xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq, xk = apply_rotary_emb_cos_sin(xq, xk, self.rope_cache)
        keys, values = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        xq, xk, xv = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        output = self.inner_attention(xq, xk, xv, self.head_dim, attention_masks, scale=self.scaling)
        return self.wo(output.view(bs, seqlen, -1))


class TwoLayers(nn.Module):
    """A Llama 3 layer and a Qwen 3 layer (attention and residual, pre-norm), on one document batch."""

    def __init__(self, max_seq_len: int):
        super().__init__()
        self.norms = nn.ModuleList([nn.RMSNorm(DIM), nn.RMSNorm(DIM)])
        self.layers = nn.ModuleList([Llama3Attention(max_seq_len), Qwen3Attention(max_seq_len)])

    def forward(self, x: torch.Tensor, attention_masks: VarlenMetadata) -> torch.Tensor:
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x), attention_masks)
        return x


def build(max_seq_len: int, device: str, dtype: torch.dtype) -> TwoLayers:
    """The model with its parameters in ``dtype`` (the rotary tables keep theirs: complex64 for Llama 3)."""
    model = TwoLayers(max_seq_len).to(device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def with_attention(model: nn.Module, attend: Callable) -> nn.Module:
    """A copy of ``model`` (same parameters) whose varlen wrappers call ``attend``."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, VarlenAttentionWrapper):
            module.attend = attend
    return twin


def document_batch(batch: int, seq_len: int, eos_id: int = 0, seed: int = 0) -> torch.Tensor:
    """Token rows with end-of-document tokens at fixed places (documents of unequal lengths)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (batch, seq_len), generator=generator)
    tokens[0, [2, 7]] = eos_id
    tokens[-1, [4]] = eos_id
    return tokens
