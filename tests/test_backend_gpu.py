"""backend="attnopt" on CUDA: the transformers-style block in bf16 matches eager forward and backward."""
from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.demo_model import LlamaBlock

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _fa4() -> bool:
    from attnopt.runtime_ops.kernels import KERNELS

    return KERNELS["fa4"].available(torch.device("cuda")) is None


@pytest.mark.parametrize("inner, seq", [("inductor", 512), ("aot_eager", 512), ("inductor", 2048)])
def test_llama_block_bf16_matches_eager(inner, seq):
    """Short sequences run as SDPA on views; from the measured crossover on, where flash-attn-4 is
    installed, as the op (passes/choose_call.py): both match eager."""
    torch.manual_seed(0)
    model = LlamaBlock(hidden_size=2048, num_heads=16, num_kv_heads=4, mlp=2048).cuda().to(torch.bfloat16)
    x = torch.randn(2, seq, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = model(x)
    ref.float().square().mean().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    results = []
    compiled = torch.compile(model, backend=attnopt.backend(inner, strict=True,
                                                            on_result=lambda *r: results.append(r[2])))
    with attnopt.runtime_ops.trace_kernels() as calls:
        out = compiled(x)
        out.float().square().mean().backward()
    got = [x.grad] + [p.grad for p in model.parameters()]
    (site,) = [s for r in results for s in r.sites]
    op = seq >= 2048 and _fa4()
    assert site.status == "lowered" and (site.call is None) == op, site.call
    assert {c.kernel for c in calls} == ({"fa4"} if op else set())
    print(f"\n{inner} S={seq}: {site.call or 'the op'}")
    torch._dynamo.reset()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    assert rel(out, ref) < 2e-2
    for g, w in zip(got, want):
        assert rel(g, w) < 3e-2
