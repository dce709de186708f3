"""The ``torch.compile`` backend: attnopt's passes on Dynamo's graph, then an inner compiler.

``torch.compile(model, backend="attnopt")`` finds this through the ``torch_dynamo_backends``
entry point, so it works without ``import attnopt``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch.fx import GraphModule

from .export import check_kernel
from .passes import PassResult, optimize_graph
from .passes.pipeline import check_target
from .report.dump import observe, reporting

CompilerFn = Callable[[GraphModule, list], Callable]


def _inner(inner: Union[str, CompilerFn], options: dict) -> Callable[..., Callable]:
    """The inner compiler ``inner`` names, checked now rather than at the first compile. It takes
    torch.compile's ``mode`` and ``options`` as Inductor does; other compilers refuse them."""
    if callable(inner) or inner != "inductor":
        if options:
            raise ValueError(f"attnopt.backend: options {sorted(options)} are only understood by inner='inductor'")
        compiler = _named(inner)
        name = inner if isinstance(inner, str) else getattr(inner, "__name__", repr(inner))

        def other(gm: GraphModule, example_inputs: list, mode: Optional[str] = None,
                  options: Optional[dict] = None) -> Callable:
            if mode not in (None, "default") or options:
                raise ValueError(f"attnopt: torch.compile's mode= and options= are Inductor's; this attnopt "
                                 f"backend compiles with {name!r} (attnopt.backend(inner='inductor') takes them)")
            return compiler(gm, example_inputs)

        return other
    from torch._inductor import config

    unknown = sorted(set(options) - set(config.get_config_copy()))
    if unknown:
        raise ValueError(f"attnopt.backend: {unknown} are not Inductor options (torch._inductor.config)")
    patches = dict(options)

    def inductor(gm: GraphModule, example_inputs: list, mode: Optional[str] = None,
                 options: Optional[dict] = None) -> Callable:
        # the config torch.compile(backend="inductor", mode=..., options=...) patches (checked as
        # torch checks it), with the backend's own options over it
        from torch._inductor.compile_fx import compile_fx

        config = torch._TorchCompileInductorWrapper(mode, options, None).config
        return compile_fx(gm, example_inputs, config_patches={**config, **patches} or None)

    return inductor


def _named(inner: Union[str, CompilerFn]) -> CompilerFn:
    if callable(inner):
        return inner
    if not isinstance(inner, str):
        raise TypeError(f"attnopt.backend: inner must be a backend name or a callable, got {type(inner).__name__}")
    if inner == "attnopt":
        raise ValueError("attnopt.backend: inner='attnopt' would run attnopt's passes twice; name the compiler "
                         "that should run after them, such as 'inductor' or 'aot_eager'")
    try:
        return torch._dynamo.lookup_backend(inner)
    except torch._dynamo.exc.InvalidBackend:
        raise ValueError(f"attnopt.backend: inner {inner!r} is not a torch.compile backend (one of "
                         f"torch._dynamo.list_backends(), or a compiler function)") from None


def backend(inner: Union[str, CompilerFn] = "inductor", *, kernel: str = "auto", strict: bool = False,
            target: str = "auto", on_result: Optional[Callable[[GraphModule, GraphModule, PassResult], None]] = None,
            dump_dir: Union[str, os.PathLike, None] = None, **inner_options: Any) -> CompilerFn:
    """A torch.compile backend that lowers attention, then compiles with ``inner``.

    ``inner`` is "inductor" (default; ``inner_options`` become Inductor config patches, and
    torch.compile's ``mode=`` and ``options=`` reach it as they reach Inductor, so
    ``mode="reduce-overhead"`` captures CUDA graphs), any registered backend name such as
    "aot_eager", or a backend callable. ``target`` "auto" (default) lowers each site to the cheaper
    exact call, plain SDPA on strided views or the attnopt op; "op" to the op everywhere;
    "portable" to plain SDPA on strided views with ``enable_gqa`` only. ``kernel`` forces one
    attention kernel for every site (the op everywhere). ``strict`` turns pass failures into errors
    instead of a warning and the unmodified graph. ``on_result(before, after, result)`` sees
    every graph.
    ``dump_dir`` (default: the ``ATTNOPT_DUMP_DIR`` environment variable, read at each compile)
    gets a ``graph_NNN`` folder per graph with its code before and after, the diff, the report,
    drawings of each attention region and an ``index.html`` page of them.

    Every argument is checked here, so a mistake fails where the backend is built, with a
    ``ValueError``/``TypeError`` naming it, not at the first compile.
    """
    if not isinstance(kernel, str):
        raise TypeError(f"attnopt.backend: kernel must be a string, got {type(kernel).__name__}")
    check_kernel(kernel, "attnopt.backend")
    check_target(target, kernel)
    if not isinstance(strict, bool):
        raise TypeError(f"attnopt.backend: strict must be True or False, got {strict!r}")
    if on_result is not None and not callable(on_result):
        raise TypeError(f"attnopt.backend: on_result must be callable, got {type(on_result).__name__}")
    if dump_dir is not None:
        if not isinstance(dump_dir, (str, os.PathLike)):
            raise TypeError(f"attnopt.backend: dump_dir must be a path, got {type(dump_dir).__name__}")
        if Path(dump_dir).exists() and not Path(dump_dir).is_dir():
            raise ValueError(f"attnopt.backend: dump_dir {str(dump_dir)!r} exists and is not a folder")
    compile_inner = _inner(inner, inner_options)

    def attnopt_backend(gm: GraphModule, example_inputs: list, **compile_options: Any) -> Callable:
        """``compile_options``: torch.compile's ``mode`` and ``options``, for the inner compiler."""
        dump = dump_dir or os.environ.get("ATTNOPT_DUMP_DIR")
        new_gm, result = optimize_graph(gm, kernel=kernel, strict=strict, target=target,
                                        report=on_result is not None or reporting(dump))
        observe(gm, new_gm, result, dump)
        if on_result is not None:
            on_result(gm, new_gm, result)
        return compile_inner(new_gm, example_inputs, **compile_options)

    return attnopt_backend


default_backend = backend()
