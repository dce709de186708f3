"""One GQA attention layer whose attention is an inner module taking q, k, v (bshd), the shape torch's
context parallel expects (``_ContextParallel`` hooks that module). The core calls attnopt.attention,
or SDPA as models write it for attnopt to lower (which needs CUDA under context parallel: on CPU,
tracing SDPA on sequence-sharded DTensors already fails inside torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnopt


class Core(nn.Module):
    def __init__(self, sdpa: bool):
        super().__init__()
        self.sdpa = sdpa

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.sdpa:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        return attnopt.attention(q, k, v, is_causal=True, layout="bshd")


class AttentionLayer(nn.Module):
    def __init__(self, hidden: int = 64, heads: int = 4, kv_heads: int = 2, sdpa: bool = False):
        super().__init__()
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden)
        self.core = Core(sdpa)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(self.core(q, k, v).reshape(b, s, -1))


def layer_inputs(seq: int, device: str = "cpu", dtype: torch.dtype = torch.float32, sdpa: bool = False
                 ) -> tuple[AttentionLayer, Tensor, Tensor]:
    """The layer, an input [2, seq, 64] and an output gradient, the same in every process."""
    torch.manual_seed(0)
    layer = AttentionLayer(sdpa=sdpa).to(device, dtype)
    x, grad = (torch.randn(2, seq, 64, device=device, dtype=dtype) for _ in range(2))
    return layer, x, grad
