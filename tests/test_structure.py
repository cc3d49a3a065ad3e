"""The shape of the package, read from its source: every module imports alone, the layers below the engine
never import it, no import cycle, no family named outside models/, and no function over 60 lines."""

import ast
import concurrent.futures
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tp_embed")
# what models/ and layers/ must never import: the engine and everything that drives it
ABOVE_THE_MODELS = ("tp_embed.engine", "tp_embed.server", "tp_embed.scheduler", "tp_embed.protocol")
MAX_FUNCTION_LINES = 60
FLAG_DECLARATIONS = {("tp_embed.args", "add_engine_args"), ("tp_embed.args", "add_server_args")}  # argparse tables


def module_files() -> dict[str, str]:
    """Dotted module name -> file, for every module of tp_embed."""
    found = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return dict(sorted(found.items()))


MODULES = module_files()


def imports(name: str) -> set[str]:
    """The tp_embed modules `name` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(MODULES[name], encoding="utf-8").read())
    package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` is the package itself, each further dot one up
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from tp_embed.models import bert` imports the module tp_embed.models.bert
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


def test_imports_are_read():
    """The reader below finds what it should (a check on the checker)."""
    assert "tp_embed.models.spec" in imports("tp_embed.models.decoder")
    assert "tp_embed.models.bert" in imports("tp_embed.models")
    assert "tp_embed.engine" in imports("tp_embed.server")


def import_alone(name: str) -> tuple[str, int, str]:
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    return name, proc.returncode, proc.stderr[-2000:]


def test_every_module_imports_alone_in_a_fresh_interpreter():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failed = [(name, err) for name, code, err in pool.map(import_alone, MODULES) if code != 0]
    assert not failed, "\n\n".join(f"import {name}:\n{err}" for name, err in failed)


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith(("tp_embed.models", "tp_embed.layers"))])
def test_models_and_layers_do_not_import_the_engine(name):
    bad = sorted(m for m in imports(name) if m.startswith(ABOVE_THE_MODELS))
    assert not bad, f"{name} imports {bad}"
    if name.startswith("tp_embed.layers"):
        bad = sorted(m for m in imports(name) if m.startswith("tp_embed.models"))
        assert not bad, f"{name} (layers) imports {bad} (models)"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    """Counting imports inside functions too: a cycle hidden in a function is still a cycle. A package
    importing its own submodules (tp_embed.models -> tp_embed.models.bert) is how a package is built,
    not a cycle, so the edge from a submodule up to its package is what would be."""
    graph = {name: imports(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_family_is_named_outside_models():
    """Outside models/, nothing reads a family or model_type, or spells an architecture name."""
    from tp_embed.models import ARCHITECTURES

    for name, path in MODULES.items():
        if name.startswith("tp_embed.models"):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Attribute) and node.attr in ("family", "model_type")), \
                f"{name}:{node.lineno} reads .{node.attr}"
            assert not (isinstance(node, ast.Constant) and node.value in ARCHITECTURES), \
                f"{name}:{node.lineno} names the architecture {node.value!r}"


def test_no_function_is_over_60_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in FLAG_DECLARATIONS:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
