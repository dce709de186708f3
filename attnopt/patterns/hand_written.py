"""Recognise attention written by hand: ``softmax(q @ kᵀ * scale + mask) @ v``.

Accepted spellings, at both IR levels: ``matmul`` of 4-D [B, H, S, D] tensors with kᵀ as a
``transpose`` of the last two dims; the scale as a constant ``mul``/``div`` of the scores or of
q; the mask added (additive), through ``masked_fill(-inf)`` or ``where(cond, s, -inf)``; the
softmax over the last dim, optionally computed in float32 and cast back; dropout on the
probabilities; then ``matmul`` with v. Every intermediate must feed only the next step (scores
or probabilities read elsewhere, e.g. returned as attention weights, keep the site as written).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.fx import Graph, Node

from .normalize import meta, op_name
from .operands import trace_operands
from .site import AttentionSite

_SOFTMAX = {"softmax", "_softmax"}
_CASTS = {"to", "float", "type_as", "_to_copy", "half", "bfloat16"}


class _NoMatch(Exception):
    pass


_ASSERT = torch.ops.aten._assert_tensor_metadata.default


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


def _last_dim(d: Any, rank: int) -> bool:
    return d in (-1, rank - 1)


def _strip_casts(node: Node, chain: list[Node]) -> Node:
    """Walk back over dtype casts (the float32-softmax idiom)."""
    while op_name(node) in _CASTS and isinstance(node.args[0], Node):
        chain.append(node)
        node = node.args[0]
    return node


class _Site:
    def __init__(self) -> None:
        self.chain: list[Node] = []
        self.scale = 1.0
        self.mask: Optional[Node] = None
        self.mask_negated = False
        self.dropout_p = 0.0


def _scores(node: Node, s: _Site) -> tuple[Node, Node]:
    """Parse the pre-softmax scores back to matmul(q, kᵀ); return (q, kᵀ)."""
    while True:
        name = op_name(node)
        if name in ("matmul",):
            q, kt = node.args[0], node.args[1]
            s.chain.append(node)
            return q, kt
        if name in ("mul", "div") and len(node.args) == 2:
            a, b = node.args
            tensor, c = (a, b) if isinstance(a, Node) else (b, a)
            if not isinstance(tensor, Node):
                raise _NoMatch("scale of two constants")
            if isinstance(c, Node):
                raise _NoMatch(f"{node.name} scales by a tensor")
            s.scale = s.scale * _const(c) if name == "mul" else s.scale / _const(c)
            if name == "div" and tensor is not a:
                raise _NoMatch("constant divided by the scores")
        elif name == "add" and len(node.args) == 2 and all(isinstance(x, Node) for x in node.args):
            if s.mask is not None:
                raise _NoMatch("two masks")
            a, b = node.args
            scores_side = a if _rank(a) == 4 and _is_scores(a) else b
            s.mask = b if scores_side is a else a
            tensor = scores_side
        elif name == "masked_fill":
            fill = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
            if not (isinstance(fill, float) and math.isinf(fill) and fill < 0) or s.mask is not None:
                raise _NoMatch("masked_fill with a value other than -inf")
            tensor, s.mask, s.mask_negated = node.args[0], node.args[1], True
        elif name == "where":
            cond, a, b = node.args[:3]
            if not (isinstance(b, float) and math.isinf(b) and b < 0) or s.mask is not None:
                raise _NoMatch("where with a fill other than -inf")
            tensor, s.mask = a, cond
        else:
            raise _NoMatch(f"{node.name} ({name}) before the softmax")
        s.chain.append(node)
        if not isinstance(tensor, Node):
            raise _NoMatch("scores are not a tensor")
        _single_user(tensor, s.chain)
        node = tensor


def _rank(node: Any) -> int:
    v = meta(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _is_scores(node: Node) -> bool:
    """True when ``node`` leads back to the q @ kᵀ product (and not to a mask)."""
    seen = 0
    while isinstance(node, Node) and seen < 16:
        if op_name(node) == "matmul":
            return True
        if not node.args or not isinstance(node.args[0], Node):
            return False
        node, seen = node.args[0], seen + 1
    return False


def _unscale_q(q: Node, s: _Site) -> Node:
    """Fold a constant pre-scaling of q (``q * scale``) into the site's scale."""
    while op_name(q) in ("mul", "div") and len(q.users) == 1:
        a, b = q.args
        if not isinstance(a, Node) or isinstance(b, Node):
            break
        s.scale = s.scale * _const(b) if op_name(q) == "mul" else s.scale / _const(b)
        s.chain.append(q)
        q = a
    return q


def _key(kt: Node, s: _Site) -> Node:
    """k from kᵀ: a transpose of the last two dims of a 4-D tensor."""
    name = op_name(kt)
    rank = _rank(kt)
    if name == "transpose" and sorted(d % rank for d in kt.args[1:3]) == [rank - 2, rank - 1]:
        if len(kt.users) == 1:
            s.chain.append(kt)
        return kt.args[0]
    if name == "permute":
        dims = list(kt.args[1] if isinstance(kt.args[1], (list, tuple)) else kt.args[1:])
        if [d % rank for d in dims] == [0, 1, 3, 2]:
            if len(kt.users) == 1:
                s.chain.append(kt)
            return kt.args[0]
    raise _NoMatch("the second matmul operand is not kᵀ")


def _match(softmax: Node) -> Optional[AttentionSite]:
    s = _Site()
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if _rank(softmax) != 4 or not _last_dim(dim, 4):
        raise _NoMatch("softmax is not over the last dim of 4-D scores")
    s.chain.append(softmax)
    scores = _strip_casts(softmax.args[0], s.chain)
    _single_user(scores, s.chain)
    q, kt = _scores(scores, s)
    q = _unscale_q(q, s)
    k = _key(kt, s)
    # forward from the softmax: casts, dropout, then @ v
    node = _single_user(softmax, s.chain)
    while True:
        name = op_name(node)
        if name in _CASTS:
            s.chain.append(node)
            node = _single_user(node, s.chain)
        elif name in ("dropout", "native_dropout"):
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", node.kwargs.get("train", True))
            if not isinstance(train, bool) or (train and isinstance(p, Node)):
                raise _NoMatch("dropout with a computed probability or mode")
            s.dropout_p = float(p) if train else 0.0
            s.chain.append(node)
            node = _single_user(node, s.chain)
        else:
            break
    if op_name(node) != "matmul" or node.args[0] not in s.chain:
        raise _NoMatch("the probabilities do not meet v in a matmul")
    v = node.args[1]
    if any(_rank(t) != 4 for t in (q, k, v)):
        raise _NoMatch("q, k, v are not 4-D")
    if not (meta(q).dtype == meta(k).dtype == meta(v).dtype == meta(node).dtype):
        raise _NoMatch("q, k, v and the output differ in dtype")
    site = AttentionSite(node, "hand_written", attn_mask=s.mask, dropout_p=s.dropout_p, scale=s.scale)
    site.extra["chain"] = list(s.chain)
    site.extra["mask_negated"] = s.mask_negated
    site.query, site.key, site.value, site.output = trace_operands(node, q, k, v)
    hq = meta(q).shape[1]
    hk = meta(site.key.source).shape[site.key.dims.index("h")]
    if meta(k).shape[1] != hq:
        raise _NoMatch("q and k disagree on heads before any repetition")
    if hq % hk:
        raise _NoMatch("query heads are not a multiple of key heads")
    return site


def find_hand_written_sites(graph: Graph) -> list[AttentionSite]:
    """Every softmax(q @ kᵀ) @ v chain in ``graph`` that can be proven to be attention."""
    sites = []
    for node in graph.nodes:
        if op_name(node) not in _SOFTMAX:
            continue
        try:
            sites.append(_match(node))
        except _NoMatch:
            continue
    return sites
