"""Attention with structure under context parallel on 2 and 4 CPU ranks (gloo), in float64 against
one process: packed documents balanced per document (shard_packed), Llama 4 chunks as packed
sequences (straddling rank boundaries on contiguous shards, or balanced per chunk), causal and
sliding windows on either side of the diagonal (dense head-tail shards and packed); K/V by ring
and by all-gather; eager and compiled with attnopt. Output, input gradient and every parameter
gradient must match."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from .cp_structured import case, reference, run_cases
from .launch import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TOLERANCE = 1e-10
UNEVEN = [13, 1, 30, 20, 7]  # padded to multiples of 2 * cp: document ends inside pieces and ranks
EVEN = [16, 8, 40, 24]  # multiples of 8: no padding, so bands may reach right of the diagonal

TWO_RANKS = [
    case("documents-causal-ring", docs=UNEVEN),
    case("documents-causal-allgather", docs=UNEVEN, exchange="allgather"),
    case("documents-causal-ring-compiled", docs=UNEVEN, compiled="aot_eager"),
    case("documents-window3-ring", docs=UNEVEN, window=(3, 0)),  # shorter than most pieces
    case("documents-window11-allgather-compiled", docs=UNEVEN, window=(11, 0), exchange="allgather",
         compiled="aot_eager"),  # longer than most pieces
    case("documents-window3-2-ring", docs=EVEN, window=(3, 2), causal=False),
    case("chunks-contiguous-ring", docs=[40, 56], chunk=12, balance="contiguous"),  # chunks straddle the ranks
    case("chunks-contiguous-allgather-compiled", docs=[40, 56], chunk=12, balance="contiguous", exchange="allgather",
         compiled="aot_eager"),
    case("chunks-per-chunk-ring", docs=[40, 56], chunk=12),  # each chunk balanced as a document
    case("chunks-window-contiguous-ring", docs=[96], chunk=20, window=(7, 0), balance="contiguous"),
    case("dense-window6-head-tail-ring", layout="bshd", window=(6, 0), balance="head_tail"),
    case("dense-window30-head-tail-allgather", layout="bshd", window=(30, 0), balance="head_tail",
         exchange="allgather"),
    case("dense-window5-3-head-tail-ring-compiled", layout="bshd", window=(5, 3), causal=False, balance="head_tail",
         compiled="aot_eager"),
    case("dense-window4-4-contiguous-allgather", layout="bshd", window=(4, 4), causal=False, balance="contiguous",
         exchange="allgather"),
    case("dense-causal-head-tail-ring", layout="bshd", balance="head_tail"),
]

FOUR_RANKS = [
    case("documents-causal-ring", docs=UNEVEN),
    case("documents-window5-allgather-compiled", docs=UNEVEN, window=(5, 0), exchange="allgather",
         compiled="aot_eager"),
    case("documents-window3-2-ring", docs=EVEN, window=(3, 2), causal=False),
    case("chunks-contiguous-ring-compiled", docs=[40, 56], chunk=12, balance="contiguous", compiled="aot_eager"),
    case("chunks-per-chunk-allgather", docs=[40, 56], chunk=8, exchange="allgather"),
    case("dense-window6-head-tail-ring", layout="bshd", window=(6, 0), balance="head_tail"),
    case("dense-window5-3-head-tail-allgather", layout="bshd", window=(5, 3), causal=False, balance="head_tail",
         exchange="allgather"),
]

INDUCTOR = [
    case("documents-causal-ring-inductor", docs=UNEVEN, compiled="inductor"),
    case("dense-window5-3-head-tail-allgather-inductor", layout="bshd", window=(5, 3), causal=False,
         balance="head_tail", exchange="allgather", compiled="inductor"),
]


def _check(c: dict, got: dict) -> None:
    want = reference(c)
    assert got["exchanges"] == [c["exchange"]], got["exchanges"]
    errors = {n: float((got[n] - w).abs().max()) for n, w in want.items()}
    assert all(e < TOLERANCE for e in errors.values()), errors
    assert float(want["out"].abs().max()) > 0.1 and float(want["dx"].abs().max()) > 0.1  # not comparing zeros


@pytest.fixture(scope="module")
def two_ranks() -> dict[str, dict]:
    """Every two-rank case in one launch (the ranks' start-up costs more than the cases)."""
    return run_ranks(run_cases, TWO_RANKS)[0]


@pytest.mark.parametrize("c", TWO_RANKS, ids=[c["name"] for c in TWO_RANKS])
def test_two_ranks_match_one_process(two_ranks, c):
    _check(c, two_ranks[c["name"]])


@pytest.fixture(scope="module")
def four_ranks() -> dict[str, dict]:
    return run_ranks(run_cases, FOUR_RANKS, world=4)[0]


@pytest.mark.slow
@pytest.mark.parametrize("c", FOUR_RANKS, ids=[c["name"] for c in FOUR_RANKS])
def test_four_ranks_match_one_process(four_ranks, c):
    _check(c, four_ranks[c["name"]])


@pytest.mark.slow
def test_inductor_matches_one_process():
    got = run_ranks(run_cases, INDUCTOR)[0]
    for c in INDUCTOR:
        _check(c, got[c["name"]])
