"""Attention modules written the way torchtitan, megatron-core and timm write them.

Small re-creations (those libraries are not installed): each keeps its library's exact tensor
spelling of q/k/v production, K/V head repetition, the SDPA call and the output layout, which
is all the recognisers see.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Rotary embedding along ``seq_dim`` of x (head dim last), positions 0..S-1."""
    s, d = x.shape[seq_dim], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d))
    ang = torch.outer(torch.arange(s, dtype=x.dtype, device=x.device), inv)
    ang = torch.cat((ang, ang), dim=-1)
    shape = [1] * x.dim()
    shape[seq_dim], shape[-1] = s, d
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def titan_repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torchtitan's repeat_kv: on [B, S, Hkv, D], before the transpose to [B, H, S, D]."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        torch.unsqueeze(x, dim=3)
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class TitanQwen3Attention(nn.Module):
    """torchtitan's Qwen3 attention: q/k norms and rope on BSHD, kv repeated on BSHD."""

    def __init__(self, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2, head_dim: int = 16):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq, xk = rope(xq, 1), rope(xk, 1)
        keys = titan_repeat_kv(xk, self.n_heads // self.n_kv_heads)
        values = titan_repeat_kv(xv, self.n_heads // self.n_kv_heads)
        xq, xk, xv = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        output = F.scaled_dot_product_attention(xq, xk, xv, is_causal=True)
        output = output.transpose(1, 2).contiguous()
        return self.wo(output.view(bs, seqlen, -1))


class MegatronAttention(nn.Module):
    """megatron-core SelfAttention on SBHD: one fused QKV projection viewed per query group,
    split, query heads merged by a reshape, K/V repeated with ``repeat_interleave``.

    ``seed`` spells the layout change as ``transpose(0, 1).contiguous()`` around SDPA (the
    common port of Megatron's core attention); otherwise ``permute(1, 2, 0, 3)`` views.
    """

    def __init__(self, dim: int = 64, n_heads: int = 4, n_groups: int = 2, head_dim: int = 16, seed: bool = False):
        super().__init__()
        self.n_heads, self.n_groups, self.head_dim, self.seed = n_heads, n_groups, head_dim, seed
        self.linear_qkv = nn.Linear(dim, (n_heads + 2 * n_groups) * head_dim)
        self.linear_proj = nn.Linear(n_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [S, B, dim]
        sq, b, _ = x.shape
        per_group = self.n_heads // self.n_groups
        mixed = self.linear_qkv(x)
        mixed = mixed.view(*mixed.size()[:-1], self.n_groups, (per_group + 2) * self.head_dim)
        query, key, value = torch.split(mixed, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, self.head_dim)
        query, key = rope(query, 0), rope(key, 0)
        key = key.repeat_interleave(per_group, dim=2)
        value = value.repeat_interleave(per_group, dim=2)
        if self.seed:
            q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out = out.transpose(1, 2).transpose(0, 1).contiguous()
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out = out.permute(2, 0, 1, 3).contiguous()
        return self.linear_proj(out.view(sq, b, self.n_heads * self.head_dim))


class TimmAttention(nn.Module):
    """timm's ViT Attention: fused qkv, ``reshape -> permute(2, 0, 3, 1, 4) -> unbind``."""

    def __init__(self, dim: int = 64, num_heads: int = 4, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TimmBlock(nn.Module):
    """A ViT block (pre-norm attention and MLP), two of which make a tiny ViT."""

    def __init__(self, dim: int = 64, num_heads: int = 4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 64, num_heads: int = 4, depth: int = 2, patch: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(TimmBlock(dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.norm(self.blocks(x))


class PaddedMLAAttention(nn.Module):
    """MLA core as flash-attn/TransformerEngine integrations write it: V zero-padded to the q/k
    head dim for the kernel, the output sliced back to V's head dim."""

    def __init__(self, dim: int = 64, n_heads: int = 4, d_qk: int = 24, d_v: int = 16):
        super().__init__()
        self.n_heads, self.d_qk, self.d_v = n_heads, d_qk, d_v
        self.q = nn.Linear(dim, n_heads * d_qk)
        self.kv = nn.Linear(dim, n_heads * (d_qk + d_v))
        self.o = nn.Linear(n_heads * d_v, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.n_heads, self.d_qk).transpose(1, 2)
        k, v = self.kv(x).view(b, s, self.n_heads, self.d_qk + self.d_v).transpose(1, 2).split(
            [self.d_qk, self.d_v], dim=-1)
        v = F.pad(v, [0, self.d_qk - self.d_v])
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o[:, :, :, : self.d_v]
        return self.o(o.transpose(1, 2).reshape(b, s, self.n_heads * self.d_v))
