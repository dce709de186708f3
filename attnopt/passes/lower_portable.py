"""Lower recognised attention sites to plain SDPA on strided views: the "portable" target.

For programs that must load where attnopt is not installed: only ATen ops are emitted. q, k
and v are read as produced through permute views to [B, H, S, D] (SDPA's only layout), K/V
repetition becomes ``enable_gqa=True``, a zero pad of V is dropped (SDPA takes a V head dim
other than q/k's), and the output is permuted to the layout its consumers read. A consumer that
``view``s that output is switched to ``reshape``: the permuted output need not be viewable.
What SDPA has no argument for (softcapping, a NaN for a row that keeps no key) stays as written
(``sdpa_refusal``); a band SDPA cannot express keeps the mask as written.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ..fx import Builder, erase_if_dead
from ..masks import MaskPlan
from ..masks import lower as masks
from ..fx.normalize import meta, same, shape
from ..patterns.site import AttentionSite
from .lower_attention import Lowered, in_layout

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default}


def sdpa_causal(site: AttentionSite) -> Optional[bool]:
    """SDPA's ``is_causal`` for the plan's band alone; None when SDPA cannot express it (a
    bounded window, bottom-right causal with lengths that may differ, or any plan that needs
    tensors SDPA does not take)."""
    plan = site.plan
    if plan.action not in ("none", "flags", "kept"):
        return None
    flags = plan.flags
    if flags.window == (-1, -1) and not flags.is_causal:
        return False
    if not flags.is_causal or flags.window[0] != -1:
        return None
    q, k = site.query, site.key
    sq, sk = shape(q.source)[q.dims.index("s")], shape(k.source)[k.dims.index("s")]
    return True if flags.causal_align == "top_left" or same(sq, sk) else None


def sdpa_refusal(site: AttentionSite) -> Optional[str]:
    """Why plain SDPA cannot compute ``site`` (None when it can)."""
    if site.softcap:
        return f"softcapping (softcap={site.softcap:g}) has no SDPA argument: left as written for target='portable'"
    if site.sinks is not None:
        return "attention sinks have no SDPA argument: left as written for target='portable'"
    if site.mask_fill is not None and site.mask_fill != float("-inf"):
        return f"a finite fill ({site.mask_fill:g}) has no SDPA argument: left as written for target='portable'"
    if site.cu_seqlens_q is not None:
        return "packed sequences (thd) have no SDPA spelling: left as written for target='portable'"
    if site.plan is not None and site.attn_mask is None and sdpa_causal(site) is None:
        flags = site.plan.flags
        band = f"causal, window {flags.window}" if flags.is_causal else f"window {flags.window}"
        return f"{band} ({flags.causal_align}) has no SDPA spelling: left as written for target='portable'"
    if site.empty_rows != "zero" and site.plan is not None and not site.plan.rows_keep_a_key:
        return ("a query row may keep no key, where the original gives NaN and SDPA zeros: left as written for "
                "target='portable'")
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


def lower_to_sdpa(gm: GraphModule, site: AttentionSite) -> Lowered:
    """Replace ``site`` by aten.scaled_dot_product_attention on views of its sources; where the
    plan needs more than SDPA's flags, the mask as written goes along."""
    refusal = sdpa_refusal(site)
    if refusal is not None:
        raise ValueError(f"{site.name}: {refusal}")
    plan, causal = site.plan, sdpa_causal(site)
    if causal is None:
        if site.attn_mask is None:
            raise ValueError(f"{site.name}: window {plan.flags.window} ({plan.flags.causal_align}) has no SDPA spelling")
        plan = MaskPlan("kept", mask=site.attn_mask, negated=site.mask_negated)
        causal = site.is_causal
    kwargs: dict[str, Any] = {"enable_gqa": True}
    if isinstance(site.dropout_p, Node) or site.dropout_p:
        kwargs["dropout_p"] = site.dropout_p
    if causal:
        kwargs["is_causal"] = True
    if site.scale is not None:
        kwargs["scale"] = site.scale
    out_use = site.output
    build = Builder(gm, site.node)
    with gm.graph.inserting_before(site.node):
        mask = masks.keep_mask(build, plan)
        if mask is not None:
            kwargs["attn_mask"] = mask
        q, k, v = (in_layout(build, op, "bhsd") for op in (site.query, site.key, site.value))
        call = out = build(aten.scaled_dot_product_attention.default, q, k, v, **kwargs)
        if out_use.written:  # the graph writes it in place: not the tensor SDPA keeps for backward, and laid
            # out as the original's [B, H, S, D] output, so that later copies of it copy as they did
            call = out = build(aten.clone.default, call, memory_format=torch.contiguous_format)
        if out_use.layout != "bhsd":
            out = build(aten.permute.default, call, ["bhsd".index(a) for a in out_use.layout])
        if tuple(meta(out).shape) != tuple(meta(out_use.node).shape):  # the readers' view merges axes of it
            out = build(aten.reshape.default, out, list(meta(out_use.node).shape))
    out_use.node.replace_all_uses_with(out)
    _reshape_views(out)
    chain = set(out_use.skipped)
    site.node.replace_all_uses_with(call, delete_user_cb=lambda u: u not in chain)  # readers of [B, H, S, D]
    dead = [site.node, *out_use.skipped, *site.query.skipped, *site.key.skipped, *site.value.skipped, *site.chain]
    return Lowered(call, erase_if_dead(gm, dead, frozenset(site.chain)), {out_use.node: out, site.node: call})
