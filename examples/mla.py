"""DeepSeek-V3-style multi-head latent attention (MLA) under ``torch.compile(backend="attnopt")``,
forward and backward checked against eager.

q/k head dim (nope + rope) differs from v's head dim; the rope key is one head broadcast over all
query heads; V is zero-padded to q/k's head dim for SDPA and the output sliced back, as
transformers' DeepSeek-V3 code does for kernels that need equal head dims.

    python examples/mla.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnopt
from attnopt.demo_model import rotary, rotate_half


class MLAttention(nn.Module):
    def __init__(self, hidden: int = 128, heads: int = 4, nope: int = 32, rope: int = 16, v_dim: int = 32,
                 kv_rank: int = 64):
        super().__init__()
        self.heads, self.nope, self.rope, self.v_dim = heads, nope, rope, v_dim
        self.q_proj = nn.Linear(hidden, heads * (nope + rope), bias=False)
        self.kv_a_proj = nn.Linear(hidden, kv_rank + rope, bias=False)
        self.kv_a_norm = nn.RMSNorm(kv_rank)
        self.kv_b_proj = nn.Linear(kv_rank, heads * (nope + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, -1).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
        compressed, k_pe = torch.split(self.kv_a_proj(x), [self.kv_a_norm.normalized_shape[0], self.rope], dim=-1)
        k_pe = k_pe.view(b, s, 1, self.rope).transpose(1, 2)  # one rope key shared by every head
        kv = self.kv_b_proj(self.kv_a_norm(compressed)).view(b, s, self.heads, -1).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        cos, sin = rotary(s, self.rope, x.device, x.dtype)
        q_pe = q_pe * cos + rotate_half(q_pe) * sin
        k_pe = k_pe * cos + rotate_half(k_pe) * sin
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(-1, self.heads, -1, -1)], dim=-1)
        v = F.pad(v, [0, self.nope + self.rope - self.v_dim])  # pad V to q/k's head dim
        out = F.scaled_dot_product_attention(query, key, v, is_causal=True)
        out = out[..., : self.v_dim]  # and slice the padding back off
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def main() -> int:
    torch.manual_seed(0)
    model = MLAttention()
    x = torch.randn(2, 32, 128, requires_grad=True)

    print(attnopt.explain(model, x), "\n")

    compiled = torch.compile(model, backend="attnopt")
    results = []
    for fn in (model, compiled):
        out = fn(x)
        results.append((out.detach(), *torch.autograd.grad(out.square().sum(), [x, *model.parameters()])))
    err = max(float((a - b).abs().max()) for a, b in zip(*results))
    print(f"max abs. difference from eager (output, input and parameter grads): {err:.2e}")
    ok = err < 1e-4
    print("numerics check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
