"""Adding nodes to a graph the way a backend expects to find them.

A node a pass adds carries what Dynamo's and export's own nodes carry: the source location and
module stack of the code it stands for (copied from an anchor node), and a fake value computed
with the graph's fake mode (``example_value`` in Dynamo graphs, ``val`` in exported ones), so
that later passes, AOTAutograd and the reports can read its shape, dtype and strides.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .normalize import meta
from .symbols import Symbols
from .writes import written_args

_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "seq_nr")


def meta_key(gm: GraphModule) -> str:
    """Where this graph records fake values: "val" (export) or "example_value" (Dynamo)."""
    for n in gm.graph.nodes:
        if "val" in n.meta:
            return "val"
        if "example_value" in n.meta:
            return "example_value"
    return "val"


class Builder:
    """Makes ``call_function`` nodes at the graph's current insertion point, stamped with the
    metadata of ``anchor`` and a fake value. Symbolic sizes among the arguments become graph
    values (``attnopt.fx.Symbols``)."""

    def __init__(self, gm: GraphModule, anchor: Node) -> None:
        self.gm, self.graph, self.anchor, self.key = gm, gm.graph, anchor, meta_key(gm)
        self._symbols: Optional[Symbols] = None

    def __call__(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        if self._symbols is None:
            self._symbols = Symbols(self.graph, self._node)
        return self._node(target, *self._symbols.value(args), **self._symbols.value(kwargs))

    def _node(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        node = self.graph.call_function(target, args, kwargs)
        self.stamp(node)
        return node

    def stamp(self, node: Node) -> None:
        """Copy the anchor's source metadata onto ``node`` and record its fake value."""
        for k in _COPIED_META:
            if k in self.anchor.meta:
                node.meta[k] = self.anchor.meta[k]
        args, kwargs = map_arg(node.args, meta), map_arg(node.kwargs, meta)
        fakes = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, FakeTensor)]
        if not fakes:  # an op such as arange reads no tensor: use the anchor's fake mode
            fakes = [v for v in (meta(self.anchor),) if isinstance(v, FakeTensor)]
        if fakes:
            with fakes[0].fake_mode:
                node.meta[self.key] = node.target(*args, **kwargs)


def erase_if_dead(gm: GraphModule, candidates: list[Node], local: frozenset = frozenset()) -> list[str]:
    """Erase the candidates still in the graph that nothing reads any more (latest first, so
    chains go together), except in-place writes other than those to memory only the dead nodes
    used (``local``); return their names."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    removed = []
    for node in sorted(set(candidates) & index.keys(), key=index.__getitem__, reverse=True):
        if not node.users and (node in local or not written_args(node)):
            removed.append(node.name)
            gm.graph.erase_node(node)
    return removed


__all__ = ["Builder", "erase_if_dead", "meta_key"]
