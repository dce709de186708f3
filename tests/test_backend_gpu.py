"""backend="attnopt" on CUDA: the transformers-style block in bf16 matches eager forward and backward."""
from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.demo_model import LlamaBlock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_llama_block_bf16_matches_eager(inner):
    torch.manual_seed(0)
    model = LlamaBlock(hidden_size=1024, num_heads=16, num_kv_heads=4, mlp=2048).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = model(x)
    ref.float().square().mean().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    compiled = torch.compile(model, backend=attnopt.backend(inner, strict=True))
    with attnopt.runtime_ops.trace_kernels() as calls:
        out = compiled(x)
        out.float().square().mean().backward()
    got = [x.grad] + [p.grad for p in model.parameters()]
    assert {c.direction for c in calls} == {"forward", "backward"}
    print(f"\n{inner}: kernels {sorted({c.kernel for c in calls})}")
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    assert rel(out, ref) < 2e-2
    for g, w in zip(got, want):
        assert rel(g, w) < 3e-2
