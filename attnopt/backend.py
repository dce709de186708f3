"""The ``torch.compile`` backend: attnopt's passes on Dynamo's graph, then an inner compiler.

``torch.compile(model, backend="attnopt")`` finds this through the ``torch_dynamo_backends``
entry point, so it works without ``import attnopt``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
from torch.fx import GraphModule

from .dump import observe
from .passes import PassResult, optimize_graph
from .passes.pipeline import check_target

CompilerFn = Callable[[GraphModule, list], Callable]


def _inner(inner: Union[str, CompilerFn], options: dict) -> CompilerFn:
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return lambda gm, ex: compile_fx(gm, ex, config_patches=options or None)
    if options:
        raise ValueError(f"attnopt.backend: options {sorted(options)} are only understood by inner='inductor'")
    return torch._dynamo.lookup_backend(inner)


def backend(inner: Union[str, CompilerFn] = "inductor", *, kernel: str = "auto", strict: bool = False,
            target: str = "op", on_result: Optional[Callable[[GraphModule, GraphModule, PassResult], None]] = None,
            dump_dir: Union[str, os.PathLike, None] = None, **inner_options: Any) -> CompilerFn:
    """A torch.compile backend that lowers attention, then compiles with ``inner``.

    ``inner`` is "inductor" (default; ``inner_options`` become Inductor config patches), any
    registered backend name such as "aot_eager", or a backend callable. ``kernel`` forces one
    attention kernel for every site. ``target`` "portable" lowers to plain SDPA on strided views
    with ``enable_gqa`` instead of the attnopt op. ``strict`` turns pass failures into errors
    instead of a warning and the unmodified graph. ``on_result(before, after, result)`` sees
    every graph.
    ``dump_dir`` (default: the ``ATTNOPT_DUMP_DIR`` environment variable, read at each compile)
    gets a ``graph_NNN`` folder per graph with its code before and after, the diff, the report
    and drawings of each attention region.
    """
    check_target(target, kernel)
    compile_inner = _inner(inner, inner_options)

    def attnopt_backend(gm: GraphModule, example_inputs: list) -> Callable:
        new_gm, result = optimize_graph(gm, kernel=kernel, strict=strict, target=target)
        observe(gm, new_gm, result, dump_dir or os.environ.get("ATTNOPT_DUMP_DIR"))
        if on_result is not None:
            on_result(gm, new_gm, result)
        return compile_inner(new_gm, example_inputs)

    return attnopt_backend


default_backend = backend()
