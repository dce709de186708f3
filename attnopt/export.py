"""``attnopt.optimize``: the same passes on a torch.export ExportedProgram."""
from __future__ import annotations

import copy

from torch.export import ExportedProgram

from .passes import PassResult, optimize_graph


def optimize(ep: ExportedProgram, *, kernel: str = "auto", strict: bool = False, target: str = "op",
             return_result: bool = False):
    """Return a new ExportedProgram with attention lowered to ``torch.ops.attnopt.attention``
    (``target="op"``) or to plain SDPA on strided views with ``enable_gqa`` (``target="portable"``:
    ATen ops only, so the saved program loads where attnopt is not installed).

    The input program is not modified. Inputs, outputs, parameters and the graph signature are
    unchanged; only nodes inside the graph are replaced. ``return_result`` also returns the
    per-site report.
    """
    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"attnopt.optimize expects a torch.export.ExportedProgram, got {type(ep).__name__}")
    new_ep = copy.deepcopy(ep)
    gm, result = optimize_graph(new_ep.graph_module, kernel=kernel, strict=strict, target=target)
    if gm is not new_ep.graph_module:
        new_ep.graph_module.graph = gm.graph
        new_ep.graph_module.recompile()
        new_ep.validate()
    return (new_ep, result) if return_result else new_ep


__all__ = ["PassResult", "optimize"]
