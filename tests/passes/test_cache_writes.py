"""KV-cache writes spelled ``index_copy(_)`` become ``index_put(_)`` with the leading dims whole
(passes/cache_writes.py): the same write, which Inductor keeps in place. Only the cases where the
two are equal by definition; the rest stay as written and behave as in eager (errors included)."""
from __future__ import annotations

import re

import pytest
import torch

import attnopt
from attnopt.passes.cache_writes import keep_cache_writes_in_place

aten = torch.ops.aten


def _dynamo_graph(fn, *args) -> torch.fx.GraphModule:
    graphs = []
    torch._dynamo.reset()
    torch.compile(fn, backend=lambda gm, _: graphs.append(gm) or gm, fullgraph=True)(*args)
    return graphs[0]


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _write(cache, positions, new, dim):
    cache.index_copy_(dim, positions, new)
    return cache.sum(dim=-1)


@pytest.mark.parametrize("dim", [0, 2, -2, -1])
def test_index_copy_becomes_index_put_and_writes_the_same(dim):
    torch.manual_seed(0)
    cache = torch.randn(2, 3, 8, 4)
    positions = torch.tensor([1, 0])
    shape = list(cache.shape)
    shape[dim] = 2
    new = torch.randn(shape)
    gm = _dynamo_graph(lambda c, p, n: _write(c, p, n, dim), cache.clone(), positions, new)
    assert keep_cache_writes_in_place(gm) == 1
    assert aten.index_put_.default in _targets(gm) and "index_copy_" not in _targets(gm)
    got, want = cache.clone(), cache.clone()
    out = gm(got, positions, new)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, _write(want, positions, new, dim))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["int32 index", "2-D index", "other dtype", "0-d index"])
def test_other_index_copies_stay_as_written(case):
    cache = torch.zeros(2, 3, 8, 4)
    positions, new = torch.tensor([5, 1]), torch.ones(2, 3, 2, 4)
    if case == "int32 index":
        positions = positions.int()
    elif case == "2-D index":
        positions, new = positions[None], torch.ones(2, 3, 2, 4)
    elif case == "other dtype":
        new = new.double()
    else:
        positions, new = torch.tensor(5), torch.ones(2, 3, 1, 4)
    graphs = []

    def backend(gm, _):
        graphs.append(keep_cache_writes_in_place(gm))
        return gm

    torch._dynamo.reset()
    fn = lambda c, p, n: _write(c, p, n, 2)  # noqa: E731
    try:
        want = fn(cache.clone(), positions, new)
    except (RuntimeError, IndexError) as e:  # eager refuses it: so must the compiled graph
        with pytest.raises(Exception, match=re.escape(str(e).split("): ", 1)[-1])):
            torch.compile(fn, backend=backend)(cache.clone(), positions, new)
        return
    got = torch.compile(fn, backend=backend)(cache.clone(), positions, new)
    assert graphs == [0]
    torch.testing.assert_close(got, want)


def test_exported_index_copy_becomes_index_put():
    class Cache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("keys", torch.zeros(2, 3, 8, 4))

        def forward(self, positions, new):
            self.keys.index_copy_(2, positions, new)
            return self.keys.sum()

    positions, new = torch.tensor([3, 4]), torch.randn(2, 3, 2, 4)
    ep = torch.export.export(Cache(), (positions, new))
    assert aten.index_copy_.default in _targets(ep.graph_module)  # export's training IR keeps it in place
    new_ep, result = attnopt.optimize(ep, return_result=True, strict=True)
    assert result.cache_writes == 1 and aten.index_put_.default in _targets(new_ep.graph_module)
    eager, module = Cache(), new_ep.module()
    torch.testing.assert_close(module(positions, new), eager(positions, new))
    torch.testing.assert_close(module.keys, eager.keys, rtol=0, atol=0)
