"""Command line (``python -m attnopt`` or the ``attnopt`` script): ``demo``, and ``inspect`` /
``optimize`` for torch.export ``.pt2`` files.

Every error is one line on stderr and a non-zero exit status (2 for a wrong command line, 1 for
the rest), never a traceback: a user handing over the wrong file needs to know which file and
why, not where in torch it was noticed. Arguments and output paths are checked before any work.
Files are read with ``torch.export.load`` and nothing else; a program whose inputs or outputs are
types registered with torch's pytree by another package (transformers' ``ModelOutput`` classes,
imported automatically, or any module named with ``--import``) loads once that package is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Iterator, NoReturn, Optional

import torch
from torch.export import ExportedProgram

from . import __version__
from .export import optimize
from .passes.pipeline import TARGETS
from .report.accounting import is_attnopt_call
from .report.dump import graphviz_note
from .report.explain import ExplainReport, GraphRecord, explain

# Packages whose pytree types a .pt2 file may name and whose modules are imported to read it;
# anything else is imported only when the user names it with --import.
AUTO_IMPORT = ("transformers",)
_UNREGISTERED = re.compile(r"Deserializing (?P<type>[\w.]+) in pytree is not registered")


class CliError(Exception):
    """A problem to report in one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (argparse prints the usage, then the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"attnopt: error: {message} (see `{self.prog} --help`)\n")


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message: torch's messages go on to advice for its own devs."""
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    text = text.split(". ", 1)[0]
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[BufferingHandler]:
    """Hold back what torch.export.load and save log and warn: on a bad file load logs a traceback,
    then raises a vaguer error (the held-back record names the real cause), and on good files
    some torch versions warn about their own buffers."""
    logger = logging.getLogger("torch.export")
    held = BufferingHandler(capacity=1000)
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [held], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield held
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _import(module: str, why: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a module that fails to import, for any reason, is one line
        raise CliError(f"cannot import {module}{why} ({type(e).__name__}: {_first_line(e)})") from e


def _load_once(path: str) -> ExportedProgram:
    """``torch.export.load``; a failure raises CliError, or LookupError naming a pytree type that
    is not registered."""
    with _quiet_torch_export() as held:
        try:
            return torch.export.load(path)
        except Exception as e:  # noqa: BLE001 - any failure to load means "not a usable .pt2"
            causes = [r.exc_info[1] for r in held.buffer if r.exc_info and r.exc_info[1] is not None] + [e]
            for cause in causes:
                match = _UNREGISTERED.search(str(cause))
                if match:
                    raise LookupError(match["type"]) from e
            raise CliError(f"{path}: not a torch.export program ({_first_line(causes[0])})") from e


def _load(path: str) -> ExportedProgram:
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise CliError(f"{path}: not a file")
    imported: set[str] = set()
    while True:
        try:
            ep = _load_once(path)
            break
        except LookupError as e:
            kind = str(e.args[0])
            module = kind.rpartition(".")[0]
            if module.split(".")[0] not in AUTO_IMPORT or module in imported:
                raise CliError(f"{path}: its inputs or outputs are of type {kind}, which torch's pytree does not "
                               f"know; pass --import MODULE naming the module that registers it") from None
            _import(module, f" to read {path}, whose inputs or outputs are of type {kind}")
            imported.add(module)
    if not isinstance(ep, ExportedProgram):
        raise CliError(f"{path}: holds a {type(ep).__name__}, not a torch.export program")
    return ep


def _writable_folder(path: Path, what: str) -> None:
    """Raise unless ``path`` is, or can be made, a folder to write in."""
    if path.exists() and not path.is_dir():
        raise CliError(f"{what}: {path} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise CliError(f"{what}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{what}: {existing} is not writable")


def _check_output_file(output: str) -> None:
    path = Path(output)
    if path.is_dir():
        raise CliError(f"{output}: is a folder; name the .pt2 file to write")
    if path.suffix != ".pt2":
        raise CliError(f"{output}: the output must be a .pt2 file (torch.export.load reads .pt2 files)")
    _writable_folder(path.parent.absolute(), f"{output}: cannot save")


def _import_modules(modules: Optional[list[str]]) -> None:
    for module in modules or []:
        _import(module, " (--import)")


def inspect_file(args: argparse.Namespace) -> int:
    """Print the explain report of a saved program; with --out, also write its dumps."""
    if args.out:
        _writable_folder(Path(args.out).absolute(), f"{args.out}: cannot write dumps")
    _import_modules(args.imports)
    report = explain(_load(args.model))
    print(report)
    if args.out:
        try:
            folders = report.dump(args.out)
        except OSError as e:
            raise CliError(f"{args.out}: cannot write dumps ({_first_line(e)})") from e
        pages = ", ".join(str(f / "index.html") for f in folders)
        print(f"\nwrote {pages} (the report and a drawing of each attention region before and after), with "
              f"before.py, after.py, diff.patch, report.txt, report.json and the drawings as .dot files")
        note = graphviz_note()
        if note:
            print(note)
    return 0


def optimize_file(args: argparse.Namespace) -> int:
    """Optimize a saved program and save the result; print what was done."""
    _check_output_file(args.output)
    _import_modules(args.imports)
    ep = _load(args.input)
    new_ep, result = optimize(ep, return_result=True, target=args.target)
    print(ExplainReport.of([GraphRecord(ep.graph_module, new_ep.graph_module, result)]))
    try:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with _quiet_torch_export():
            torch.export.save(new_ep, args.output)
    except Exception as e:  # noqa: BLE001 - report any failure to write in one line
        raise CliError(f"{args.output}: cannot save ({type(e).__name__}: {_first_line(e)})") from e
    needs = "loading it needs `import attnopt`" if any(map(is_attnopt_call, new_ep.graph.nodes)) \
        else "loads with plain torch"
    print(f"\nsaved {args.output} ({needs})")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Compile a transformers-style Llama block with attnopt; check forward and backward."""
    import attnopt
    from attnopt.demo_model import LlamaBlock

    graphs: list[tuple] = []
    try:
        backend = attnopt.backend(args.inner, on_result=lambda b, a, r: graphs.append((b, a, r)))
    except (TypeError, ValueError) as e:
        raise CliError(f"--inner: {str(e).removeprefix('attnopt.backend: inner ')}") from e
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaBlock(hidden_size=256, num_heads=8, num_kv_heads=2, mlp=512).to(device, dtype)
    x = torch.randn(2, 128, 256, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(model, backend=backend)

    def run(fn):
        x.grad = None
        model.zero_grad()
        out = fn(x)
        out.float().square().mean().backward()
        return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run(model)
    with attnopt.runtime_ops.trace_kernels() as calls:
        out, grads = run(compiled)
    print(f"attnopt demo: transformers-style Llama block (GQA 8/2 heads, repeat_kv, transposes, .contiguous()), "
          f"{device}, {dtype}, inner compiler {args.inner}\n")
    print(f"{ExplainReport.of([GraphRecord(*graphs[-1], training=model.training)])}\n")
    ran = ", ".join(sorted({f'{c.direction}={c.kernel}' for c in calls}))
    print("kernels that ran: " + (ran or "torch's SDPA (no attnopt.attention call)"))
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
    out_err = rel(out, ref_out)
    grad_err = max(rel(g, w) for g, w in zip(grads, ref_grads))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = out_err < tol and grad_err < tol
    print(f"forward  max rel. error vs eager: {out_err:.2e}")
    print(f"backward max rel. error vs eager: {grad_err:.2e} (input and all parameter grads)")
    print("numerics check: " + ("PASS" if ok else "FAIL") + f" (tolerance {tol:g})")
    return 0 if ok and graphs[-1][2].lowered else 1


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="attnopt", description="attnopt: fused attention for PyTorch graphs")
    top.add_argument("--version", action="version", version=f"attnopt {__version__} (torch {torch.__version__})")
    sub = top.add_subparsers(dest="command", required=True, metavar="{demo,inspect,optimize}")
    p = sub.add_parser("demo", help="compile a built-in Llama block with attnopt and check numerics")
    p.add_argument("--inner", default="inductor", help="inner torch.compile backend (default: inductor)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.set_defaults(func=demo)
    imports = dict(action="append", dest="imports", metavar="MODULE",
                   help="import MODULE first: one that registers a pytree type the program's inputs or outputs use "
                        "(repeatable; transformers' types need no flag)")
    p = sub.add_parser("inspect", help="report the attention sites of a torch.export .pt2 file")
    p.add_argument("model", help="a file written by torch.export.save")
    p.add_argument("--out", metavar="DIR", help="also write index.html, before/after code, diff, report and "
                                                "drawings to this folder")
    p.add_argument("--import", **imports)
    p.set_defaults(func=inspect_file)
    p = sub.add_parser("optimize", help="lower attention in a .pt2 file and save the result")
    p.add_argument("input", help="a file written by torch.export.save")
    p.add_argument("output", help="where to save the optimized program (a .pt2 file)")
    p.add_argument("--target", choices=TARGETS, default="auto",
                   help="auto: per site, plain SDPA on views or attnopt.attention, whichever is cheaper on the device "
                        "the program was traced on; op: attnopt.attention at every site (its kernel is picked where "
                        "the program runs); portable: plain SDPA only, which loads without attnopt")
    p.add_argument("--import", **imports)
    p.set_defaults(func=optimize_file)
    return top


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        message = str(e)
    except KeyboardInterrupt:
        message = "interrupted"
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        message = f"{args.command} failed: {type(e).__name__}: {_first_line(e)}"
    print(f"attnopt: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
