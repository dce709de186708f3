"""Shared pieces of the spelling tests: sizes, one projection feeding a spelling, GQA heads."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

B, S, H, G, D = 2, 6, 4, 2, 8
R = H // G
sdpa = F.scaled_dot_product_attention


class Attn(nn.Module):
    """``fn(proj(x))``: one projection (so every operand has a gradient) and a spelling."""

    def __init__(self, fn: Callable, width: int):
        super().__init__()
        self.fn, self.proj = fn, nn.Linear(16, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.proj(x))


def split_gqa(t: torch.Tensor, repeat: Callable) -> tuple:
    """q, k, v heads ([B, H, S, D]) of a [.., (H + 2G) * D] projection, K/V repeated by ``repeat``."""
    b, s = t.shape[0], t.shape[1]
    q, k, v = t.split([H * D, G * D, G * D], dim=-1)
    q = q.view(b, s, H, D).transpose(1, 2)
    k, v = (repeat(x.view(b, s, G, D).transpose(1, 2)) for x in (k, v))
    return q, k, v


def bshd_out(o: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H * D], as most models hand the output to their projection."""
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


def case(fn: Callable, width: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return Attn(fn, width).double(), (torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True),)
