"""Trace the q, k, v operands and the output of one attention call together.

The pieces are not independent: K/V repetition is stripped only when K and V share it, and a
zero pad of V only when the output chain provably slices those columns off again. Every
recogniser (SDPA calls, hand-written attention, flash-attn and varlen calls) gets the same answer
from here, for the layout its call reads: [B, H, S, D] (SDPA), [B, S, H, D] or packed [T, H, D]
(flash-attn).

A packed operand made by merging the batch and sequence axes of a 4-D tensor (torchtitan:
``repeat_kv`` on [B, S, H, D], transposes, ``reshape(-1, H, D)``) is read from that tensor where
this removes something (a repetition, a pad, a copy) and the merge is then a view; the lowering
reads it through a reshape made by ``read_packed``.

Reading a source in place instead of its copy is only equal when nothing writes that memory:
Dynamo graphs (and torch.export's training IR) keep in-place ops, so a chain whose memory (or
any alias of it, ``attnopt.fx.Writes``) is written from its first crossed step on is not
crossed; nor is an output chain written after the call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from ..fx import Builder, Writes
from ..fx.normalize import canonical, meta, same, shape
from .layout_chain import KERNEL_LAYOUTS, PACKED, TracedOperand, trace_operand, trace_output
from .site import OutputUse

aten = torch.ops.aten
_TOKENS = "bshd"  # a packed operand's 4-D source, 'b' and 's' merged into tokens in that order


def _as_called(node: Node, dims: str) -> TracedOperand:
    """The operand read as the call reads it, no chain crossed."""
    return TracedOperand(node, dims)


def _readable(op: TracedOperand, dims: str) -> bool:
    """The op can read ``op``'s source for a call reading ``dims``: a kernel layout for 4-D calls;
    the packed tensor, or a 4-D tensor whose merged axes it packs again, for packed calls."""
    if dims != PACKED:
        return op.dims in KERNEL_LAYOUTS
    return op.dims == PACKED or (op.tokens is not None and sorted(op.dims) == sorted(_TOKENS))


def _merge_is_view(op: TracedOperand) -> bool:
    """Merging the source's 'b' and 's' axes (b outer) is a view of its memory."""
    size, stride = meta(op.source).shape, meta(op.source).stride()
    b, s = op.dims.index("b"), op.dims.index("s")
    return same(size[s], 1) or same(size[b], 1) or same(stride[b], stride[s] * size[s])


def _copies_below_merge(op: TracedOperand) -> bool:
    """A copy of a non-contiguous tensor was crossed below the merge into tokens."""
    below = op.skipped[op.skipped.index(op.tokens) + 1:]
    return any((c := canonical(n)) is not None and c.kind == "copy" and not meta(c.input).is_contiguous()
               for n in below)


def _trace(node: Node, dims: str, **strip) -> TracedOperand:
    """``trace_operand``; a packed operand is read from the 4-D tensor it was merged from only when
    that strips something the packed tensor keeps: a repetition, a pad, or a copy (with the merge
    then a view)."""
    deep = trace_operand(node, dims=dims, **strip)
    if deep.tokens is None:
        return deep
    shallow = trace_operand(node, dims=dims, unpack=False, **strip)
    if deep.group > shallow.group or deep.pad > shallow.pad or (_copies_below_merge(deep) and _merge_is_view(deep)):
        return deep
    return shallow


def _key_value(key: Node, value: Node, strip_pad: bool, dims: str) -> tuple[TracedOperand, TracedOperand]:
    k, v = _trace(key, dims), _trace(value, dims, strip_pad=strip_pad)
    if k.group != v.group:  # only strip repetition that K and V share
        k, v = _trace(key, dims, strip_repeat=False), _trace(value, dims, strip_repeat=False, strip_pad=strip_pad)
    if not (_readable(k, dims) and _readable(v, dims)):
        k, v = _as_called(key, dims), _as_called(value, dims)
    return k, v


def _trimmed_output(node: Node, v: TracedOperand, dims: str) -> Optional[OutputUse]:
    """The output use past the slice that undoes V's zero pad, if the chain has one."""
    vs = shape(v.source)
    return trace_output(node, trim_to=vs[v.dims.index("d")], dims=dims) if v.pad and vs is not None else None


def _operand_unsafe(op: TracedOperand, writes: Writes, call: Node, saved: bool) -> bool:
    """A write to the memory the chain spans, from its first crossed step on: the copy the walk
    crossed would not have seen it, an in-place read would. Up to the call when nothing is kept
    for backward; when it is (``saved``), later writes count too. A decode step over a KV cache
    is the case that needs the difference: every later layer writes its own cache in place, which
    may alias this layer's as far as the graph can tell."""
    if not op.skipped:
        return False
    first = min(op.skipped, key=writes.position)
    return writes.first_write([op.source, *op.skipped], after=first, before=None if saved else call) is not None


def _output_unsafe(out: OutputUse, node: Node, writes: Writes) -> bool:
    """A write to the output or its chain after the call: once the op writes the chain's end,
    the output and that end share memory where a copy kept them apart."""
    return bool(out.skipped) and writes.first_write([node, *out.skipped], after=node) is not None


def _trace_all(node: Node, query: Node, key: Node, value: Node, dims: str) \
        -> tuple[TracedOperand, TracedOperand, TracedOperand, OutputUse]:
    q = _trace(query, dims, strip_repeat=False)
    if not _readable(q, dims):
        q = _as_called(query, dims)
    k, v = _key_value(key, value, strip_pad=True, dims=dims)
    out = _trimmed_output(node, v, dims)
    if out is None:
        if v.pad:
            k, v = _key_value(key, value, strip_pad=False, dims=dims)
        out = trace_output(node, dims=dims)
    return q, k, v, out


def trace_operands(node: Node, query: Node, key: Node, value: Node, writes: Writes, dims: str = "bhsd") \
        -> tuple[TracedOperand, TracedOperand, TracedOperand, OutputUse]:
    """(q, k, v, output use) of the attention computed by ``node`` from operands it reads as
    ``dims`` ("bhsd", "bshd" or "thd"; ``node``'s value is the output in the same layout)."""
    q, k, v, out = _trace_all(node, query, key, value, dims)
    # the op keeps its inputs for backward when anything it reads requires grad (a learned bias too)
    read = (*node.all_input_nodes, query, key, value)
    saved = any(isinstance(meta(t), torch.Tensor) and meta(t).requires_grad for t in read)
    if _operand_unsafe(q, writes, node, saved):
        q = _as_called(query, dims)
    if _operand_unsafe(k, writes, node, saved) or _operand_unsafe(v, writes, node, saved) \
            or _output_unsafe(out, node, writes):
        k, v, out = _as_called(key, dims), _as_called(value, dims), trace_output(node, dims=dims)
        if _output_unsafe(out, node, writes):
            out = OutputUse(node, dims)
    out.written = writes.first_write([node, out.node], after=node) is not None
    return q, k, v, out


def read_packed(op: TracedOperand, anchor: Node) -> TracedOperand:
    """``op`` with a [T, H, D] source the op reads: for an operand traced into the 4-D tensor it
    was packed from, a reshape of that tensor merging its 'b' and 's' axes (after a permute view
    when they are not leading), made right before ``anchor``. Other operands come back as they are."""
    if op.dims == PACKED:
        return op
    graph = anchor.graph
    build = Builder(graph.owning_module, anchor)
    with graph.inserting_before(anchor):
        source = op.source
        if op.dims != _TOKENS:
            source = build(aten.permute.default, source, [op.dims.index(a) for a in _TOKENS])
        h, d = meta(source).shape[2:]
        source = build(aten.reshape.default, source, [-1, h, d])
    return TracedOperand(source, PACKED, op.group, op.skipped, op.pad)


__all__ = ["read_packed", "trace_operands"]
