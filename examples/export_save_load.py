"""torch.export -> attnopt.optimize -> save -> load -> run, on a transformers-style Llama block.

``target="op"`` puts ``torch.ops.attnopt.attention`` at every site, which picks its kernel on the
device where the program runs (the default, "auto", chooses per site for the device the program was
traced on: on this CPU trace, plain SDPA on views). The saved program calls the op, so loading it
needs ``import attnopt`` (which registers the op); ``python -m attnopt inspect FILE`` reports on the
saved file.

    python examples/export_save_load.py [--out model.pt2]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

import attnopt
from attnopt.demo_model import LlamaBlock
from attnopt.report.explain import ExplainReport, GraphRecord


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to save the optimized program (default: a temporary file)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaBlock(hidden_size=128, num_heads=8, num_kv_heads=2, mlp=256).eval()
    x = torch.randn(2, 32, 128)

    ep = torch.export.export(model, (x,))
    optimized, result = attnopt.optimize(ep, target="op", return_result=True)
    print(ExplainReport.of([GraphRecord(ep.graph_module, optimized.graph_module, result)]), "\n")

    path = args.out or os.path.join(tempfile.mkdtemp(prefix="attnopt-"), "llama_block.pt2")
    torch.export.save(optimized, path)
    loaded = torch.export.load(path)
    calls = sum(n.target is torch.ops.attnopt.attention.default for n in loaded.graph.nodes)
    print(f"saved and reloaded {path}: {calls} attnopt.attention call(s)")

    with torch.no_grad(), attnopt.runtime_ops.trace_kernels() as kernels:
        got = loaded.module()(x)
        want = model(x)
    err = float((got - want).abs().max())
    print(f"kernels that ran: {', '.join(sorted({k.kernel for k in kernels}))}")
    print(f"max abs. difference from eager: {err:.2e}")
    ok = err < 1e-4 and result.lowered == calls == 1
    print("numerics check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
