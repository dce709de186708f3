"""Real model code, tiny random configs: every attention site is rewritten under torch.compile
and under torch.export + attnopt.optimize, and forward and backward match eager.

transformers builds its causal mask in the graph; mask recovery (another pass) may turn it into
``is_causal``/a window, or keep it as an explicit mask: either way the site must be lowered.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import Capture

from .helpers import check_compiled, check_exported
from .zoo import MODELS, build

# (gqa group, q layout, output layout) every site of the model must show once lowered
EXPECTED = {
    "llama": (2, "bhsd", "bshd"), "qwen3": (2, "bhsd", "bshd"), "mistral": (2, "bhsd", "bshd"),
    "gpt2": (1, "bshd", "bshd"), "deepseek_v3": (1, "bhsd", "bshd"),
    "titan_qwen3": (2, "bshd", "bshd"), "megatron": (2, "sbhd", "sbhd"), "megatron_seed": (2, "sbhd", "sbhd"),
    "timm_vit": (1, "bhsd", "bshd"), "padded_mla": (1, "bshd", "bshd"),
}


def _assert_sites(name: str, sites) -> None:
    group, layout, out_layout = EXPECTED[name]
    assert sites and all(s.status == "lowered" for s in sites), [(s.name, s.reason) for s in sites]
    assert {(s.gqa_group, s.layout, s.out_layout) for s in sites} == {(group, layout, out_layout)}


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_is_rewritten_and_matches_eager(name):
    model, inputs = build(name)
    _assert_sites(name, check_compiled(model, inputs))


@pytest.mark.parametrize("name", MODELS)
def test_exported_model_is_rewritten_and_matches_eager(name):
    model, inputs = build(name)
    _, sites = check_exported(model, inputs)
    _assert_sites(name, sites)


def test_mla_heads_are_reported_unpadded():
    model, inputs = build("padded_mla")
    _, (site,) = check_exported(model, inputs)
    assert site.head_dims == (24, 16) and site.heads == (4, 4)


@pytest.mark.parametrize("name", ["llama", "titan_qwen3", "megatron"])
def test_dynamic_batch_and_sequence_keep_the_rewrite_without_recompiles(name):
    model, (x,) = build(name)
    capture = Capture("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=capture.backend, dynamic=True)
    compiled(x)
    graphs = len(capture.graphs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in ((3, 5), (4, 9)):  # [B, S] (Megatron: [S, B])
            y = torch.randn(*size, x.shape[-1], dtype=x.dtype, requires_grad=True)
            torch.testing.assert_close(compiled(y), model(y))
    assert len(capture.graphs) == graphs
    _assert_sites(name, [s for _, _, result in capture.graphs for s in result.sites])
