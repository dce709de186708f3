"""Where an attention site is in the user's code, the same under torch.compile and torch.export.

Dynamo names modules by how it reached them (``L['args'][0].model.layers.0.self_attn``, where the
root is whatever argument held the model), export by their path (``model.layers.0.self_attn``);
both become the path as written in the model. Their stack traces differ too: Dynamo's goes down
to the innermost frame (a library's SDPA wrapper), export's may stop earlier; the line reported
is the innermost one in the file that defines the site's module (the attention call in the
user's model file), or the innermost frame when no module file is on the stack.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional

import torch
from torch.fx import Node

_ROOT = re.compile(r"^[LG]\['[^']*'\](?:\[\d+\])*\.?")  # L['self'], L['args'][0], L['fn'], G['model']
_GETATTR = re.compile(r"getattr\(([^()]*), '([^']+)'\)")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def user_path(path: str) -> str:
    """A module path as Dynamo or export spells it, written as in the model: dotted, from the
    root module (which is ""). ``L['self']._modules['layers']._modules['0']``, ``L['self'].layers[0]``
    and ``layers.0`` all give ``layers.0``."""
    while _GETATTR.search(path):
        path = _GETATTR.sub(r"\1.\2", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = _ROOT.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _stack(node: Node) -> list[tuple[str, Any]]:
    """(path as in the model, type) of the submodules ``node`` runs in, outermost first. The root
    module is left out: export records it, Dynamo does not."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = [entry if isinstance(entry, tuple) else (str(entry), None) for entry in stack.values()]
    return [(path, kind) for path, kind in ((user_path(p), k) for p, k in entries) if path]


def module_path(node: Node) -> str:
    """The path of the innermost submodule ``node`` runs in, "" for the root module (or no module)."""
    stack = _stack(node)
    return stack[-1][0] if stack else ""


def _type_name(kind: Any) -> Optional[str]:
    """``kind`` as a qualified name: Dynamo records classes, export their qualified names."""
    if kind is None:
        return None
    if isinstance(kind, type):
        return f"{kind.__module__}.{kind.__qualname__}"
    return str(kind).removeprefix("<class '").removesuffix("'>")


def module_type(node: Node) -> Optional[str]:
    """The class name of the innermost submodule ``node`` runs in (None in the root module)."""
    stack = _stack(node)
    name = _type_name(stack[-1][1]) if stack else None
    return name.rsplit(".", 1)[-1] if name else None


def _module_files(qualified: str) -> list[str]:
    """Path endings of the file that defines the class ``qualified`` (``a.b.C`` -> ``a/b.py``),
    for each way of splitting module from class name."""
    parts = qualified.split(".")
    ends = []
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        loaded = getattr(sys.modules.get(module), "__file__", None)
        ends += [loaded] if loaded else []
        ends += [f"/{module.replace('.', '/')}.py", f"/{module.replace('.', '/')}/__init__.py"]
    return ends


def _frames(node: Node) -> list[re.Match]:
    return list(_FRAME.finditer(node.meta.get("stack_trace") or ""))


def location(node: Node) -> Optional[str]:
    """``File "...", line N, in f`` for the user's line of ``node``, None without a stack trace."""
    frames = _frames(node)
    if not frames:
        return None
    outside = [f for f in frames if not f["file"].startswith(_TORCH_DIR)]  # not torch's own wrappers
    chosen = (outside or frames)[-1]
    for _, kind in reversed(_stack(node)):
        name = _type_name(kind)
        ends = _module_files(name) if name else []
        matching = [f for f in frames if any(f["file"] == e or f["file"].endswith(e) for e in ends)]
        if matching:
            chosen = matching[-1]
            break
    return chosen.group(0)


def split_location(text: Optional[str]) -> tuple[Optional[str], Optional[int], Optional[str]]:
    """(file, line, function) of a ``location`` string."""
    match = _FRAME.search(text or "")
    return (match["file"], int(match["line"]), match["func"]) if match else (None, None, None)


__all__ = ["location", "module_path", "module_type", "split_location", "user_path"]
