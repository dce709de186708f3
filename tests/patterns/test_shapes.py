"""Cross-attention, decode with a KV cache, batch size 1 and dynamic batch/sequence sizes."""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

import attnopt
from attnopt.demo_model import repeat_kv
from tests.conftest import Capture
from tests.models.helpers import check_compiled, check_exported

from .qkv import D, G, H, R, sdpa

F64 = torch.float64


class CrossAttention(nn.Module):
    """Queries from x, keys/values from a memory of another length (GQA, repeat_kv)."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.q, self.kv = nn.Linear(16, H * D), nn.Linear(16, 2 * G * D)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, sq, sk = x.shape[0], x.shape[1], memory.shape[1]
        q = self.q(x).view(b, sq, H, D).transpose(1, 2)
        k, v = self.kv(memory).view(b, sk, 2, G, D).unbind(2)
        k, v = repeat_kv(k.transpose(1, 2), R), repeat_kv(v.transpose(1, 2), R)
        return sdpa(q, k, v, is_causal=self.causal).transpose(1, 2).reshape(b, sq, H * D)


class Decode(nn.Module):
    """One new token against a KV cache (q length 1): cache and new K/V concatenated, repeated."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, (H + 2 * G) * D)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).view(b, s, H + 2 * G, D).transpose(1, 2).split([H, G, G], dim=1)
        k, v = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
        o = sdpa(q, repeat_kv(k, R), repeat_kv(v, R))
        return o.transpose(1, 2).reshape(b, s, -1)


def _randn(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _lowered_with_gqa(sites) -> None:
    (site,) = sites
    assert site.status == "lowered" and site.gqa_group == R, site.reason


def test_cross_attention():
    torch.manual_seed(0)
    for causal in (False, True):  # causal with Sq != Sk: SDPA's top-left diagonal is kept
        model, inputs = CrossAttention(causal).double(), (_randn(2, 5, 16), _randn(2, 9, 16))
        _lowered_with_gqa(check_compiled(model, inputs))
        _lowered_with_gqa(check_exported(model, inputs)[1])


def test_decode_with_kv_cache():
    torch.manual_seed(0)
    model, inputs = Decode().double(), (_randn(2, 1, 16), _randn(2, G, 7, D), _randn(2, G, 7, D))
    _lowered_with_gqa(check_compiled(model, inputs))
    _lowered_with_gqa(check_exported(model, inputs)[1])


def test_batch_size_one():
    torch.manual_seed(0)
    model, inputs = CrossAttention(causal=True).double(), (_randn(1, 6, 16), _randn(1, 6, 16))
    _lowered_with_gqa(check_compiled(model, inputs))
    _lowered_with_gqa(check_exported(model, inputs)[1])


def test_dynamic_batch_and_sequence_compile_once():
    torch.manual_seed(0)
    model = CrossAttention(causal=True)
    capture = Capture("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture.backend, dynamic=True)
    compiled(torch.randn(2, 4, 16), torch.randn(2, 6, 16))  # distinct sizes: no duck-sized equalities
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b, sq, sk in ((3, 5, 7), (2, 9, 9), (4, 17, 3)):
            x, mem = torch.randn(b, sq, 16), torch.randn(b, sk, 16)
            torch.testing.assert_close(compiled(x, mem), model(x, mem), rtol=1e-4, atol=1e-5)
    assert len(capture.graphs) == 1
    _lowered_with_gqa(capture.result.sites)


def test_dynamic_batch_and_sequence_export():
    torch.manual_seed(0)
    model = CrossAttention()
    batch, sq, sk = Dim("batch", min=2), Dim("sq", min=2), Dim("sk", min=2)
    args = (torch.randn(2, 4, 16), torch.randn(2, 6, 16))
    ep = torch.export.export(model, args, dynamic_shapes=({0: batch, 1: sq}, {0: batch, 1: sk}))
    ep = attnopt.optimize(ep, strict=True, target="op")
    for b, n, m in ((3, 5, 7), (2, 9, 9), (4, 17, 3)):
        x, mem = torch.randn(b, n, 16), torch.randn(b, m, 16)
        torch.testing.assert_close(ep.module()(x, mem), model(x, mem), rtol=1e-4, atol=1e-5)
    assert sum(n.target is torch.ops.attnopt.attention.default for n in ep.graph.nodes) == 1
    assert not any(n.target is torch.ops.aten.expand.default for n in ep.graph.nodes)
