"""Attention masks: interpret the subgraph that builds one (typed, write-aware), split it into a
typed structure, plan what the site runs instead, and build the tensors the plan needs.

    interpret.py  -> structure.py  -> plan.py  -> lower.py
"""
from .interpret import Unproven, interpret
from .plan import ACTIONS, BandFlags, MaskPlan, MaskRequest, band_flags, plan_mask
from .structure import Band, MaskStructure, structure_of

__all__ = ["ACTIONS", "Band", "BandFlags", "MaskPlan", "MaskRequest", "MaskStructure", "Unproven", "band_flags",
           "interpret", "plan_mask", "structure_of"]
