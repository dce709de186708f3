"""The portable target: plain SDPA on strided views with enable_gqa, ATen ops only, so an
optimized program saves and loads where attnopt is not installed."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnopt
from tests.models.graph_checks import sdpa_calls
from tests.models.helpers import check_compiled, check_exported
from tests.models.zoo import build

LOAD_WITHOUT_ATTNOPT = """
import sys, torch
program, data = sys.argv[1], torch.load(sys.argv[2])
out = torch.export.load(program).module()(*data["inputs"])
torch.testing.assert_close(out, data["expected"])
assert "attnopt" not in sys.modules, "loading imported attnopt"
"""


@pytest.mark.parametrize("name", ["llama", "mistral", "titan_qwen3", "megatron_seed", "padded_mla", "timm_vit"])
def test_exported_model_lowers_to_plain_sdpa(name):
    model, inputs = build(name)
    new_ep, sites = check_exported(model, inputs, target="portable")
    assert sites and all(s.status == "lowered" for s in sites)
    assert all(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in sdpa_calls(new_ep.graph_module))


def test_band_sdpa_cannot_express_keeps_the_written_mask():
    """Mistral's sliding window is recovered as a window; SDPA has no window, so the portable
    program keeps the mask as written (and plain causal becomes is_causal)."""
    for name, has_mask in (("mistral", True), ("llama", False)):
        model, inputs = build(name)
        new_ep, sites = check_exported(model, inputs, target="portable")
        assert all(s.has_mask == has_mask and ("kept as written" in s.mask) == has_mask for s in sites)
        for call in sdpa_calls(new_ep.graph_module):
            assert (call.kwargs.get("attn_mask") is not None) == has_mask
            assert call.kwargs.get("is_causal", False) == (not has_mask)


def test_compiled_with_the_portable_target():
    model, inputs = build("megatron")
    (site,) = check_compiled(model, inputs, target="portable")
    assert site.status == "lowered" and site.gqa_group == 2 and site.out_layout == "sbhd"


def test_saved_program_loads_and_runs_without_attnopt(tmp_path):
    model, inputs = build("titan_qwen3")
    inputs = tuple(t.detach() for t in inputs)
    ep = torch.export.export(model, inputs)
    torch.save({"inputs": inputs, "expected": model(*inputs).detach()}, tmp_path / "data.pt")

    def load_elsewhere(target: str) -> subprocess.CompletedProcess:
        new_ep = attnopt.optimize(ep, strict=True, target=target)
        torch.export.save(new_ep, tmp_path / f"{target}.pt2")
        return subprocess.run([sys.executable, "-c", LOAD_WITHOUT_ATTNOPT, str(tmp_path / f"{target}.pt2"),
                               str(tmp_path / "data.pt")], capture_output=True, text=True, cwd=tmp_path)

    run = load_elsewhere("portable")
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_elsewhere("op").returncode != 0  # the attnopt op needs attnopt to load


def test_unknown_target_and_forced_kernel_are_rejected():
    with pytest.raises(ValueError, match="target must be one of"):
        attnopt.backend("aot_eager", target="flex")
    with pytest.raises(ValueError, match="cannot force kernel"):
        attnopt.backend("aot_eager", target="portable", kernel="math")
