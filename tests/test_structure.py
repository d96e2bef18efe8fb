"""The package's import graph: no cycles, every arrow pointing down the layers, the CLI on top.

Read from the source with ``ast`` (every ``import``, also those inside functions; annotations-only imports
under ``if TYPE_CHECKING:`` do not run and are left out), so a cycle hidden behind a lazy import fails too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "starflow"

LAYERS = {
    "starflow.files": -1,  # atomic writes and weights fingerprints: imports nothing of the package
    "starflow.worker": -1,  # a torchrun worker's tie to its launcher, set before torch loads: imports nothing
    "starflow.console": -1,  # the terminal's warning lines: imports nothing of the package
    "starflow": 0, "starflow.config": 0,
    "starflow.prompts": 1, "starflow.assets": 1, "starflow.checkpoint": 1, "starflow.folder_lock": 1,
    "starflow.signals": 1,
    "starflow.models": 2, "starflow.adapters": 2, "starflow.data": 2,
    "starflow.distributed": 3, "starflow.sizing": 3, "starflow.download": 3,
    "starflow.sampling": 4,
    "starflow.evaluation": 5, "starflow.train": 5,
    "starflow.cli": 6,
    "starflow.__main__": 7,  # python -m starflow: the entry point over the commands
}
"""Each module's unit (the longest prefix listed; ``starflow`` itself is the root ``__init__``, which holds
only the version) and its layer: a module may import from its own unit or
from a lower layer only (cli -> train/evaluation -> sampling -> distributed/sizing/download ->
models/adapters/data -> prompts/assets/checkpoint/folder_lock/signals -> config -> files/worker/console)."""


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> set[str]:
    """Every ``starflow`` module that importing (or running) ``module`` imports, resolved to modules, plus
    ``argparse`` when imported."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out = {m for m in found if m in MODULES or m == "argparse"}
    for m in list(out):  # importing a module of another package runs that package's __init__ first
        parent = m.rpartition(".")[0]
        while parent and parent != "starflow" and not module.startswith(parent + ".") and module != parent:
            out.add(parent)
            parent = parent.rpartition(".")[0]
    out.discard(module)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _unit(module: str) -> str:
    units = [u for u in LAYERS if module == u or (u != "starflow" and module.startswith(u + "."))]
    assert units, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return max(units, key=len)


def test_the_layers_are_read_from_real_imports() -> None:
    """The graph is not empty: the pipeline imports the models, the CLI imports the trainer."""
    assert "starflow.models" in GRAPH["starflow.sampling.pipeline"]
    assert "starflow.train.launch" in GRAPH["starflow.cli.train"]
    assert "starflow.models.jacobi" in GRAPH["starflow.models.starflow"]


def test_no_import_cycle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v] - {"argparse"}:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_import_points_down_the_layers() -> None:
    upward = []
    for module, targets in sorted(GRAPH.items()):
        unit = _unit(module)
        for target in sorted(targets - {"argparse"}):
            other = _unit(target)
            if other != unit and LAYERS[other] >= LAYERS[unit]:
                upward.append(f"{module} -> {target} (layer {LAYERS[unit]} -> {LAYERS[other]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_only_the_cli_parses_arguments() -> None:
    offenders = [m for m, targets in GRAPH.items() if not m.startswith("starflow.cli") and m != "starflow.__main__"
                 and ("argparse" in targets or any(t.startswith("starflow.cli") for t in targets))]
    assert not offenders, f"argparse or starflow.cli imported outside starflow/cli: {offenders}"


def test_models_import_only_torch_and_the_config() -> None:
    """``import starflow.models`` loads no I/O, adapter, data or distribution code."""
    code = ("import sys, starflow.models; "
            "print(sorted(m for m in sys.modules if m.startswith(('starflow', 'transformers', 'diffusers'))))")
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert all(m in ("starflow", "starflow.config") or m.startswith("starflow.models") for m in loaded), loaded
    uses_distributed = []
    for m, path in MODULES.items():
        if not m.startswith("starflow.models"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                ["torch.distributed"] if isinstance(node, ast.Attribute) and node.attr == "distributed" else []
            uses_distributed += [f"{m}: {n}" for n in names if n.startswith("torch.distributed")]
    assert not uses_distributed, uses_distributed


@pytest.mark.parametrize("entry", [["starflow", "--help"], [sys.executable, "-m", "starflow.cli", "--help"],
                                   [sys.executable, "-m", "starflow", "--help"]])
def test_both_entry_points_list_every_command(entry: list[str]) -> None:
    if entry[0] == "starflow" and not Path(sys.executable).with_name("starflow").exists():
        pytest.skip("the starflow console script is not installed beside this Python")
    if entry[0] == "starflow":
        entry = [str(Path(sys.executable).with_name("starflow")), *entry[1:]]
    out = subprocess.run(entry, capture_output=True, text=True, check=True).stdout
    for command in ("train", "sample", "validate", "download", "convert", "export", "eval-nll", "pack",
                    "cache-latents"):
        assert command in out
