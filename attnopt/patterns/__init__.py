"""Recognisers: read a graph, propose attention sites in canonical form."""
from .sdpa import find_sdpa_sites
from .site import AttentionSite, Operand, OutputUse

__all__ = ["AttentionSite", "Operand", "OutputUse", "find_sdpa_sites"]
