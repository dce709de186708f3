"""The pieces the call recognisers share: the band flash-attn kernels compute, checked against the
kernels' own rules for every small shape and window, and reading a call by its op's schema."""
from __future__ import annotations

import itertools

import pytest
import torch

from attnopt.patterns.calls import Band, _bind_schema, _canonical_band, fa2_band, fa3_band, unset_reason


def _keeps(band: Band, sq: int, sk: int) -> torch.Tensor:
    """[sq, sk] keys kept by ``band`` around the bottom-right diagonal (-1 = unbounded), as the op
    computes it."""
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if band.left >= 0:
        keep &= j >= i - band.left
    if band.right >= 0:
        keep &= j <= i + band.right
    return keep


def _kernel_keeps(sq: int, sk: int, left: int, right: int) -> torch.Tensor:
    """The kernels' mask for their final (left, right) and is_causal/is_local decision."""
    if left < 0 and right < 0:
        return torch.ones(sq, sk, dtype=torch.bool)
    return _keeps(Band(left, right), sq, sk)


def fa2_kernel(sq: int, sk: int, max_q: int, max_k: int, causal: bool, left: int, right: int) -> torch.Tensor:
    """FlashAttention-2 (csrc/flash_attn/flash_api.cpp, and torch's copy): sides normalised against
    the longest key length, causal sets right to 0, then set_params bounds an unbounded side at the
    longest key length when the other side is bounded."""
    left = -1 if left >= max_k else left
    right = -1 if right >= max_k else right
    if max_q == 1:
        causal = False
    if causal:
        right = 0
    if left < 0 <= right:
        left = max_k
    elif right < 0 <= left:
        right = max_k
    return _kernel_keeps(sq, sk, left, right)


def fa3_kernel(sq: int, sk: int, max_q: int, max_k: int, causal: bool, left: int, right: int) -> torch.Tensor:
    """FlashAttention-3 (hopper/flash_api.cpp): sides at the longest lengths minus one are unbounded,
    causal sets right to 0, unbounded sides become the longest lengths minus one."""
    left = -1 if left >= max_k - 1 else left
    right = -1 if right >= max_q - 1 else right
    if max_q == 1 and left == -1 and right == -1:
        causal = False
    if causal:
        right = 0
    if left < 0 and right < 0:
        return torch.ones(sq, sk, dtype=torch.bool)
    left = max_k - 1 if left < 0 else left
    right = max_q - 1 if right < 0 else right
    return _kernel_keeps(sq, sk, left, right)


SIDES = range(-2, 7)
SHAPES = [(sq, sk) for sq in range(1, 6) for sk in range(1, 6)]


@pytest.mark.parametrize("causal", [False, True])
def test_fa2_band_is_the_kernel_mask(causal):
    """Dense calls: the band is exactly the kernel's mask, for every shape and window."""
    for (sq, sk), left, right in itertools.product(SHAPES, SIDES, SIDES):
        band = _canonical_band(fa2_band(causal, left, right, sq, sk, sq == sk), sq, sk)
        assert torch.equal(_keeps(band, sq, sk), fa2_kernel(sq, sk, sq, sk, causal, left, right)), \
            (sq, sk, causal, left, right, band)


@pytest.mark.parametrize("causal", [False, True])
def test_fa3_band_is_the_kernel_mask(causal):
    for (sq, sk), left, right in itertools.product(SHAPES, SIDES, SIDES):
        band = _canonical_band(fa3_band(causal, left, right), sq, sk)
        assert torch.equal(_keeps(band, sq, sk), fa3_kernel(sq, sk, sq, sk, causal, left, right)), \
            (sq, sk, causal, left, right, band)


@pytest.mark.parametrize("kernel", ["FlashAttention-2", "FlashAttention-3"])
def test_packed_band_holds_in_every_sequence(kernel):
    """Packed calls: one band from the longest lengths is each sequence's mask, for sequences of
    any lengths up to them (and of equal lengths when the call says so)."""
    lengths = [(2, 3), (4, 1), (1, 4), (3, 3), (4, 4)]
    max_q, max_k = 4, 4
    for causal, left, right, equal in itertools.product([False, True], SIDES, SIDES, [False, True]):
        seqs = [(q, k) for q, k in lengths if q == k or not equal]
        if kernel == "FlashAttention-2":
            band, emulate = fa2_band(causal, left, right, max_q, max_k, equal), fa2_kernel
        else:
            band, emulate = fa3_band(causal, left, right), fa3_kernel
        band = _canonical_band(band, max_q, max_k)
        for sq, sk in seqs:
            assert torch.equal(_keeps(band, sq, sk), emulate(sq, sk, max_q, max_k, causal, left, right)), \
                (kernel, sq, sk, causal, left, right, equal, band)


def test_undecided_window_is_a_reason():
    """A right window against a key length that is a symbol of the graph is not decided."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    sk = env.create_unbacked_symint()
    assert isinstance(fa2_band(False, -1, 3, 8, sk, False), str)
    assert fa2_band(True, 3, -1, 8, sk, False) == Band(3, 0)  # causal: the right side is 0 whatever sk is


VARLEN_2_11 = torch._C.parse_schema(
    "torch_attn::_varlen_attn(Tensor query, Tensor key, Tensor value, Tensor cu_seq_q, Tensor cu_seq_k, SymInt max_q, "
    "SymInt max_k, bool is_causal=False, float? scale=None, SymInt[]? window_size=None) -> (Tensor, Tensor, Tensor)")


def test_calls_are_read_by_their_own_schema():
    """torch 2.11's varlen schema read by name: the 2.13 arguments it lacks count as not given."""
    q, k, v, cu = object(), object(), object(), object()
    args = _bind_schema(VARLEN_2_11, (q, k, v, cu, cu, 8, 8, True, None, [-1, 0]), {})
    assert args["is_causal"] is True and args["window_size"] == [-1, 0] and args["scale"] is None
    assert unset_reason(args, {"seqused_k": "key lengths", "block_table": "a paged cache"}) is None
    assert _bind_schema(VARLEN_2_11, (q, k, v, cu, cu, 8, 8), {"enable_gqa": True}) is None
    assert _bind_schema(VARLEN_2_11, (q, k, v, cu, cu, 8, 8), {})["window_size"] is None
