"""Target "auto" lowers a site SDPA can compute to SDPA on views unless the op would run a faster
kernel on sequences long enough to hide its launch path (passes/choose_call.py): on CUDA by the
measured crossover; on the CPU, where the op runs SDPA's own kernel, always, except for a written
softmax whose NaNs only the op reproduces.

CI has no GPU: the graphs here are traced on the CPU and the pass is told their tensors live on
CUDA and which kernel the op would pick there; the lowered graph then runs on the CPU against
eager, forward and backward. tests/test_backend_gpu.py runs the same choice on a GPU."""
from __future__ import annotations

import types

import pytest
import torch

import attnopt
from attnopt.demo_model import LlamaAttention
from attnopt.passes import choose_call

SDPA = torch.ops.aten.scaled_dot_product_attention.default
OP = torch.ops.attnopt.attention.default


@pytest.fixture
def on_cuda(monkeypatch):
    """The pass sees CUDA tensors and a GPU; ``kernel`` is what the op would pick there."""
    picked = types.SimpleNamespace(kernel="fa4", asked=[])
    real_meta = choose_call.meta

    def cuda_meta(node):
        t = real_meta(node)
        return types.SimpleNamespace(device=torch.device("cuda"), dtype=t.dtype)

    def kernel_for(q, k, v, **kw):
        picked.asked.append((tuple(q.shape), tuple(k.shape), kw))
        return picked.kernel

    monkeypatch.setattr(choose_call, "meta", cuda_meta)
    monkeypatch.setattr(choose_call, "kernel_for", kernel_for)
    monkeypatch.setattr(choose_call, "_placeholder", lambda like, size: torch.empty(size, device="meta"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return picked


def _lower(seq: int, head_dim: int = 128, dynamic: bool = False, **backend):
    torch.manual_seed(0)
    model = LlamaAttention(4 * head_dim, 4, 2).double()
    x = torch.randn(1, seq, 4 * head_dim, dtype=torch.float64)
    shapes = {"hidden_states": {1: torch.export.Dim("s", min=2, max=4096)}} if dynamic else None
    ep = torch.export.export(model, (x,), dynamic_shapes=shapes)
    new, result = attnopt.optimize(ep, strict=True, return_result=True, **backend)
    (site,) = result.sites
    calls = {n.target for n in new.graph.nodes if n.target in (SDPA, OP)}
    return model, x, new, site, calls


def _same_as_eager(model, x, new) -> None:
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = model(x1), new.module()(x2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x2)[0], torch.autograd.grad(want.sum(), x1)[0])


@pytest.mark.parametrize("seq, kernel, call", [
    (2048, "fa4", OP),  # at the crossover, flash-attn-4 through the op
    (64, "fa4", SDPA),  # shorter: the op's launch costs more than its kernel saves
    (2048, "cudnn", SDPA),  # SDPA reaches cuDNN without the op
])
def test_the_cheaper_exact_call(on_cuda, seq, kernel, call):
    on_cuda.kernel = kernel
    model, x, new, site, calls = _lower(seq)
    assert site.status == "lowered" and calls == {call}
    assert (site.call is None) == (call is OP)
    if call is SDPA:
        assert site.call.startswith("SDPA on views")
    (q, k, kw), = on_cuda.asked  # the op's GQA call: K/V heads unrepeated, the band as SDPA's flag
    assert q[1] == 4 and k[1] == 2 and kw["is_causal"] is True
    _same_as_eager(model, x, new)


def test_an_unmeasured_head_dim_gets_sdpa(on_cuda):
    *_, site, calls = _lower(2048, head_dim=32)
    assert calls == {SDPA} and "no measured crossover" in site.call


def test_a_sequence_known_only_at_run_time_gets_sdpa(on_cuda):
    model, x, new, site, calls = _lower(64, dynamic=True)
    assert calls == {SDPA} and "run time" in site.call and not on_cuda.asked
    _same_as_eager(model, x, new)


def test_a_forced_kernel_keeps_the_op(on_cuda):
    *_, site, calls = _lower(64, kernel="math")
    assert calls == {OP} and site.call is None


def test_the_cpu_lowers_sdpa_to_sdpa_on_views():
    model, x, new, site, calls = _lower(64)
    assert calls == {SDPA} and "on the CPU" in site.call
    _same_as_eager(model, x, new)
    *_, site, calls = _lower(64, target="op")
    assert calls == {OP} and site.call is None


def test_the_cpu_keeps_the_op_for_a_written_softmax():
    """Only the op reproduces the NaNs a written softmax gives a NaN input or a row with no key."""
    def f(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / 4.0
        causal = torch.ones(8, 8, dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    q, k, v = (torch.randn(2, 4, 8, 16, dtype=torch.float64) for _ in range(3))
    q[0, 1, 3, 5] = float("nan")
    new, result = attnopt.optimize(torch.export.export(_Fn(f), (q, k, v)), strict=True, return_result=True)
    (site,) = result.sites
    assert site.status == "lowered" and site.call is None
    assert any(n.target is OP for n in new.graph.nodes)
    torch.testing.assert_close(new.module()(q, k, v), f(q, k, v), equal_nan=True)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
