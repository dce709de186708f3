"""Megatron on TransformerEngine's FlashAttention backend: the SBHD module's ``flash_attn_func`` and
the MLA module's padded ``flash_attn_varlen_func`` are lowered with every copy, V pad and trim
gone (the op reads [S, B, H, D] views with GQA, writes [S, B, H, D] for the output projection, and
takes V with its own head dim), forward and backward equal to eager in float64 under torch.compile
and torch.export. The GPU tests run the same modules on torch's FlashAttention in bf16."""
from __future__ import annotations

import pytest
import torch

import attnopt
from tests.patterns.call_checks import check_compiled, check_exported
from tests.patterns.flash_kernels import DECLARED

from .te_style import (GROUPS, HEADS, HIDDEN, NOPE, ROPE, V_DIM, MegatronSBHD, MLAPackedTHD,
                       aten_flash_attn_func, aten_flash_attn_varlen_func)

S, B = 10, 2
CU = torch.tensor([0, 3, 9, 10, 20], dtype=torch.int32)  # 20 tokens in 4 documents
needs_declared = pytest.mark.skipif(not DECLARED, reason="flash-attn is installed: its ops run on CUDA only")


def _megatron(device="cpu", dtype=torch.float64, seq=S, attend=None):
    torch.manual_seed(0)
    model = (MegatronSBHD() if attend is None else MegatronSBHD(attend)).to(device, dtype)
    return model, (torch.randn(seq, B, HIDDEN, device=device, dtype=dtype, requires_grad=True),)


def _mla(device="cpu", dtype=torch.float64, cu=CU, max_seqlen=10, attend=None):
    torch.manual_seed(0)
    model = (MLAPackedTHD() if attend is None else MLAPackedTHD(attend)).to(device, dtype)
    x = torch.randn(int(cu[-1]), HIDDEN, device=device, dtype=dtype, requires_grad=True)
    return model, (x, cu.to(device), max_seqlen)


def _assert_megatron(sites) -> None:
    (site,) = sites
    assert site.status == "lowered", site.reason
    assert (site.layout, site.kv_layout, site.out_layout) == ("sbhd", "sbhd", "sbhd")
    assert site.heads == (HEADS, GROUPS) and site.gqa_group == 1 and site.is_causal


def _assert_mla(sites) -> None:
    (site,) = sites
    assert site.status == "lowered", site.reason
    assert (site.layout, site.kv_layout, site.out_layout) == ("thd", "thd", "thd")
    assert site.head_dims == (NOPE + ROPE, V_DIM) and site.is_causal


@needs_declared
def test_megatron_sbhd_compiled():
    model, inputs = _megatron()
    _assert_megatron(check_compiled(model, inputs))


@needs_declared
def test_megatron_sbhd_exported():
    model, inputs = _megatron()
    _assert_megatron(check_exported(model, inputs)[1])


@needs_declared
def test_megatron_sbhd_portable():
    """Plain SDPA on the [S, B, H, D] views with enable_gqa, written back through the output projection's view."""
    model, inputs = _megatron()
    (site,) = check_exported(model, inputs, target="portable")[1]
    assert site.status == "lowered", site.reason


@needs_declared
def test_mla_thd_portable_stays():
    """SDPA has no packed sequences: the MLA call stays as written, with the reason."""
    model, inputs = _mla()
    ep = torch.export.export(model, inputs)
    (site,) = attnopt.optimize(ep, strict=True, target="portable", return_result=True)[1].sites
    assert site.status == "skipped" and "packed" in site.reason


@needs_declared
def test_mla_thd_compiled():
    model, inputs = _mla()
    _assert_mla(check_compiled(model, inputs))


@needs_declared
def test_mla_thd_exported():
    model, inputs = _mla()
    _assert_mla(check_exported(model, inputs)[1])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def _against_eager_on_cuda(make, attend, **kw) -> None:
    """bf16 on torch's FlashAttention, eager and compiled, each against the same weights and input
    in float64 on the CPU (flash-attn's declared reference): the compiled error is at most twice
    eager's own, for the output and every gradient."""
    model, inputs = make("cuda", torch.bfloat16, attend=attend, **kw)
    exact, exact_inputs = make("cpu", torch.float64, **kw)
    exact.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    x = inputs[0].detach().double().cpu().requires_grad_()
    exact_inputs = (x, *exact_inputs[1:])
    ref = exact(*exact_inputs)
    grad = torch.randn_like(ref)
    want = [ref, *torch.autograd.grad(ref, [x, *exact.parameters()], grad)]

    def run(fn):
        out = fn(*inputs)
        return [out, *torch.autograd.grad(out, [inputs[0], *model.parameters()], grad.to(out))]

    eager = run(model)
    torch._dynamo.reset()
    compiled = run(torch.compile(model, backend=attnopt.backend("aot_eager", strict=True)))
    errors = [(_rel(e, w), _rel(c, w)) for e, c, w in zip(eager, compiled, want)]
    assert all(c <= 2 * e + 1e-3 for e, c in errors), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_megatron_sbhd_bf16_on_cuda():
    _against_eager_on_cuda(_megatron, aten_flash_attn_func, seq=512)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mla_thd_bf16_on_cuda():
    cu = torch.tensor([0, 300, 700, 1024], dtype=torch.int32)
    _against_eager_on_cuda(_mla, aten_flash_attn_varlen_func, cu=cu, max_seqlen=400)
