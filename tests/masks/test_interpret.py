"""The mask interpreter follows torch's typing: bools are not numbers, integers wrap at their
width, floats are not modelled, and document ids are re-derived from what the graph computes.
Each mask is captured at both IR levels (Dynamo's torch-level graph and export's ATen graph)."""
from __future__ import annotations

import pytest
import torch

from attnopt.masks import Band, Unproven, interpret, structure_of

S = 6


def _mask_node(fn, *args, level: str) -> torch.fx.Node:
    """The node computing ``fn``'s returned mask in a captured graph."""
    if level == "export":
        class Wrap(torch.nn.Module):
            def forward(self, *a):
                return fn(*a)

        gm = torch.export.export(Wrap(), args).graph_module
    else:
        graphs = []
        torch._dynamo.reset()
        torch.compile(fn, backend=lambda gm, _: graphs.append(gm) or gm, fullgraph=True)(*args)
        gm = graphs[0]
    (out,) = gm.graph.find_nodes(op="output")
    return out.args[0][0]


def _structure(fn, *args, level: str, negate: bool = False):
    return structure_of(interpret(_mask_node(fn, *args, level=level)), negate=negate)


LEVELS = ["dynamo", "export"]


def _idx():
    i = torch.arange(S)
    return i[:, None], i[None, :]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("build,band", [
    (lambda q, k: k <= q, Band(upper=0)),
    (lambda q, k: k < q, Band(upper=-1)),  # the diagonal excluded: not the same as causal
    (lambda q, k: k > q, Band(lower=1)),
    (lambda q, k: (k >= q - 3) & (k < q), Band(lower=-3, upper=-1)),
    (lambda q, k: (k - q <= 2) & (q - k <= 3), Band(lower=-3, upper=2)),
    (lambda q, k: (k <= q) != 0, Band(upper=0)),  # a bool compared with 0 is the bool itself
    (lambda q, k: (k <= q).to(torch.int64).bool(), Band(upper=0)),
    (lambda q, k: (k <= q) == 0, Band(lower=1)),  # ... and compared with 0 for equality, its negation
    (lambda q, k: (k <= q) * (k >= q - 2), Band(lower=-2, upper=0)),  # bool * bool is and
    (lambda q, k: 3 * k < 3 * q + 2, Band(upper=0)),  # integers: 3(k - q) < 2 is k - q <= 0
    (lambda q, k: (q - k).abs() <= 2, Band(lower=-2, upper=2)),  # ModernBERT's local window
], ids=["causal", "strict_lt", "strict_gt", "strict_window", "two_sided", "bool_ne_0", "bool_int_bool",
        "bool_eq_0", "bool_mul", "scaled", "abs_window"])
def test_band_bounds_are_explicit(build, band, level):
    s = _structure(lambda x: build(*_idx()), torch.zeros(()), level=level)
    assert s.band == band and not s.terms()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("build,negate,band", [
    (lambda x: torch.triu(torch.ones(S, S), diagonal=1).bool(), True, Band(upper=0)),  # Megatron: True = masked
    (lambda x: torch.tril(torch.ones(1, S, S)) < 0.5, True, Band(upper=0)),  # Megatron's data pipeline
    (lambda x: (1.0 - torch.tril(torch.ones(S, S), -2)) == 0, False, Band(upper=-2)),
], ids=["triu_bool", "tril_lt_half", "one_minus_tril"])
def test_exact_float_masks(build, negate, band, level):
    """Float tensors that only ever hold integers the dtype represents exactly are modelled."""
    assert _structure(build, torch.zeros(()), level=level, negate=negate).band == band


@pytest.mark.parametrize("level", LEVELS)
def test_inexact_float_values_are_not_proven(level):
    def build(x):
        big = torch.full((S, S), 2.0**25, dtype=torch.float32) + torch.tril(torch.ones(S, S))  # past float32's integers
        return big > 2.0**25

    with pytest.raises(Unproven, match="may not be exact"):
        _structure(build, torch.zeros(()), level=level)


@pytest.mark.parametrize("level", LEVELS)
def test_small_integer_dtypes_wrap_in_eager_and_are_not_proven(level):
    def build(x):
        i = torch.arange(S, dtype=torch.uint8) * 100  # 500 wraps to 244 in uint8
        return i[None, :] <= i[:, None]

    with pytest.raises(Unproven, match="may wrap around in torch.uint8"):
        _structure(build, torch.zeros(()), level=level)


@pytest.mark.parametrize("level", LEVELS)
def test_integer_arithmetic_within_its_width_is_proven(level):
    def build(x):
        i = torch.arange(S, dtype=torch.int16) * 1000  # 5000 fits int16
        return i[None, :] <= i[:, None]

    assert _structure(build, torch.zeros(()), level=level).band == Band(upper=0)


@pytest.mark.parametrize("level", LEVELS)
def test_float_to_integer_casts_are_not_proven(level):
    with pytest.raises(Unproven):
        _structure(lambda m: (m * 2.5).to(torch.int64).bool(), torch.rand(S, S), level=level)


@pytest.mark.parametrize("level", LEVELS)
def test_bitwise_ops_on_integers_are_not_logic(level):
    def build(x):
        q, k = _idx()
        return (~(k - q)).bool()  # ~ on int64 is -x - 1, not "not"

    with pytest.raises(Unproven, match="bitwise"):
        _structure(build, torch.zeros(()), level=level)


def _documents(pos):
    starts = torch.diff(pos, prepend=pos[:, :1] - 1) != 1
    return starts.cumsum(-1)


def _same_document(doc):
    q, k = _idx()
    return (doc[:, None, :, None] == doc[:, None, None, :]) & (k <= q)


POS = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])


@pytest.mark.parametrize("level", LEVELS)
def test_documents_from_position_ids(level):
    s = _structure(lambda pos: _same_document(_documents(pos)), POS, level=level)
    assert s.documents is not None and s.documents.op == "placeholder" and s.band == Band(upper=0)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("reindex", [
    lambda doc: torch.cat([doc[:, :1], doc[:, :-1]], -1),  # shifted by one
    lambda doc: doc.flip(-1),  # read backwards
], ids=["shifted", "flipped"])
def test_document_ids_through_value_changing_indexing_are_not_documents(reindex, level):
    with pytest.raises(Unproven):
        _structure(lambda pos: _same_document(reindex(_documents(pos))), POS, level=level)


@pytest.mark.parametrize("level", LEVELS)
def test_document_starts_of_shifted_positions_are_not_documents(level):
    def build(pos):
        shifted = pos[:, 1:]
        starts = torch.diff(shifted, prepend=shifted[:, :1] - 1) != 1
        doc = torch.cat([starts, starts[:, -1:]], -1).cumsum(-1)
        return _same_document(doc)

    with pytest.raises(Unproven):
        _structure(build, POS, level=level)


@pytest.mark.parametrize("level", LEVELS)
def test_restarts_at_zero_are_not_steps_other_than_one(level):
    """Documents cut where positions restart at 0 differ from documents cut where they do not
    step by +1 (positions 0 1 2 5 6: one document, or two): only the latter is what the
    lowering builds."""
    def build(pos):
        return _same_document((pos == 0).cumsum(-1))

    with pytest.raises(Unproven):
        _structure(build, POS, level=level)


def test_interpretation_lists_what_the_proof_read():
    def build(pos):
        return _same_document(_documents(pos))

    interp = interpret(_mask_node(build, POS, level="dynamo"))
    assert any(n.op == "placeholder" for n in interp.spans)
    assert len(interp.documents) == 1
