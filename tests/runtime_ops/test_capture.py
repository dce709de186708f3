"""While a CUDA graph is captured the op reads nothing on the host: replays see other values.

Capture itself needs a GPU (tests/runtime_ops/test_attention_gpu.py); here ``capturing`` is made
to say yes on the CPU, so the choices the op makes under capture are checked where CI runs."""
from __future__ import annotations

import importlib

import pytest
import torch

import attnopt.runtime_ops as R
from attnopt.runtime_ops import spec

attention = importlib.import_module("attnopt.runtime_ops.attention")  # the module; the package exports the function


@pytest.fixture
def capture(monkeypatch):
    for module in (attention, spec):
        monkeypatch.setattr(module, "capturing", lambda t: True)


def test_a_finite_fill_runs_as_written_under_capture(capture):
    """The bound that lets a finite fill act as -inf is a host read per call: under capture the
    math kernel computes the fill as written, which holds for any values a replay brings."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    i = torch.arange(6)
    keep = i[None, :] <= i[:, None]
    with R.trace_kernels() as calls:
        out = R.attention(q, k, v, keep, mask_fill=-10000.0)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [c.kernel for c in calls] == ["math", "math"]
    ref = torch.softmax((q @ k.transpose(-2, -1) * 8 ** -0.5).masked_fill(~keep, -10000.0), -1) @ v
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)


def test_offsets_are_neither_read_nor_trimmed_under_capture(capture):
    fixed = torch.tensor([0, 4, 10, 10, 10], dtype=torch.int32)
    assert spec.check_cu_seqlens(fixed, fixed, 10, 10, 7, 7) == (4, 7, 7, False, None, None)


def test_a_kernel_that_needs_offsets_on_the_host_says_so_under_capture(capture):
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="which a CUDA graph cannot capture"):
        R.attention(q, q, q, layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6)


def test_nothing_is_captured_on_the_cpu():
    assert not spec.capturing(torch.zeros(1))
