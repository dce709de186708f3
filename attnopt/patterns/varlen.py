"""Recognise torch's packed-sequence attention, ``torch.nn.attention.varlen.varlen_attn``, which
graphs hold as the custom op ``torch.ops.torch_attn._varlen_attn``.

Its schema differs between torch versions; arguments are read by name from the installed op:

- torch 2.11: ``(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
  scale=None, window_size=None)``;
- torch 2.13: the same, then ``enable_gqa=False, seqused_k=None, block_table=None,
  num_splits=None``, and ``cu_seq_k`` may be None;
- between them, a form with a key/value cache (``k_cache, v_cache, cache_seqlens,
  cache_batch_idx, page_table, seqused_k``).

Mapping: query [T, Hq, D], key/value [T, Hkv, D] packed ("thd"), ``cu_seq_q/k`` and ``max_q/k``
as the offsets and longest lengths, ``scale`` as is; ``is_causal`` and ``window_size`` (left,
right) as the band torch's flash kernels compute (bottom right within each sequence; torch runs
FlashAttention-2 or, once activated, FlashAttention-3, and the band is taken only where both
agree); GQA by head count (query head h reads key/value head h // (Hq / Hkv)), whether or not
``enable_gqa`` says so. The call returns (output, logsumexp, rng_state): a read log-sum-exp (as
torchtitan reads for its output transforms) keeps it as written, as do key lengths, a paged or
appended cache, and ``cu_seq_k=None``. ``num_splits`` changes only the order of the kernel's
sums and is dropped.
"""
from __future__ import annotations

from torch.fx import Graph, Node

from ..fx import Writes
from .calls import CallSite, bind, constant_reason, make_site, number_reason, set_band, unset_reason, value_of
from .site import AttentionSite

_NAME = "torch_attn::_varlen_attn"
_OUTPUTS = ["output", "logsumexp", "rng_state"]
_UNSUPPORTED = {
    "seqused_k": "per-sequence key lengths", "block_table": "a paged key/value cache",
    "k_cache": "a key/value cache", "v_cache": "a key/value cache", "cache_seqlens": "a key/value cache",
    "cache_batch_idx": "a key/value cache", "page_table": "a paged key/value cache",
}


def _varlen_call(node: Node, args: dict) -> CallSite:
    cs = CallSite(node, "varlen", "thd", args["query"], args["key"], args["value"], scale=args["scale"],
                  cu_seqlens_q=args["cu_seq_q"], cu_seqlens_k=args["cu_seq_k"], max_seqlen_q=args["max_q"],
                  max_seqlen_k=args["max_k"])
    cs.reason = constant_reason(args, ("is_causal", "window_size")) or number_reason(args, ("scale",)) \
        or unset_reason(args, _UNSUPPORTED)
    if cs.reason:
        return cs
    if args["cu_seq_k"] is None:
        cs.reason = "cu_seq_k is None (keys laid out by the cache arguments): left as written"
        return cs
    window = args["window_size"] or (-1, -1)
    if len(window) != 2 or any(isinstance(w, Node) or not isinstance(w, int) for w in window):
        cs.reason = f"window_size {window} is not two constants"
        return cs
    equal = args["cu_seq_q"] is args["cu_seq_k"]
    set_band(cs, bool(args["is_causal"]), tuple(window), value_of(args["max_q"]), value_of(args["max_k"]), equal)
    return cs


def find_varlen_sites(graph: Graph, writes: Writes) -> list[AttentionSite]:
    """Every ``torch_attn._varlen_attn`` call in ``graph``."""
    sites = []
    for node in list(graph.nodes):
        bound = bind(node)
        if bound is None or bound[0].name != _NAME:
            continue
        site = make_site(_varlen_call(node, bound[1]), _OUTPUTS, writes)
        if site is not None:
            sites.append(site)
    return sites


__all__ = ["find_varlen_sites"]
