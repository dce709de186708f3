"""attnopt: find attention in PyTorch graphs and lower it to one fused, layout-native op.

    model = torch.compile(model, backend="attnopt")
    ep = attnopt.optimize(torch.export.export(model, args))
    print(attnopt.explain(model, *args))
"""
from . import distributed, runtime_ops  # distributed: the op under DTensor and context parallel
from .backend import backend
from .explain import ExplainReport, explain
from .export import optimize
from .passes import PassResult, SiteReport, optimize_graph
from .runtime_ops import attention

__version__ = "0.1.0"

__all__ = ["ExplainReport", "PassResult", "SiteReport", "attention", "backend", "distributed", "explain", "optimize",
           "optimize_graph", "runtime_ops"]
