"""Recognisers: read a graph, propose attention sites in canonical form.

``RECOGNISERS`` is the one list of them, one per family of attention calls; the passes run each
over a graph (``find_sites``).
"""
from __future__ import annotations

from typing import Callable

from torch.fx import Graph

from ..fx import Writes
from .aten_sdpa import find_aten_sdpa_sites
from .flash_attn import find_flash_attn_sites
from .flex import find_flex_sites
from .hand_written import find_hand_written_sites
from .sdpa import find_sdpa_sites
from .site import AttentionSite, Operand, OutputUse
from .varlen import find_varlen_sites

Recogniser = Callable[[Graph, Writes], list[AttentionSite]]

RECOGNISERS: tuple[Recogniser, ...] = (
    find_sdpa_sites,  # F.scaled_dot_product_attention
    find_aten_sdpa_sites,  # aten's fused SDPA kernels, aten._flash_attention_forward
    find_varlen_sites,  # torch.nn.attention.varlen.varlen_attn
    find_flash_attn_sites,  # the flash-attn package (2.x and 3)
    find_flex_sites,  # torch.nn.attention.flex_attention
    find_hand_written_sites,  # softmax(q @ kᵀ) @ v
)


def find_sites(graph: Graph, writes: Writes) -> list[AttentionSite]:
    """The sites every recogniser finds in ``graph``."""
    return [site for recognise in RECOGNISERS for site in recognise(graph, writes)]


__all__ = ["RECOGNISERS", "AttentionSite", "Operand", "OutputUse", "find_aten_sdpa_sites", "find_flash_attn_sites",
           "find_flex_sites", "find_hand_written_sites", "find_sdpa_sites", "find_sites", "find_varlen_sites"]
