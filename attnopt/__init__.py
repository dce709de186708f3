"""attnopt: find attention in PyTorch graphs and lower it to one fused, layout-native op.

    model = torch.compile(model, backend="attnopt")
    ep = attnopt.optimize(torch.export.export(model, args))
    print(attnopt.explain(model, *args))
"""
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from . import distributed, runtime_ops  # distributed: the op under DTensor and context parallel
from .backend import backend
from .export import optimize
from .passes import PassResult, SiteReport, optimize_graph
from .report.explain import ExplainReport, explain
from .runtime_ops import attention

__all__ = ["__version__", "ExplainReport", "PassResult", "SiteReport", "attention", "backend", "distributed", "explain", "optimize",
           "optimize_graph", "runtime_ops"]
