"""In-place writes and aliasing, as Dynamo and torch.export record them; and what the passes do
around them: no proof or in-place read survives a write."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.fx import Writes
from tests.conftest import Capture

B, H, S, D = 2, 2, 6, 4


def _dynamo_graph(fn, *args) -> torch.fx.GraphModule:
    graphs = []
    torch._dynamo.reset()
    torch.compile(fn, backend=lambda gm, _: graphs.append(gm) or gm, fullgraph=True)(*args)
    return graphs[0]


def _export_graph(fn, *args) -> torch.fx.GraphModule:
    class Wrap(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    return torch.export.export(Wrap(), args).graph_module


GRAPHS = {"dynamo": _dynamo_graph, "export": _export_graph}


def _named(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


@pytest.mark.parametrize("level", GRAPHS)
@pytest.mark.parametrize("write", [
    lambda t: t.__setitem__((0, 1), 0.0),
    lambda t: t.mul_(2),
    lambda t: F.relu(t, inplace=True),
    lambda t: F.relu(t, True),
    lambda t: torch.relu_(t),
    lambda t: t[:, 0].fill_(1.0),  # a write through a view reaches its base
], ids=["setitem", "method", "kwarg_inplace", "positional_inplace", "function", "through_view"])
def test_writes_reach_every_alias(write, level):
    def fn(x):
        y = x * 1
        view = y.transpose(0, 1)
        copy = y + 1
        write(y)
        return view, copy

    gm = GRAPHS[level](fn, torch.randn(3, 3))
    writes = Writes(gm.graph)
    out = gm.graph.find_nodes(op="output")[0].args[0]
    view, copy = out
    assert writes.first_write([view]) is not None  # a view of the written tensor
    assert writes.first_write([copy]) is None  # computed from it before: fresh memory


@pytest.mark.parametrize("level", GRAPHS)
def test_logical_operators_are_not_writes(level):
    gm = GRAPHS[level](lambda a, b: (a > 0) & (b > 0) | (a < b), torch.randn(3), torch.randn(3))
    assert not Writes(gm.graph).any


def test_writes_are_placed_in_graph_order():
    def fn(x):
        y = x * 1
        z = y.view(-1)
        before = z + 1
        y.add_(1)
        after = z + 1
        return before, after

    gm = _dynamo_graph(fn, torch.randn(3))
    writes = Writes(gm.graph)
    before, after = gm.graph.find_nodes(op="output")[0].args[0]
    z = before.args[0]
    assert writes.first_write([z], before=before) is None
    assert writes.first_write([z], before=after) is not None


def _idx():
    i = torch.arange(S)
    return i[:, None], i[None, :]


def _compile(fn, *args, **kw):
    capture = Capture(**kw)
    torch._dynamo.reset()
    out = torch.compile(fn, backend=capture.backend)(*args)
    torch.testing.assert_close(out, fn(*args))
    return capture.result.sites


def test_a_mask_edited_after_it_is_built_is_kept():
    """Models set global or sink tokens after building a band (``m[i, j] = ...``): the band proof
    was about the mask before the edit."""
    def fn(q, k, v):
        qi, ki = _idx()
        m = ki <= qi
        m[0, S - 1] = True
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    (site,) = _compile(fn, q, k, v)
    assert site.mask_action == "kept" and "written in place" in site.mask


def test_an_input_written_between_the_mask_and_attention_is_not_read_again():
    """Key padding is lowered by reading the padding input at the attention call: a write to it
    after the mask was built would make that read differ from the mask."""
    def fn(q, k, v, pad):
        qi, ki = _idx()
        m = (pad[:, None, None, :] != 0) & (ki <= qi)
        pad.zero_()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    pad = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * S])
    capture = Capture()
    torch._dynamo.reset()
    out = torch.compile(fn, backend=capture.backend)(q, k, v, pad.clone())
    torch.testing.assert_close(out, fn(q, k, v, pad.clone()))
    (site,) = capture.result.sites
    assert site.mask_action == "kept"


def test_an_inplace_activation_between_a_copy_and_attention_keeps_the_copy():
    def fn(x):
        x = x * 1
        q = x.view(B, S, H, D).transpose(1, 2).contiguous()
        F.relu(x, inplace=True)  # the copy q does not see this; an in-place read of x would
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    (site,) = _compile(fn, torch.randn(B, S, H * D, dtype=torch.float64))
    assert site.status == "lowered" and site.layout == "bhsd"  # read from the copy, not from x


def test_a_write_to_the_output_keeps_the_output_copy():
    def fn(q, k, v):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        flat = o.transpose(1, 2).contiguous().view(B, S, H * D)
        o.mul_(2)  # flat is a copy: unaffected in eager; a view of the op's output would not be
        return flat + 0

    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        (site,) = _compile(fn, q, k, v)
    assert site.status == "lowered" and site.out_layout == "bhsd"


def test_export_keeps_copies_around_writes():
    def fn(x):
        x = x * 1
        q = x.view(B, S, H, D).transpose(1, 2).contiguous()
        x.relu_()
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    class M(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    x = torch.randn(B, S, H * D, dtype=torch.float64)
    ep, result = attnopt.optimize(torch.export.export(M(), (x,)), strict=True, return_result=True)
    torch.testing.assert_close(ep.module()(x), fn(x))
    (site,) = result.sites
    assert site.status == "lowered" and site.layout == "bhsd"


def _cache_step(cache_k, cache_v, q, write_before: bool):
    """A decode step as a cache writes it: repeat_kv of the cache, attention, then a write to the
    cache (the next layer's write, as far as aliasing can tell) or the same write before attention."""
    k = cache_k[:, :, None].expand(B, 2, 2, S, D).reshape(B, 4, S, D)
    v = cache_v[:, :, None].expand(B, 2, 2, S, D).reshape(B, 4, S, D)
    if write_before:
        cache_k.mul_(2)  # the repeat saw the old cache; an in-place read would see this
    out = F.scaled_dot_product_attention(q, k, v)
    if not write_before:
        cache_k.mul_(2)
    return out


@pytest.mark.parametrize("write_before", [False, True], ids=["write after", "write between"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_a_write_after_attention_blocks_in_place_reads_only_when_backward_keeps_them(write_before, grad):
    """Without a backward, the op reads a repeated cache where it lies unless it is written before
    the call; with one (saved inputs), a write anywhere after the repeat keeps the copy."""
    torch.manual_seed(0)
    cache_k, cache_v = (torch.randn(B, 2, S, D, dtype=torch.float64) for _ in range(2))
    q = torch.randn(B, 4, 1, D, dtype=torch.float64, requires_grad=grad)
    capture = Capture("aot_eager")
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        got_k = cache_k.clone()
        got = torch.compile(_cache_step, backend=capture.backend)(got_k, cache_v, q, write_before)
        want_k = cache_k.clone()
        want = _cache_step(want_k, cache_v, q, write_before)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_k, want_k)
    if grad:
        torch.testing.assert_close(torch.autograd.grad(got.sum(), q), torch.autograd.grad(want.sum(), q))
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.gqa_group == (1 if write_before or grad else 2)


@pytest.mark.parametrize("spelling", ["sdpa", "hand_written"])
def test_a_learned_bias_keeps_the_copy_of_frozen_keys_written_later(spelling):
    """Frozen q, k, v but a bias that requires grad: the op still keeps k for the bias's gradient,
    so a write after the call counts."""
    torch.manual_seed(0)
    cache_k, cache_v = (torch.randn(B, 2, S, D, dtype=torch.float64) for _ in range(2))
    q = torch.randn(B, 4, 1, D, dtype=torch.float64)
    bias = torch.randn(1, 4, 1, S, dtype=torch.float64, requires_grad=True)

    def step(cache_k, cache_v, q, bias):
        k = cache_k[:, :, None].expand(B, 2, 2, S, D).reshape(B, 4, S, D)
        v = cache_v[:, :, None].expand(B, 2, 2, S, D).reshape(B, 4, S, D)
        if spelling == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = ((q @ k.transpose(-1, -2)) * D ** -0.5 + bias).softmax(-1) @ v
        cache_k.mul_(2)
        return out

    capture = Capture("aot_eager")
    torch._dynamo.reset()
    got_k, want_k = cache_k.clone(), cache_k.clone()
    got = torch.compile(step, backend=capture.backend)(got_k, cache_v, q, bias)
    want = step(want_k, cache_v, q, bias)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), bias), torch.autograd.grad(want.sum(), bias))
    (site,) = capture.result.sites
    assert site.status == "lowered" and site.gqa_group == 1
