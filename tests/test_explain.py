"""attnopt.explain: rows for lowered sites (on a module, an ExportedProgram and a GraphModule), for
every reason a site is left as written, site names and source lines in the user's terms, the mask
column, and train/eval reports."""
from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule

import attnopt
from attnopt.demo_model import LlamaAttention, LlamaBlock
from attnopt.passes import SiteReport
from attnopt.report.explain import mask_action, mask_cell
from attnopt.report.source import user_path

B, S, HQ, HKV, D = 2, 8, 4, 2, 16


def _sdpa_line() -> int:
    lines, start = inspect.getsourcelines(LlamaAttention.forward)
    return start + next(i for i, ln in enumerate(lines) if "scaled_dot_product_attention(" in ln)


def _check_llama_row(report: attnopt.ExplainReport) -> None:
    (row,) = report.rows
    s = row.site
    assert (row.module, row.name, row.id, s.module, row.module_type) == ("", "attention", "attention", "", None)
    # on the CPU the op would run the kernel SDPA runs: the site becomes SDPA on views (target "auto")
    assert (s.status, row.lowered_to, s.kernel) == ("lowered", "sdpa on views", None)
    assert s.call.startswith("SDPA on views: on the CPU")
    assert (s.heads, s.gqa_group, s.head_dims, s.is_causal, s.has_mask) == ((HQ, HKV), 2, (D, D), True, False)
    assert (s.layout, s.kv_layout, s.out_layout) == ("bhsd", "bhsd/bshd", "bshd")
    assert row.file.endswith("demo_model.py") and row.line == _sdpa_line() and row.function == "forward"
    # q.contiguous() of the rope output (transposed strides), the two repeat_kv reshapes and the
    # output's .contiguous(): four [B, H, S, D]-sized fp32 copies per forward call
    assert (s.copies_removed, s.bytes_removed) == (4, 4 * B * HQ * S * D * 4)
    text = str(report)
    assert re.search(r"1 attention site in 1 graph( \(training\))?: 1 lowered, 0 left as written", text)
    assert "4/2 (GQA 2)" in text and "4 (16.0 KiB)" in text and "sdpa on views" in text
    site = json.loads(report.to_json())["sites"][0]
    assert site["bytes_removed"] == 16384 and site["lowered_to"] == "sdpa on views" and site["line"] == row.line
    assert (site["site"], site["id"], site["node"], site["mask_action"]) == ("attention", "attention", s.name, "none")


def _model_and_input():
    torch.manual_seed(0)
    return LlamaAttention(hidden_size=HQ * D, num_heads=HQ, num_kv_heads=HKV), torch.randn(B, S, HQ * D)


def test_explain_compiled_module():
    model, x = _model_and_input()
    report = attnopt.explain(model, x)
    _check_llama_row(report)


def test_explain_module_inside_a_block_names_its_path():
    model, x = LlamaBlock(hidden_size=64, num_heads=4, num_kv_heads=2, mlp=64), torch.randn(2, 8, 64)
    for report in (attnopt.explain(model, x), attnopt.explain(torch.export.export(model, (x,)))):
        (row,) = report.rows
        assert (row.module, row.name, row.id, row.module_type) == ("self_attn", "attention", "self_attn.attention",
                                                                   "LlamaAttention")
        assert row.line == _sdpa_line() and "self_attn.attention" not in str(report).split("notes:")[0]


@pytest.mark.parametrize("written, path", [
    ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['self']._modules['model']._modules['layers']._modules['0']", "model.layers.0"),
    ("getattr(L['self'].layers, '0').attn", "layers.0.attn"),
    ("L['fn']", ""),
    ("model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("", ""),
])
def test_module_paths_as_written_in_the_model(written, path):
    """Dynamo names modules by how it reached them, export by their path: both read as the model's."""
    assert user_path(written) == path


class TwoAttentions(nn.Module):
    """Two attention calls in one module."""

    def forward(self, q, k, v):
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + F.scaled_dot_product_attention(q, k, v)


def test_sites_of_one_module_are_numbered_the_same_under_compile_and_export():
    q = torch.randn(B, HQ, S, D)
    for report in (attnopt.explain(TwoAttentions(), q, q, q), attnopt.explain(torch.export.export(TwoAttentions(),
                                                                                                  (q, q, q)))):
        assert [(r.id, r.file.endswith("test_explain.py")) for r in report.rows] == [("attention", True),
                                                                                      ("attention_1", True)]
        assert report.rows[1].line == report.rows[0].line + 1


@pytest.mark.parametrize("fields, action, cell", [
    ({}, "none", "none"),
    ({"mask_action": "flags", "is_causal": True}, "flags", "removed: is_causal"),
    ({"mask_action": "flags", "is_causal": True, "window": (3, 0)}, "flags", "removed: window_size"),
    ({"mask_action": "flags"}, "flags", "removed"),  # an all-true mask
    ({"mask_action": "thd"}, "thd", "removed: varlen (thd)"),
    ({"mask_action": "batches"}, "batches", "removed: chunks as batches"),
    ({"mask_action": "key_padding", "has_mask": True}, "key_padding", "key padding [B,1,1,Sk]"),
    ({"mask_action": "key_lengths"}, "key_lengths", "removed: key lengths"),
    ({"mask_action": "cache_lengths"}, "cache_lengths", "removed: key lengths"),
    ({"mask_action": "flex", "has_mask": True}, "flex", "flex_attention"),
    ({"mask_action": "kept", "has_mask": True}, "kept", "kept"),
    ({"has_mask": True}, "kept", "kept"),  # a site left as written with its mask
])
def test_mask_column_says_what_became_of_the_mask(fields, action, cell):
    """From the passes' typed ``mask_action`` when they set it, from their note otherwise."""
    site = SiteReport("n", "sdpa", "lowered", **fields)
    assert (mask_action(site), mask_cell(site)) == (action, cell)


def test_train_and_eval_in_one_report_say_what_differs():
    torch.manual_seed(0)
    model, x = LlamaAttention(hidden_size=HQ * D, num_heads=HQ, num_kv_heads=HKV, dropout=0.1), torch.randn(B, S, HQ * D)
    train = attnopt.explain(model.train(), x)
    assert "(training)" in str(train).splitlines()[0] and train.rows[0].site.dropout_p != 0.0
    both = train + attnopt.explain(model.eval(), x)
    text = str(both)
    assert "(training and eval)" in text.splitlines()[0]
    assert [r.mode for r in both.rows] == ["train", "eval"] and "\ntrain  " in text and "\neval   " in text
    (line,) = [ln for ln in text.splitlines() if "train and eval differ" in ln]
    assert "at 1 of 1 site in dropout" in line and "dropout runs only in training" in line
    assert [g["training"] for g in json.loads(both.to_json())["graphs"]] == [True, False]


def test_explain_exported_program_and_its_graph_module():
    model, x = _model_and_input()
    ep = torch.export.export(model, (x,))
    _check_llama_row(attnopt.explain(ep))
    _check_llama_row(attnopt.explain(ep.graph_module))
    assert sum(n.target is torch.ops.attnopt.attention.default for n in ep.graph.nodes) == 0  # not modified


def test_explain_graph_module_without_shapes_records_them_from_args():
    gm = torch.fx.symbolic_trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q = torch.randn(B, HQ, S, D)
    (row,) = attnopt.explain(gm, q, q, q).rows
    assert row.site.status == "lowered" and row.site.heads == (HQ, HQ) and row.site.head_dims == (D, D)


def test_explain_counts_a_program_already_optimized():
    model, x = _model_and_input()
    report = attnopt.explain(attnopt.optimize(torch.export.export(model, (x,)), target="op"))
    assert report.rows == [] and report.attnopt_calls_before == 1
    assert "already calls attnopt.attention 1 time" in str(report)


def test_explain_rejects_other_objects():
    with pytest.raises(TypeError, match="ExportedProgram"):
        attnopt.explain(42)


# Skipped sites: every reason patterns/sdpa.py gives today. Graphs are built by hand where no
# real program can produce the condition (SDPA itself would reject it when run).

def _graph(q=(B, HQ, S, D), k=(B, HKV, S, D), dtype=torch.float32, record_shapes=True, extra=None, **kwargs):
    """q, k, v placeholders (v shaped like k) -> SDPA(**kwargs) -> output. ``extra`` maps kwarg
    names to placeholders with the given recorded value."""
    g = Graph()
    nodes = {}
    for name, shape in (("q", q), ("k", k), ("v", k)):
        nodes[name] = g.placeholder(name)
        if record_shapes:
            nodes[name].meta["val"] = torch.zeros(shape, dtype=dtype)
    for name, value in (extra or {}).items():
        kwargs[name] = g.placeholder(name)
        kwargs[name].meta["val"] = value
    out = g.call_function(torch._C._nn.scaled_dot_product_attention, (nodes["q"], nodes["k"], nodes["v"]), kwargs)
    out.meta["val"] = torch.zeros(q, dtype=dtype)
    g.output(out)
    return GraphModule(nn.Module(), g)


SKIPS = [
    ("is_causal is computed in the graph", _graph(k=(B, HQ, S, D), extra={"is_causal": True})),
    ("enable_gqa is computed in the graph", _graph(extra={"enable_gqa": True})),
    ("dropout_p is computed in the graph from a tensor", _graph(k=(B, HQ, S, D), extra={"dropout_p": torch.zeros(())})),
    ("scale is computed in the graph from a tensor", _graph(k=(B, HQ, S, D), extra={"scale": torch.ones(())})),
    ("q/k/v carry no shape metadata", _graph(record_shapes=False)),
    ("not 4-D", _graph(q=(B, S, D), k=(B, S, D))),
    ("not floating point", _graph(k=(B, HQ, S, D), dtype=torch.int32)),
    ("attn_mask is not a tensor in the graph", _graph(k=(B, HQ, S, D), extra={"attn_mask": 3})),
    ("SDPA would reject 4 query heads with 2 key heads", _graph()),
    ("3 query heads are not a multiple of 2 key/value heads", _graph(q=(B, 3, S, D), enable_gqa=True)),
]


@pytest.mark.parametrize("reason, gm", SKIPS)
def test_skipped_site_reports_why(reason, gm):
    report = attnopt.explain(gm)
    (row,) = report.rows
    assert row.site.status == "skipped" and reason in row.site.reason
    assert row.lowered_to is None and row.site.kernel is None
    assert "0 lowered, 1 left as written" in str(report)
    assert f"left as written: {row.site.reason}" in str(report)
    assert json.loads(report.to_json())["sites"][0]["reason"] == row.site.reason


class LearnedBias(nn.Module):
    """Attention with a trainable additive bias as its mask (T5-style position bias)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, HQ, S, S))

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


def test_learned_bias_is_lowered_in_a_real_model():
    q = torch.randn(B, HQ, S, D)
    report = attnopt.explain(LearnedBias(), q, q, q)
    (row,) = report.rows
    assert row.site.status == "lowered" and row.site.mask_action == "kept"
    assert row.site.has_mask and row.file.endswith("test_explain.py")


def test_explain_again_and_again_despite_the_recompile_limit():
    model, x = _model_and_input()
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(3):
            assert len(attnopt.explain(model, x).rows) == 1


def test_explain_an_already_compiled_module():
    model, x = _model_and_input()
    compiled = torch.compile(model, backend="aot_eager")
    _check_llama_row(attnopt.explain(compiled, x))
