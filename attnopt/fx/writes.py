"""In-place writes in a graph, and which tensors may share memory with them.

A fact proven about a tensor (the structure of a mask, an operand that can be read where it was
produced instead of from its copy) holds only while nothing writes that tensor's memory. Dynamo's
graphs keep in-place ops (``x.mul_(2)``, ``x[i] = v``, ``F.relu(x, inplace=True)``) and
torch.export's training IR keeps some (``aten.copy_`` into a ``select`` view). ``Writes`` finds
every write and groups nodes into classes of tensors that may alias, conservatively:

- an op may alias its tensor inputs unless it is known to return fresh memory (an ATen schema
  without an alias annotation, or a name on the list below); views, ``.contiguous()``, ``.to()``
  and anything unknown may return (a view of) an input;
- graph inputs (user inputs, parameters, buffers) of one dtype may alias each other;
- sizes and other numbers carry no memory.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Iterable, Optional

import torch
from torch.fx import Graph, Node

from .normalize import meta, op_name

# Ops that always return newly allocated memory, by the name ``op_name`` gives them at either IR
# level. ATen overloads are judged by their schema instead.
_FRESH = frozenset({
    "abs", "add", "addmm", "all", "amax", "amin", "and_", "any", "arange", "argsort", "baddbmm", "bitwise_and",
    "bitwise_not", "bitwise_or", "bitwise_xor", "bmm", "cat", "ceil", "clamp", "clamp_max", "clamp_min", "clone",
    "cos", "cumsum", "diff", "div", "einsum", "embedding", "empty", "empty_like", "eq", "erf", "exp", "floor",
    "floordiv", "fmod", "full", "full_like", "gather", "ge", "gelu", "gt", "index_select", "invert", "layer_norm",
    "le", "linear", "log", "log_softmax", "logical_and", "logical_not", "logical_or", "logical_xor", "lt",
    "masked_fill", "matmul", "max", "maximum", "mean", "min", "minimum", "mm", "mul", "ne", "neg", "new_empty",
    "new_full", "new_ones", "new_zeros", "norm", "ones", "ones_like", "or_", "outer", "pad", "pow", "prod",
    "rand", "randint", "randn", "reciprocal", "relu", "remainder", "repeat", "repeat_interleave", "rms_norm",
    "round", "rsqrt", "scaled_dot_product_attention", "sigmoid", "sign", "silu", "sin", "softmax", "_softmax",
    "sqrt", "square", "stack", "sub", "sum", "tanh", "tensor", "tril", "triu", "trunc", "where", "xor", "zeros",
    "zeros_like", "lift_fresh_copy", "scalar_tensor", "__and__", "__or__", "__xor__", "__invert__", "__eq__",
    "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "truediv", "mod",
})
# ATen ops that may return their input without saying so in their schema.
_UNANNOTATED_ALIASES = frozenset({"dropout", "feature_dropout", "alpha_dropout", "type_as"})
_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
})


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def _inplace_flag(node: Node) -> bool:
    """``F.relu(x, inplace=True)``-style calls: the function's own ``inplace`` argument."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"] is True
    try:
        params = inspect.signature(node.target).parameters
    except (TypeError, ValueError):
        return False
    names = list(params)
    return "inplace" in names and len(node.args) > names.index("inplace") \
        and node.args[names.index("inplace")] is True


def written_args(node: Node, graph_owner: Any = None) -> list[Node]:
    """The graph tensors ``node`` writes in place (empty for a functional op)."""
    args = [a for a in node.args if isinstance(a, Node)]
    out = node.kwargs.get("out")
    written = [out] if isinstance(out, Node) else []
    if node.op == "call_method":
        if _is_inplace_name(node.target) or node.target == "__setitem__":
            written.append(node.args[0])
    elif node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            schema_args = target._schema.arguments
            for i, arg in enumerate(schema_args):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                    if isinstance(value, Node):
                        written.append(value)
        elif getattr(operator, getattr(target, "__name__", ""), None) is target:  # operator.and_ is not in place
            if target in _INPLACE_OPERATORS:
                written.append(node.args[0])
        elif _is_inplace_name(getattr(target, "__name__", "")):
            written.append(node.args[0])
        elif callable(target) and _inplace_flag(node):
            written.append(node.args[0])
    elif node.op == "call_module" and graph_owner is not None:
        module = graph_owner.get_submodule(node.target)
        if getattr(module, "inplace", False) and args:
            written.append(args[0])
    return [w for w in written if isinstance(w, Node)]


def _carries_memory(node: Node) -> bool:
    """The node's value is (or holds) a tensor; sizes and other numbers share no memory. Unknown
    values count as tensors."""
    value = meta(node)
    if value is None:
        return node.op != "output"
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def _may_alias_inputs(node: Node) -> bool:
    """True unless ``node`` is known to return fresh memory."""
    if node.op in ("placeholder", "get_attr", "output"):
        return False
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema
        if node.target.overloadpacket.__name__ in _UNANNOTATED_ALIASES:
            return True
        return any(r.alias_info is not None for r in schema.returns)
    if node.op in ("call_function", "call_method") and op_name(node) in _FRESH and not written_args(node):
        return False
    return True


class Writes:
    """Every in-place write of a graph, and its classes of possibly aliasing tensors.

    Built once over a graph; nodes added later (views made by a recogniser or a lowering) are
    placed in the class of their inputs and at the position of the nearest older node.
    """

    def __init__(self, graph: Graph, owner: Any = None) -> None:
        self.graph = graph
        self._parent: dict[Node, Node] = {}
        self._index = {n: i for i, n in enumerate(graph.nodes)}
        for n in graph.nodes:
            self._parent[n] = n
        by_dtype: dict = {}
        for n in graph.nodes:  # callers may hand over aliasing inputs (of one dtype)
            if n.op in ("placeholder", "get_attr") and _carries_memory(n):
                value = meta(n)
                first = by_dtype.setdefault(getattr(value, "dtype", None), n)
                self._union(n, first)
        for n in graph.nodes:
            written = written_args(n, owner)
            if written:  # an in-place op returns (an alias of) what it writes, nothing else
                for a in written:
                    self._union(n, a)
            elif _may_alias_inputs(n) and _carries_memory(n):
                for a in n.all_input_nodes:
                    if _carries_memory(a):
                        self._union(n, a)
        self._writes: list[tuple[int, Node, Node]] = []  # (position, writer, class root)
        for n in graph.nodes:
            for target in written_args(n, owner):
                self._writes.append((self._index[n], n, self._root(target)))

    def _root(self, node: Node) -> Node:
        if node not in self._parent:  # made after the analysis: a view of its inputs
            inputs = node.all_input_nodes
            self._parent[node] = self._root(inputs[0]) if inputs else node
            for a in inputs[1:]:
                self._union(node, a)
        while self._parent[node] is not node:
            self._parent[node] = self._parent[self._parent[node]]
            node = self._parent[node]
        return node

    def _union(self, a: Node, b: Node) -> None:
        ra, rb = self._root(a), self._root(b)
        if ra is not rb:
            self._parent[ra] = rb

    def position(self, node: Node) -> int:
        """``node``'s place in graph order (a node added later takes its older neighbour's)."""
        cur = node
        while cur not in self._index and cur.op != "root":
            cur = cur.prev
        return self._index.get(cur, -1)

    @property
    def any(self) -> bool:
        """True when the graph writes anything in place."""
        return bool(self._writes)

    def first_write(self, nodes: Iterable[Node], after: Optional[Node] = None,
                    before: Optional[Node] = None) -> Optional[Node]:
        """The first node that writes memory any of ``nodes`` may share, strictly between
        ``after`` and ``before`` in graph order (open ends: the whole graph); None if none."""
        if not self._writes:
            return None
        roots = {self._root(n) for n in nodes}
        lo = self.position(after) if after is not None else -1
        hi = self.position(before) if before is not None else len(self._index) + 1
        for pos, writer, root in self._writes:
            if lo < pos < hi and root in roots:
                return writer
        return None


__all__ = ["Writes", "written_args"]
