"""Command line (``python -m attnopt`` or the ``attnopt`` script): ``demo``, and ``inspect`` /
``optimize`` for torch.export ``.pt2`` files.

File commands fail with one line on stderr and exit status 1, never a traceback: a user handing
over the wrong file needs to know which file and why, not where in torch it was noticed. Files
are read with ``torch.export.load`` and nothing else.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import sys
import warnings
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Iterator

import torch
from torch.export import ExportedProgram

from .dump import graphviz_note
from .explain import ExplainReport, GraphRecord, explain
from .export import optimize


class CliError(Exception):
    """A problem to report in one line."""


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message: torch's messages go on to advice for its own devs."""
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    text = text.split(". ", 1)[0]
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet_export_log() -> Iterator[BufferingHandler]:
    """Hold back what torch.export.load logs: on a bad file it logs a traceback, then raises a
    vaguer error; the held-back record names the real cause."""
    logger = logging.getLogger("torch.export")
    held = BufferingHandler(capacity=1000)
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [held], False
    try:
        yield held
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _load(path: str) -> ExportedProgram:
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise CliError(f"{path}: not a file")
    with _quiet_export_log() as held:
        try:
            ep = torch.export.load(path)
        except Exception as e:  # noqa: BLE001 - any failure to load means "not a usable .pt2"
            causes = [r.exc_info[1] for r in held.buffer if r.exc_info and r.exc_info[1] is not None]
            cause = causes[-1] if causes else e
            raise CliError(f"{path}: not a torch.export program ({_first_line(cause)})") from e
    if not isinstance(ep, ExportedProgram):
        raise CliError(f"{path}: holds a {type(ep).__name__}, not a torch.export program")
    return ep


def inspect_file(args: argparse.Namespace) -> int:
    """Print the explain report of a saved program; with --out, also write its dumps."""
    report = explain(_load(args.model))
    print(report)
    if args.out:
        try:
            folders = report.dump(args.out)
        except OSError as e:
            raise CliError(f"{args.out}: cannot write dumps ({_first_line(e)})") from e
        print(f"\nwrote {', '.join(str(f) for f in folders)}: before.py, after.py, diff.patch, report.txt, "
              f"report.json, and a drawing of each attention region before and after")
        note = graphviz_note()
        if note:
            print(note)
    return 0


def optimize_file(args: argparse.Namespace) -> int:
    """Optimize a saved program and save the result; print what was done."""
    ep = _load(args.input)
    options = {}
    if args.portable:
        if "target" not in inspect.signature(optimize).parameters:
            raise CliError("--portable needs attnopt.optimize(target='portable'), which this attnopt does not have yet")
        options["target"] = "portable"
    new_ep, result = optimize(ep, return_result=True, **options)
    print(ExplainReport.of([GraphRecord(ep.graph_module, new_ep.graph_module, result)]))
    try:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(new_ep, args.output)
    except Exception as e:  # noqa: BLE001 - report any failure to write in one line
        raise CliError(f"{args.output}: cannot save ({type(e).__name__}: {_first_line(e)})") from e
    needs = "loads with plain torch" if args.portable else "loading it needs `import attnopt`"
    print(f"\nsaved {args.output} ({needs})")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Compile a transformers-style Llama block with attnopt; check forward and backward."""
    import attnopt
    from attnopt.demo_model import LlamaBlock

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaBlock(hidden_size=256, num_heads=8, num_kv_heads=2, mlp=512).to(device, dtype)
    x = torch.randn(2, 128, 256, device=device, dtype=dtype, requires_grad=True)
    graphs: list[tuple] = []
    compiled = torch.compile(model, backend=attnopt.backend(args.inner, on_result=lambda b, a, r: graphs.append((b, a, r))))

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
    print(f"{ExplainReport.of([GraphRecord(*graphs[-1])])}\n")
    print("kernels that ran: " + ", ".join(sorted({f'{c.direction}={c.kernel}' for c in calls})))
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
    out_err = rel(out, ref_out)
    grad_err = max(rel(g, w) for g, w in zip(grads, ref_grads))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = out_err < tol and grad_err < tol
    print(f"forward  max rel. error vs eager: {out_err:.2e}")
    print(f"backward max rel. error vs eager: {grad_err:.2e} (input and all parameter grads)")
    print("numerics check: " + ("PASS" if ok else "FAIL") + f" (tolerance {tol:g})")
    return 0 if ok and graphs[-1][2].lowered else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnopt", description="attnopt: fused attention for PyTorch graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a built-in Llama block with attnopt and check numerics")
    p.add_argument("--inner", default="inductor", help="inner torch.compile backend (default: inductor)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.set_defaults(func=demo)
    p = sub.add_parser("inspect", help="report the attention sites of a torch.export .pt2 file")
    p.add_argument("model", help="a file written by torch.export.save")
    p.add_argument("--out", help="also write before/after code, diff, report and drawings to this folder")
    p.set_defaults(func=inspect_file)
    p = sub.add_parser("optimize", help="lower attention in a .pt2 file and save the result")
    p.add_argument("input", help="a file written by torch.export.save")
    p.add_argument("output", help="where to save the optimized program")
    p.add_argument("--portable", action="store_true",
                   help="emit plain SDPA that loads without attnopt instead of attnopt.attention")
    p.set_defaults(func=optimize_file)
    args = parser.parse_args(argv)
    # torch's own deprecation noise from deep-copying exported programs, not the user's concern
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    try:
        return args.func(args)
    except CliError as e:
        print(f"attnopt: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
