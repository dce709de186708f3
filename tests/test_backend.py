"""attnopt.backend checks every argument when it is built, not at the first compile."""
from __future__ import annotations

import pytest
import torch

import attnopt
from attnopt.demo_model import LlamaAttention


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((), {"kernel": "bogus"}, ValueError, "unknown kernel 'bogus'; choose from auto, "),
    ((), {"kernel": None}, TypeError, "kernel must be a string"),
    ((), {"target": "bogus"}, ValueError, "target must be one of"),
    ((), {"target": "portable", "kernel": "math"}, ValueError, "cannot force kernel='math'"),
    ((), {"strict": "yes"}, TypeError, "strict must be True or False"),
    ((), {"on_result": 3}, TypeError, "on_result must be callable"),
    ((), {"dump_dir": 3}, TypeError, "dump_dir must be a path"),
    (("bogus",), {}, ValueError, "'bogus' is not a torch.compile backend"),
    (("attnopt",), {}, ValueError, "would run attnopt's passes twice"),
    ((3,), {}, TypeError, "inner must be a backend name or a callable"),
    (("aot_eager",), {"max_autotune": True}, ValueError, "only understood by inner='inductor'"),
    ((lambda gm, ex: gm,), {"max_autotune": True}, ValueError, "only understood by inner='inductor'"),
    (("inductor",), {"not_an_option": 1}, ValueError, r"\['not_an_option'\] are not Inductor options"),
])
def test_bad_arguments_fail_where_the_backend_is_built(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        attnopt.backend(*args, **kwargs)


def test_dump_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        attnopt.backend(dump_dir=blocker)


def test_good_arguments_build_and_compile(tmp_path):
    seen = []
    backend = attnopt.backend("aot_eager", kernel="math", strict=True, dump_dir=tmp_path / "new",
                              on_result=lambda before, after, result: seen.append(result))
    attnopt.backend("inductor", max_autotune=False)  # a real Inductor option
    torch._dynamo.reset()
    model = LlamaAttention(64, 4, 2)
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    torch._dynamo.reset()
    assert seen[-1].lowered == 1 and (tmp_path / "new" / "graph_000" / "index.html").exists()


@pytest.mark.parametrize("mode, options, patched", [
    ("reduce-overhead", None, {"triton.cudagraphs": True}),
    ("max-autotune", None, {"max_autotune": True}),
    (None, {"max_autotune": True, "epilogue_fusion": False}, {"max_autotune": True, "epilogue_fusion": False}),
])
def test_compile_mode_and_options_reach_inductor(monkeypatch, mode, options, patched):
    """torch.compile(backend="attnopt", mode=..., options=...) hands them to Inductor as
    backend="inductor" would (on the CPU, CUDA graphs are skipped and the model still runs)."""
    import torch._inductor.compile_fx as compile_fx

    seen, real = [], compile_fx.compile_fx

    def recording(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return real(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx", recording)
    torch._dynamo.reset()
    model = LlamaAttention(64, 4, 2)
    x = torch.randn(2, 8, 64, requires_grad=True)
    compiled = torch.compile(model, backend="attnopt", mode=mode, options=options)
    with torch._inductor.config.patch(max_autotune_gemm_backends="ATEN"):  # no Triton GEMM search on the CPU
        out = compiled(x)
        out.sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out, model(x))
    assert seen and seen[0].items() >= patched.items()  # the outer call; it patches the config for the rest


def test_compile_mode_with_another_inner_compiler_says_so():
    torch._dynamo.reset()
    compiled = torch.compile(LlamaAttention(64, 4, 2), backend=attnopt.backend("aot_eager"), mode="reduce-overhead")
    with pytest.raises(Exception, match="mode= and options= are Inductor's; this attnopt backend compiles with 'aot_eager'"):
        compiled(torch.randn(2, 8, 64))
    torch._dynamo.reset()


def test_report_work_runs_only_when_a_report_is_read(monkeypatch, tmp_path):
    """Kernel prediction and copy accounting are for reports: a plain compile skips them; a
    callback or a dump folder gets them."""
    from attnopt.passes import pipeline
    from attnopt.report import dump

    annotated, real = [], pipeline.annotate
    monkeypatch.setattr(pipeline, "annotate", lambda *a: (annotated.append(1), real(*a))[1])
    monkeypatch.delenv("ATTNOPT_DUMP_DIR", raising=False)
    monkeypatch.setattr(dump.graph_log, "isEnabledFor", lambda level: False)  # whatever logging earlier tests set
    monkeypatch.setattr(dump, "_tracing", lambda: False)
    model, x = LlamaAttention(64, 4, 2), torch.randn(2, 8, 64)
    results = []
    for backend in ("attnopt", attnopt.backend(target="op", on_result=lambda *r: results.append(r[2])),
                    attnopt.backend(dump_dir=tmp_path)):
        torch._dynamo.reset()
        torch.compile(model, backend=backend)(x)
    torch._dynamo.reset()
    assert len(annotated) == 2
    (site,) = results[0].sites
    assert site.kernel == "cpu_flash" and site.copies_removed > 0


def test_dynamic_shapes_compile_once():
    """dynamic=True reaches Dynamo as with Inductor: the graphs compiled for the first length
    serve every other one."""
    results = []
    torch._dynamo.reset()
    model = LlamaAttention(64, 4, 2)
    compiled = torch.compile(model, backend=attnopt.backend(on_result=lambda *r: results.append(r[2])), dynamic=True)
    counts = []
    for seq in (8, 12, 5):
        x = torch.randn(2, seq, 64)
        torch.testing.assert_close(compiled(x), model(x))
        counts.append(len(results))
    torch._dynamo.reset()
    assert counts[0] == counts[-1] and all(r.lowered == 1 for r in results)
