"""Recognise ``scaled_dot_product_attention`` calls and the layout chains around them."""
from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..fx import Writes
from ..fx.normalize import meta, same, sdpa_args, shape
from .operands import trace_operands
from .site import AttentionSite


def _symbolic_number(arg) -> bool:
    """A graph value standing for a Python number (Dynamo's symbolic float/int), not a tensor."""
    return isinstance(arg, Node) and isinstance(meta(arg), (torch.SymFloat, torch.SymInt))


def _check(site: AttentionSite, args: dict) -> str | None:
    for name in ("is_causal", "enable_gqa"):
        if isinstance(args[name], Node):
            return f"{name} is computed in the graph, not a constant"
    for name in ("dropout_p", "scale"):
        if isinstance(args[name], Node) and not _symbolic_number(args[name]):
            return f"{name} is computed in the graph from a tensor"
    vals = [meta(args[n]) for n in ("query", "key", "value")]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return "q/k/v carry no shape metadata"
    if any(v.dim() != 4 for v in vals):
        return "q/k/v are not 4-D [B, H, S, D] tensors"
    if not all(v.is_floating_point() for v in vals):
        return "q/k/v are not floating point"
    mask = args["attn_mask"]
    if mask is not None:
        if not isinstance(mask, Node) or not isinstance(meta(mask), torch.Tensor):
            return "attn_mask is not a tensor in the graph"
    hq, hk = shape(site.query.source)[site.query.dims.index("h")], shape(site.key.source)[site.key.dims.index("h")]
    hq_sdpa, hk_sdpa = vals[0].shape[1], vals[1].shape[1]
    if not all(same(v.shape[0], vals[0].shape[0]) for v in vals[1:]):
        return "q, k and v differ in batch size (SDPA broadcasts it; the op does not)"
    if not args["enable_gqa"] and hk_sdpa != hq_sdpa and hk_sdpa != 1:
        return f"SDPA would reject {hq_sdpa} query heads with {hk_sdpa} key heads"
    if hq % hk != 0:
        return f"{hq} query heads are not a multiple of {hk} key/value heads"
    return None


def find_sdpa_sites(graph: Graph, writes: Writes) -> list[AttentionSite]:
    """Every SDPA call in ``graph``, with operands traced to their sources where provable."""
    sites = []
    for node in graph.nodes:
        args = sdpa_args(node)
        if args is None:
            continue
        site = AttentionSite(node, "sdpa", attn_mask=args["attn_mask"])
        sites.append(site)
        if any(isinstance(args[n], Node) and not _symbolic_number(args[n]) for n in ("dropout_p", "is_causal",
                                                                                       "scale", "enable_gqa")):
            site.skip_reason = _check(site, args)
            continue
        site.query, site.key, site.value, output = trace_operands(node, args["query"], args["key"], args["value"],
                                                                          writes)
        site.skip_reason = _check(site, args)
        if site.skip_reason:
            continue
        site.dropout_p, site.is_causal, site.scale = args["dropout_p"], bool(args["is_causal"]), args["scale"]
        site.output = output
    return sites
