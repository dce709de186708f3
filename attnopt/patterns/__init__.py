"""Recognisers: read a graph, propose attention sites in canonical form."""
from .hand_written import find_hand_written_sites
from .sdpa import find_sdpa_sites
from .site import AttentionSite, Operand, OutputUse

__all__ = ["AttentionSite", "Operand", "OutputUse", "find_hand_written_sites", "find_sdpa_sites"]
