"""attnopt::attention on CUDA: every variant on every kernel there, bf16 against a float64 reference.

Prints one row per (variant, kernel): the relative errors of out, dq, dk, dv, or why the kernel
does not take the variant, and which kernel the automatic policy picks. Run with ``pytest -s``.
"""
from __future__ import annotations

import pytest
import torch

import attnopt.runtime_ops as R
from attnopt.runtime_ops import kernels
from attnopt.runtime_ops.attention import _varlen_spec as varlen_spec
from attnopt.runtime_ops.spec import build_spec
from tests.runtime_ops.variants import SOFTCAP_VARIANTS, VARIANTS, make_inputs, reference, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = 2e-2  # bf16 operands: errors land between 1e-3 and 1e-2


def _gpu_variant(v):
    """Larger than the CPU sizes so that tiles are exercised; head dims kept kernel-friendly; a
    single query stays single (decode)."""
    grow = dict(seqlen_q=v.seqlen_q * 8 if v.seqlen_q > 1 else 1, seqlen_k=v.seqlen_k * 8, dim_qk=v.dim_qk * 2,
                dim_v=v.dim_v * 2)
    if v.seqlens:
        grow["seqlens"] = tuple(s * 8 for s in v.seqlens)
    if v.seqused:
        grow["seqused"] = tuple(s * 8 for s in v.seqused)
    return v.scaled(**grow)


def _spec(q, k, v, kw):
    a = dict(kw)
    return build_spec(q, k, v, a.get("attn_mask"), 0.0, a["is_causal"], None, a["layout"], a.get("out_layout"),
                      a["causal_align"], a["window_size"], a.get("cu_seqlens_q"), a.get("cu_seqlens_k"),
                      a.get("max_seqlen_q"), a.get("max_seqlen_k"), a.get("seqused_k"), a.get("softcap", 0.0))


def test_every_variant_on_every_cuda_kernel():
    rows, failures = [], []
    for variant in map(_gpu_variant, VARIANTS + SOFTCAP_VARIANTS):
        q, k, v, kw = make_inputs(variant, torch.bfloat16, "cuda")
        q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
        ref64 = reference(q64, k64, v64, kw)
        grad = torch.randn(ref64.shape, device="cuda", dtype=torch.bfloat16)
        want = torch.autograd.grad(ref64, (q64, k64, v64), grad.double().cpu())
        spec = _spec(q, k, v, kw)
        if spec.varlen:
            spec, *_ = varlen_spec(spec, q, k, kw["cu_seqlens_q"], kw["cu_seqlens_k"])
        auto = R.kernel_for(q, k, v, **kw)
        for name, why_not in kernels.explain(spec).items():
            if why_not != "ok":
                rows.append((variant.name, name, "n/a", why_not))
                continue
            try:
                with R.trace_kernels() as calls:
                    out = R.attention(q, k, v, kernel=name, **kw)
                    got = torch.autograd.grad(out, (q, k, v), grad)
                errs = [rel_err(out, ref64)] + [rel_err(g, w) for g, w in zip(got, want)]
                ran = {c.kernel for c in calls}
                ok = max(errs) < TOL and ran == {name}
                rows.append((variant.name, name, "ok" if ok else "FAIL",
                             " ".join(f"{e:.1e}" for e in errs) + ("  (auto)" if name == auto else "")))
                if not ok:
                    failures.append((variant.name, name, errs, ran))
            except Exception as e:  # noqa: BLE001 - every kernel error is reported, then fails the test
                rows.append((variant.name, name, "ERROR", f"{type(e).__name__}: {str(e)[:150]}"))
                failures.append((variant.name, name, repr(e)[:300]))
    print(f"\n{'variant':28} {'kernel':10} {'status':6} rel.err out dq dk dv / reason")
    for r in rows:
        print(f"{r[0]:28} {r[1]:10} {r[2]:6} {r[3]}")
    assert not failures, failures


@pytest.mark.parametrize("kernel", ["cudnn", "efficient"])
def test_dropout_forward_and_backward_share_the_mask(kernel):
    from tests.runtime_ops.variants import Variant

    variant = Variant("drop", heads_q=8, heads_kv=8 if kernel == "efficient" else 2, seqlen_q=256, seqlen_k=256,
                      dim_qk=64, dim_v=64)
    q, k, v, kw = make_inputs(variant, torch.bfloat16, "cuda")
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, dropout_p=0.2, kernel=kernel, **kw)
        grad = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda",
                           dtype=out.dtype)
        (dv,) = torch.autograd.grad(out, (v,), grad)
    assert {c.kernel for c in calls} == {kernel}
    terms = grad.float() * out.float()
    lhs, rhs = terms.sum(), (dv.float() * v.float()).sum()
    # out = P_drop V gives <dO, out> = <P_drop^T dO, V> = <dV, V> only when both use one mask: a
    # different mask is off by ~1/sqrt(N) of the summed magnitudes, bf16 rounding by ~1e-5
    assert abs(lhs - rhs) / terms.abs().sum() < 2e-4
    print(f"\ndropout on {kernel}: <dO,out>={lhs.item():.4f} <dV,v>={rhs.item():.4f}")


@pytest.mark.parametrize("kernel", ["fa4", "flash", "cudnn", "efficient", "math"])
def test_seqused_k_decode_matches_sliced_cache(kernel):
    kern = kernels.KERNELS[kernel]
    if kern.available(torch.device("cuda")):
        pytest.skip(kern.available(torch.device("cuda")))
    torch.manual_seed(0)
    heads = 8 if kernel == "efficient" else 16  # EFFICIENT has no GQA
    q = torch.randn(4, 1, heads, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4, 8, 1024, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    lengths = torch.tensor([1, 300, 777, 1024], device="cuda", dtype=torch.int32)
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, layout="bshd", seqused_k=lengths, kernel=kernel)
    assert {c.kernel for c in calls} == {kernel}
    for b, n in enumerate(lengths.tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].transpose(1, 2).float(), k[b:b + 1, :n].transpose(1, 2).float(),
            v[b:b + 1, :n].transpose(1, 2).float(), enable_gqa=True).transpose(1, 2)
        assert rel_err(out[b:b + 1], ref) < TOL


def test_decode_over_a_cache_runs_in_a_cuda_graph():
    """The decode path reads key lengths on the device only, so a decode step can be captured."""
    torch.manual_seed(0)
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([1000 + 37 * i for i in range(8)], device="cuda", dtype=torch.int32)
    eager = R.attention(q, k, v, seqused_k=lengths)
    graph = torch.cuda.CUDAGraph()
    with R.trace_kernels() as calls, torch.cuda.graph(graph):
        out = R.attention(q, k, v, seqused_k=lengths)
    lengths += 5  # the graph reads the new lengths when replayed
    graph.replay()
    assert {c.kernel for c in calls} == {"flash"}
    want = R.attention(q, k, v, seqused_k=lengths)
    assert rel_err(out, want) < 1e-6 and rel_err(out, eager) > 1e-4
