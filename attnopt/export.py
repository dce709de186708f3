"""``attnopt.optimize``: the same passes on a torch.export ExportedProgram."""
from __future__ import annotations

import copy
import warnings
from typing import Union

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument
from torch.fx import GraphModule

from .passes import PassResult, optimize_graph
from .passes.pipeline import _copy, check_target
from .runtime_ops import KERNEL_NAMES


def check_kernel(kernel: str, who: str) -> None:
    """Reject a kernel name the op does not know, before any work is done."""
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"{who}: unknown kernel {kernel!r}; choose from {', '.join(KERNEL_NAMES)}")


def _keep_output_names(gm: GraphModule, ep: ExportedProgram, result: PassResult) -> None:
    """Give each node the graph returns the name ``ep``'s signature has for that output.

    A lowering replaces an attention call that is itself a program output by new nodes with new
    names; the signature refers to outputs by name, and it is the program's interface, so the
    nodes take the old names rather than the signature new ones."""
    (output,) = gm.graph.find_nodes(op="output")
    renamed = {}
    for node, spec in zip(output.args[0], ep.graph_signature.output_specs):
        if not isinstance(spec.arg, TensorArgument) or getattr(node, "name", spec.arg.name) == spec.arg.name:
            continue
        holder = next((n for n in gm.graph.nodes if n.name == spec.arg.name), None)
        if holder is not None:  # a node the output no longer reads still holds the name: move it aside
            holder._rename(f"{spec.arg.name}_unused")
        renamed[node.name] = spec.arg.name
        node.name = spec.arg.name
        gm.graph._graph_namespace._rename_object(node, spec.arg.name)
    for site in result.sites:
        site.new_node = renamed.get(site.new_node, site.new_node)
    gm.recompile()


def _scalar_constants(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """The one-element tensor constants export lifted to inputs (``torch.tensor(0.0)`` in a model),
    by placeholder name: a mask built as ``where(keep, torch.tensor(0.0), fill)`` reads one."""
    out = {}
    for spec in ep.graph_signature.input_specs:
        value = ep.constants.get(spec.target) if spec.kind == InputKind.CONSTANT_TENSOR else None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[spec.arg.name] = value
    return out


def _program(ep: ExportedProgram, gm: GraphModule) -> ExportedProgram:
    """A new program around ``gm`` with ``ep``'s signature, parameters and constants (shared, not
    copied). The module call graph is copied but its TreeSpecs are shared: they are immutable,
    and deep-copying them makes torch warn about its own deprecated LeafSpec on every call."""
    specs = {id(spec): spec for entry in ep.module_call_graph if entry.signature is not None
             for spec in (entry.signature.in_spec, entry.signature.out_spec)}
    return ExportedProgram(root=gm, graph=gm.graph, graph_signature=copy.deepcopy(ep.graph_signature),
                           state_dict=ep.state_dict, range_constraints=copy.deepcopy(ep.range_constraints),
                           module_call_graph=copy.deepcopy(ep.module_call_graph, specs),
                           example_inputs=ep.example_inputs, constants=ep.constants, verifiers=ep.verifiers)


def optimize(ep: ExportedProgram, *, kernel: str = "auto", strict: bool = False, target: str = "auto",
             return_result: bool = False) -> Union[ExportedProgram, tuple[ExportedProgram, PassResult]]:
    """Return a new ExportedProgram with attention lowered: per site to the cheaper exact call,
    plain SDPA on strided views or ``torch.ops.attnopt.attention``, for the device the program was
    traced on (``target="auto"``); to the op everywhere (``target="op"``); or to plain SDPA on
    strided views with ``enable_gqa`` only (``target="portable"``: ATen ops only, so the saved
    program loads where attnopt is not installed).

    The input program is not modified; the new one shares its parameters and constants. Inputs,
    outputs and the graph signature (names included) are unchanged; only nodes inside the graph
    are replaced. A rewrite that the program's verifier rejects falls back to the unchanged
    program with a warning, like any pass failure (``strict=True`` raises instead).
    ``return_result`` also returns the per-site report.
    """
    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"attnopt.optimize expects a torch.export.ExportedProgram, got {type(ep).__name__}")
    check_target(target, kernel)
    check_kernel(kernel, "attnopt.optimize")
    gm, result = optimize_graph(ep.graph_module, kernel=kernel, strict=strict, target=target,
                                constants=_scalar_constants(ep))
    if result.error is None:
        try:
            _keep_output_names(gm, ep, result)
            return (_program(ep, gm), result) if return_result else _program(ep, gm)
        except Exception as e:  # noqa: BLE001 - a rejected rewrite falls back like any pass failure
            if strict:
                raise
            warnings.warn(f"attnopt: the rewritten program failed verification, program left unchanged: "
                          f"{type(e).__name__}: {e}", stacklevel=2)
            result = PassResult(error=f"{type(e).__name__}: {e}")
    new_ep = _program(ep, _copy(ep.graph_module))
    return (new_ep, result) if return_result else new_ep


__all__ = ["PassResult", "check_kernel", "optimize"]
