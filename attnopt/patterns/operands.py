"""Trace the q, k, v operands and the output of one attention call together.

The pieces are not independent: K/V repetition is stripped only when K and V share it, and a
zero pad of V only when the output chain provably slices those columns off again. Every
recogniser (SDPA calls, hand-written attention) gets the same answer from here.

Reading a source in place instead of its copy is only equal when nothing writes that memory:
Dynamo graphs (and torch.export's training IR) keep in-place ops, so a chain whose memory (or
any alias of it, ``attnopt.fx.Writes``) is written from its first crossed step on is not
crossed; nor is an output chain written after the call.
"""
from __future__ import annotations

from typing import Optional

from torch.fx import Node

from ..fx import Writes
from .layout_chain import KERNEL_LAYOUTS, TracedOperand, trace_operand, trace_output
from ..fx.normalize import shape
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


def _operand_unsafe(op: TracedOperand, writes: Writes) -> bool:
    """A write to the memory the chain spans, from its first crossed step on: the copy the walk
    crossed would not have seen it, an in-place read would (and the op keeps its inputs for
    backward, so later writes count too)."""
    if not op.skipped:
        return False
    first = min(op.skipped, key=writes.position)
    return writes.first_write([op.source, *op.skipped], after=first) is not None


def _output_unsafe(out: OutputUse, node: Node, writes: Writes) -> bool:
    """A write to the output or its chain after the call: once the op writes the chain's end,
    the output and that end share memory where a copy kept them apart."""
    return bool(out.skipped) and writes.first_write([node, *out.skipped], after=node) is not None


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


def trace_operands(node: Node, query: Node, key: Node, value: Node, writes: Writes) \
        -> tuple[TracedOperand, TracedOperand, TracedOperand, OutputUse]:
    """(q, k, v, output use) of the attention computed by ``node`` from [B, H, S, D] operands."""
    q, k, v, out = _trace(node, query, key, value)
    if _operand_unsafe(q, writes):
        q = _bhsd(query)
    if _operand_unsafe(k, writes) or _operand_unsafe(v, writes) or _output_unsafe(out, node, writes):
        k, v, out = _bhsd(key), _bhsd(value), trace_output(node)
        if _output_unsafe(out, node, writes):
            out = OutputUse(node, "bhsd")
    out.written = writes.first_write([node, out.node], after=node) is not None
    return q, k, v, out
