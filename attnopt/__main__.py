"""Command line: ``python -m attnopt demo`` (or the ``attnopt`` script)."""
from __future__ import annotations

import argparse
import sys

import torch

from .passes import PassResult


def _table(result: PassResult) -> str:
    rows = [("site", "status", "q layout", "kv layout", "out", "heads q/kv", "causal", "removed / reason")]
    for s in result.sites:
        heads = f"{s.heads[0]}/{s.heads[1]}" if s.heads else "-"
        detail = f"{len(s.removed)} nodes: {', '.join(s.removed)}" if s.status == "lowered" else s.reason
        rows.append((s.name, s.status, s.layout or "-", s.kv_layout or "-", s.out_layout or "-", heads,
                     str(s.is_causal), detail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def demo(args: argparse.Namespace) -> int:
    """Compile a transformers-style Llama block with attnopt; check forward and backward."""
    import attnopt
    from attnopt.demo_model import LlamaBlock

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = LlamaBlock(hidden_size=256, num_heads=8, num_kv_heads=2, mlp=512).to(device, dtype)
    x = torch.randn(2, 128, 256, device=device, dtype=dtype, requires_grad=True)
    results: list[PassResult] = []
    compiled = torch.compile(model, backend=attnopt.backend(args.inner, on_result=lambda b, a, r: results.append(r)))

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
    print(_table(results[-1]) + "\n")
    print("kernels that ran: " + ", ".join(sorted({f'{c.direction}={c.kernel}' for c in calls})))
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
    out_err = rel(out, ref_out)
    grad_err = max(rel(g, w) for g, w in zip(grads, ref_grads))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = out_err < tol and grad_err < tol
    print(f"forward  max rel. error vs eager: {out_err:.2e}")
    print(f"backward max rel. error vs eager: {grad_err:.2e} (input and all parameter grads)")
    print("numerics check: " + ("PASS" if ok else "FAIL") + f" (tolerance {tol:g})")
    return 0 if ok and results[-1].lowered else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnopt", description="attnopt: fused attention for PyTorch graphs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile a built-in Llama block with attnopt and check numerics")
    p.add_argument("--inner", default="inductor", help="inner torch.compile backend (default: inductor)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
