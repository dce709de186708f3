"""Lower recognised attention sites to plain SDPA on strided views: the "portable" target.

For programs that must load where attnopt is not installed: only ATen ops are emitted. q, k
and v are read as produced through permute views to [B, H, S, D] (SDPA's only layout), K/V
repetition becomes ``enable_gqa=True``, a zero pad of V is dropped (SDPA takes a V head dim
other than q/k's), and the output is permuted to the layout its consumers read. A consumer that
``view``s that output is switched to ``reshape``: the permuted output need not be viewable.
Softcapped scores have no SDPA spelling: such sites stay as written (``sdpa_refusal``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ..patterns.normalize import same, shape
from ..patterns.site import AttentionSite
from .lower_attention import Lowered, _erase_if_dead, _in_layout, _meta_key, _stamp, keep_mask

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default}


def sdpa_causal(site: AttentionSite) -> Optional[bool]:
    """SDPA's ``is_causal`` for the site's causal/window band; None when SDPA cannot express it
    (a bounded window, or bottom-right causal with query and key lengths that may differ)."""
    left, right = site.window
    right = 0 if site.is_causal else right
    if (left, right) == (-1, -1):
        return False
    if (left, right) != (-1, 0):
        return None
    q, k = site.query, site.key
    sq, sk = shape(q.source)[q.dims.index("s")], shape(k.source)[k.dims.index("s")]
    return True if site.causal_align == "top_left" or same(sq, sk) else None


def sdpa_refusal(site: AttentionSite) -> Optional[str]:
    """Why plain SDPA cannot compute ``site`` (None when it can)."""
    if site.softcap:
        return f"softcapping (softcap={site.softcap:g}) has no SDPA argument: left as written for target='portable'"
    return None


def _reshape_views(node: Node) -> None:
    """Let ``node``'s consumers read it whatever its strides: view (to a shape) -> reshape."""
    for user in list(node.users):
        if user.args[0] is not node or any(isinstance(a, torch.dtype) for a in (*user.args, *user.kwargs.values())):
            continue
        if user.op == "call_method" and user.target == "view":
            user.target = "reshape"
        elif user.op == "call_function" and user.target in _VIEWS:
            user.target = aten.reshape.default


def lower_to_sdpa(gm: GraphModule, site: AttentionSite, written_mask: Optional[Node] = None) -> Lowered:
    """Replace ``site`` by aten.scaled_dot_product_attention on views of its sources.

    ``written_mask`` is the explicit mask the site had before mask recovery: it is kept when the
    recovered band is one SDPA cannot express.
    """
    refusal = sdpa_refusal(site)
    if refusal is not None:
        raise ValueError(f"{site.name}: {refusal}")
    key = _meta_key(gm)
    mask, causal = site.attn_mask, sdpa_causal(site)
    if site.extra.get("chunk") or site.extra.get("key_limit") or site.extra.get("cache_offset") \
            or site.extra.get("documents") is not None or site.extra.get("key_padding") is not None:
        causal = None  # chunks, key lengths, documents and padding with a band: keep the mask
    if causal is None:
        if written_mask is None:
            raise ValueError(f"{site.name}: window {site.window} ({site.causal_align}) has no SDPA spelling")
        mask, causal = written_mask, False
    kwargs: dict[str, Any] = {"enable_gqa": True}
    if isinstance(site.dropout_p, Node) or site.dropout_p:
        kwargs["dropout_p"] = site.dropout_p
    if causal:
        kwargs["is_causal"] = True
    if site.scale is not None:
        kwargs["scale"] = site.scale
    out_use = site.output
    with gm.graph.inserting_before(site.node):
        mask = keep_mask(gm, mask, site, key)
        if mask is not None:
            kwargs["attn_mask"] = mask
        q, k, v = (_in_layout(gm, op, "bhsd", key, site) for op in (site.query, site.key, site.value))
        call = gm.graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
        _stamp(call, site, key)
        out = call
        if out_use.layout != "bhsd":
            out = gm.graph.call_function(aten.permute.default, (call, ["bhsd".index(a) for a in out_use.layout]))
            _stamp(out, site, key)
    out_use.node.replace_all_uses_with(out)
    _reshape_views(out)
    chain = set(out_use.skipped)
    site.node.replace_all_uses_with(call, delete_user_cb=lambda u: u not in chain)  # readers of [B, H, S, D]
    dead = [site.node, *out_use.skipped, *site.query.skipped, *site.key.skipped, *site.value.skipped,
            *site.extra.get("chain", [])]
    return Lowered(call, _erase_if_dead(gm, dead))
