"""A transformers Llama under ``torch.compile(backend="attnopt")``, built from a tiny config (no
download), with ``attnopt.explain`` saying what was found and done, and graph dumps written.

    python examples/transformers_compile.py [--dump-dir DIR]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnopt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-dir", help="where to write before/after graphs (default: a temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    padding = torch.ones_like(tokens)
    padding[1, 12:] = 0  # the second sequence is 12 tokens long: transformers builds a mask in the graph

    print(attnopt.explain(model, tokens, attention_mask=padding), "\n")

    dump_dir = args.dump_dir or tempfile.mkdtemp(prefix="attnopt-dumps-")
    compiled = torch.compile(model, backend=attnopt.backend(dump_dir=dump_dir))
    with torch.no_grad():
        want = model(tokens, attention_mask=padding).logits
        got = compiled(tokens, attention_mask=padding).logits
    err = float((got - want).abs().max())
    print(f"graph dumps (code before/after, diff, report, drawings): {dump_dir}")
    print(f"max abs. difference from eager: {err:.2e}")
    ok = err < 1e-4
    print("numerics check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
