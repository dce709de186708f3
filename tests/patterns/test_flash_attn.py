"""The flash-attn package's attention (2.x ``flash_attn_func`` / ``flash_attn_varlen_func`` through
their autograd.Functions, flash-attn 3's op with its registered autograd) becomes one lowered site:
under torch.compile from Dynamo's ``autograd_function_apply``, under torch.export from the op call
the forward inlines. Calls stating what the op cannot, whose other outputs are read, or wrapped in
an autograd.Function whose backward is not flash-attn's stay as written.

flash-attn builds for CUDA only; its ops are declared here for CPU (``flash_kernels``), so eager
runs and the rewritten graphs are checked against it in float64.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from .call_checks import check_compiled, check_exported, sites_of
from .flash_kernels import DECLARED, flash_attn_3_func, flash_attn_func, flash_attn_varlen_func
from .qkv import B, G, H, R, S

pytestmark = pytest.mark.skipif(not DECLARED, reason="flash-attn is installed: its ops run on CUDA only")
D = 16


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


CU_Q, CU_K = _offsets([2, 4, 3, 3]), _offsets([3, 5, 2, 4])  # 12 queries and 14 keys in 4 documents


class Flash(nn.Module):
    """q [B, S, H, D] and k, v [B, Sk, G, D] views of projections, attention by ``attend`` on
    [B, S, ...] or packed [B * S, ...] tokens (``packed``), an output projection."""

    def __init__(self, attend: Callable, packed: bool = False, head_dim: int = D):
        super().__init__()
        self.attend, self.packed, self.d = attend, packed, head_dim
        self.q, self.kv, self.out = nn.Linear(16, H * head_dim), nn.Linear(16, 2 * G * head_dim), \
            nn.Linear(H * head_dim, 16)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, s, sk = x.shape[0], x.shape[1], memory.shape[1]
        q = self.q(x).view(b, s, H, self.d)
        k, v = self.kv(memory).view(b, sk, 2 * G, self.d).split(G, dim=2)
        if self.packed:
            q, k, v = q.reshape(b * s, H, self.d), k.reshape(b * sk, G, self.d), v.reshape(b * sk, G, self.d)
        return self.out(self.attend(q, k, v).reshape(b, s, -1))


def repeated(attend: Callable) -> Callable:
    """K/V repeated to the query heads first (``repeat_interleave`` on the head axis)."""
    return lambda q, k, v: attend(q, k.repeat_interleave(R, dim=-2), v.repeat_interleave(R, dim=-2))


CASES = {  # name: (attend, packed, key length, head dim, expected gqa group)
    "func_causal_gqa": (lambda q, k, v: flash_attn_func(q, k, v, causal=True), False, S, D, 1),
    "func_window_softcap_bottom_right": (
        lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.3, window_size=(2, 1), softcap=5.0),
        False, S + 3, D, 1),
    "func_repeated_kv": (repeated(lambda q, k, v: flash_attn_func(q, k, v, causal=True)), False, S, D, R),
    "varlen_causal": (lambda q, k, v: flash_attn_varlen_func(q, k, v, CU_Q, CU_K, 4, 5, causal=True), True, S + 1,
                      D, 1),
    "fa3_causal": (lambda q, k, v: flash_attn_3_func(q, k, v, causal=True, window_size=(3, 0)), False, S, D, 1),
}


def _case(name: str):
    attend, packed, sk, d, _ = CASES[name]
    torch.manual_seed(0)
    model = Flash(attend, packed, d).double()
    inputs = (torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True),
              torch.randn(B, sk, 16, dtype=torch.float64, requires_grad=True))
    return model, inputs


def _assert_site(sites, name: str) -> None:
    (site,) = sites
    assert site.status == "lowered", site.reason
    layout = "thd" if CASES[name][1] else "bshd"
    assert site.kind == "flash_attn" and (site.layout, site.kv_layout, site.out_layout) == (layout,) * 3
    assert site.gqa_group == CASES[name][4] and site.heads[0] == H


@pytest.mark.parametrize("name", list(CASES))
def test_compiled(name):
    model, inputs = _case(name)
    _assert_site(check_compiled(model, inputs), name)


@pytest.mark.parametrize("name", list(CASES))
def test_exported(name):
    model, inputs = _case(name)
    _assert_site(check_exported(model, inputs)[1], name)


def test_head_dim_padded_inside_the_function():
    """A head dim that is not a multiple of 8 is padded inside flash-attn's autograd.Function:
    under torch.compile the call stays as written (the body computes q, k, v); export inlines the
    pads, and the op takes the padded q, k with V's own head dim and the stated scale."""
    model = Flash(lambda q, k, v: flash_attn_func(q, k, v, causal=True), head_dim=12).double()
    inputs = (torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True),
              torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True))
    (site,) = check_compiled(model, inputs, lowered=False)
    assert site.status == "skipped" and "computes q, k, v itself" in site.reason
    (site,) = check_exported(model, inputs, lowered=False)[1]
    assert site.status == "lowered" and site.head_dims == (16, 12)


# --- left as written ------------------------------------------------------------------------------
def _skipped(model, inputs) -> str:
    (site,) = sites_of(model, inputs)
    assert site.status == "skipped" and site.kind == "flash_attn"
    return site.reason


def test_softmax_lse_read_keeps_the_call():
    model, inputs = _case("func_causal_gqa")

    def attend(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        return out * lse.transpose(1, 2)[..., None]

    model.attend = attend
    assert "softmax_lse" in _skipped(model, inputs)


def test_alibi_keeps_the_call():
    model, inputs = _case("func_causal_gqa")
    slopes = torch.rand(H, dtype=torch.float32)
    model.attend = lambda q, k, v: flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    assert "alibi_slopes" in _skipped(model, inputs)


class StraightThrough(torch.autograd.Function):
    """flash-attn's forward op with a backward of its own: not attention's gradient."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, D ** -0.5, True, -1, -1, 0.0, None, False)[0]

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.sum(2, keepdim=True)[:, :, :1].expand(-1, -1, G, -1), \
            grad.sum(2, keepdim=True)[:, :, :1].expand(-1, -1, G, -1)


def test_a_backward_of_its_own_keeps_the_call():
    model, inputs = _case("func_causal_gqa")
    model.attend = StraightThrough.apply
    (site,) = check_compiled(model, inputs, lowered=False)
    assert site.status == "skipped" and "backward is not flash-attn's" in site.reason


def test_a_cache_update_keeps_the_call():
    """flash-attn 3's ``flash_attn_with_kvcache`` appends keys to the cache inside the kernel."""
    model, inputs = _case("fa3_causal")
    model.attend = lambda q, k, v: torch.ops.flash_attn_3._flash_attn_forward(
        q, torch.zeros_like(k), torch.zeros_like(v), k, v, causal=True)[0]
    with torch.no_grad():
        assert "k_new" in _skipped(model, tuple(t.detach() for t in inputs))
