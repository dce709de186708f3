"""The op's arguments, declared once in ``args.ARGS``: the schemas, the Python front and argument
binding are derived from that table, and arguments graphs already use keep their names and meaning."""
from __future__ import annotations

import inspect

import pytest
import torch

import attnopt.runtime_ops as R
from attnopt.runtime_ops import args as A

# The arguments graphs and callers are written against, in schema order, with their defaults.
EARLIER = [("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
           ("is_causal", False), ("scale", None), ("layout", "bhsd"), ("out_layout", None),
           ("causal_align", "top_left"), ("window_size", [-1, -1]), ("cu_seqlens_q", None), ("cu_seqlens_k", None),
           ("max_seqlen_q", None), ("max_seqlen_k", None), ("kernel_name", "auto"), ("seqused_k", None),
           ("softcap", 0.0)]


def test_schemas_are_the_table():
    forward = torch.ops.attnopt.attention.default._schema
    backward = torch.ops.attnopt.attention_backward.default._schema
    assert [a.name for a in forward.arguments] == list(A.NAMES)
    assert [a.name for a in backward.arguments] == ["grad_out", "out", "lse", "rng_state", *A.NAMES]
    for a, arg in zip(forward.arguments, A.ARGS):
        assert (a.type.kind() == "OptionalType") == arg.type.endswith("?")
        if arg.default is not inspect.Parameter.empty:
            want = list(arg.default) if isinstance(arg.default, tuple) else arg.default
            assert a.default_value == want


def test_earlier_arguments_keep_their_names_positions_and_defaults():
    forward = torch.ops.attnopt.attention.default._schema.arguments
    for a, (name, default) in zip(forward, EARLIER):
        assert a.name == name
        if a.has_default_value():
            assert a.default_value == default
    assert all(a.has_default_value() for a in forward[len(EARLIER):])  # later ones are optional


def test_front_signature_and_doc_come_from_the_table():
    sig = inspect.signature(R.attention)
    public = [a for a in A.ARGS if a.front != ""]
    assert list(sig.parameters)[:-1] == [a.front or a.name for a in public]
    assert "kernel" in sig.parameters and "mask_grad" not in sig.parameters
    assert list(sig.parameters)[A.POSITIONAL - 1] == "scale"
    assert sig.parameters["layout"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(R.kernel_for).parameters.keys() == sig.parameters.keys() - {"return_lse"}
    doc = " ".join(R.attention.__doc__.split())
    for a in public:
        assert f"{a.front or a.name}: {a.doc}" in doc


def test_front_binds_like_its_signature():
    q = torch.randn(1, 2, 4, 8)
    torch.testing.assert_close(R.attention(q, q, q, None, 0.0, True), R.attention(q, q, q, is_causal=True))
    assert R.kernel_for(q, q, q, kernel="math") == R.kernel_for(q, q, q, kernel_name="math") == "math"
    with pytest.raises(TypeError, match="positional"):
        R.attention(q, q, q, None, 0.0, False, None, "bhsd")
    with pytest.raises(TypeError, match="unexpected keyword argument 'causal'"):
        R.kernel_for(q, q, q, causal=True)
    with pytest.raises(TypeError, match="missing required arguments: value"):
        R.kernel_for(q, q)


def test_complete_fills_what_the_dispatcher_drops():
    q = torch.randn(1)
    call = A.complete((q, q, q, None, 0.5))
    assert call.dropout_p == 0.5 and call.layout == "bhsd" and call.window_size == (-1, -1)
    assert call == A.bind((q, q, q), {"dropout_p": 0.5})
