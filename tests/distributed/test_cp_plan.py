"""The context-parallel block plan (``attnopt.distributed.plan``), checked on the host against the
mask it must reproduce: over every rank and source block, the calls cover each (row, key) pair the
documents and the band keep exactly once, nothing else, and every row of a call keeps a key; and the
rule that picks the K/V exchange."""
from __future__ import annotations

import random

import pytest

from attnopt.distributed import plan


def _kept(align: str, window: tuple[int, int], nq: int, nk: int, x: int, y: int) -> bool:
    """The op's band for local row x and key y of an nq x nk block."""
    base = 0 if align == "top_left" else nk - nq
    left, right = window
    return (left < 0 or y - x >= base - left) and (right < 0 or y - x <= base + right)


def _segments(call: plan.Call):
    """(first row, first key, rows, keys) of each sequence of a call, in local coordinates."""
    if call.segments is None:
        yield call.q0, call.k0, call.q1 - call.q0, call.k1 - call.k0
        return
    q, k = call.q0, call.k0
    for nq, nk in call.segments:
        yield q, k, nq, nk
        q, k = q + nq, k + nk


def _covered(balance, world, local, docs, window, packed):
    total = local * world
    seen = {}
    for rank in range(world):
        rows = {r.local + i: r.start + i for r in plan.runs(balance, rank, world, local, docs) for i in range(r.length)}
        for src in range(world):
            keys = {r.local + i: r.start + i for r in plan.runs(balance, src, world, local, docs)
                    for i in range(r.length)}
            for call in plan.block_calls(plan.runs(balance, rank, world, local, docs),
                                         plan.runs(balance, src, world, local, docs), docs, window, packed):
                assert (call.segments is not None) == packed
                for q0, k0, nq, nk in _segments(call):
                    for x in range(nq):
                        hits = [y for y in range(nk) if _kept(call.align, call.window, nq, nk, x, y)]
                        assert nk == 0 or hits, f"row {rows[q0 + x]} keeps no key in {call}"
                        for y in hits:
                            pair = (rows[q0 + x], keys[k0 + y])
                            assert pair not in seen, f"{pair} computed twice: {call} and {seen[pair]}"
                            seen[pair] = call
    doc = {p: d for d, (b, e) in enumerate(zip(docs[:-1], docs[1:])) for p in range(b, e)}
    left, right = window
    want = {(i, j) for i in range(total) for j in range(total)
            if i in doc and doc.get(j) == doc[i] and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)}
    assert set(seen) == want


WINDOWS = [(-1, 0), (-1, -1), (3, 0), (5, 0), (0, 0), (2, 3), (13, 2), (-1, 4), (40, 0)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("world", [2, 4])
def test_dense_shards(window, world):
    for balance in (plan.CONTIGUOUS, plan.HEAD_TAIL):
        _covered(balance, world, 8, [0, 8 * world], window, packed=False)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("world", [2, 4])
def test_packed_documents_split_into_pieces(window, world):
    rng = random.Random(window[0] * 7 + world)
    docs = [0]
    for _ in range(5):
        docs.append(docs[-1] + 2 * world * rng.randint(1, 4))
    _covered(plan.DOCUMENTS, world, docs[-1] // world, docs, window, packed=True)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("world", [2, 4])
def test_documents_and_chunks_straddling_contiguous_and_head_tail_shards(window, world):
    """Uneven documents (or chunks of 6) cut anywhere by the shards, some tokens after the last."""
    local = 12
    for docs in ([0, 5, 6, 17, 30, 12 * world - 3], list(range(0, local * world + 1, 6))):
        for balance in (plan.CONTIGUOUS, plan.HEAD_TAIL):
            _covered(balance, world, local, docs, window, packed=True)


def test_packed_documents_must_be_padded():
    with pytest.raises(ValueError, match="multiple of 2 \\* 2"):
        plan.check_documents(plan.DOCUMENTS, 2, [0, 6, 12])


def test_exchange_rule(monkeypatch):
    """All-gather while the gathered K/V fits the limit, the ring beyond; the environment or
    set_kv_exchange forces one."""
    from attnopt.distributed import exchange, set_kv_exchange

    monkeypatch.delenv("ATTNOPT_CP_EXCHANGE", raising=False)
    limit = exchange.GATHER_LIMIT_BYTES
    assert exchange.choose(limit // 4, 4) == "allgather" and exchange.choose(limit // 4 + 1, 4) == "ring"
    monkeypatch.setenv("ATTNOPT_CP_EXCHANGE", "ring")
    assert exchange.choose(1, 2) == "ring"
    set_kv_exchange("allgather")
    try:
        assert exchange.choose(limit, 2) == "allgather"
    finally:
        set_kv_exchange(None)
    monkeypatch.setenv("ATTNOPT_CP_EXCHANGE", "nccl")
    with pytest.raises(ValueError, match="ATTNOPT_CP_EXCHANGE"):
        exchange.choose(1, 2)
