"""Attention spelled as one op call: what the call-family recognisers share.

A family (``aten_sdpa.py``, ``varlen.py``, ``flash_attn.py``) reads its call's arguments by name
from the op's own schema (so that older and newer schemas of one op read alike), states what the
call computes in the site's terms (a ``CallSite``), and ``make_site`` traces the operands and the
output in the layout the call reads, checks the shapes and makes the ``AttentionSite``.

These ops return tuples: the attention output is ``getitem(call, 0)``; a call whose other outputs
(log-sum-exp, RNG state, debug masks) are read stays as written.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..fx import Writes
from ..fx.normalize import meta, same
from .layout_chain import PACKED
from .operands import read_packed, trace_operands
from .site import AttentionSite

@dataclass
class CallSite:
    """What an attention call computes, in ``AttentionSite`` terms. ``layout`` is how the call
    reads q, k and v ("bhsd", "bshd" or packed "thd"; the output comes back in the same layout).
    ``reason`` says why the call stays as written."""

    call: Node
    kind: str
    layout: str
    query: Node
    key: Node
    value: Node
    attn_mask: Optional[Node] = None
    dropout_p: Union[float, Node] = 0.0
    is_causal: bool = False
    causal_align: str = "top_left"
    window: tuple[int, int] = (-1, -1)
    scale: Union[float, Node, None] = None
    softcap: float = 0.0
    cu_seqlens_q: Optional[Node] = None
    cu_seqlens_k: Optional[Node] = None
    max_seqlen_q: Union[int, Node, None] = None
    max_seqlen_k: Union[int, Node, None] = None
    reason: Optional[str] = None
    erase: list[Node] = field(default_factory=list)  # erased with the call once dead (autograd bodies)


# --- reading a call's arguments ----------------------------------------------------------------
def _bind_schema(schema: torch._C.FunctionSchema, args: tuple, kwargs: dict) -> Optional[dict]:
    """The call's arguments by schema name, defaults filled in; None when they do not fit."""
    params = schema.arguments
    positional = [a for a in params if not a.kwarg_only]
    if len(args) > len(positional) or any(k not in {a.name for a in params} for k in kwargs):
        return None
    bound = {a.name: v for a, v in zip(positional, args)}
    for name, value in kwargs.items():
        if name in bound:
            return None
        bound[name] = value
    for a in params:
        if a.name not in bound:
            if not a.has_default_value():
                return None
            bound[a.name] = a.default_value
    return bound


def bind(node: Node) -> Optional[tuple[torch._C.FunctionSchema, dict]]:
    """(the schema, arguments by name) for a call of a registered op (Dynamo records the overload
    packet, export the overload), else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        overloads = [getattr(target, name) for name in target.overloads()]
    elif isinstance(target, torch._ops.OpOverload):
        overloads = [target]
    else:
        return None
    for overload in overloads:
        bound = _bind_schema(overload._schema, node.args, node.kwargs)
        if bound is not None:
            return overload._schema, bound
    return None


def _symbolic_number(value: Any) -> bool:
    """A graph value standing for a Python number (Dynamo's symbolic float/int), not a tensor."""
    return isinstance(value, Node) and isinstance(meta(value), (torch.SymFloat, torch.SymInt))


def constant_reason(args: dict, names: tuple[str, ...]) -> Optional[str]:
    """Why arguments that must be constants are not."""
    for name in names:
        if isinstance(args[name], Node):
            return f"{name} is computed in the graph, not a constant"
    return None


def number_reason(args: dict, names: tuple[str, ...]) -> Optional[str]:
    """Why numeric arguments (scale, dropout) are not numbers: tensors computed in the graph."""
    for name in names:
        if isinstance(args[name], Node) and not _symbolic_number(args[name]):
            return f"{name} is computed in the graph from a tensor"
    return None


def unset_reason(args: dict, names: dict[str, str]) -> Optional[str]:
    """Why the call uses a feature the site cannot express: the first of ``names`` (argument ->
    what it does) given a value other than None / False / 0."""
    for name, what in names.items():
        value = args.get(name)
        if value is not None and value is not False and not (isinstance(value, (int, float)) and value == 0):
            return f"{name} is given ({what}): left as written"
    return None


# --- the band flash-attn kernels compute ---------------------------------------------------------
def _known(cond: Any) -> Optional[bool]:
    """True/False where ``cond`` is decided for every value of the graph's symbols, else None."""
    if isinstance(cond, bool):
        return cond
    if statically_known_true(cond):
        return True
    if statically_known_true(torch.sym_not(cond)):
        return False
    return None


@dataclass(frozen=True)
class Band:
    """(left, right) keys around the diagonal, -1 = unbounded (the op's ``window_size``)."""

    left: int
    right: int

    def __str__(self) -> str:
        return f"({self.left}, {self.right})"


def fa2_band(causal: bool, left: int, right: int, sq: Any, sk: Any, equal: bool) -> Union[Band, str]:
    """The band FlashAttention-2 (flash-attn 2.x and torch's own flash kernels) computes for
    ``causal`` and ``window_size`` over [sq, sk] scores (varlen: the longest lengths; ``equal``:
    every sequence has as many queries as keys): a side at or past ``sk`` counts as unbounded
    (a window right of ``sk`` or more on sequences with more queries than keys is not), causal
    sets the right side to 0, and a right side left unbounded beside a bounded left side is
    ``sk``, which bounds rows only where ``sq > sk + 1``. A string says what is not decided."""
    left, right = max(left, -1), max(right, -1)
    if right >= 0 and not causal:  # as unbounded: differs from the bound only with more queries than keys
        past = _known(right >= sk)
        if past is None and not equal:
            return f"window_size right={right} against a key length the graph does not fix"
        right = -1 if past else right
    if causal:
        right = 0
    if left >= 0 and _known(left >= sk):  # keeps every key, as unbounded does
        left = -1
    if left >= 0 and right < 0 and not equal:
        if _known(left >= sk) is not False:
            return f"window_size left={left} against a key length the graph does not fix"
        short = _known(sq <= sk + 1)
        if short is None or (not short and not isinstance(sk, int)):
            return ("a left window with an unbounded right side bounds rows at the key length, which the graph "
                    "does not fix")
        right = -1 if short else sk
    return Band(left, right)


def fa3_band(causal: bool, left: int, right: int) -> Band:
    """The band FlashAttention-3 (flash_attn_3, and torch's flash kernels once FA3 is activated)
    computes: negative sides unbounded (the bounds it gives them keep every key there), causal
    setting the right side to 0."""
    left, right = max(left, -1), max(right, -1)
    return Band(left, 0 if causal else right)


def _canonical_band(band: Band, sq: Any, sk: Any) -> Band:
    """``band`` with a side that keeps every key on its side written as unbounded: a left side of
    at least ``sk - 1``, a right side (other than causal's 0) of at least ``sq - 1``."""
    left = -1 if band.left >= 0 and _known(band.left >= sk - 1) else band.left
    right = -1 if band.right >= 1 and _known(band.right >= sq - 1) else band.right
    return Band(left, right)


def _flag(site: CallSite, band: Band, equal: bool) -> None:
    """Set the site's causal flag, alignment and window from a bottom-right ``band`` (flash-attn's
    diagonal), in the canonical form the mask plans use: causal with (left, 0), or (-1, -1) when
    the left side is unbounded; top-left alignment when query and key lengths are equal."""
    site.is_causal = band.right == 0
    if site.is_causal:
        site.window = (band.left, 0) if band.left >= 0 else (-1, -1)
    else:
        site.window = (band.left, band.right)
    unbanded = site.window == (-1, -1) and not site.is_causal
    site.causal_align = "top_left" if equal or unbanded else "bottom_right"


def set_band(site: CallSite, causal: bool, window: tuple, sq: Any, sk: Any, equal: bool,
             kernels: tuple[str, ...] = ("FlashAttention-2", "FlashAttention-3")) -> None:
    """The site's band for a flash-attn style ``causal`` and ``window`` (left, right) over [sq, sk]
    (packed: the longest lengths, ``equal`` when every sequence has as many queries as keys), as
    the ``kernels`` that may run the call compute it; where they differ, or a side is not decided,
    ``reason`` says so."""
    left, right = window
    bands = {}
    for kernel in kernels:
        band = fa2_band(causal, left, right, sq, sk, equal) if kernel == "FlashAttention-2" \
            else fa3_band(causal, left, right)
        if isinstance(band, str):
            site.reason = band
            return
        bands[kernel] = _canonical_band(band, sq, sk)
    if len(set(bands.values())) > 1:
        site.reason = (f"window ({left}, {right}) over these lengths means "
                       + " and ".join(f"{b} in {k}" for k, b in bands.items()) + ", either of which may run")
        return
    _flag(site, next(iter(bands.values())), equal)


def lengths(cs: CallSite, cu_q: Optional[Node], cu_k: Optional[Node], max_q: Any,
            max_k: Any) -> Optional[tuple[Any, Any, bool]]:
    """(Sq, Sk, whether they are provably equal) of a BSHD call, or of a packed one (its offsets and
    longest lengths recorded on the site); None, with the reason on the site, when q/k carry no shapes."""
    if cs.layout == "thd":
        cs.cu_seqlens_q, cs.cu_seqlens_k, cs.max_seqlen_q, cs.max_seqlen_k = cu_q, cu_k, max_q, max_k
        return value_of(max_q), value_of(max_k), cu_q is cu_k
    q, k = meta(cs.query), meta(cs.key)
    if q is None or k is None:
        cs.reason = "q/k carry no shape metadata"
        return None
    return q.shape[1], k.shape[1], same(q.shape[1], k.shape[1])


def value_of(x: Any) -> Any:
    """A size or number as a value (the one recorded for a graph node)."""
    return meta(x) if isinstance(x, Node) else x


# --- the tuple a call returns ---------------------------------------------------------------------
def tuple_output(call: Node, names: list[str]) -> tuple[Optional[Node], list[Node], Optional[str]]:
    """(the node reading output 0, the unread readers of other outputs, why not a rewrite) for a
    call returning a tuple; ``names`` names its outputs for the reason."""
    out, unread = None, []
    for user in call.users:
        if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int):
            return None, [], "its result is read as a whole tuple"
        index = user.args[1]
        if index == 0:
            if out is not None:
                return None, [], "its output is read through two getitems"
            out = user
        elif user.users:
            name = names[index] if index < len(names) else f"output {index}"
            return None, [], f"its {name} output is read: left as written"
        else:
            unread.append(user)
    return out, unread, None


# --- the site --------------------------------------------------------------------------------------
def _shape_reason(cs: CallSite) -> Optional[str]:
    vals = [meta(n) for n in (cs.query, cs.key, cs.value)]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return "q/k/v carry no shape metadata"
    if not all(v.is_floating_point() for v in vals) or len({v.dtype for v in vals}) != 1:
        return "q/k/v are not floating point of one dtype"
    q, k, v = vals
    rank = 3 if cs.layout == PACKED else 4
    if any(t.dim() != rank for t in vals):
        return f"q/k/v are not {rank}-D as the call reads them ({cs.layout})"
    h, d = cs.layout.index("h"), cs.layout.index("d")
    seq = 0 if cs.layout == PACKED else cs.layout.index("s")
    if not (same(k.shape[h], v.shape[h]) and same(k.shape[seq], v.shape[seq]) and same(q.shape[d], k.shape[d])):
        return "k and v differ in heads or length, or q and k in head dim"
    if not isinstance(q.shape[h], int) or not isinstance(k.shape[h], int) or k.shape[h] == 0 \
            or q.shape[h] % k.shape[h]:
        return f"{q.shape[h]} query heads are not a multiple of {k.shape[h]} key/value heads"
    if cs.layout != PACKED and not all(same(t.shape[cs.layout.index("b")], q.shape[cs.layout.index("b")])
                                       for t in (k, v)):
        return "q, k and v differ in batch size"
    if cs.layout == PACKED:
        cus = [meta(n) if isinstance(n, Node) else None for n in (cs.cu_seqlens_q, cs.cu_seqlens_k)]
        if any(not isinstance(c, torch.Tensor) or c.dtype != torch.int32 or c.dim() != 1 for c in cus):
            return "cu_seqlens are not 1-D int32 tensors"
        if not same(cus[0].shape[0], cus[1].shape[0]):
            return "cu_seqlens_q and cu_seqlens_k differ in length"
    if cs.attn_mask is not None and not isinstance(meta(cs.attn_mask), torch.Tensor):
        return "attn_mask is not a tensor in the graph"
    return None


def _written_between(cs: CallSite, out: Node, writes: Writes) -> Optional[str]:
    """The op replaces the call where its output is read: nothing the call reads may be written
    between the two."""
    if out is cs.call:
        return None
    reads = [n for n in (cs.query, cs.key, cs.value, cs.attn_mask, cs.cu_seqlens_q, cs.cu_seqlens_k)
             if isinstance(n, Node)]
    writer = writes.first_write(reads, after=cs.call, before=out)
    return None if writer is None else f"{writer.name} writes an input of the call before its output is read"


def make_site(cs: CallSite, names: list[str], writes: Writes) -> Optional[AttentionSite]:
    """The site of a call (None when its attention output is not read): operands and output traced
    in the call's layout, packed operands read through ``read_packed``; with ``skip_reason`` set
    where the call stays as written."""
    out, unread, reason = tuple_output(cs.call, names)
    if out is None and reason is None:
        return None
    site = AttentionSite(out if out is not None else cs.call, cs.kind, attn_mask=cs.attn_mask,
                         dropout_p=cs.dropout_p, is_causal=cs.is_causal, causal_align=cs.causal_align,
                         window=cs.window, cu_seqlens_q=cs.cu_seqlens_q, cu_seqlens_k=cs.cu_seqlens_k,
                         max_seqlen_q=cs.max_seqlen_q, max_seqlen_k=cs.max_seqlen_k, scale=cs.scale,
                         softcap=cs.softcap, chain=[cs.call, *unread, *cs.erase])
    site.skip_reason = reason or cs.reason or _shape_reason(cs) or _written_between(cs, out, writes)
    if site.skip_reason:
        return site
    q, k, v, output = trace_operands(out, cs.query, cs.key, cs.value, writes, dims=cs.layout)
    if cs.layout == PACKED:
        q, k, v = (read_packed(op, out) for op in (q, k, v))
    site.query, site.key, site.value, site.output = q, k, v, output
    return site


__all__ = ["Band", "CallSite", "bind", "constant_reason", "fa2_band", "fa3_band", "make_site",
           "number_reason", "set_band", "tuple_output", "unset_reason", "value_of"]
