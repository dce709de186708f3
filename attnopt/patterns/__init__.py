"""Recognisers: read a graph, propose attention sites in canonical form."""
from .hand_written import find_hand_written_sites
from .mask_structure import MaskStructure, analyse_mask
from .sdpa import find_sdpa_sites
from .site import AttentionSite, Operand, OutputUse

__all__ = ["AttentionSite", "MaskStructure", "Operand", "OutputUse", "analyse_mask", "find_hand_written_sites",
           "find_sdpa_sites"]
