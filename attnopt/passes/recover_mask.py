"""Replace an explicit attention mask by the structure it was proven to have.

A mask proven to be a causal or sliding-window band (or all true) is dropped and the site gets
``is_causal`` / ``causal_align`` / ``window_size``, which the fast kernels take natively; chunks
become batches of whole chunks, documents packed ``thd`` sequences, and the key limits of a KV
cache (a single query's position, or the number of cached tokens) per-batch key lengths
(``seqused_k``). Key padding with a band becomes the [B, 1, 1, Sk] padding vector the model was
given plus the band's flags: kernels read Sk booleans per batch instead of a dense Sq x Sk mask,
and skip the blocks the band leaves out.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from ..patterns.mask_structure import MaskStructure, analyse_mask
from ..patterns.normalize import meta, op_name, same
from ..patterns.site import AttentionSite


def recover_mask(site: AttentionSite, proofs: Optional[dict] = None) -> Optional[str]:
    """Rewrite ``site``'s mask fields when its mask is a band; return what was found (or None).

    ``proofs`` memoises the mask analysis over one graph: models build one mask and hand it to
    every layer, and the symbolic proof is the costly part of the passes."""
    mask = site.attn_mask
    if mask is None:
        return None
    keep, note = _keep_mask(site)
    if keep is None:
        return note
    key = (keep, bool(site.extra.get("mask_negated")))
    proofs = {} if proofs is None else proofs
    if key not in proofs:
        proofs[key] = analyse_mask(keep, negate=key[1])
    structure = proofs[key]
    if isinstance(structure, str):
        return structure
    q, k = site.query, site.key
    sq, sk = meta(q.source).shape[q.dims.index("s")], meta(k.source).shape[k.dims.index("s")]
    found = structure.describe()
    if meta(mask).dtype != torch.bool and not _rows_keep_a_key(structure):
        return f"{found}: kept as an explicit mask (an additive mask may leave a row without keys)"
    if structure.document is not None and _band_and(structure, "document"):
        why_not = _documents_as_sequences(site, structure, sq, sk)
        if why_not is None:
            return f"{found}: mask removed, documents run as packed sequences (thd)"
        return f"{found}: kept as an explicit mask ({why_not})"
    if structure.chunk is not None and _band_and(structure, "chunk"):
        why_not = _chunks_as_batches(site, structure, sq, sk)
        if why_not is None:
            return f"{found}: mask removed, chunks run as batches"
        return f"{found}: kept as an explicit mask ({why_not})"
    if structure.padding is not None and _band_and(structure, "padding"):
        why_not = _key_padding(site, structure, sq, sk)
        if why_not is None:
            return f"{found}: dense mask removed, key padding passed as a [B, 1, 1, Sk] mask"
        return f"{found}: kept as an explicit mask ({why_not})"
    if structure.cache_offset is not None and _only(structure, "cache_offset"):
        why_not = _cache_lengths(site, structure)
        if why_not is None:
            return f"{found}: mask removed, keys limited per batch (seqused_k), bottom-right causal"
        return f"{found}: kept as an explicit mask ({why_not})"
    if structure.key_limit is not None and _only(structure, "key_limit"):
        why_not = _key_lengths(site, structure, sq)
        if why_not is None:
            return f"{found}: mask removed, keys limited per batch (seqused_k)"
        return f"{found}: kept as an explicit mask ({why_not})"
    if not structure.band_only:
        return f"{found}: kept as an explicit mask"
    band = structure.band(sq, sk)
    if band is None:
        return f"{found}: band not expressible as a causal/window diagonal, kept as an explicit mask"
    _apply_band(site, band)
    return f"{found}: mask removed"


def _apply_band(site: AttentionSite, band: tuple[bool, str, tuple[int, int]]) -> None:
    """Drop the site's mask for the (is_causal, causal_align, window) it was proven to be."""
    site.attn_mask = None
    site.is_causal, site.causal_align, site.window = band
    if site.is_causal and site.window == (-1, 0):
        site.window = (-1, -1)  # is_causal already says "nothing right of the diagonal"


def _chunks_as_batches(site: AttentionSite, structure: MaskStructure, sq: int, sk: int) -> Optional[str]:
    """Turn a chunked (optionally causal-in-chunk) mask into batches of whole chunks when the
    sequence splits evenly; else say why not. Sources in another layout than [B, S, H, D] are
    copied once into it (still far cheaper than an O(S^2) masked kernel)."""
    c = structure.chunk
    if not (isinstance(sq, int) and isinstance(sk, int)) or sq != sk or sq % c:
        return f"chunks need a static self-attention length divisible by {c}"
    if structure.lower is not None or structure.upper not in (None, 0):
        return "chunks with a window inside"
    if meta(site.attn_mask).dtype != torch.bool and structure.upper is None:
        return "additive chunk mask"
    site.attn_mask = None
    site.extra["chunk"] = c
    site.is_causal = structure.upper == 0
    return None


def _documents_as_sequences(site: AttentionSite, structure: MaskStructure, sq: int, sk: int) -> Optional[str]:
    """Same-document self-attention as packed sequences: every document of every row becomes one
    varlen sequence, cut where the position ids stop increasing by exactly 1 (the definition the
    mask was proven to use), with the causal/window band applied inside each sequence."""
    if not same(sq, sk):
        return "documents need self-attention (equal query and key lengths)"
    why_not = _apply_band_part(site, structure, sq, sk)
    if why_not is None:
        site.extra["documents"] = structure.document
    return why_not


def _apply_band_part(site: AttentionSite, structure: MaskStructure, sq: int, sk: int) -> Optional[str]:
    """Give the site the flags of the mask's causal/window terms, or say why they have none."""
    band = MaskStructure(upper=structure.upper, lower=structure.lower).band(sq, sk)
    if band is None:
        return "band not expressible as a causal/window diagonal"
    _apply_band(site, band)
    return None


_TERMS = ("chunk", "document", "padding", "upper", "lower", "key_limit", "cache_offset")


def _only(structure: MaskStructure, limit: str) -> bool:
    """True when ``limit`` is the mask's only term."""
    return not structure.never and all(getattr(structure, f) is None for f in _TERMS if f != limit)


def _band_and(structure: MaskStructure, term: str) -> bool:
    """True when the mask is ``term`` and at most a causal/window band."""
    others = set(_TERMS) - {term, "upper", "lower"}
    return not structure.never and all(getattr(structure, f) is None for f in others)


def _key_padding(site: AttentionSite, structure: MaskStructure, sq: int, sk: int) -> Optional[str]:
    """Key padding AND a band: the band goes to the site's flags and the padding input (nonzero =
    keep) reaches the op as a [B, 1, 1, Sk] mask, the same mask factored."""
    if any(op.dims.count("b") != 1 for op in (site.query, site.key, site.value)):
        return "key padding needs a batch axis"
    why_not = _apply_band_part(site, structure, sq, sk)
    if why_not is None:
        site.extra["key_padding"] = structure.padding
    return why_not


def _inference_only(site: AttentionSite) -> Optional[str]:
    if any(meta(op.source).requires_grad for op in (site.query, site.key, site.value)):
        return "key lengths are lowered for inference only"
    return None


def _key_lengths(site: AttentionSite, structure: MaskStructure, sq: int) -> Optional[str]:
    """Decode over a cache: one query that sees keys k < P[0] + e is a per-batch key length."""
    if sq != 1:
        return "a key limit per query needs a single query position"
    why_not = _inference_only(site)
    if why_not is None:
        site.attn_mask = None
        site.extra["key_limit"] = structure.key_limit
    return why_not


def _cache_lengths(site: AttentionSite, structure: MaskStructure) -> Optional[str]:
    """Queries after L cached tokens that see keys k - q <= L + c: the cache's first L + c + Sq
    keys, bottom-right causal. Exact while 0 <= L + c and L + c + Sq <= Sk, which the lowering
    asserts on the device (a cache that overflowed would otherwise be read differently)."""
    if any(op.dims.count("b") != 1 for op in (site.query, site.key, site.value)):
        return "key lengths need a batch axis"
    why_not = _inference_only(site)
    if why_not is None:
        site.extra["cache_offset"], site.extra["cache_mask"] = structure.cache_offset, site.attn_mask
        site.attn_mask = None
        site.is_causal, site.causal_align, site.window = True, "bottom_right", (-1, -1)
    return why_not


def _rows_keep_a_key(structure: MaskStructure) -> bool:
    """Every query provably keeps at least one key (k == q). A row with none is where an additive
    finfo.min differs from -inf (it averages every key), and where kernels disagree anyway."""
    keeps_diagonal = (structure.upper is None or structure.upper >= 0) and (
        structure.lower is None or structure.lower <= 0)
    return (keeps_diagonal and structure.key_limit is None and structure.cache_offset is None
            and structure.padding is None and not structure.never)


def _is_zero(x: object) -> bool:
    """0, or a graph-made zero scalar tensor (``torch.zeros(())``)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x == 0
    return isinstance(x, Node) and op_name(x) == "zeros" and meta(x) is not None and meta(x).numel() == 1


def _keep_mask(site: AttentionSite) -> tuple[Optional[Node], Optional[str]]:
    """The boolean keep-mask behind the site's mask, when there is one to analyse.

    Hand-written ``masked_fill(mask, -inf)`` masks are negated keep-masks; additive masks built as
    ``where(keep, 0, -inf or finfo.min)`` are keep-masks too; they are rewritten only when every row
    keeps a key (``_rows_keep_a_key``), where a finite minimum and -inf agree.
    """
    mask = site.attn_mask
    value = meta(mask)
    if value.dtype == torch.bool:
        return mask, None
    if op_name(mask) == "where" and len(mask.args) == 3:
        cond, zero, fill = mask.args
        if isinstance(cond, Node) and _is_zero(zero) and isinstance(fill, float) and (
                fill == float("-inf") or fill <= torch.finfo(value.dtype).min):
            return cond, None
    return None, "additive mask not built as where(keep, 0, -inf): kept as an explicit mask"


def erase_dead_masks(gm: GraphModule, masks: list[Node]) -> list[str]:
    """Erase the mask-building subgraphs that no attention call reads any more."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    pending = set()
    stack = [m for m in masks if m.graph is gm.graph]
    while stack:
        n = stack.pop()
        if n in pending or n.op not in ("call_function", "call_method"):
            continue
        pending.add(n)
        stack.extend(a for a in n.all_input_nodes)
    removed = []
    for n in sorted(pending, key=index.get, reverse=True):
        if not n.users and not n.is_impure():
            removed.append(n.name)
            gm.graph.erase_node(n)
    return removed


__all__ = ["MaskStructure", "erase_dead_masks", "recover_mask"]
