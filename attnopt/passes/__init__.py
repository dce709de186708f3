"""Graph passes over attention sites. Each is a function of a GraphModule."""
from .lower_attention import Lowered, lower_to_op
from .lower_portable import lower_to_sdpa
from .pipeline import PassResult, SiteReport, optimize_graph
from .recover_mask import erase_dead_masks, recover_mask

__all__ = ["Lowered", "PassResult", "SiteReport", "erase_dead_masks", "lower_to_op", "lower_to_sdpa", "optimize_graph",
           "recover_mask"]
