"""The package layout: foundations (errors, home, config, model.config, tokenizer.core/hf, checkpoint, dist)
form no import cycles, and evaluation, export and inference never import the training package, so a
server runs without training code. Checked on the source (every import, lazy ones included) and by
importing in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanoforge"
FOUNDATIONS = ["nanoforge.errors", "nanoforge.home", "nanoforge.progress", "nanoforge.config",
               "nanoforge.model.config", "nanoforge.tokenizer.core", "nanoforge.tokenizer.hf",
               "nanoforge.checkpoint", "nanoforge.dist"]
NO_TRAINING = ("infer", "eval", "export")


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")  # not the data folders (eval/tasks/ holds lm-eval code)
           if all((d / "__init__.py").is_file() for d in p.parents if d.is_relative_to(PACKAGE))}


def _imports(path: Path, module_level: bool) -> set[str]:
    """nanoforge modules `path` imports: at module level only (what runs on import), or anywhere (lazy
    imports inside functions too); imports under `if TYPE_CHECKING:` never run and are left out."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(block.test) for n in ast.walk(block)}  # annotations, never run
    nodes = [n for n in tree.body if not isinstance(n, ast.If)] if module_level else \
        [n for n in ast.walk(tree) if id(n) not in typing_only]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_known_imports() -> None:
    """Guards the checks below against a parser that finds nothing."""
    everything = _imports(MODULES["nanoforge.train.loop"], module_level=False)
    assert {"nanoforge.checkpoint", "nanoforge.dist", "nanoforge.config", "nanoforge.infer.engine"} <= everything
    assert "nanoforge.infer.engine" not in _imports(MODULES["nanoforge.train.loop"], module_level=True)


def test_no_import_cycles_at_module_level() -> None:
    graph = {m: _imports(p, module_level=True) for m, p in MODULES.items()}
    assert _cycles(graph) == []


def test_foundations_form_no_cycle_even_through_lazy_imports() -> None:
    graph = {m: _imports(p, module_level=False) for m, p in MODULES.items()}
    bad = [c for c in _cycles(graph) if set(c) & set(FOUNDATIONS)]
    assert bad == []
    assert "nanoforge.config" not in graph["nanoforge.model.config"]  # the model knows no run config
    assert "nanoforge.tokenizer.hf" not in graph["nanoforge.tokenizer.core"]


@pytest.mark.parametrize("stage", NO_TRAINING)
def test_inference_evaluation_and_export_never_import_training_code(stage: str) -> None:
    offenders = {m: sorted(t for t in _imports(p, module_level=False) if t.startswith("nanoforge.train"))
                 for m, p in MODULES.items() if m.startswith(f"nanoforge.{stage}")}
    assert {m: t for m, t in offenders.items() if t} == {}


def _fresh_import(*names: str) -> list[str]:
    """The nanoforge modules a fresh interpreter has loaded after importing `names`."""
    code = ("import importlib, json, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nanoforge'))))\n")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_importing_them_in_a_fresh_interpreter_loads_no_training_or_run_config() -> None:
    foundations = _fresh_import("nanoforge.model.config", "nanoforge.tokenizer.core")
    assert "nanoforge.model.config" in foundations and "nanoforge.tokenizer.core" in foundations
    assert "nanoforge.config" not in foundations and "nanoforge.tokenizer.hf" not in foundations
    # what a server or an evaluation loads (the source check above covers every module)
    stages = ["nanoforge.infer.engine", "nanoforge.export.hf", "nanoforge.eval.tasks", "nanoforge.eval.bpb"]
    loaded = _fresh_import("nanoforge.checkpoint", "nanoforge.dist", *stages)
    assert set(stages) <= set(loaded)
    assert [m for m in loaded if m.startswith("nanoforge.train")] == []
