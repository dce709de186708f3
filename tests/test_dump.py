"""Before/after dumps: the files a dump folder holds, its index.html page, the region drawings (with
and without Graphviz), the logging routes, and golden diffs of what the passes emit for
representative sites."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from expecttest import assert_expected_inline

import attnopt
from attnopt.demo_model import LlamaAttention
from attnopt.report import dump


def _model():
    torch.manual_seed(0)
    return LlamaAttention(hidden_size=64, num_heads=4, num_kv_heads=2), torch.randn(2, 8, 64)


def _compile_with(backend) -> None:
    torch._dynamo.reset()
    model, x = _model()
    torch.compile(model, backend=backend)(x)
    torch._dynamo.reset()


def _normalized(text: str) -> str:
    """Source paths reduced to file names, so goldens do not depend on where things are installed."""
    return re.sub(r"# File: \S*/([^/\s]+\.py)", r"# File: \1", text)


def _check_folder(folder, site: str) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"before.py", "after.py", "diff.patch", "report.txt", "report.json", "index.html",
            f"{site}.before.dot", f"{site}.after.dot"} <= names
    assert "torch.ops.attnopt.attention.default" in (folder / "after.py").read_text()
    assert "+" in (folder / "diff.patch").read_text()
    assert json.loads((folder / "report.json").read_text())["sites"][0]["status"] == "lowered"
    assert "1 lowered" in (folder / "report.txt").read_text()
    assert (f"{site}.before.svg" in names) == (shutil.which("dot") is not None)


def test_backend_dump_dir(tmp_path):
    _compile_with(attnopt.backend("aot_eager", strict=True, target="op", dump_dir=tmp_path))
    (folder,) = tmp_path.iterdir()
    assert folder.name == "graph_000"
    _check_folder(folder, "attention")


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_DUMP_DIR", str(tmp_path))
    _compile_with(attnopt.backend("aot_eager", strict=True, target="op"))
    _compile_with(attnopt.backend("aot_eager", strict=True, target="op"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_000", "graph_001"]


def test_report_dump_without_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(dump.shutil, "which", lambda name: None)
    model, x = _model()
    (folder,) = attnopt.explain(torch.export.export(model, (x,))).dump(tmp_path)
    assert not list(folder.glob("*.svg")) and len(list(folder.glob("*.dot"))) == 2
    assert dump.graphviz_note() == dump.NO_GRAPHVIZ and "\n" not in dump.NO_GRAPHVIZ


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed")
def test_drawings_render_to_svg(tmp_path):
    model, x = _model()
    (folder,) = attnopt.explain(torch.export.export(model, (x,))).dump(tmp_path)
    assert (folder / "attention.after.svg").read_text().lstrip().startswith("<?xml")


def test_unwritable_dump_dir_from_environment_warns_and_compiles(tmp_path, monkeypatch):
    """An explicit dump_dir is checked when the backend is built (tests/test_backend.py); the
    environment variable is read at each compile, where a dump must not fail the compile."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNOPT_DUMP_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not write a graph dump"):
        _compile_with(attnopt.backend("aot_eager", strict=True, target="op"))


class _Links(HTMLParser):
    """Anchors, element ids, and what each figure holds, of a page."""

    def __init__(self):
        super().__init__()
        self.hrefs, self.ids, self.sources, self.figures, self._figure = [], set(), [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if "src" in attrs:
            self.sources.append(attrs["src"])
        if tag == "figure":
            self._figure = attrs["id"]
            self.figures[self._figure] = []
        elif self._figure is not None:
            self.figures[self._figure].append(tag)

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(LlamaAttention(64, 4, 2) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("via", ["compile", "export"])
def test_index_page_links_every_site_and_drawing(tmp_path, via):
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(2, 8, 64)
    report = attnopt.explain(model if via == "compile" else torch.export.export(model, (x,)), *(
        (x,) if via == "compile" else ()))
    (folder,) = report.dump(tmp_path)
    page = _Links()
    page.feed((folder / "index.html").read_text())
    sites = [s["id"] for s in json.loads((folder / "report.json").read_text())["sites"]]
    assert sites == ["layers.0.attention", "layers.1.attention"]
    for site in sites:
        for anchor in (site, f"{site}.before", f"{site}.after"):
            assert f"#{anchor}" in page.hrefs and anchor in page.ids
        for when in ("before", "after"):
            assert "svg" in page.figures[f"{site}.{when}"] and "rect" in page.figures[f"{site}.{when}"]
    assert all(h[1:] in page.ids for h in page.hrefs if h.startswith("#"))
    assert all((folder / h).is_file() for h in page.hrefs if not h.startswith("#"))
    assert page.sources == []  # one file: nothing loaded from elsewhere


def test_attnopt_logger_shows_report_and_diff(caplog):
    with caplog.at_level(logging.DEBUG, logger="attnopt"):
        _compile_with(attnopt.backend("aot_eager", strict=True, target="op"))
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "attnopt.graphs")
    assert "1 lowered" in text and "+" in text and "attnopt.attention.default" in text


def test_torch_logs_and_torch_trace(tmp_path):
    """TORCH_LOGS="+attnopt" prints the report and diff; TORCH_TRACE gets them as artifacts."""
    code = ("import torch, attnopt\nfrom attnopt.demo_model import LlamaAttention\n"
            "torch.compile(LlamaAttention(64, 4, 2), backend=attnopt.backend('aot_eager', target='op'))(torch.randn(2, 8, 64))\n")
    env = {**os.environ, "TORCH_LOGS": "+attnopt", "TORCH_TRACE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 lowered" in proc.stderr and "+        attention_default = torch.ops.attnopt.attention" in proc.stderr
    trace = "".join(p.read_text() for p in tmp_path.iterdir())
    assert "attnopt_report" in trace and "attnopt_diff" in trace


def test_regions_cover_removed_and_added_nodes():
    model, x = _model()
    ep = torch.export.export(model, (x,))
    new_ep, result = attnopt.optimize(ep, return_result=True, target="op")
    (site,) = result.sites
    region_b, core_b, region_a, core_a = dump.regions(ep.graph_module, new_ep.graph_module, site)
    assert core_b == {site.name, *site.removed} and core_b < region_b
    assert core_a == {"permute_default", "attention_default", "getitem"} and core_a < region_a


# Golden dumps: a change in what the passes emit shows up here as a readable diff in review.

def test_golden_dynamo_diff():
    graphs = []
    _compile_with(attnopt.backend("aot_eager", strict=True, target="op", on_result=lambda *g: graphs.append(g)))
    assert_expected_inline(_normalized(dump.graph_diff(*graphs[-1][:2])), """\
--- before.py
+++ after.py
@@ -19,7 +19,6 @@
         # File: demo_model.py:52 in forward, code: v = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
         linear_2: "f32[2, 8, 32]" = torch._C._nn.linear(l_hidden_states_, l_self_modules_v_proj_parameters_weight_, None)
         view_2: "f32[2, 8, 2, 16]" = linear_2.view(2, 8, -1, 16)
-        v: "f32[2, 2, 8, 16]" = view_2.transpose(1, 2)
 
         # File: demo_model.py:30 in rotary, code: inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
         arange: "f32[8]" = torch.arange(0, 16, 2, device = device(type='cpu'), dtype = torch.float32)
@@ -70,32 +69,13 @@
         mul_3: "f32[2, 2, 8, 16]" = cat_2 * sin_1
         k_1: "f32[2, 2, 8, 16]" = mul_2 + mul_3
 
-        # File: demo_model.py:20 in repeat_kv, code: hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
-        getitem_4: "f32[2, 2, 1, 8, 16]" = k_1[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
-        hidden_states: "f32[2, 2, 2, 8, 16]" = getitem_4.expand(2, 2, 2, 8, 16)
-
-        # File: demo_model.py:21 in repeat_kv, code: return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)
-        k_2: "f32[2, 4, 8, 16]" = hidden_states.reshape(2, 4, 8, 16)
-
-        # File: demo_model.py:20 in repeat_kv, code: hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
-        getitem_5: "f32[2, 2, 1, 8, 16]" = v[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
-        hidden_states_1: "f32[2, 2, 2, 8, 16]" = getitem_5.expand(2, 2, 2, 8, 16)
-
-        # File: demo_model.py:21 in repeat_kv, code: return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)
-        v_1: "f32[2, 4, 8, 16]" = hidden_states_1.reshape(2, 4, 8, 16)
-
-        # File: demo_model.py:59 in forward, code: q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True,
-        contiguous: "f32[2, 4, 8, 16]" = q_1.contiguous()
-        contiguous_1: "f32[2, 4, 8, 16]" = k_2.contiguous()
-        contiguous_2: "f32[2, 4, 8, 16]" = v_1.contiguous()
-
         # File: demo_model.py:58 in forward, code: attn = F.scaled_dot_product_attention(
-        attn: "f32[2, 4, 8, 16]" = torch._C._nn.scaled_dot_product_attention(contiguous, contiguous_1, contiguous_2, is_causal = True, dropout_p = 0.0)
+        permute_default: "f32[2, 2, 8, 16]" = torch.ops.aten.permute.default(view_2, [0, 2, 1, 3])
+        attention_default = torch.ops.attnopt.attention.default(q_1, k_1, permute_default, layout = 'bhsd', out_layout = 'bshd', is_causal = True)
+        getitem: "f32[2, 8, 4, 16]" = attention_default[0]
 
         # File: demo_model.py:62 in forward, code: attn = attn.transpose(1, 2).contiguous().reshape(bsz, q_len, -1)
-        transpose_3: "f32[2, 8, 4, 16]" = attn.transpose(1, 2)
-        contiguous_3: "f32[2, 8, 4, 16]" = transpose_3.contiguous()
-        attn_1: "f32[2, 8, 64]" = contiguous_3.reshape(2, 8, -1)
+        attn_1: "f32[2, 8, 64]" = getitem.reshape(2, 8, -1)
 
         # File: demo_model.py:63 in forward, code: return self.o_proj(attn)
         linear_3: "f32[2, 8, 64]" = torch._C._nn.linear(attn_1, l_self_modules_o_proj_parameters_weight_, None)
""")


def test_golden_export_diff_and_drawing():
    model, x = _model()
    ep = torch.export.export(model, (x,))
    new_ep, result = attnopt.optimize(ep, return_result=True, target="op")
    assert_expected_inline(_normalized(dump.graph_diff(ep.graph_module, new_ep.graph_module)), """\
--- before.py
+++ after.py
@@ -19,7 +19,6 @@
 
         # File: demo_model.py:52 in forward, code: v = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
         view_2: "f32[2, 8, 2, 16]" = torch.ops.aten.view.default(linear_2, [2, 8, -1, 16])
-        transpose_2: "f32[2, 2, 8, 16]" = torch.ops.aten.transpose.int(view_2, 1, 2)
 
         # File: demo_model.py:53 in forward, code: cos, sin = rotary(q_len, self.head_dim, hidden_states.device, hidden_states.dtype)
         arange: "f32[8]" = torch.ops.aten.arange.start_step(0, 16, 2, dtype = torch.float32, device = device(type='cpu'), pin_memory = False)
@@ -55,26 +54,13 @@
         mul_4: "f32[2, 2, 8, 16]" = torch.ops.aten.mul.Tensor(cat_2, to_1)
         add_1: "f32[2, 2, 8, 16]" = torch.ops.aten.add.Tensor(mul_3, mul_4)
 
-        # File: demo_model.py:56 in forward, code: k = repeat_kv(k, self.num_key_value_groups)
-        unsqueeze: "f32[2, 2, 1, 8, 16]" = torch.ops.aten.unsqueeze.default(add_1, 2)
-        expand: "f32[2, 2, 2, 8, 16]" = torch.ops.aten.expand.default(unsqueeze, [2, 2, 2, 8, 16])
-        reshape: "f32[2, 4, 8, 16]" = torch.ops.aten.reshape.default(expand, [2, 4, 8, 16])
-
-        # File: demo_model.py:57 in forward, code: v = repeat_kv(v, self.num_key_value_groups)
-        unsqueeze_1: "f32[2, 2, 1, 8, 16]" = torch.ops.aten.unsqueeze.default(transpose_2, 2)
-        expand_1: "f32[2, 2, 2, 8, 16]" = torch.ops.aten.expand.default(unsqueeze_1, [2, 2, 2, 8, 16])
-        reshape_1: "f32[2, 4, 8, 16]" = torch.ops.aten.reshape.default(expand_1, [2, 4, 8, 16])
-
-        # File: demo_model.py:59 in forward, code: q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True,
-        contiguous: "f32[2, 4, 8, 16]" = torch.ops.aten.contiguous.default(add)
-
         # File: demo_model.py:58 in forward, code: attn = F.scaled_dot_product_attention(
-        scaled_dot_product_attention: "f32[2, 4, 8, 16]" = torch.ops.aten.scaled_dot_product_attention.default(contiguous, reshape, reshape_1, None, 0.0, True)
+        permute_default: "f32[2, 2, 8, 16]" = torch.ops.aten.permute.default(view_2, [0, 2, 1, 3])
+        attention_default = torch.ops.attnopt.attention.default(add, add_1, permute_default, layout = 'bhsd', out_layout = 'bshd', is_causal = True)
+        getitem: "f32[2, 8, 4, 16]" = attention_default[0]
 
         # File: demo_model.py:62 in forward, code: attn = attn.transpose(1, 2).contiguous().reshape(bsz, q_len, -1)
-        transpose_3: "f32[2, 8, 4, 16]" = torch.ops.aten.transpose.int(scaled_dot_product_attention, 1, 2)
-        contiguous_1: "f32[2, 8, 4, 16]" = torch.ops.aten.contiguous.default(transpose_3)
-        reshape_2: "f32[2, 8, 64]" = torch.ops.aten.reshape.default(contiguous_1, [2, 8, -1])
+        reshape_2: "f32[2, 8, 64]" = torch.ops.aten.reshape.default(getitem, [2, 8, -1])
 
         # File: linear.py:134 in forward, code: return F.linear(input, self.weight, self.bias)
         linear_3: "f32[2, 8, 64]" = torch.ops.aten.linear.default(reshape_2, p_o_proj_weight)
""")
    region_b, core_b, _, _ = dump.regions(ep.graph_module, new_ep.graph_module, result.sites[0])
    assert_expected_inline(dump.region_dot(ep.graph_module, region_b, core_b, "before", "red"), """\
digraph "before" {
  label="before"; labelloc=t; node [shape=box, fontname="monospace"];
  "view_2" [label="view_2\\nview\\nf32[2, 8, 2, 16]", style="dashed"];
  "view_2" -> "transpose_2";
  "transpose_2" [label="transpose_2\\ntranspose\\nf32[2, 2, 8, 16]", style="filled", fillcolor="red"];
  "transpose_2" -> "unsqueeze_1";
  "add" [label="add\\nadd\\nf32[2, 4, 8, 16]", style="dashed"];
  "add" -> "contiguous";
  "add_1" [label="add_1\\nadd\\nf32[2, 2, 8, 16]", style="dashed"];
  "add_1" -> "unsqueeze";
  "unsqueeze" [label="unsqueeze\\nunsqueeze\\nf32[2, 2, 1, 8, 16]", style="filled", fillcolor="red"];
  "unsqueeze" -> "expand";
  "expand" [label="expand\\nexpand\\nf32[2, 2, 2, 8, 16]", style="filled", fillcolor="red"];
  "expand" -> "reshape";
  "reshape" [label="reshape\\nreshape\\nf32[2, 4, 8, 16]\\ncopy 4.0 KiB", style="filled", fillcolor="red", color="red", penwidth=2];
  "reshape" -> "scaled_dot_product_attention";
  "unsqueeze_1" [label="unsqueeze_1\\nunsqueeze\\nf32[2, 2, 1, 8, 16]", style="filled", fillcolor="red"];
  "unsqueeze_1" -> "expand_1";
  "expand_1" [label="expand_1\\nexpand\\nf32[2, 2, 2, 8, 16]", style="filled", fillcolor="red"];
  "expand_1" -> "reshape_1";
  "reshape_1" [label="reshape_1\\nreshape\\nf32[2, 4, 8, 16]\\ncopy 4.0 KiB", style="filled", fillcolor="red", color="red", penwidth=2];
  "reshape_1" -> "scaled_dot_product_attention";
  "contiguous" [label="contiguous\\ncontiguous\\nf32[2, 4, 8, 16]\\ncopy 4.0 KiB", style="filled", fillcolor="red", color="red", penwidth=2];
  "contiguous" -> "scaled_dot_product_attention";
  "scaled_dot_product_attention" [label="scaled_dot_product_attention\\nscaled_dot_product_attention\\nf32[2, 4, 8, 16]", style="filled", fillcolor="red"];
  "scaled_dot_product_attention" -> "transpose_3";
  "transpose_3" [label="transpose_3\\ntranspose\\nf32[2, 8, 4, 16]", style="filled", fillcolor="red"];
  "transpose_3" -> "contiguous_1";
  "contiguous_1" [label="contiguous_1\\ncontiguous\\nf32[2, 8, 4, 16]\\ncopy 4.0 KiB", style="filled", fillcolor="red", color="red", penwidth=2];
  "contiguous_1" -> "reshape_2";
  "reshape_2" [label="reshape_2\\nreshape\\nf32[2, 8, 64]", style="dashed"];
}
""")
    assert result.sites[0].copies_removed == 4
