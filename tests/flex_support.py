"""flex_attention in CPU tests.

torch's Python entry ``flex_attention`` refuses CPU inputs that require grad (its compiled CPU
kernel has no backward), but the flex HOP's reference implementation differentiates on CPU, in
eager and under ``aot_eager``: ``flex_grad_on_cpu`` lifts that refusal so that forward and backward
of the original and of the rewritten graph can be compared on CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch.fx import GraphModule, Node
from torch.nn.attention import flex_attention as flex_module

FLEX = torch.ops.higher_order.flex_attention
QUIET = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex_grad_on_cpu(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda query, key, value: None)


def flex_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.target is FLEX]


def dynamo_graph(fn, *args) -> GraphModule:
    """The one graph Dynamo captures for ``fn(*args)``."""
    graphs = []
    torch._dynamo.reset()
    torch.compile(fn, backend=lambda gm, _: graphs.append(gm) or gm, fullgraph=True)(*args)
    torch._dynamo.reset()
    return graphs[0]


def export_graph(module: torch.nn.Module, *args) -> GraphModule:
    with torch.no_grad():
        return torch.export.export(module, args).graph_module
