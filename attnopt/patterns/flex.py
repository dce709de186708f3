"""Recognise ``flex_attention``: graphs hold it as ``torch.ops.higher_order.flex_attention(query,
key, value, score_mod, block_mask, scale, kernel_options, score_mod_other_buffers,
mask_mod_other_buffers)``, at both IR levels, with ``score_mod`` and the BlockMask's ``mask_mod``
as GraphModules reached by ``get_attr`` and ``block_mask`` flattened (``attnopt.masks.mask_mod``).

Mapping: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D/Dv] ("bhsd", traced through layout chains and K/V
repetition like SDPA's operands); GQA by head count (flex's ``enable_gqa`` lets Hq be a multiple of
Hkv, and query head h reads key/value head h // (Hq / Hkv), as the op's GQA does); ``scale`` as the
call passes it (flex fills in 1/sqrt(D) before the call); the mask is the mask_mod under the block
mask, handed to the plan (``AttentionSite.mask_mod``), which proves it as it proves a tensor mask.
A row that keeps no key gets zeros, as in SDPA. The call returns (output, logsumexp, max_scores):
a read log-sum-exp or max keeps it as written, as does a ``score_mod`` other than the identity
(a bias, softcapping, ALiBi), and a block mask made for other lengths or block sizes than its call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Graph, GraphModule, Node

from ..fx import Writes
from ..fx.normalize import meta, same
from ..masks.mask_mod import BLOCK_TENSORS, BlockMaskArgs, MaskMod, read_block_mask
from .calls import CallSite, make_site, number_reason
from .site import AttentionSite

FLEX = torch.ops.higher_order.flex_attention
_OUTPUTS = ["output", "logsumexp", "max_scores"]


def _submodule(graph: Graph, node: Node) -> Optional[GraphModule]:
    """The GraphModule a ``get_attr`` node names."""
    owner = graph.owning_module
    if owner is None or not isinstance(node, Node) or node.op != "get_attr":
        return None
    sub = owner.get_submodule(node.target) if hasattr(owner, "get_submodule") else None
    return sub if isinstance(sub, GraphModule) else None


def _identity_reason(score_mod: Optional[GraphModule]) -> Optional[str]:
    """Why the score_mod is not ``lambda score, b, h, q_idx, kv_idx: score``."""
    if score_mod is None:
        return "score_mod is not a graph"
    placeholders = list(score_mod.graph.find_nodes(op="placeholder"))
    (output,) = score_mod.graph.find_nodes(op="output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    if not placeholders or result is not placeholders[0]:
        return "score_mod modifies the scores (a bias or softcap the op does not take): left as flex_attention"
    return None


def _block_reason(bm: BlockMaskArgs, b, hq, sq, sk) -> Optional[str]:
    """Why the block mask's shape does not fit the call (it was made for other lengths or blocks).
    flex's own mask for a call without one is a single block of 2**30 made for lengths (1, 1)."""
    if not all(isinstance(x, int) for x in (b, hq, sq, sk)):
        return "the block mask is checked at static batch, head and sequence sizes only"
    if min(sq, sk) < 1:
        return "no queries or no keys"
    qb, kb = bm.block_size
    one_block = qb >= sq and kb >= sk
    if not one_block and not (same(bm.seq_lengths[0], sq) and same(bm.seq_lengths[1], sk)):
        return f"block mask made for lengths {bm.seq_lengths}, not the call's ({sq}, {sk})"
    nq, nk = -(-sq // min(qb, sq)), -(-sk // min(kb, sk))
    for i, (name, node) in enumerate(zip(BLOCK_TENSORS, bm.tensors)):
        if node is None:
            continue
        shape = getattr(meta(node), "shape", None)
        rank = 3 if "num_blocks" in name else 4
        if shape is None or len(shape) != rank or not all(isinstance(x, int) for x in shape):
            return f"block mask tensor {name} has no static {rank}-D shape"
        rows = nq if i < 4 else nk  # the kv lists have a row per query block, the q lists per key block
        if shape[0] not in (1, b) or shape[1] not in (1, hq) or shape[2] != rows:
            return f"block mask tensor {name} of shape {list(shape)} does not fit the call's blocks"
    return None


def _flex_call(graph: Graph, node: Node) -> tuple[CallSite, Optional[MaskMod]]:
    query, key, value, score_mod, block_mask, scale, _, score_buffers, mask_buffers = (list(node.args) + [(), ()])[:9]
    cs = CallSite(node, "flex", "bhsd", query, key, value, scale=scale)
    cs.reason = number_reason({"scale": scale}, ("scale",)) or _identity_reason(_submodule(graph, score_mod))
    read = read_block_mask(block_mask) if isinstance(block_mask, tuple) else None
    if read is None:
        cs.reason = cs.reason or "block mask in a form not read"
        return cs, None
    bm, mask_node = read
    mask_graph = _submodule(graph, mask_node)
    cs.erase = [n for n in (score_mod, mask_node) if isinstance(n, Node)]
    vals = [meta(n) for n in (query, key)]
    if mask_graph is None or any(not isinstance(v, torch.Tensor) or v.dim() != 4 for v in vals) \
            or any(not isinstance(n, Node) for n in mask_buffers):
        cs.reason = cs.reason or "mask_mod or q/k not read"
        return cs, None
    sizes = (vals[0].shape[0], vals[0].shape[1], vals[0].shape[2], vals[1].shape[2])
    cs.reason = cs.reason or _block_reason(bm, *sizes)
    return cs, MaskMod(mask_graph, tuple(mask_buffers), bm, sizes)


def find_flex_sites(graph: Graph, writes: Writes) -> list[AttentionSite]:
    """Every flex_attention call in ``graph``, its mask handed over as ``site.mask_mod``."""
    sites = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not FLEX:
            continue
        cs, mask_mod = _flex_call(graph, node)
        site = make_site(cs, _OUTPUTS, writes)
        if site is not None:
            site.mask_mod = mask_mod
            sites.append(site)
    return sites


__all__ = ["FLEX", "find_flex_sites"]
