"""Trace the q, k, v operands and the output of one attention call together.

The pieces are not independent: K/V repetition is stripped only when K and V share it, and a
zero pad of V only when the output chain provably slices those columns off again. Every
recogniser (SDPA calls, hand-written attention) gets the same answer from here.

Reading a source in place instead of its copy is only equal when nothing writes to memory
in between: Dynamo graphs (and transformers' DeepSeek under export) keep in-place ops, so a
chain with an in-place op anywhere between its first crossed step and the attention call (or,
for the output, between the call and the chain's last reader) is not crossed.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from .layout_chain import KERNEL_LAYOUTS, TracedOperand, trace_operand, trace_output
from .normalize import shape
from .site import OutputUse


def _bhsd(node: Node) -> TracedOperand:
    """The operand read as attention sees it: [B, H, S, D], no chain crossed."""
    return TracedOperand(node, "bhsd")


def _key_value(key: Node, value: Node, strip_pad: bool) -> tuple[TracedOperand, TracedOperand]:
    k, v = trace_operand(key), trace_operand(value, strip_pad=strip_pad)
    if k.group != v.group:  # only strip repetition that K and V share
        k, v = trace_operand(key, strip_repeat=False), trace_operand(value, strip_repeat=False, strip_pad=strip_pad)
    if k.dims not in KERNEL_LAYOUTS or v.dims not in KERNEL_LAYOUTS:
        k, v = _bhsd(key), _bhsd(value)
    return k, v


def _trimmed_output(node: Node, v: TracedOperand) -> Optional[OutputUse]:
    """The output use past the slice that undoes V's zero pad, if the chain has one."""
    vs = shape(v.source)
    return trace_output(node, trim_to=vs[v.dims.index("d")]) if v.pad and vs is not None else None


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift}


def _mutates(node: Node) -> bool:
    """An in-place op (``x.mul_(2)``, ``x += y``, ``x[i] = y``, ``aten.copy_``): it may write any
    alias of its input."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "")
    if getattr(operator, name, None) is node.target:  # operator.or_ is not in place; operator.ior is
        return node.target in _INPLACE_OPERATORS
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return name.endswith("_") and not name.startswith("_")


def _written_between(first: Node, last: Node) -> bool:
    """Some node strictly between ``first`` and ``last`` (graph order) writes in place."""
    cur = first.next
    while cur is not last and cur.op != "root":
        if _mutates(cur):
            return True
        cur = cur.next
    return False


def _ordered(nodes) -> list[Node]:
    nodes = list(nodes)
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
    return sorted(nodes, key=order.__getitem__)


def _operand_unsafe(op: TracedOperand, node: Node) -> bool:
    """A write between the first step crossed and the attention call: the copy the walk crossed
    would not have seen it, the in-place read would."""
    return bool(op.skipped) and _written_between(_ordered(op.skipped)[0], node)


def _output_unsafe(out: OutputUse, node: Node) -> bool:
    """A write between the attention call and the last reader of the chain's end."""
    readers = _ordered(out.node.users)
    return bool(out.skipped) and _written_between(node, readers[-1] if readers else out.node)


def _trace(node: Node, query: Node, key: Node, value: Node) \
        -> tuple[TracedOperand, TracedOperand, TracedOperand, OutputUse]:
    q = trace_operand(query, strip_repeat=False)
    if q.dims not in KERNEL_LAYOUTS:
        q = _bhsd(query)
    k, v = _key_value(key, value, strip_pad=True)
    out = _trimmed_output(node, v)
    if out is None:
        if v.pad:
            k, v = _key_value(key, value, strip_pad=False)
        out = trace_output(node)
    return q, k, v, out


def trace_operands(node: Node, query: Node, key: Node, value: Node) \
        -> tuple[TracedOperand, TracedOperand, TracedOperand, OutputUse]:
    """(q, k, v, output use) of the attention computed by ``node`` from [B, H, S, D] operands."""
    q, k, v, out = _trace(node, query, key, value)
    if _operand_unsafe(q, node):
        q = _bhsd(query)
    if _operand_unsafe(k, node) or _operand_unsafe(v, node) or _output_unsafe(out, node):
        k, v, out = _bhsd(key), _bhsd(value), trace_output(node)
        if _output_unsafe(out, node):
            out = OutputUse(node, "bhsd")
    return q, k, v, out
