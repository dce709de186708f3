"""torchtitan's Llama 3 / Qwen 3 attention on its varlen backend: both layers' ``varlen_attn`` calls
are lowered with the K/V repetition, the transposes and the packing reshapes gone (K and V reach
the op as views of their projections with 2 heads, GQA native), forward and backward equal to the
reference in float64, under torch.compile and torch.export. The GPU test runs torch's real
``varlen_attn`` in bf16 against the compiled model."""
from __future__ import annotations

import pytest
import torch

import attnopt
from tests.patterns.call_checks import check_compiled, check_exported

from .torchtitan_style import (DIM, HEADS, KV_HEADS, build, create_varlen_metadata_for_document, document_batch,
                               reference_varlen, with_attention)

B, S = 2, 12


def _case(device: str = "cpu", dtype: torch.dtype = torch.float64, seq_len: int = S):
    torch.manual_seed(0)
    model = build(seq_len, device, dtype)
    masks = create_varlen_metadata_for_document(document_batch(B, seq_len), eos_id=0)
    masks = type(masks)(masks.cu_seq_q.to(device), masks.cu_seq_k.to(device), masks.max_q, masks.max_k)
    x = torch.randn(B, seq_len, DIM, device=device, dtype=dtype, requires_grad=True)
    return model, (x, masks)


def _assert_sites(sites) -> None:
    assert len(sites) == 2
    for site in sites:
        assert site.status == "lowered", site.reason
        assert site.kind == "varlen" and site.is_causal
        assert (site.layout, site.kv_layout, site.out_layout) == ("thd", "thd", "thd")
        assert site.heads == (HEADS, KV_HEADS) and site.gqa_group == HEADS // KV_HEADS


def test_compiled():
    model, inputs = _case()
    _assert_sites(check_compiled(model, inputs, with_attention(model, reference_varlen)))


def test_exported():
    model, inputs = _case()
    _assert_sites(check_exported(model, inputs, with_attention(model, reference_varlen))[1])


def test_dynamic_shapes():
    """Symbolic batch, length and token counts: the packing reshapes are rebuilt from graph sizes."""
    model, inputs = _case()
    sites = check_compiled(model, inputs, with_attention(model, reference_varlen), dynamic=True)
    _assert_sites(sites[-2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_against_torch_varlen_on_cuda():
    """torch's varlen_attn (FlashAttention) runs eagerly; attnopt's op runs compiled; bf16."""
    model, (x, masks) = _case("cuda", torch.bfloat16, seq_len=256)
    ref = model(x, masks)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, *model.parameters()], grad)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=attnopt.backend("aot_eager", strict=True))
    out = compiled(x, masks)
    got = torch.autograd.grad(out, [x, *model.parameters()], grad)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    assert rel(out, ref) < 2e-2
    assert all(rel(g, w) < 5e-2 for g, w in zip(got, want))
