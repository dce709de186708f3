"""A flex ``mask_mod`` is proven with the tensor-mask interpreter, its (b, h, q_idx, kv_idx) bound to
the indices of a [B, H, Sq, Sk] mask and its captured tensors as leaves, and split into the same
structure; at both IR levels (Dynamo's graph and export's, where indexing is ``flat_apply`` of
flex's ``ModIndex``). Masks that are not such a structure (per head, indices read through other
tensors, floating-point ids) are unproven. The blocks a structure keeps some or every key of (what
a BlockMask lists) are computed exactly in the graph."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

from attnopt.fx import Builder
from attnopt.masks import Band, Unproven, blocks, structure_of
from attnopt.masks.interpret import interpret_mask_mod
from attnopt.masks.structure import CacheOffset, KeyLimit, MaskStructure
from tests.flex_support import QUIET, dynamo_graph, export_graph, flex_nodes

pytestmark = QUIET
B, H, S, D = 2, 2, 256, 8
W, C = 32, 64

_gen = torch.Generator().manual_seed(0)
IDS = torch.sort(torch.randint(0, 4, (B, S), generator=_gen), dim=1).values.int()
IDS_1D = IDS[0].clone()
KEEP = torch.rand(B, S, generator=_gen) > 0.2
LENGTHS = torch.tensor([200, 100])
WINDOWS = torch.tensor([16, 48])
FLOAT_IDS = IDS.double()


def causal(b, h, q, k):
    return q >= k


def document(b, h, q, k):  # torchtitan's document mask over [B, S] sequence indices
    return IDS[b, q] == IDS[b, k]


def sliding_window(b, h, q, k):  # torchtitan's get_sliding_window_mask_mod
    return (k <= q) & (q - k < W)


# name: (mask_mod, expected (band, chunk, terms besides band and chunk)) or None for unproven
CASES = {
    "causal": (causal, (Band(upper=0), None, set())),
    "sliding_window": (sliding_window, (Band(-(W - 1), 0), None, set())),
    "window_off_by_one": (lambda b, h, q, k: (k <= q) & (q - k <= W), (Band(-W, 0), None, set())),
    "strict": (lambda b, h, q, k: k < q, (Band(upper=-1), None, set())),
    "fixed_block": (lambda b, h, q, k: q // C == k // C, (Band(), C, set())),
    "block_causal": (and_masks(causal, document), (Band(upper=0), None, {"document_ids"})),
    "document_1d": (lambda b, h, q, k: IDS_1D[q] == IDS_1D[k], (Band(), None, {"document_ids"})),
    "padding": (lambda b, h, q, k: KEEP[b, k] & (k <= q), (Band(upper=0), None, {"padding"})),
    "per_head": (lambda b, h, q, k: (k <= q) | (h == 0), None),
    "per_head_window": (lambda b, h, q, k: q - k < WINDOWS[h], None),
    "key_length": (lambda b, h, q, k: k < LENGTHS[b], None),
    "float_ids": (lambda b, h, q, k: FLOAT_IDS[b, q] == FLOAT_IDS[b, k], None),
    "document_of_query_start": (lambda b, h, q, k: k >= IDS_1D[IDS_1D[q]], None),
}
MASKS = [create_block_mask(mm, B, None, S, S, device="cpu") for mm, _ in CASES.values()]


class Calls(torch.nn.Module):
    """One flex call per case, the BlockMasks held as attributes (export lifts their tensors)."""

    def __init__(self):
        super().__init__()
        self.masks = MASKS

    def forward(self, q):
        return tuple(flex_attention(q, q, q, block_mask=bm) for bm in self.masks)


def _structures(level: str) -> dict:
    q = torch.randn(B, H, S, D)
    gm = dynamo_graph(Calls(), q) if level == "dynamo" else export_graph(Calls(), q)
    out = {}
    for name, node in zip(CASES, flex_nodes(gm)):
        mask_mod = gm.get_submodule(node.args[4][-1].target)
        try:
            s = structure_of(interpret_mask_mod(mask_mod.graph, (B, H, S, S), list(node.args[8])))
            out[name] = (s.band, s.chunk, s.terms() - {"chunk"})
        except Unproven:
            out[name] = None
    return out


@pytest.mark.parametrize("level", ["dynamo", "export"])
def test_mask_mods_split_into_structures(level):
    assert _structures(level) == {name: expected for name, (_, expected) in CASES.items()}


def test_index_bounds_follow_the_sizes():
    """(b, h, q_idx, kv_idx) are int32 scalars within their sizes: ``q_idx + 1`` is exact at the
    call's lengths, and may wrap where q_idx may reach the top of int32."""
    ahead = create_block_mask(lambda b, h, q, k: k <= q + 1, B, None, S, S, device="cpu")
    gm = dynamo_graph(lambda q: flex_attention(q, q, q, block_mask=ahead), torch.randn(B, H, S, D))
    (node,) = flex_nodes(gm)
    graph = gm.get_submodule(node.args[4][-1].target).graph
    assert structure_of(interpret_mask_mod(graph, (B, H, S, S), [])).band == Band(upper=1)
    with pytest.raises(Unproven, match="may wrap around in torch.int32"):
        interpret_mask_mod(graph, (B, H, 2**31, 2**31), [])
    with pytest.raises(Unproven, match="4 indices and 1 buffers"):
        interpret_mask_mod(graph, (B, H, S, S), [node])


# --- block occupancy: the blocks a structure keeps some key of, and every key of -------------------
def _documents(starts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(starts.int(), 1)


def _position_starts(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones_like(p[:, :1], dtype=torch.bool), p[:, 1:] - p[:, :-1] != 1], 1)


_POSITIONS = torch.cat([torch.arange(n) for n in (30, 45, 25)]).expand(B, 100).contiguous()
_SORTED_IDS = torch.sort(torch.randint(0, 6, (B, 100), generator=_gen), 1).values
_LIMITS = torch.randint(0, 100, (40,), generator=_gen)
_CACHED = torch.tensor([37])


def _dense(name: str, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B or 1, Sq, Sk] keep-mask of each case, straight from the terms' definitions."""
    if name == "band_padding":
        return ((k - q >= -20) & (k - q <= 3))[None] & (x[:, None, : k.shape[1]] != 0)
    if name == "chunk_causal":
        return ((q // 24 == k // 24) & (k <= q))[None]
    if name == "document_ids_causal":
        return (x[:, :, None] == x[:, None, :]) & (k <= q)[None]
    if name == "documents_window":
        d = _documents(_position_starts(x))
        return (d[:, :, None] == d[:, None, :]) & ((k <= q) & (k - q >= -10))[None]
    if name == "chunked_documents":
        d = _documents(_position_starts(x))
        return (d[:, :, None] == d[:, None, :]) & (x[:, :, None] // 16 == x[:, None, :] // 16) & (k <= q)[None]
    if name == "key_limit":
        return (k < x[:, None] + 1)[None]
    if name == "cache_offset":
        return (k - q <= x + 0)[None]
    return torch.zeros(1, *q.shape[:1], k.shape[1], dtype=torch.bool)


OCCUPANCY = {  # name: (input, sq, sk, structure over the input's graph node)
    "band_padding": (torch.rand(B, 95, generator=_gen) > 0.3, 100, 90,
                     lambda x: MaskStructure(band=Band(-20, 3), padding=x)),
    "chunk_causal": (_SORTED_IDS, 100, 100, lambda x: MaskStructure(band=Band(upper=0), chunk=24)),
    "document_ids_causal": (_SORTED_IDS, 100, 100, lambda x: MaskStructure(band=Band(upper=0), document_ids=x)),
    "documents_window": (_POSITIONS, 100, 100, lambda x: MaskStructure(band=Band(-10, 0), documents=x)),
    "chunked_documents": (_POSITIONS, 100, 100, lambda x: MaskStructure(band=Band(upper=0), chunk=16,
                                                                       chunk_positions=x, documents=x)),
    "key_limit": (_LIMITS, 40, 100, lambda x: MaskStructure(key_limit=KeyLimit(x, 1))),
    "cache_offset": (_CACHED, 40, 100, lambda x: MaskStructure(cache_offset=CacheOffset(x, 0))),
    "never": (_CACHED, 40, 100, lambda x: MaskStructure(never=True)),
}


@pytest.mark.parametrize("name", list(OCCUPANCY))
def test_block_occupancy_is_exact(name):
    """``occupancy`` equals the dense mask reduced per block, partial last blocks included."""
    x, sq, sk, structure = OCCUPANCY[name]
    qb, kb = 16, 32
    gm = make_fx(lambda t: t, tracing_mode="fake")(x)
    (node,), (out,) = gm.graph.find_nodes(op="placeholder"), gm.graph.find_nodes(op="output")
    build = Builder(gm, node)
    with gm.graph.inserting_before(out):
        some, every = blocks.occupancy(build, structure(node), sq, sk, (qb, kb), torch.device("cpu"))
    out.args = ((some, every),)
    gm.recompile()
    got_some, got_every = gm(x)
    dense = _dense(name, torch.arange(sq)[:, None], torch.arange(sk)[None, :], x)
    nq, nk = -(-sq // qb), -(-sk // kb)
    want_some = torch.zeros(dense.shape[0], nq, nk, dtype=torch.bool)
    want_every = torch.zeros_like(want_some)
    for i in range(nq):
        for j in range(nk):
            block = dense[:, i * qb:(i + 1) * qb, j * kb:(j + 1) * kb].flatten(1)
            want_some[:, i, j], want_every[:, i, j] = block.any(1), block.all(1)
    assert torch.equal(got_some[:, 0], want_some.expand_as(got_some[:, 0]))
    assert torch.equal(got_every[:, 0], want_every.expand_as(got_every[:, 0]))
