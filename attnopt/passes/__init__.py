"""Graph passes over attention sites. Each is a function of a GraphModule."""
from .lower_attention import Lowered, lower_to_op
from .pipeline import PassResult, SiteReport, optimize_graph

__all__ = ["Lowered", "PassResult", "SiteReport", "lower_to_op", "optimize_graph"]
