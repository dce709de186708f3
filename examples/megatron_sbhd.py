"""Megatron-style self-attention on sequence-first [S, B, hidden] activations, under
``torch.compile(backend="attnopt")``, with forward and backward checked against eager.

Written the way megatron-core's local (non-TE) path spells it: one fused QKV projection viewed
as [S, B, groups, (R + 2) * D] and split, grouped-query heads, ``transpose(0, 1).contiguous()``
to batch-first before attention, and the output brought back to [S, B, H * D] through
``permute(2, 0, 1, 3).contiguous().view``.

    python examples/megatron_sbhd.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnopt


class MegatronSelfAttention(nn.Module):
    def __init__(self, hidden: int = 128, heads: int = 8, groups: int = 2):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, hidden // heads
        self.per_group = heads // groups
        self.linear_qkv = nn.Linear(hidden, (heads + 2 * groups) * self.head_dim)
        self.linear_proj = nn.Linear(heads * self.head_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        s, b, _ = x.shape
        mixed = self.linear_qkv(x).view(s, b, self.groups, (self.per_group + 2) * self.head_dim)
        q, k, v = torch.split(mixed, [self.per_group * self.head_dim, self.head_dim, self.head_dim], dim=3)
        q = q.reshape(s, b, self.heads, self.head_dim)  # [S, B, H, D]
        # [S, B, H, D] -> [B, H, S, D], copying to batch-first as the seed code does
        q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = out.permute(2, 0, 1, 3).contiguous().view(s, b, -1)  # [B, H, S, D] -> [S, B, H * D]
        return self.linear_proj(out)


def main() -> int:
    torch.manual_seed(0)
    model = MegatronSelfAttention()
    x = torch.randn(32, 2, 128, requires_grad=True)  # [S, B, hidden]

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
