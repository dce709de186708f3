"""Which pieces of attention a context-parallel rank computes, worked out on the host from shapes
and document offsets alone.

Each rank holds runs of the global sequence (contiguous shards, torch's head-tail pieces, or a head
and a tail piece of every document). For its query runs against one source rank's key runs, every
pair of pieces inside one document is cut down to the keys its band (causal, sliding window,
unbounded) reaches and the rows that reach them; pairs that reach nothing are dropped. What is
left becomes op calls whose band is a plain ``window_size`` under top-left or bottom-right
alignment, so every row of a call keeps at least one key (the kernels' lse for an empty dense row
is not -inf, and the merge needs it to be).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

# Sharding of the global sequence over the ranks.
CONTIGUOUS, HEAD_TAIL, DOCUMENTS = "contiguous", "head_tail", "documents"


@dataclass(frozen=True)
class Run:
    """``length`` rows at ``local`` in a rank's shard, at ``start`` in the global sequence."""

    local: int
    start: int
    length: int


def runs(balance: str, rank: int, world: int, local_len: int, docs: Optional[Sequence[int]]) -> list[Run]:
    """Where rank ``rank``'s rows sit in the global sequence, sorted by global start."""
    if balance == CONTIGUOUS:
        return [Run(0, rank * local_len, local_len)]
    if balance == HEAD_TAIL:
        half = local_len // 2
        return [Run(0, rank * half, half), Run(half, (2 * world - 1 - rank) * half, half)]
    out = []
    for begin, end in zip(docs[:-1], docs[1:]):
        piece = (end - begin) // (2 * world)
        if piece:
            out += [Run(begin // world, begin + rank * piece, piece),
                    Run(begin // world + piece, begin + (2 * world - 1 - rank) * piece, piece)]
    return sorted(out, key=lambda r: r.start)


def check_documents(balance: str, world: int, docs: Sequence[int]) -> None:
    """Per-document balancing splits every document into 2 * world equal pieces."""
    if balance == DOCUMENTS:
        bad = [e - b for b, e in zip(docs[:-1], docs[1:]) if (e - b) % (2 * world)]
        if bad:
            raise ValueError(f"attnopt.attention under context parallel: packed documents must be padded to a "
                             f"multiple of 2 * {world} tokens (attnopt.distributed.shard_packed does), got "
                             f"lengths {bad}")


@dataclass(frozen=True)
class Call:
    """One op call: local query rows [q0, q1) against local keys [k0, k1) of a source block, with
    ``window`` (-1 unbounded) aligned by ``align``; packed calls list (rows, keys) per segment."""

    q0: int
    q1: int
    k0: int
    k1: int
    align: str
    window: tuple[int, int]
    segments: Optional[tuple[tuple[int, int], ...]] = None


_FULL = ("top_left", (-1, -1))


def _band(qa: int, qb: int, ka: int, kb: int, left: Optional[int], right: Optional[int]
          ) -> Optional[tuple[str, tuple[int, int]]]:
    """The op's (alignment, window) for rows [qa, qb) and keys [ka, kb) (global) under the band
    ``-left <= key - row <= right`` (None unbounded), or None when neither alignment expresses it."""
    sq, sk = qb - qa, kb - ka
    for align, shift in (("top_left", ka - qa), ("bottom_right", kb - qb)):
        lw = None if left is None else left + shift
        rw = None if right is None else right - shift
        if (lw is not None and lw < 0) or (rw is not None and rw < 0):
            continue
        # local key - row spans [-(sq - 1), sk - 1]; a bound outside it removes nothing
        base = 0 if align == "top_left" else sk - sq
        if lw is not None and base - lw <= -(sq - 1):
            lw = None
        if rw is not None and base + rw >= sk - 1:
            rw = None
        if lw is None and rw is None:
            return _FULL
        return align, (-1 if lw is None else lw, -1 if rw is None else rw)
    return None


def _pieces(qa: int, qb: int, ka: int, kb: int, left: Optional[int], right: Optional[int]
            ) -> list[tuple[int, int, int, int, str, tuple[int, int]]]:
    """Rows [qa, qb) against keys [ka, kb) of one document: the sub-blocks that keep keys, each with
    the band that expresses it, rows halved until one alignment does."""
    if left is not None:
        ka = max(ka, qa - left)
    if right is not None:
        kb = min(kb, qb + right)
    if ka >= kb:
        return []
    if right is not None:
        qa = max(qa, ka - right)
    if left is not None:
        qb = min(qb, kb + left)
    if qa >= qb:
        return []
    band = _band(qa, qb, ka, kb, left, right)
    if band is not None:
        return [(qa, qb, ka, kb, *band)]
    mid = (qa + qb) // 2
    return _pieces(qa, mid, ka, kb, left, right) + _pieces(mid, qb, ka, kb, left, right)


def _overlapping(rs: list[Run], begin: int, end: int) -> list[Run]:
    starts = [r.start for r in rs]
    i = max(bisect.bisect_right(starts, begin) - 1, 0)
    out = []
    while i < len(rs) and rs[i].start < end:
        if rs[i].start + rs[i].length > begin:
            out.append(rs[i])
        i += 1
    return out


def block_calls(q_runs: list[Run], k_runs: list[Run], docs: Sequence[int], window: tuple[int, int],
                packed: bool) -> list[Call]:
    """The calls one rank makes against one source block. ``docs`` are the global document offsets
    (one document [0, S) for dense layouts); ``window`` is the call's (left, right), -1 unbounded."""
    left, right = (None if w < 0 else w for w in window)
    found = []
    for begin, end in zip(docs[:-1], docs[1:]):
        for qr in _overlapping(q_runs, begin, end):
            qa, qb = max(qr.start, begin), min(qr.start + qr.length, end)
            for kr in _overlapping(k_runs, begin, end):
                ka, kb = max(kr.start, begin), min(kr.start + kr.length, end)
                for a, b, c, d, align, win in _pieces(qa, qb, ka, kb, left, right):
                    found.append(Call(a - qr.start + qr.local, b - qr.start + qr.local,
                                      c - kr.start + kr.local, d - kr.start + kr.local, align, win))
    found = _join(found)
    return _packed(found) if packed else found


def _join(calls: list[Call]) -> list[Call]:
    """Merge calls of one band that share keys and have adjacent rows, then those that share rows
    and have adjacent keys (the two halves of a head-tail shard seeing one whole block)."""
    for by_rows in (True, False):
        key = (lambda c: (c.align, c.window, c.k0, c.k1, c.q0)) if by_rows else \
            (lambda c: (c.align, c.window, c.q0, c.q1, c.k0))
        out: list[Call] = []
        for c in sorted(calls, key=key):
            p = out[-1] if out else None
            if p is not None and (p.align, p.window) == (c.align, c.window) and c.window == (-1, -1):
                if by_rows and (p.k0, p.k1) == (c.k0, c.k1) and p.q1 == c.q0:
                    out[-1] = Call(p.q0, c.q1, p.k0, p.k1, p.align, p.window)
                    continue
                if not by_rows and (p.q0, p.q1) == (c.q0, c.q1) and p.k1 == c.k0:
                    out[-1] = Call(p.q0, p.q1, p.k0, c.k1, p.align, p.window)
                    continue
            out.append(c)
        calls = out
    return calls


def _packed(calls: list[Call]) -> list[Call]:
    """Packed calls: the sub-blocks of one band chained in order of both rows and keys, each chain
    one call whose segments are the sub-blocks, with rows or keys between them in segments of their
    own that keep nothing."""
    chains: dict[tuple, list[list[Call]]] = {}
    for c in sorted(calls, key=lambda c: (c.q0, c.k0)):
        lists = chains.setdefault((c.align, c.window), [])
        for chain in lists:
            if chain[-1].q1 <= c.q0 and chain[-1].k1 <= c.k0:
                chain.append(c)
                break
        else:
            lists.append([c])
    out = []
    for (align, window), lists in chains.items():
        for chain in lists:
            segments: list[tuple[int, int]] = []
            q, k = chain[0].q0, chain[0].k0
            for c in chain:
                if c.q0 > q:
                    segments.append((c.q0 - q, 0))
                if c.k0 > k:
                    segments.append((0, c.k0 - k))
                segments.append((c.q1 - c.q0, c.k1 - c.k0))
                q, k = c.q1, c.k1
            out.append(Call(chain[0].q0, q, chain[0].k0, k, align, window, tuple(segments)))
    return out
