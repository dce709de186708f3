"""Block-level facts about a proven mask, built in the graph: which (query block, key block) pairs
keep some key and which keep every key. flex_attention's BlockMask lists exactly those, so they
check a flex call's own block lists against its mask_mod, and build the block lists of a flex
call made from a proven structure.

Every term of a structure but key padding keeps, per query row q, one interval of keys (a band, a
chunk, a document and a key limit are each an interval, so is their intersection); key padding is
counted with a running sum over the keys. A block keeps some key iff one of its rows keeps a key of
its columns, and every key iff each row keeps all of them: exact, at O(B * Sq * Sk / KV_BLOCK).
Document ids mean packed documents only when each id is one contiguous run of its row, which is
checked on the device where they are used.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from ..fx import Builder
from ..fx.normalize import meta
from .mask_mod import BlockMaskArgs
from .structure import MaskStructure

aten = torch.ops.aten


def _made(build: Builder, tag: tuple) -> Optional[Node]:
    """The node an earlier lowering built for ``tag`` (models hand one mask to every layer)."""
    for node in build.graph.nodes:
        if node.meta.get("attnopt_made") == tag:
            return node
    return None


def _mark(node: Node, tag: tuple) -> Node:
    node.meta["attnopt_made"] = tag
    return node


def _rows(build: Builder, ids: Node) -> Node:
    """[B, S] ids of a [B, S] or [S] input."""
    return ids if meta(ids).dim() == 2 else build(aten.unsqueeze.default, ids, 0)


def check_runs(build: Builder, ids: Node) -> None:
    """Assert on the device that each id is one contiguous run of its row: a row's runs, counted
    where the id changes, are as many as its distinct ids, counted on the sorted row."""
    tag = ("document_runs", ids)
    if _made(build, tag) is not None:
        return
    rows = _rows(build, ids)
    ordered = build(operator.getitem, build(aten.sort.default, rows, -1), 0)

    def changes(x: Node) -> Node:
        steps = build(aten.ne.Tensor, build(aten.slice.Tensor, x, 1, 1), build(aten.slice.Tensor, x, 1, 0, -1))
        return build(aten.sum.dim_IntList, steps, [1])

    same = build(aten.all.default, build(aten.eq.Tensor, changes(rows), changes(ordered)))
    _mark(build(aten._assert_async.msg, same, f"attnopt: an id of {ids.name} occurs in more than one run of a row; "
                "the mask's lowering to packed documents does not hold for these inputs"), tag)


def _document_span(build: Builder, starts: Node, device: torch.device) -> tuple[Node, Node]:
    """int64 [B, S] first and last index of each token's document from its [B, S] start flags."""
    s = meta(starts).shape[1]
    index = build(aten.arange.default, s, device=device)
    first = build(operator.getitem, build(aten.cummax.default, build(aten.where.ScalarOther, starts, index, 0), 1), 0)
    ends = build(aten.cat.default, [build(aten.slice.Tensor, starts, 1, 1),
                                    build(aten.new_ones.default, starts, [meta(starts).shape[0], 1])], 1)
    tail = build(aten.flip.default, build(aten.where.ScalarOther, ends, index, s - 1), [1])
    last = build(aten.flip.default, build(operator.getitem, build(aten.cummin.default, tail, 1), 0), [1])
    return first, last


def document_starts(build: Builder, s: MaskStructure) -> Node:
    """[B, S] bool: where a document starts (row starts, positions that do not step by exactly +1,
    ids that change)."""
    if s.documents is not None:
        p = s.documents
        cut = build(aten.ne.Scalar, build(aten.sub.Tensor, build(aten.slice.Tensor, p, 1, 1),
                                          build(aten.slice.Tensor, p, 1, 0, -1)), 1)
    else:
        p = _rows(build, s.document_ids)
        cut = build(aten.ne.Tensor, build(aten.slice.Tensor, p, 1, 1), build(aten.slice.Tensor, p, 1, 0, -1))
    first = build(aten.new_ones.default, cut, [meta(p).shape[0], 1], dtype=torch.bool)
    return build(aten.cat.default, [first, cut], 1)


def row_intervals(build: Builder, s: MaskStructure, sq: int, sk: int, device: torch.device) -> tuple[Node, Node]:
    """int64 [B or 1, Sq]: the first and last key each query row keeps under every term of ``s`` but
    key padding (last < first: none)."""
    q = build(aten.unsqueeze.default, build(aten.arange.default, sq, device=device), 0)
    first = build(aten.zeros.default, [1, sq], dtype=torch.int64, device=device)
    last = build(aten.full.default, [1, sq], sk - 1, dtype=torch.int64, device=device)

    def keep(lo: Optional[Node] = None, hi: Optional[Node] = None) -> None:
        nonlocal first, last
        if lo is not None:
            first = build(aten.maximum.default, first, lo)
        if hi is not None:
            last = build(aten.minimum.default, last, hi)

    if s.band.lower is not None:
        keep(lo=build(aten.add.Tensor, q, s.band.lower))
    if s.band.upper is not None:
        keep(hi=build(aten.add.Tensor, q, s.band.upper))
    if s.chunk is not None:
        if s.chunk_positions is None:
            offset = build(aten.remainder.Scalar, q, s.chunk)
        else:  # inside a document positions step by 1, so P[k] // C == P[q] // C is k - q in a range
            positions = build(aten._to_copy.default, s.chunk_positions, dtype=torch.int64)
            offset = build(aten.remainder.Scalar, build(aten.slice.Tensor, positions, 1, 0, sq), s.chunk)
        start = build(aten.sub.Tensor, q, offset)
        keep(start, build(aten.add.Tensor, start, s.chunk - 1))
    if s.documents is not None or s.document_ids is not None:
        if s.document_ids is not None:
            check_runs(build, s.document_ids)
        keep(*_document_span(build, document_starts(build, s), device))
    if s.key_limit is not None:
        limit = build(aten._to_copy.default, build(aten.slice.Tensor, s.key_limit.positions, 0, 0, sq),
                      dtype=torch.int64)
        keep(hi=build(aten.unsqueeze.default, build(aten.add.Tensor, limit, s.key_limit.extra - 1), 0))
    if s.cache_offset is not None:
        length = build(aten.reshape.default, build(aten._to_copy.default, s.cache_offset.length, dtype=torch.int64),
                       [1, 1])
        keep(hi=build(aten.add.Tensor, build(aten.add.Tensor, q, length), s.cache_offset.offset))
    if s.never:
        keep(hi=build(aten.full.default, [1, sq], -1, dtype=torch.int64, device=device))
    return first, last


def _kept_counts(build: Builder, s: MaskStructure, first: Node, last: Node, k0: Node, k1: Node, sk: int) -> Node:
    """int64 [B or 1, Sq, nk]: keys each query row keeps in each key block."""
    lo = build(aten.maximum.default, build(aten.unsqueeze.default, first, -1), k0)
    hi = build(aten.minimum.default, build(aten.unsqueeze.default, last, -1), k1)
    if s.padding is None:
        return build(aten.clamp_min.default, build(aten.add.Tensor, build(aten.sub.Tensor, hi, lo), 1), 0)
    keep = build(aten.ne.Scalar, build(aten.slice.Tensor, s.padding, 1, 0, sk), 0)
    running = build(aten.cumsum.default, keep, 1, dtype=torch.int64)
    running = build(aten.cat.default, [build(aten.new_zeros.default, running, [meta(running).shape[0], 1]), running], 1)
    b = meta(running).shape[0]
    shape = [b, *meta(lo).shape[1:]]
    lo, hi = (build(aten.expand.default, t, shape) for t in (lo, hi))

    def at(index: Node) -> Node:
        flat = build(aten.reshape.default, build(aten.clamp.default, index, 0, sk), [b, -1])
        return build(aten.reshape.default, build(aten.gather.default, running, 1, flat), shape)

    counts = build(aten.sub.Tensor, at(build(aten.add.Tensor, hi, 1)), at(lo))
    return build(aten.where.ScalarOther, build(aten.ge.Tensor, hi, lo), counts, 0)


def occupancy(build: Builder, s: MaskStructure, sq: int, sk: int, block_size: tuple[int, int],
              device: torch.device) -> tuple[Node, Node]:
    """bool [B or 1, 1, nq, nk]: the blocks of (Q, KV) ``block_size`` that keep some key, and those
    that keep every key (of the rows and columns inside Sq x Sk)."""
    tag = ("block_occupancy", s.band, s.chunk, s.chunk_positions, s.documents, s.document_ids, s.padding,
           s.key_limit, s.cache_offset, s.never, sq, sk, block_size)
    some = _made(build, (*tag, "some"))
    if some is not None:
        return some, _made(build, (*tag, "every"))
    qb, kb = min(block_size[0], sq), min(block_size[1], sk)
    nq, nk = -(-sq // qb), -(-sk // kb)
    first, last = row_intervals(build, s, sq, sk, device)
    k0 = build(aten.mul.Tensor, build(aten.arange.default, nk, device=device), kb)
    k1 = build(aten.clamp_max.default, build(aten.add.Tensor, k0, kb - 1), sk - 1)
    counts = _kept_counts(build, s, first, last, k0, k1, sk)
    some = build(aten.gt.Scalar, counts, 0)
    every = build(aten.eq.Tensor, counts, build(aten.add.Tensor, build(aten.sub.Tensor, k1, k0), 1))
    if nq * qb != sq:  # rows past Sq in the last block: they keep nothing and hold nothing back
        some = build(aten.constant_pad_nd.default, some, [0, 0, 0, nq * qb - sq], 0)
        every = build(aten.constant_pad_nd.default, every, [0, 0, 0, nq * qb - sq], 1)
    b = meta(some).shape[0]
    some = build(aten.any.dim, build(aten.reshape.default, some, [b, 1, nq, qb, nk]), 3)
    every = build(aten.all.dim, build(aten.reshape.default, every, [b, 1, nq, qb, nk]), 3)
    return _mark(some, (*tag, "some")), _mark(every, (*tag, "every"))


def _listed(build: Builder, num: Optional[Node], index: Optional[Node], like: Node, n: int) -> Node:
    """bool [..., rows, n]: the blocks a (num_blocks, indices) pair lists (none when absent)."""
    if num is None or index is None:
        return build(aten.zeros_like.default, like)
    t = meta(index).shape[-1]
    valid = build(aten.lt.Tensor, build(aten.arange.default, t, device=meta(index).device),
                  build(aten.unsqueeze.default, num, -1))
    index = build(aten._to_copy.default, index, dtype=torch.int64)
    valid = build(aten.logical_and.default, valid, build(aten.lt.Scalar, index, n))
    slot = build(aten.where.ScalarOther, valid, index, n)  # unlisted entries land in a spare column
    base = build(aten.zeros.default, [*meta(index).shape[:-1], n + 1], dtype=torch.bool, device=meta(index).device)
    return build(aten.slice.Tensor, build(aten.scatter.value, base, -1, slot, True), -1, 0, n)


def check_block_mask(build: Builder, bm: BlockMaskArgs, some: Node, every: Node, name: str) -> None:
    """Assert on the device that the flex call's block lists are those of its mask_mod: no block
    both partial and full, every block that keeps a key listed, full blocks keeping every key; for
    the key blocks (forward) and the query blocks (backward) alike."""
    tag = ("block_mask_check", bm, some)
    if _made(build, tag) is not None:
        return
    nq, nk = meta(some).shape[-2:]
    checks = []
    for side, (num, index, full_num, full_index) in (("kv", bm.tensors[0:4]), ("q", bm.tensors[4:8])):
        if num is None:
            continue
        s, e = (some, every) if side == "kv" else (build(aten.transpose.int, t, -1, -2) for t in (some, every))
        n = nk if side == "kv" else nq
        partial = _listed(build, num, index, s, n)
        full = _listed(build, full_num, full_index, s, n)
        checks += [build(aten.logical_not.default, build(aten.logical_and.default, partial, full)),
                   build(aten.logical_or.default, build(aten.logical_not.default, s),
                         build(aten.logical_or.default, partial, full)),
                   build(aten.logical_or.default, build(aten.logical_not.default, full), e)]
    ok = build(aten.all.default, checks[0])
    for c in checks[1:]:
        ok = build(aten.logical_and.default, ok, build(aten.all.default, c))
    _mark(build(aten._assert_async.msg, ok, f"attnopt: the BlockMask of {name} does not list the blocks its "
                "mask_mod keeps; the lowering of the mask_mod alone does not hold for these inputs"), tag)


def block_lists(build: Builder, some: Node, every: Node) -> tuple[Node, ...]:
    """The eight block tensors of a BlockMask (kv then q side, partial then full) for blocks that
    keep some key (``some``) and every key (``every``), ordered as ``create_block_mask`` orders them."""
    partial = build(aten.logical_and.default, some, build(aten.logical_not.default, every))

    def ordered(dense: Node) -> tuple[Node, Node]:
        dense = build(aten._to_copy.default, dense, dtype=torch.int32)
        num = build(aten._to_copy.default, build(aten.sum.dim_IntList, dense, [-1]), dtype=torch.int32)
        index = build(aten.argsort.stable, dense, stable=True, dim=-1, descending=True)
        return num, build(aten._to_copy.default, index, dtype=torch.int32)

    kv = (*ordered(partial), *ordered(every))
    q = (*ordered(build(aten.transpose.int, partial, -1, -2)), *ordered(build(aten.transpose.int, every, -1, -2)))
    return (*kv, *q)


__all__ = ["block_lists", "check_block_mask", "check_runs", "document_starts", "occupancy", "row_intervals"]
