"""The import graph of src/chatlora, read with ast (nothing is imported): recipes are leaves, every
package imports only itself and the packages below it, and no two modules import each other through
any chain. Imports inside functions count: they run too, only later.

The idea is torchtune's tests/test_import_recipes.py (a recipe is not a library); this goes further
and checks the whole layering, which docs/architecture.md draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = SRC / "chatlora"

# The layers, low -> high: a package may import itself and the ones before it, nothing after it. The
# one place this order is written down in code (docs/architecture.md draws it).
LAYERS = [
    ("errors", ["chatlora", "chatlora.errors"]),
    ("config", ["chatlora.config"]),
    ("run", ["chatlora.run"]),
    ("data", ["chatlora.data"]),
    ("model", ["chatlora.model"]),
    ("generate", ["chatlora.generate"]),
    ("evaluate", ["chatlora.evaluate"]),
    ("trainer", ["chatlora.trainer"]),
    ("plan", ["chatlora.plan"]),
    ("serve", ["chatlora.serve"]),
    ("export", ["chatlora.export"]),
    ("recipes", ["chatlora.recipes"]),
    ("cli", ["chatlora.cli", "chatlora.flags", "chatlora.flags_export", "chatlora.__main__"]),
]

# Known edges (importer, imported) that break the rules today and that the redesign of issue 22 is
# removing in parallel branches; this list is emptied once they are merged. Nothing is to be added.
ALLOWED: set[tuple[str, str]] = set()


def layer_of(module: str) -> int:
    best = None
    for rank, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") and prefix != "chatlora":
                best = rank
    if best is None:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS in {__file__}")
    return best


def layer_name(module: str) -> str:
    return LAYERS[layer_of(module)][0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """The chatlora modules `path` imports, anywhere in it, with the line of each import."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from chatlora.model import quant` imports the module chatlora.model.quant
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "chatlora" or target.startswith("chatlora."):
                while target not in known and "." in target:  # `import chatlora.model.load as x`, attributes
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno))
    return found


def graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    where: dict[tuple[str, str], str] = {}
    for module, path in known.items():
        for target, line in imports(path, known):
            if target != module:
                edges[module].add(target)
                where.setdefault((module, target), f"{path.relative_to(SRC.parent)}:{line}")
    return edges, where


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_recipe_imports_a_recipe():
    edges, where = graph()
    bad = [f"{where[m, t]}: {m} imports {t}" for m in edges for t in sorted(edges[m])
           if m.startswith("chatlora.recipes.") and t.startswith("chatlora.recipes") and (m, t) not in ALLOWED]
    assert not bad, ("a recipe imports another recipe; move the shared code down to the package it "
                     "belongs to (docs/architecture.md):\n  " + "\n  ".join(bad))


def test_no_package_imports_a_package_above_it():
    edges, where = graph()
    bad = [f"{where[m, t]}: {m} ({layer_name(m)}) imports {t} ({layer_name(t)})"
           for m in edges for t in sorted(edges[m]) if layer_of(t) > layer_of(m) and (m, t) not in ALLOWED]
    order = " < ".join(name for name, _ in LAYERS)
    assert not bad, f"a package imports one above it (the order: {order}):\n  " + "\n  ".join(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges, where = graph()
    kept = {m: {t for t in ts if (m, t) not in ALLOWED} for m, ts in edges.items()}
    found = cycles(kept)
    lines = []
    for component in found:
        inside = set(component)
        lines.append("a cycle among " + ", ".join(component) + ":")
        lines += [f"    {where[m, t]}: {m} imports {t}" for m in component for t in sorted(kept[m] & inside)]
    assert not found, "modules import each other (through any chain):\n  " + "\n  ".join(lines)


def test_the_checks_find_what_they_look_for():
    """The checks themselves: a cycle and a back-edge are seen, through a function-level import too."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("chatlora.recipes.train") > layer_of("chatlora.trainer.trainer") > layer_of("chatlora.errors")
    assert layer_of("chatlora") == layer_of("chatlora.errors")
    # cli.py imports the launcher only inside run(): found all the same
    assert "chatlora.recipes.launch" in {t for t, _ in imports(ROOT / "cli.py", modules())}
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("chatlora.nowhere")


def test_help_and_flag_errors_need_no_torch():
    """`chatlora ... --help` and a refused flag answer in a fraction of a second: nothing on the way to the
    parser imports torch or transformers (seconds each; the bad-input corpus runs the command 80 times)."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\nfrom chatlora.flags import parser\np = parser()\n"
            "for argv in (['train', '--help'], ['chat', '--help'], ['serve', '--help'], ['export', '--help'],\n"
            "             ['chat', 'RUN', '--decode', 'nope']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), "
            "contextlib.suppress(SystemExit): p.parse_args(argv)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_train_refuses_bad_rows_and_a_missing_adapter_before_torch(tmp_path):
    """`chatlora train` checks the rows (and model.adapter) before torch and transformers are imported:
    a bad file is refused in a fraction of a second, not after the ten seconds those imports take on a
    small CPU; and nothing of the run folder is made."""
    import json
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": 3, "output": "x"}) + "\n", encoding="utf-8")
    code = ("import sys\nfrom chatlora.cli import main\n"
            f"codes = [main(['train', 'demo', 'data.train={bad}', 'output_dir={tmp_path / 'run'}']),\n"
            f"         main(['train', 'dpo-demo', 'model.adapter={tmp_path / 'none'}', 'output_dir={tmp_path / 'run'}'])]\n"
            "print(codes, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    # The first run on a machine lists TrainingArguments' fields into the cache folder (config/load.py),
    # which imports transformers once; the run after it is what users meet.
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[2, 2] []", out.stdout + out.stderr
    assert f"{bad}:line 1 [instruction]: must be a string, got int" in out.stderr
    assert "model.adapter:" in out.stderr and not (tmp_path / "run").exists()
