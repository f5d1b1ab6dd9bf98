"""The package's layering, checked on its source and in fresh interpreters: the configuration and
the command line's help load no torch, ``distributed`` loads no Pyro, and no module-level import
goes in a circle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_vae"


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize("statement", ["import pyro_vae.config", "import pyro_vae.cli; pyro_vae.cli.parser()"])
def test_the_configuration_and_the_command_line_load_no_torch(statement):
    loaded = loaded_after(statement)
    assert "torch" not in loaded and "pyro_vae.run" not in loaded, sorted(m for m in loaded if m.startswith(("torch", "pyro_vae")))


def test_distributed_only_communicates():
    loaded = loaded_after("import pyro_vae.distributed")
    assert "torch.distributed" in loaded and not any(m == "pyro" or m.startswith("pyro.") for m in loaded)


def module_level_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports at module level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyro_vae."):
            found.add(node.module.split(".")[1])
    return {name.split(".")[0] for name in found}


def test_no_module_level_import_cycle():
    graph = {p.stem: module_level_imports(p) for p in PACKAGE.glob("*.py")}
    done, visiting = set(), []

    def visit(module):
        if module in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(module):] + [module]))
        if module in done or module not in graph:
            return
        visiting.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert {"config", "names", "errors"} <= done


def test_ruff_keeps_the_style():
    """``ruff check`` (pyproject.toml: line length 120, import order) is clean and the package is
    formatted as ``ruff format`` leaves it."""
    pytest.importorskip("ruff")  # the docs extra installs it
    root = PACKAGE.parent
    for command in (["check", "."], ["format", "--check", "pyro_vae"]):
        done = subprocess.run([sys.executable, "-m", "ruff", *command], capture_output=True, text=True, cwd=root, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
