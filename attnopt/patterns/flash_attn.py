"""Recognise the flash-attn package's attention as graphs hold it.

flash-attn registers its kernels as torch.library custom ops and wraps them in autograd.Functions
(``flash_attn_func``, ``flash_attn_varlen_func`` and their packed-QKV forms). torch.export inlines
the forward, leaving the op call; Dynamo keeps the autograd.Function as one
``autograd_function_apply`` node whose forward body calls the op. Both are recognised; the body's
forward must read q, k, v (and the offsets) as the node receives them and return the op's output
(the slice back to the head dim flash-attn pads to a multiple of 8 counts only as the identity),
and its backward body must call the package's backward op with the forward's settings: then the
autograd.Function computes attention and its gradient, which the op reproduces.

Mapping, argument by argument (all causal and windows bottom right, GQA by head count):

- ``flash_attn::_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal,
  window_size_left, window_size_right, softcap, alibi_slopes, return_softmax)``: [B, S, H, D];
  the band as FlashAttention-2 computes it; ``softcap`` as is (0 = none); ALiBi stays as written;
  returns (out, softmax_lse, S_dmask, rng_state);
- ``flash_attn::_flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
  alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k, zero_tensors, num_splits)``:
  packed [T, H, D]; a block table, left padding or key lengths stay as written;
- ``flash_attn_3::_flash_attn_forward(q, k, v, k_new, v_new, qv, out_, cu_seqlens_q,
  cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table,
  kv_batch_idx, leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale,
  v_descale, softmax_scale, causal, window_size_left, window_size_right, attention_chunk, softcap,
  ...)``: [B, S, H, D], or packed with ``cu_seqlens_q/k``; the band as FlashAttention-3 computes
  it; appended keys (``flash_attn_with_kvcache``), ``qv``, key lengths, paged or indexed caches,
  rotary embedding, fp8 descaling and chunked attention stay as written.

flash-attn 2's ``flash_attn_with_kvcache`` calls its extension directly, not a registered op:
graphs never hold it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import Graph, GraphModule, Node

from ..fx import Writes
from ..fx.normalize import canonical, meta
from .calls import CallSite, bind, constant_reason, lengths, make_site, number_reason, set_band, unset_reason
from .layout_chain import _is_identity
from .site import AttentionSite

_AUTOGRAD_FUNCTION = torch.ops.higher_order.autograd_function_apply
_FA2, _FA3 = ("FlashAttention-2",), ("FlashAttention-3",)


@dataclass(frozen=True)
class _Family:
    """One flash-attn forward op: its argument names and what stays as written."""

    kernels: tuple[str, ...]
    backward: str  # the backward op its autograd.Function calls
    unsupported: dict
    outputs: tuple[str, ...]


_FA3_UNSUPPORTED = {
    "k_new": "keys appended to a cache", "v_new": "values appended to a cache", "qv": "a query-value product",
    "out_": "an output buffer", "cu_seqlens_k_new": "keys appended to a cache", "seqused_q": "query lengths",
    "seqused_k": "per-sequence key lengths", "page_table": "a paged key/value cache",
    "kv_batch_idx": "an indexed key/value cache", "leftpad_k": "left-padded keys", "rotary_cos": "rotary embedding",
    "rotary_sin": "rotary embedding", "seqlens_rotary": "rotary embedding", "q_descale": "fp8 descaling",
    "k_descale": "fp8 descaling", "v_descale": "fp8 descaling", "attention_chunk": "chunked attention",
}
_FAMILIES = {
    "flash_attn::_flash_attn_forward": _Family(
        _FA2, "flash_attn::_flash_attn_backward", {"alibi_slopes": "ALiBi biases"},
        ("out", "softmax_lse", "S_dmask", "rng_state")),
    "flash_attn::_flash_attn_varlen_forward": _Family(
        _FA2, "flash_attn::_flash_attn_varlen_backward",
        {"alibi_slopes": "ALiBi biases", "block_table": "a paged key/value cache", "leftpad_k": "left-padded keys",
         "seqused_k": "per-sequence key lengths"},
        ("out", "softmax_lse", "S_dmask", "rng_state")),
    "flash_attn_3::_flash_attn_forward": _Family(
        _FA3, "flash_attn_3::_flash_attn_backward", _FA3_UNSUPPORTED,
        ("out", "softmax_lse", "out_accum", "softmax_lse_accum")),
}
# settings the backward op must share with the forward: (forward name, backward name)
_SHARED = (("dropout_p", "dropout_p"), ("softmax_scale", "softmax_scale"), ("causal", "causal"),
           ("causal", "is_causal"), ("window_size_left", "window_size_left"),
           ("window_size_right", "window_size_right"), ("softcap", "softcap"), ("alibi_slopes", "alibi_slopes"))


def _call_site(node: Node, family: _Family, args: dict) -> CallSite:
    """The site of one forward op call whose graph values ``args`` holds."""
    varlen = args.get("cu_seqlens_q") is not None
    cs = CallSite(node, "flash_attn", "thd" if varlen else "bshd", args["q"], args["k"], args["v"],
                  dropout_p=args.get("dropout_p", 0.0), scale=args["softmax_scale"], softcap=args["softcap"])
    cs.reason = constant_reason(args, ("causal", "window_size_left", "window_size_right", "softcap")) \
        or number_reason(args, ("dropout_p", "softmax_scale") if "dropout_p" in args else ("softmax_scale",)) \
        or unset_reason(args, family.unsupported)
    if not cs.reason and varlen != (args.get("cu_seqlens_k") is not None):
        cs.reason = "only one of cu_seqlens_q and cu_seqlens_k is given: left as written"
    if cs.reason:
        return cs
    window = (args["window_size_left"], args["window_size_right"])
    found = lengths(cs, args.get("cu_seqlens_q"), args.get("cu_seqlens_k"), args.get("max_seqlen_q"),
                    args.get("max_seqlen_k"))
    if found is None:
        return cs
    set_band(cs, bool(args["causal"]), window, *found, family.kernels)
    return cs


# --- Dynamo's autograd_function_apply ---------------------------------------------------------------
def _body(node: Node, index: int) -> Optional[GraphModule]:
    ref = node.args[index] if len(node.args) > index else None
    if not isinstance(ref, Node) or ref.op != "get_attr":
        return None
    module = node.graph.owning_module.get_submodule(ref.target)
    return module if isinstance(module, GraphModule) else None


def _only_call(body: GraphModule, names) -> Optional[tuple[Node, torch._C.FunctionSchema, dict]]:
    """The one call in ``body`` of an op named in ``names``."""
    found = [(n, *b) for n in body.graph.nodes if (b := bind(n)) is not None and b[0].name in names]
    return found[0] if len(found) == 1 else None


def _returns_output(body: GraphModule, call: Node) -> bool:
    """The body's first output is the call's output 0, through value-preserving steps only."""
    out = body.graph.find_nodes(op="output")[0].args[0]
    if not isinstance(out, (tuple, list)) or not out:
        return False
    node = out[0][0] if isinstance(out[0], (tuple, list)) and out[0] else out[0]
    while isinstance(node, Node) and (c := canonical(node)) is not None and _is_identity(node, c):
        node = c.input
    return (isinstance(node, Node) and node.target is operator.getitem and node.args[0] is call
            and node.args[1] == 0)


def _backward_matches(body: GraphModule, family: _Family, forward: dict) -> bool:
    """The backward body calls the family's backward op with the forward's settings."""
    found = _only_call(body, (family.backward,))
    if found is None:
        return False
    backward = found[2]
    return all(forward[f] == backward[b] for f, b in _SHARED if f in forward and b in backward)


def _inside_reason(args: dict, inside: list[str]) -> str:
    """Why a kernel argument computed inside the autograd.Function keeps the call: flash-attn pads
    q, k and v whose head dim is not a multiple of 8 there; a float Dynamo made dynamic is read
    from a tensor there."""
    tensors = [name for name in inside if isinstance(meta(args[name]), torch.Tensor)]
    if tensors:
        return f"the autograd.Function computes {', '.join(tensors)} itself before the kernel"
    return f"{', '.join(inside)} reach the kernel as values computed inside the autograd.Function (dynamic floats)"


def _autograd_site(node: Node) -> Optional[CallSite]:
    """The site of an ``autograd_function_apply`` whose forward is one flash-attn op call."""
    forward, backward = _body(node, 0), _body(node, 1)
    if forward is None or backward is None:
        return None
    found = _only_call(forward, _FAMILIES)
    if found is None:
        return None
    call, schema, args = found
    family = _FAMILIES[schema.name]
    placeholders = forward.graph.find_nodes(op="placeholder")
    operands = list(node.args[2:])
    if len(placeholders) == len(operands) + 1:  # the body's first input is the autograd ctx
        placeholders = placeholders[1:]
    if len(placeholders) != len(operands):
        return None
    outer = dict(zip(placeholders, operands))
    inside = [name for name, value in args.items() if isinstance(value, Node) and value not in outer]
    if inside:
        cs = CallSite(node, "flash_attn", "bshd", *(operands + [node] * 3)[:3])
        cs.reason = _inside_reason(args, inside)
    else:
        cs = _call_site(node, family, {name: outer.get(value, value) if isinstance(value, Node) else value
                                       for name, value in args.items()})
    cs.erase = [a for a in node.args[:2] if isinstance(a, Node)]
    if cs.reason is None and not _returns_output(forward, call):
        cs.reason = "the autograd.Function's forward returns more than the kernel's output"
    if cs.reason is None and not _backward_matches(backward, family, args):
        cs.reason = "the autograd.Function's backward is not flash-attn's backward of this call"
    return cs


def find_flash_attn_sites(graph: Graph, writes: Writes) -> list[AttentionSite]:
    """Every flash-attn forward op call in ``graph``, called directly or inside an autograd.Function."""
    sites = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _AUTOGRAD_FUNCTION:
            cs, outputs = _autograd_site(node), ("out", "softmax_lse", "S_dmask")
        else:
            bound = bind(node)
            if bound is None or bound[0].name not in _FAMILIES:
                continue
            family = _FAMILIES[bound[0].name]
            cs, outputs = _call_site(node, family, bound[1]), family.outputs
        if cs is None:
            continue
        site = make_site(cs, list(outputs), writes)
        if site is not None:
            sites.append(site)
    return sites


__all__ = ["find_flash_attn_sites"]
