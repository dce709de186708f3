"""Attention sinks against GPT-OSS's eager attention in transformers, float64, forward and backward
(dQ, dK, dV and dsinks), on both CPU kernels: the math kernel runs them natively, cpu_flash by
folding them into its output and lse."""
from __future__ import annotations

import types

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

import attnopt.runtime_ops as R
from attnopt.runtime_ops import sinks as sink_math

CPU_KERNELS = ("cpu_flash", "math")
NEG = float("-inf")


def gpt_oss(q, k, v, sinks, keep=None):
    """transformers' GPT-OSS eager attention on [B, H, S, D] (its mask is additive), output [B, Hq, Sq, Dv]."""
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks, training=False)
    mask = None if keep is None else torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, NEG)
    out, _ = eager_attention_forward(module, q, k, v, mask, q.shape[-1] ** -0.5)
    return out.transpose(1, 2)


def _band(sq, sk, left=-1):
    i, j = torch.arange(sq)[:, None] + sk - sq, torch.arange(sk)[None]
    keep = j <= i
    return keep & (j >= i - left) if left >= 0 else keep


def _inputs(b=2, hq=8, hkv=2, sq=7, sk=7, d=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)
    sinks = (2 * torch.randn(hq, dtype=dtype)).requires_grad_()
    return make(b, hq, sq, d), make(b, hkv, sk, d), make(b, hkv, sk, d), sinks


CASES = {  # name: (op keywords, the keep mask the eager model builds)
    "gqa_causal": (dict(is_causal=True), _band(7, 7)),
    "sliding_window": (dict(is_causal=True, window_size=(3, 0)), _band(7, 7, left=3)),
    "padding_and_causal": ("padding", None),
    "bidirectional": (dict(), None),
}


def _case(name):
    kw, keep = CASES[name]
    if kw == "padding":  # key padding vector [B, 1, 1, Sk], the band as is_causal
        pad = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        pad[1, ..., :2] = False  # batch 1 is left-padded: its first two rows keep only the sink
        return dict(attn_mask=pad, is_causal=True), pad & _band(7, 7)
    return kw, keep


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sinks_match_gpt_oss_eager(case, kernel):
    kw, keep = _case(case)
    q, k, v, sinks = _inputs()
    ref = gpt_oss(q, k, v, sinks, keep)
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, sinks=sinks, kernel=kernel, **kw)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, sinks), grad)
    want = torch.autograd.grad(ref, (q, k, v, sinks), grad)
    assert [c.kernel for c in calls] == [kernel, kernel]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_sinks_on_packed_sequences_match_per_sequence_eager(kernel):
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    q = torch.randn(14, 8, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(14, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = torch.randn(8, dtype=torch.float64, requires_grad=True)
    out = R.attention(q, k, v, layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8,
                      is_causal=True, sinks=sinks, kernel=kernel)
    dense = lambda t, a, b: t[a:b].transpose(0, 1).unsqueeze(0)
    ref = torch.cat([gpt_oss(dense(q, a, b), dense(k, a, b), dense(v, a, b), sinks, _band(b - a, b - a))[0]
                     .transpose(0, 1) for a, b in zip(cu.tolist(), cu[1:].tolist())])
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(out, (q, k, v, sinks), grad), torch.autograd.grad(ref, (q, k, v, sinks), grad)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_sinks_in_layouts_and_lower_precision():
    """bshd in, sbhd out; bfloat16 operands with float32 sinks: the two kernels agree to bf16 rounding
    and the gradient of the float32 sinks stays float32."""
    q, k, v, sinks = _inputs(dtype=torch.float32)
    t = lambda x: x.detach().transpose(1, 2).to(torch.bfloat16).requires_grad_()
    qb, kb, vb = t(q), t(k), t(v)
    outs = {}
    for kernel in CPU_KERNELS:
        out = R.attention(qb, kb, vb, sinks=sinks, is_causal=True, layout="bshd", out_layout="sbhd", kernel=kernel)
        outs[kernel] = (out, *torch.autograd.grad(out.float().square().sum(), (qb, kb, vb, sinks)))
    ref = gpt_oss(q.double(), k.double(), v.double(), sinks.double(), _band(7, 7)).permute(2, 0, 1, 3)
    for got in outs.values():
        torch.testing.assert_close(got[0].double(), ref, rtol=2e-2, atol=2e-2)
        assert got[4].dtype == torch.float32
    for a, b in zip(outs["math"], outs["cpu_flash"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_sink_gradients_by_finite_differences():
    q, k, v, sinks = _inputs(b=1, hq=4, hkv=2, sq=3, sk=4, d=4)
    f = lambda q, k, v, s: R.attention(q, k, v, sinks=s, is_causal=True, causal_align="bottom_right")
    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_fold_keeps_rows_without_keys_at_zero_with_the_sink_as_lse():
    """Kernels mark a row with no key by lse -inf, +inf (FlashAttention) or 0 with out 0 (cpu_flash)."""
    out = torch.ones(1, 1, 3, 2)
    out[0, 0, 1:] = 0
    lse = torch.tensor([[[0.5, NEG, float("inf")]]])
    sinks = torch.tensor([1.0])
    folded, total = sink_math.fold(out, lse, sinks, thd=False)
    torch.testing.assert_close(total, torch.tensor([[[torch.logaddexp(torch.tensor(0.5), sinks)[0], 1.0, 1.0]]]))
    torch.testing.assert_close(folded[0, 0, 0], torch.sigmoid(torch.tensor(0.5 - 1.0)).expand(2))
    assert (folded[0, 0, 1:] == 0).all()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_sinks_through_torch_compile(backend):
    q, k, v, sinks = _inputs(dtype=torch.float32)
    f = lambda q, k, v, s: R.attention(q, k, v, sinks=s, is_causal=True, window_size=(3, 0))
    ref = f(q, k, v, sinks)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v, sinks), grad)
    torch._dynamo.reset()
    out = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, sinks)
    torch.testing.assert_close(out, ref)
    for g, w in zip(torch.autograd.grad(out, (q, k, v, sinks), grad), want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_opcheck_with_sinks(kernel):
    q, k, v, sinks = _inputs(dtype=torch.float32)
    kwargs = {"is_causal": True, "kernel_name": kernel, "sinks": sinks}
    torch.library.opcheck(torch.ops.attnopt.attention.default, (q, k, v), kwargs)
    args = tuple(t.detach() for t in (q, k, v))
    kwargs["sinks"] = sinks.detach()
    out, lse, rng = torch.ops.attnopt.attention.default(*args, **kwargs)
    torch.library.opcheck(torch.ops.attnopt.attention_backward.default, (torch.randn_like(out), out, lse, rng, *args),
                          kwargs)
