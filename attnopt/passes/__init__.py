"""Graph passes over attention sites. Each is a function of a GraphModule."""
from .lower_attention import Lowered, lower_to_op
from .lower_portable import lower_to_sdpa
from .pipeline import PassResult, SiteReport, optimize_graph

__all__ = ["Lowered", "PassResult", "SiteReport", "lower_to_op", "lower_to_sdpa", "optimize_graph"]
