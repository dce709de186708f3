"""Recognise attention written by hand: ``softmax(q @ kᵀ * scale + mask) @ v``.

Accepted spellings, at both IR levels, in the order they apply to the scores:

- the product: ``matmul`` of 4-D [B, H, S, D] tensors with kᵀ a transpose of k; or ``bmm``,
  ``matmul`` or Megatron's ``baddbmm(buf, q, kᵀ, beta=0, alpha=scale)`` of 3-D [B*H, S, D]
  tensors that are provably reshapes merging (B, H) of 4-D tensors (also through transposes, as
  Megatron's [S, B*H, D] -> ``transpose(0, 1)``), with one B and H for q, k, v and every
  [B, H, Sq, Sk] view of the scores;
- the scale: constant ``mul``/``div`` of the scores or of q;
- softcapping (Gemma 2): ``tanh(scores / cap) * cap``, after the scale and before the mask;
- the mask: added (additive), ``masked_fill(m, -inf)`` or ``where(keep, s, -inf)``. A finite
  fill (Megatron's -10000.0) is accepted only where it provably acts as -inf: scores bounded by a
  softcap so that every masked weight underflows to exactly 0, and a mask proven to leave every
  row a key (a fully masked row averages every key where -inf keeps none);
- the softmax over the last dim, dtype casts anywhere (the fp32-softmax idiom), views between
  [B*H, Sq, Sk] and [B, H, Sq, Sk], dropout on the probabilities, then ``matmul``/``bmm`` with v.

Every intermediate must feed only the next step (scores or probabilities read elsewhere, e.g.
returned as attention weights, keep the site as written, silently: that is not a rewrite
candidate). A complete chain with a step whose equivalence cannot be proven is reported as a
skipped site with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import Graph, Node

from ..fx import Writes
from .layout_chain import _is_identity
from ..fx.normalize import Canon, _arg, canonical, meta, op_name, same, shape
from .operands import trace_operands
from .site import AttentionSite, OutputUse

aten = torch.ops.aten
_SOFTMAX = {"softmax", "_softmax"}
_CASTS = {"to", "float", "double", "type_as", "_to_copy", "half", "bfloat16"}
_PRODUCTS = {"matmul", "bmm", "baddbmm"}
_ALLOCATIONS = {"empty", "zeros", "empty_like", "zeros_like", "new_empty", "new_zeros"}
_ASSERT = torch.ops.aten._assert_tensor_metadata.default


class _NoMatch(Exception):
    """Not attention in a supported spelling: left alone without a report."""


class _Unproven(Exception):
    """Attention, but a step's equivalence to the op is not proven: reported as skipped."""


@dataclass
class _Chain:
    """What the walk around one softmax found."""

    nodes: list[Node] = field(default_factory=list)  # erased by the lowering once dead
    scale: float = 1.0  # factors on q·kᵀ before any softcap
    inner: float = 1.0  # factors between the softcap and the mask
    outer: float = 1.0  # factors after the mask (on the final scores when there is no mask)
    softcap: float = 0.0
    mask: Optional[Node] = None
    mask_negated: bool = False
    fill: Optional[float] = None  # masked_fill / where value; None for an additive mask
    sinks: Optional[Node] = None  # [Hq] logits concatenated to the scores as one more column (GPT-OSS)
    dropout_p: float = 0.0
    views: list[tuple] = field(default_factory=list)  # [B, H, Sq, Sk] shapes the scores pass through
    casts: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)  # (phase, from, to)
    problems: list[str] = field(default_factory=list)  # found on the walk, reported once it completes


def _single_user(node: Node, chain: Optional[list[Node]] = None) -> Node:
    """The one node reading ``node``; export's dtype assertions on it join ``chain`` (they go
    with the tensor they check)."""
    users = [u for u in node.users if u.target is not _ASSERT]
    if len(users) != 1:
        raise _NoMatch(f"{node.name} is read by {len(users)} nodes")
    if chain is not None:
        chain.extend(u for u in node.users if u.target is _ASSERT)
    return users[0]


def _const(x: Any) -> float:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise _NoMatch(f"{x!r} is not a constant")


def _rank(node: Any) -> int:
    v = meta(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _factor(node: Node) -> tuple[Node, float]:
    """(x, f) for ``x * c`` or ``c * x`` (f = c) and ``x / c`` (f = 1 / c), c a constant."""
    if len(node.args) != 2:
        raise _NoMatch(f"{node.name} is not a binary op")
    if any(v is not None for v in node.kwargs.values()):
        raise _NoMatch(f"{node.name} is called with {sorted(node.kwargs)}")
    a, b = node.args
    tensor, c = (a, b) if isinstance(a, Node) else (b, a)
    if not isinstance(tensor, Node) or isinstance(c, Node):
        raise _NoMatch(f"{node.name} does not scale a tensor by a constant")
    f = _const(c)
    if op_name(node) in ("mul", "imul", "mul_"):
        return tensor, f
    if tensor is not a or f == 0:
        raise _NoMatch("a constant divided by the scores")
    return tensor, 1.0 / f


def _merges(four: Node, three: Node, pos: int) -> bool:
    """``three`` is ``four`` with its adjacent axes pos, pos + 1 merged (row-major, as reshape does)."""
    fs, ts = shape(four), shape(three)
    if fs is None or ts is None or len(fs) != 4 or len(ts) != 3:
        return False
    rest = zip(fs[:pos] + fs[pos + 2:], ts[:pos] + ts[pos + 1:])
    return same(fs[pos] * fs[pos + 1], ts[pos]) and all(same(a, b) for a, b in rest)


def _head_view(node: Node, k: Canon) -> Optional[tuple]:
    """The [B, H, X, Y] shape of a reshape between [B*H, X, Y] and [B, H, X, Y] (either way)."""
    if k.kind != "reshape":
        return None
    if _merges(k.input, node, 0):
        return shape(k.input)
    return shape(node) if _merges(node, k.input, 0) else None


def _cast(node: Node, phase: str, c: _Chain) -> Optional[Node]:
    """The input of a dtype conversion, recorded for ``_check_casts``; None for anything else."""
    if op_name(node) not in _CASTS or not node.args or not isinstance(node.args[0], Node):
        return None
    src, dst = meta(node.args[0]), meta(node)
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor) or src.device != dst.device:
        return None
    c.casts.append((phase, src.dtype, dst.dtype))
    return node.args[0]


def _passthrough(node: Node, c: _Chain, phase: str) -> Optional[Node]:
    """The input of a step that keeps the scores' values: a dtype cast (checked once the
    operands' dtype is known), a copy, or a view between [B*H, Sq, Sk] and [B, H, Sq, Sk] (its
    4-D shape is recorded for the B, H check)."""
    cast = _cast(node, phase, c)
    if cast is not None:
        return cast
    k = canonical(node)
    if k is None:
        return None
    if _is_identity(node, k):
        return k.input
    view = _head_view(node, k)
    if view is None:
        return None
    c.views.append(view)
    return k.input


def _leads_to_product(node: Any) -> bool:
    """True when ``node`` leads back to the q·kᵀ product (and not to a mask)."""
    for _ in range(16):
        if not isinstance(node, Node):
            return False
        if op_name(node) in _PRODUCTS:
            return True
        node = node.args[0] if node.args else None
    return False


def _scale(node: Node, c: _Chain) -> Node:
    tensor, f = _factor(node)
    if c.softcap:
        c.scale *= f
    elif c.mask is None:
        c.outer *= f
    else:
        c.inner *= f
    return tensor


def _is_softcap(node: Node) -> bool:
    return op_name(node) == "mul" and any(isinstance(a, Node) and op_name(a) == "tanh" for a in node.args)


def _softcap(node: Node, c: _Chain) -> Node:
    """Record ``tanh(x / cap) * cap`` (``node`` is the outer mul) and return x."""
    tanh, cap = _factor(node)
    _single_user(tanh, c.nodes)
    divided = tanh.args[0]
    if not isinstance(divided, Node) or op_name(divided) not in ("mul", "div"):
        raise _NoMatch("tanh of unscaled scores is not a softcap")
    _single_user(divided, c.nodes)
    x, f = _factor(divided)
    if cap == 0 or not math.isclose(f * cap, 1.0, rel_tol=1e-9):
        raise _NoMatch(f"tanh(x * {f:g}) * {cap:g} is not a softcap")
    if c.softcap:
        raise _NoMatch("two softcaps")
    if c.inner != 1.0 or c.outer != 1.0:
        c.problems.append("a scale applied after softcapping changes the cap")
    c.softcap = abs(cap)  # odd tanh: -c * tanh(x / -c) == c * tanh(x / c)
    c.nodes.extend((tanh, divided))
    return x


def _mask_operands(node: Node) -> tuple[Node, Any, Optional[float], bool]:
    """(scores, mask, fill, negated) of an add / masked_fill / where step."""
    name = op_name(node)
    if name in ("add", "iadd", "add_"):  # in place (T5's ``scores += bias``): on the chain's own scores
        if len(node.args) != 2 or node.kwargs or not all(isinstance(x, Node) for x in node.args):
            raise _NoMatch("add of a constant or with alpha")
        a, b = node.args
        scores = a if _leads_to_product(a) else b
        if not _leads_to_product(scores):
            raise _NoMatch("neither addend leads to the scores")
        return scores, (b if scores is a else a), None, False
    if name in ("masked_fill", "masked_fill_"):
        scores, mask, fill, negated = node.args[0], node.args[1], _arg(node, 2, "value"), True
    elif len(node.args) == 3:  # where(keep, scores, fill)
        mask, scores, fill, negated = *node.args, False
    else:
        raise _NoMatch("where without a fill value")
    fill = _const(fill)
    if math.isnan(fill) or fill > 0 or fill == math.inf:
        raise _NoMatch(f"a fill of {fill} does not mask")
    return scores, mask, fill, negated


def _mask(node: Node, c: _Chain) -> Node:
    """Record the mask of an add / masked_fill / where step; return the scores it reads."""
    scores, mask, fill, negated = _mask_operands(node)
    if not isinstance(scores, Node) or not isinstance(mask, Node):
        raise _NoMatch("the scores or the mask is not a graph tensor")
    if c.mask is not None:
        c.problems.append("two masks")
        return scores
    if c.softcap:
        c.problems.append("the mask is applied before softcapping, which caps masked scores at -softcap")
    ns, ss = shape(node), shape(scores)
    if ns is None or ss is None or len(ns) != len(ss) or not all(same(a, b) for a, b in zip(ns, ss)):
        c.problems.append("the mask broadcasts the scores to a larger shape")
    elif len(ss) == 3 and _rank(mask) == 3 and not same(shape(mask)[0], 1):
        c.problems.append("a mask over the merged [B*H] axis of 3-D scores")
    c.mask, c.fill, c.mask_negated = mask, fill, negated
    return scores


def _step(node: Node, c: _Chain) -> Node:
    """Record one softcap, scale or mask step of the scores; return the scores it reads."""
    name = op_name(node)
    if _is_softcap(node):
        return _softcap(node, c)
    if name in ("mul", "div", "imul", "itruediv", "mul_", "div_"):  # in place (Falcon): on the chain's own scores
        if any(v is not None for v in node.kwargs.values()) and node.args and isinstance(node.args[0], Node):
            c.problems.append(f"{node.name} ({name} with {', '.join(sorted(node.kwargs))}) is not a scale")
            return node.args[0]
        return _scale(node, c)
    if name in ("add", "iadd", "add_", "masked_fill", "masked_fill_", "where"):
        return _mask(node, c)
    raise _NoMatch(f"{node.name} ({name}) before the softmax")


def _read_by(tensor: Node, reader: Node, c: _Chain) -> None:
    """``reader`` is the only reader of ``tensor``, besides an in-place ``masked_fill_`` of it that
    comes first (Dynamo's spelling of Megatron's fill): that fill is the chain's mask step."""
    fill = _inplace_fill(tensor, reader)
    if fill is None:
        _single_user(tensor, c.nodes)
        return
    c.nodes.append(fill)
    _mask(fill, c)


def _without_row_max(x: Node, c: _Chain) -> Node:
    """y for ``x = y - y.max(-1, keepdim=True).values`` (or ``amax``), else x: the softmax
    subtracts the row max itself, so the subtraction changes none of its values."""
    if op_name(x) != "sub" or len(x.args) != 2 or x.kwargs or not all(isinstance(a, Node) for a in x.args):
        return x
    y, m = x.args
    top = m.args[0] if op_name(m) == "getitem" and m.args[1] == 0 else m
    if op_name(top) not in ("max", "amax") or top.args[0] is not y:
        return x
    dim, keep = _arg(top, 1, "dim"), _arg(top, 2, "keepdim", False)
    if dim not in (-1, _rank(y) - 1) or keep is not True:
        return x
    if any(u not in (top, x) and u.target is not _ASSERT for u in y.users):
        return x
    c.nodes.extend((x, m, top))
    c.nodes.extend(u for u in top.users if u is not m and not u.users)  # export's unused argmax
    return y


def _sink_logits(column: Node, heads: Any) -> Optional[Node]:
    """The [Hq] tensor a [B, Hq, Sq, 1] column is a broadcast of: reshapes, unsqueezes and
    expands that only move its one axis of ``heads`` entries to the head axis."""
    node = column
    while (k := canonical(node)) is not None and k.kind in ("expand", "reshape", "unsqueeze", "copy"):
        dims = shape(node)
        if dims is None or [d for d in dims if not same(d, 1)] != [heads] and k.kind != "expand":
            return None
        node = k.input
    dims = shape(node)
    if dims is None or len(dims) != 1 or not same(dims[0], heads):
        return None
    out = shape(column)
    return node if out is not None and len(out) == 4 and same(out[1], heads) and same(out[3], 1) else None


def _without_sinks(x: Node, c: _Chain) -> Node:
    """scores for ``x = cat([scores, sinks column], -1)``, the sinks recorded (GPT-OSS)."""
    if op_name(x) != "cat" or len(x.args[0]) != 2 or _arg(x, 1, "dim", 0) not in (-1, 3) or _rank(x) != 4:
        return x
    scores, column = x.args[0]
    sinks = _sink_logits(column, shape(scores)[1]) if isinstance(column, Node) else None
    if sinks is None or not isinstance(scores, Node):
        return x
    c.sinks = sinks
    node = column
    while node is not sinks:  # the broadcast of the sinks goes with the chain
        c.nodes.append(node)
        node = canonical(node).input
    c.nodes.append(x)
    _single_user(scores, c.nodes)
    return scores


def _drops_sink_column(node: Node, softmax: Node) -> bool:
    """``node`` keeps every column of the softmax's output but the last (the sinks')."""
    k = canonical(node)
    if k is None or k.kind != "slice" or k.input is not softmax:
        return False
    dim, start, _, step = k.params
    before, after = shape(softmax), shape(node)
    return (dim == len(before) - 1 and start in (None, 0) and step in (None, 1) and after is not None
            and same(after[-1], before[-1] - 1))


def _inplace_fill(scores: Node, reader: Node) -> Optional[Node]:
    """Dynamo keeps ``scores.masked_fill_(m, v)`` as a statement whose result nothing reads, and
    the next step reads ``scores`` itself (Megatron's FusedScaleMaskSoftmax): the fill, when it is
    the only other reader of the scores and comes before ``reader``. The scores are the chain's
    own memory (every step to them has a single reader), so the write is local to the chain."""
    softmax = reader
    others = [u for u in scores.users if u is not softmax and u.target is not _ASSERT]
    if len(others) != 1:
        return None
    fill = others[0]
    if op_name(fill) != "masked_fill_" or fill.args[0] is not scores or fill.users:
        return None
    node = fill.next
    while node is not softmax and node.op != "root":
        node = node.next
    return fill if node is softmax else None


def _scores(node: Node, c: _Chain) -> Node:
    """Walk the pre-softmax scores back to the q·kᵀ product (returned)."""
    while op_name(node) not in _PRODUCTS:
        tensor = _passthrough(node, c, "scores")
        if tensor is None:
            tensor = _step(node, c)
        c.nodes.append(node)
        _read_by(tensor, node, c)
        node = tensor
    c.nodes.append(node)
    return node


def _dropout(node: Node) -> float:
    """The probability a dropout step drops with (0 outside training)."""
    p, train = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", node.kwargs.get("train", True))
    if not isinstance(train, bool) or (train and isinstance(p, Node)):
        raise _NoMatch("dropout with a computed probability or mode")
    return float(p) if train else 0.0


def _reaches_product(node: Node) -> bool:
    """``node`` leads, through single readers, to a matmul/bmm that reads it first."""
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            return False
        user = users[0]
        if op_name(user) in ("matmul", "bmm") and user.args and user.args[0] is node:
            return True
        node = user
    return False


def _probs(softmax: Node, c: _Chain) -> Node:
    """Walk forward from the softmax over casts, views and dropout to the product with v; any
    other op on the way changes the probabilities (reported once the product is found)."""
    last, node = softmax, _single_user(softmax, c.nodes)
    if c.sinks is not None:
        if not _drops_sink_column(node, softmax):
            raise _NoMatch("the sinks' column is not dropped right after the softmax")
        c.nodes.append(node)
        last, node = node, _single_user(node, c.nodes)
    while op_name(node) not in ("matmul", "bmm"):
        if node.args and node.args[0] is not last:
            raise _NoMatch(f"{node.name} does not read the probabilities first")
        if op_name(node) == "dropout":
            c.dropout_p = _dropout(node)
        elif _passthrough(node, c, "probs") is None:
            if not _reaches_product(node):
                raise _NoMatch(f"{node.name} ({op_name(node)}) after the softmax")
            c.problems.append(f"{node.name} ({op_name(node)}) between the softmax and the product with v "
                              "changes the probabilities")
        c.nodes.append(node)
        last, node = node, _single_user(node, c.nodes)
    if node.args[0] is not last:
        raise _NoMatch("the probabilities do not meet v in a matmul")
    return node


class _Scaffold:
    """Views that exist only while ``trace_operands`` reads them: the [B, H, S, D] tensors a 3-D
    spelling never materialises. Erased before the recogniser returns."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def view(self, target: Callable, source: Node, *args: Any) -> Node:
        with source.graph.inserting_after(source):
            node = source.graph.call_function(target, (source, *args))
        node.meta["val" if "val" in source.meta else "example_value"] = target(meta(source), *args)
        self.nodes.append(node)
        return node

    def erase(self) -> None:
        for node in reversed(self.nodes):
            node.graph.erase_node(node)


def _input_labels(k: Canon, labels: str) -> str:
    """Axis labels of ``k.input`` given those of the transpose/permute's output."""
    out = list(labels)
    if k.kind == "transpose":
        d0, d1 = k.params
        out[d0], out[d1] = out[d1], out[d0]
        return "".join(out)
    for i, p in enumerate(k.params):
        out[p] = labels[i]
    return "".join(out)


def _split_heads(node: Node, labels: str, c: _Chain) -> tuple[Node, str]:
    """The 4-D tensor a 3-D operand is a reshape of, and its axis labels: ``labels`` name the
    operand's axes with 'n' for the merged batch*heads axis, which the reshape must split into
    adjacent (b, h) axes. Transposes and copies on the way are crossed."""
    while (k := canonical(node)) is not None:
        if k.kind in ("transpose", "permute"):
            labels = _input_labels(k, labels)
        elif k.kind == "reshape" and _merges(k.input, node, labels.index("n")):
            c.nodes.append(node)
            return k.input, labels.replace("n", "bh")
        elif not _is_identity(node, k):
            break
        c.nodes.append(node)
        node = k.input
    raise _Unproven(f"the 3-D operand {node.name} is not provably a reshape of a 4-D [B, H, S, D] tensor")


def _operand(node: Node, labels: str, c: _Chain, scaffold: _Scaffold) -> Node:
    """A node whose value is the operand read as [B, H, S, D]: ``labels`` name ``node``'s axes
    ('bhds' for a 4-D kᵀ, 'nsd'/'nds' for 3-D operands with the merged batch*heads axis 'n').
    3-D operands always go through a scaffold view, so that the in-place check of
    ``trace_operands`` spans the reshape, which may have copied."""
    if _rank(node) != len(labels):
        raise _Unproven(f"{node.name} has {_rank(node)} dims where the product reads {len(labels)}")
    if "n" in labels:
        node, labels = _split_heads(node, labels, c)
    elif labels == "bhsd":
        return node
    elif (k := canonical(node)) is not None and k.kind in ("transpose", "permute") \
            and _input_labels(k, labels) == "bhsd":
        c.nodes.append(node)
        return k.input
    return scaffold.view(aten.permute.default, node, [labels.index(a) for a in "bhsd"])


def _qk_operands(product: Node, c: _Chain) -> tuple[Node, Node]:
    """(q, kᵀ) of the scores product; baddbmm's alpha joins the scale, its input must be ignored."""
    if op_name(product) != "baddbmm":
        return product.args[0], product.args[1]
    beta, alpha = product.kwargs.get("beta", 1), product.kwargs.get("alpha", 1)
    if isinstance(beta, Node) or beta != 0:
        raise _Unproven(f"baddbmm adds beta={beta} times its input to the scores")
    if isinstance(alpha, Node):
        raise _Unproven("baddbmm's alpha is computed in the graph")
    c.scale *= _const(alpha)
    buffer = product.args[0]
    if isinstance(buffer, Node) and op_name(buffer) in _ALLOCATIONS and len(buffer.users) == 1:
        c.nodes.append(buffer)  # the allocation only baddbmm read (and ignored with beta=0)
    return product.args[1], product.args[2]


def _unscale_q(q: Node, c: _Chain) -> Node:
    """Fold a constant pre-scaling of q (``q * scale``) into the scale."""
    while op_name(q) in ("mul", "div") and len(q.users) == 1:
        try:
            x, f = _factor(q)
        except _NoMatch:
            break
        c.scale *= f
        c.nodes.append(q)
        q = x
    return q


def _output(pv: Node, q4: Node, c: _Chain, scaffold: _Scaffold) -> Node:
    """The [B, H, Sq, Dv] node the site ends at: a 4-D product; the view of a 3-D product to
    [B, H, Sq, Dv] when that is its only reader; else a scaffold view (the lowering then delivers
    the [B*H, Sq, Dv] tensor the product's readers read)."""
    if _rank(pv) == 4:
        return pv
    b, h = shape(q4)[:2]
    if len(pv.users) == 1:
        view = next(iter(pv.users))
        k = canonical(view)
        if k is not None and k.kind == "reshape" and k.input is pv and _merges(view, pv, 0) \
                and same(shape(view)[0], b) and same(shape(view)[1], h):
            c.nodes.append(pv)
            return view
    return scaffold.view(aten.unflatten.int, pv, 0, [b, h])


def _check_shapes(q4: Node, k4: Node, v4: Node, out: Node, c: _Chain) -> None:
    """q, k, v and every 4-D view of the scores agree on B and H (a 3-D product pairs its
    batch*heads rows by index, so every reshape must split them alike), and on dtype."""
    b, h = shape(q4)[:2]
    broadcast = same(shape(k4)[1], 1) and same(shape(v4)[1], 1)  # one K/V head the product broadcasts (MQA)
    for name, node in (("k", k4), ("v", v4)):
        if not (same(shape(node)[0], b) and (broadcast or same(shape(node)[1], h))):
            raise _Unproven(f"q and {name} differ in batch or heads before any repetition")
    if not all(same(view[0], b) and same(view[1], h) for view in c.views):
        raise _Unproven("a view of the scores splits batch*heads unlike q")
    if not (meta(q4).dtype == meta(k4).dtype == meta(v4).dtype == meta(out).dtype):
        raise _Unproven("q, k, v and the output differ in dtype")


_EXACT_UPCASTS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                  (torch.bfloat16, torch.float64), (torch.float32, torch.float64)}


def _check_casts(c: _Chain, dtype: torch.dtype) -> None:
    """Casts keep values only as exact upcasts; after the softmax, rounding the probabilities
    back to the operands' dtype ``dtype`` is what the fused kernels do as well (the fp32-softmax
    idiom). Anything else (an integer dtype, a round trip through a narrower float) changes
    values the op would not."""
    ordered = sorted(c.casts, key=lambda cast: cast[2].is_floating_point)  # a cast to an integer is the cause
    for phase, src, dst in ordered:
        if src == dst or (src, dst) in _EXACT_UPCASTS or (phase == "probs" and dst == dtype and src.is_floating_point):
            continue
        raise _Unproven(f"a cast of the {phase} from {src} to {dst} changes their values")


def _total_scale(c: _Chain) -> float:
    """The op's scale; a factor after the mask scales the mask too, which only a -inf fill
    survives (times a positive factor)."""
    if c.outer != 1.0 and c.mask is not None and not (c.fill == -math.inf and c.outer > 0):
        raise _Unproven("a scale applied after the mask scales the mask too")
    return c.scale * c.inner * c.outer


def _site(qk: Node, pv: Node, c: _Chain, writes: Writes) -> AttentionSite:
    """The canonical site of a complete chain, or _Unproven naming the first step not proven."""
    if c.problems:
        raise _Unproven(c.problems[0])
    q, kt = _qk_operands(qk, c)
    q = _unscale_q(q, c)
    three = {"q": "nsd", "k": "nds", "v": "nsd"}
    four = {"q": "bhsd", "k": "bhds", "v": "bhsd"}
    scaffold = _Scaffold()
    try:
        labels = four if _rank(qk) == 4 else three
        q4, k4 = _operand(q, labels["q"], c, scaffold), _operand(kt, labels["k"], c, scaffold)
        v4 = _operand(pv.args[1], (four if _rank(pv) == 4 else three)["v"], c, scaffold)
        _check_shapes(q4, k4, v4, pv, c)
        _check_casts(c, meta(q4).dtype)
        end = _output(pv, q4, c, scaffold)
        q_op, k_op, v_op, out = trace_operands(end, q4, k4, v4, writes)
        if any(op.source in scaffold.nodes for op in (q_op, k_op, v_op)):
            raise _Unproven("an in-place write keeps a 3-D operand from being read as produced")
        for op in (q_op, k_op, v_op):
            op.skipped = [n for n in op.skipped if n not in scaffold.nodes]
        hq = shape(q4)[1]
    finally:
        scaffold.erase()
    if end in scaffold.nodes:
        end, out = pv, OutputUse(pv, "bhsd")
    hk = shape(k_op.source)[k_op.dims.index("h")]
    if hq % hk:
        raise _Unproven("query heads are not a multiple of key heads")
    site = AttentionSite(end, "hand_written", attn_mask=c.mask, mask_negated=c.mask_negated, mask_fill=c.fill,
                         dropout_p=c.dropout_p, scale=_total_scale(c), softcap=c.softcap, sinks=c.sinks,
                         empty_rows=_empty_rows(c), chain=list(c.nodes))
    site.query, site.key, site.value, site.output = q_op, k_op, v_op, out
    return site


def _empty_rows(c: _Chain) -> str:
    """What the chain gives a row whose every score is masked with -inf, or whose query holds a NaN:
    the softmax's NaN, whose gradient differs for a fill (no gradient through filled scores) and
    an added -inf."""
    if c.sinks is not None:  # a sink keeps every row's denominator positive
        return "zero"
    if c.mask is None:
        return "nan"
    return "nan_additive" if c.fill is None else "nan" if c.fill == -math.inf else "zero"


def _match(softmax: Node, writes: Writes) -> AttentionSite:
    c = _Chain()
    rank = _rank(softmax)
    if rank not in (3, 4) or _arg(softmax, 1, "dim") not in (-1, rank - 1):
        raise _NoMatch("softmax is not over the last dim of 3-D or 4-D scores")
    c.nodes.append(softmax)
    scores = softmax.args[0]
    if not isinstance(scores, Node):
        raise _NoMatch("softmax of a constant")
    if isinstance(meta(scores), torch.Tensor) and isinstance(meta(softmax), torch.Tensor):
        c.casts.append(("scores", meta(scores).dtype, meta(softmax).dtype))  # softmax(x, dtype=...)
    _read_by(scores, softmax, c)
    scores = _without_sinks(_without_row_max(scores, c), c)
    qk = _scores(scores, c)
    pv = _probs(softmax, c)
    try:
        return _site(qk, pv, c, writes)
    except _Unproven as e:
        return AttentionSite(pv, "hand_written", attn_mask=c.mask, skip_reason=str(e))


def find_hand_written_sites(graph: Graph, writes: Writes) -> list[AttentionSite]:
    """Every softmax(q @ kᵀ) @ v chain in ``graph``: proven ones ready to lower, the others
    with the reason they stay as written."""
    sites = []
    for node in list(graph.nodes):  # a snapshot: the scaffold adds and erases nodes
        if op_name(node) not in _SOFTMAX:
            continue
        try:
            sites.append(_match(node, writes))
        except _NoMatch:
            continue
    return sites
