"""The command line: inspect and optimize on .pt2 files (transformers outputs and other registered
pytree types included), every error path as one line on stderr in a subprocess, --version, demo,
and the README's install lines being the ones CI runs."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import attnopt
from attnopt.__main__ import main
from attnopt.demo_model import LlamaAttention

ATTN = torch.ops.attnopt.attention.default
ROOT = Path(__file__).parents[1]


def _cli(*args: str, exe: tuple = (sys.executable, "-m", "attnopt"), env: dict | None = None,
         ) -> subprocess.CompletedProcess:
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error line of a failed run, checked to be the only thing on stderr, with nothing on stdout."""
    assert proc.returncode != 0 and proc.stdout == "", (proc.stdout, proc.stderr)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("attnopt: error: "), line
    return line


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaAttention(hidden_size=64, num_heads=4, num_kv_heads=2)
    path = tmp_path_factory.mktemp("pt2") / "attn.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 8, 64),)), path)
    return path


def test_inspect_prints_the_report_and_writes_dumps(pt2, tmp_path):
    proc = _cli("inspect", str(pt2), "--out", str(tmp_path / "dumps"))
    assert proc.returncode == 0, proc.stderr
    # a CPU program: the op would run the kernel SDPA runs, so "auto" lowers the site to SDPA on views
    assert "1 lowered" in proc.stdout and "sdpa on views" in proc.stdout and "on the CPU" in proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    folder = tmp_path / "dumps" / "graph_000"
    assert {"index.html", "before.py", "after.py", "diff.patch", "report.txt", "report.json"} <= {
        p.name for p in folder.iterdir()}
    assert (folder / "report.txt").read_text().strip() in proc.stdout and str(folder / "index.html") in proc.stdout


def test_optimize_saves_a_program_that_loads_and_runs(pt2, tmp_path, capsys):
    out = tmp_path / "sub" / "opt.pt2"
    assert main(["optimize", str(pt2), str(out), "--target", "op"]) == 0
    printed = capsys.readouterr().out
    assert "1 lowered" in printed and "loading it needs `import attnopt`" in printed
    loaded = torch.export.load(out)
    assert sum(n.target is ATTN for n in loaded.graph.nodes) == 1
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(loaded.module()(x), torch.export.load(pt2).module()(x))
    assert main(["inspect", str(out)]) == 0
    assert "already calls attnopt.attention 1 time" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["portable", "auto"])
def test_optimize_to_plain_sdpa(pt2, tmp_path, capsys, target):
    """portable always, and auto on a CPU program (the op would run SDPA's kernel): no op in the file."""
    assert main(["optimize", str(pt2), str(tmp_path / "p.pt2"), "--target", target]) == 0
    assert "loads with plain torch" in capsys.readouterr().out
    assert not any(n.target is ATTN for n in torch.export.load(tmp_path / "p.pt2").graph.nodes)


def _bad_files(tmp_path, pt2) -> dict:
    text = tmp_path / "notes.pt2"
    text.write_text("not a model\n")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(pt2.read_bytes()[:2000])
    checkpoint = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, checkpoint)
    other_zip = tmp_path / "other.pt2"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("hello.txt", "hi")
    program = "not a torch.export program ("  # then torch's own first sentence on why
    return {tmp_path / "missing.pt2": "no such file", tmp_path: "not a file", text: program, truncated: program,
            checkpoint: program, other_zip: program}


@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_bad_files_give_one_line_errors(pt2, tmp_path, capsys, command):
    for path, expected in _bad_files(tmp_path, pt2).items():
        args = [command, str(path)] + ([str(tmp_path / "out.pt2")] if command == "optimize" else [])
        assert main(args) == 1, path
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f"attnopt: error: {path}") and expected in err and "\n" not in err, err
        assert captured.out == ""
    assert not (tmp_path / "out.pt2").exists()


@pytest.mark.parametrize("output, expected", [
    ("{tmp}", "is a folder; name the .pt2 file to write"),
    ("{tmp}/out.bin", "the output must be a .pt2 file (torch.export.load reads .pt2 files)"),
    ("{tmp}/file/out.pt2", "cannot save: {tmp}/file exists and is not a folder"),
])
def test_output_paths_are_checked_before_any_work(pt2, tmp_path, capsys, output, expected):
    (tmp_path / "file").write_text("")
    output, expected = output.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    assert main(["optimize", str(pt2), output]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == f"attnopt: error: {output}: {expected}"


def test_dump_folder_is_checked_before_any_work(pt2, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["inspect", str(pt2), "--out", str(tmp_path / "file")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "exists and is not a folder" in captured.err


@pytest.mark.parametrize("args, expected", [
    ((), "the following arguments are required"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("inspect", "x.pt2", "--bogus"), "unrecognized arguments: --bogus"),
    (("demo", "--inner", "bogus"), "--inner: 'bogus' is not a torch.compile backend"),
    (("inspect", "{pt2}", "--import", "no_such_module_here"), "cannot import no_such_module_here (--import)"),
    (("optimize", "{pt2}", "{tmp}"), "is a folder; name the .pt2 file to write"),
    (("inspect", "{tmp}/bad.pt2"), "bad.pt2: not a torch.export program ("),
])
def test_errors_in_a_subprocess_are_one_line(pt2, tmp_path, args, expected):
    (tmp_path / "bad.pt2").write_bytes(b"\x00" * 64)
    line = _one_line_error(_cli(*(a.format(pt2=pt2, tmp=tmp_path) for a in args)))
    assert expected in line


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.split()[:2] == ["attnopt", attnopt.__version__]
    assert importlib.metadata.version("attnopt") == attnopt.__version__  # pyproject.toml reads it from attnopt


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 128, (2, 16))


def _names(sites: list) -> list:
    return [(s["id"], os.path.basename(s["file"]), s["line"], s["status"]) for s in sites]


def test_transformers_program_reads_and_names_sites_as_compile_and_export_do(llama, tmp_path):
    """A transformers model returns a ModelOutput: the CLI reads its .pt2 (importing the module that
    registers the type), and the report names sites and source lines as under compile and export."""
    model, tokens = llama
    ep = torch.export.export(model, (tokens,), {"use_cache": False})
    torch.export.save(ep, tmp_path / "llama.pt2")
    proc = _cli("inspect", str(tmp_path / "llama.pt2"), "--out", str(tmp_path / "dumps"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    cli = _names(json.loads((tmp_path / "dumps" / "graph_000" / "report.json").read_text())["sites"])
    compiled = _names(json.loads(attnopt.explain(model, tokens, use_cache=False).to_json())["sites"])
    exported = _names(json.loads(attnopt.explain(ep).to_json())["sites"])
    assert cli == compiled == exported
    assert [site[:2] for site in cli] == [("model.layers.0.self_attn.attention", "modeling_llama.py"),
                                          ("model.layers.1.self_attn.attention", "modeling_llama.py")]
    assert "model.layers.0.self_attn  attention  modeling_llama.py:" in proc.stdout


def test_other_pytree_types_load_with_import(tmp_path, monkeypatch):
    (tmp_path / "pairout.py").write_text(textwrap.dedent("""\
        import dataclasses
        import torch

        @dataclasses.dataclass
        class Pair:
            attn: torch.Tensor
            x: torch.Tensor

        torch.export.register_dataclass(Pair, serialized_type_name="pairout.Pair")

        class Model(torch.nn.Module):
            def forward(self, q):
                return Pair(torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True), q)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import pairout

    path = tmp_path / "pair.pt2"
    torch.export.save(torch.export.export(pairout.Model(), (torch.randn(2, 4, 8, 16),)), path)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    line = _one_line_error(_cli("inspect", str(path), env=env))
    assert "pairout.Pair" in line and "--import MODULE" in line
    proc = _cli("inspect", str(path), "--import", "pairout", env=env)
    assert proc.returncode == 0 and "1 lowered" in proc.stdout, proc.stderr


@pytest.mark.skipif(shutil.which("attnopt") is None, reason="attnopt is not installed as a console script")
def test_console_script(pt2):
    proc = _cli("inspect", str(pt2), exe=("attnopt",))
    assert proc.returncode == 0 and "1 lowered" in proc.stdout


def test_demo_still_runs():
    proc = _cli("demo", "--inner", "aot_eager", "--cpu")
    assert proc.returncode == 0, proc.stderr
    assert "1 lowered" in proc.stdout and "numerics check: PASS" in proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


def test_ci_runs_the_readme_install_lines():
    """The README's install block, line by line, is what .ci/run runs, in order, and CI installs
    nothing the README does not."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install, try, test"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#")]
    commands = [ln for ln in ci if ln.startswith(("python", ". ", "pip"))]
    assert len(commands) == len(lines)
    for want, got in zip(lines, commands):
        assert got == want or got.startswith(want + " 2>&1 | tee "), (want, got)
    assert "python -m attnopt demo" in lines and "python -m pytest -q" in lines
