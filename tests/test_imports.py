"""Imports flow one way: input_pipeline <- neco_jax <- evaluation <- configs, with main.py, bench/ and the tests
on top. Read from the source with `ast` (module-level and function-local imports, and `importlib.import_module`
of a literal name), so a forbidden import fails here even where no test executes it."""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package may import itself and the packages before it, nothing after it.
LAYERS = ("input_pipeline", "neco_jax", "evaluation", "configs")
TOP = ("main", "bench", "tests")  # nothing in LAYERS imports these
# Modules a package must not import although their package is below it: evaluation restores training
# checkpoints through neco_jax.checkpoint alone, never through the trainer (its loop, step or actions).
FORBIDDEN: dict[str, tuple[str, ...]] = {"evaluation": ("neco_jax.train", "neco_jax.step", "neco_jax.periodic")}


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every absolute import in `tree`; `from a import b` gives `a.b` (b may be a module
    or a name in a). A relative import stays inside its own package."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                arg = arg.values[0]  # f"evaluation.{name}": its literal start names the package
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value.rstrip(".")))
    return found


def violations(package: str, modules: dict[str, str], forbidden=FORBIDDEN) -> list[str]:
    """The imports of `package` (module name -> source) that break the layering, as 'file:line: name'."""
    above = LAYERS[LAYERS.index(package) + 1 :] + TOP
    bad = []
    for module, source in sorted(modules.items()):
        for line, name in imported_names(ast.parse(source)):
            parts = name.split(".")
            if parts[0] in above or any(name == f or name.startswith(f + ".") for f in forbidden.get(package, ())):
                bad.append(f"{module}:{line}: imports {name}")
    return sorted(set(bad))


@functools.cache
def package_sources(package: str) -> dict[str, str]:
    sources = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text()
    return sources


@pytest.mark.parametrize("package", LAYERS)
def test_each_package_imports_only_the_layers_below_it(package):
    sources = package_sources(package)
    assert sources, f"no sources found under {package}/"
    assert violations(package, sources) == []


@pytest.mark.parametrize(
    "package,source,name",
    [
        ("input_pipeline", "from neco_jax.errors import UserError\n", "neco_jax.errors.UserError"),
        ("neco_jax", "def f():\n    from evaluation import runner\n", "evaluation.runner"),
        ("neco_jax", "import configs.base\n", "configs.base"),
        ("evaluation", "def f():\n    from neco_jax import train\n", "neco_jax.train"),
        ("evaluation", "import neco_jax.train as t\n", "neco_jax.train"),
        ("evaluation", "import importlib\nimportlib.import_module(f'configs.{x}')\n", "configs"),
        ("neco_jax", "import bench.common\n", "bench.common"),
    ],
)
def test_a_forbidden_import_is_found(package, source, name):
    assert any(v.endswith(f"imports {name}") for v in violations(package, {f"{package}.mod": source}))


def test_allowed_imports_pass():
    assert (
        violations("evaluation", {"evaluation.mod": "from neco_jax import checkpoint\nimport input_pipeline\n"}) == []
    )
    assert violations("configs", {"configs.base": "from neco_jax.errors import UserError\n"}) == []


def unexplained_local_imports(source: str, module: str) -> list[str]:
    """Function-local imports without a comment saying why (a slow or optional import, or a cycle), on their
    line or the line above; one comment covers the imports right below it."""
    lines = source.split("\n")
    local = set()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    explained, bad = set(), []
    for line in sorted(local):
        above = line - 1
        while above > 0 and not lines[above - 1].strip():
            above -= 1
        if "#" in lines[line - 1] or above in explained or lines[above - 1].strip().startswith("#"):
            explained.add(line)
        else:
            bad.append(f"{module}:{line}: {lines[line - 1].strip()}")
    return bad


def test_function_local_imports_say_why():
    sources = {m: s for package in LAYERS for m, s in package_sources(package).items()}
    sources["main"] = (ROOT / "main.py").read_text()
    assert [b for m, s in sorted(sources.items()) for b in unexplained_local_imports(s, m)] == []
    example = "def f():\n    import torch  # optional\n\n    import optuna\n\n\ndef g():\n    import json\n"
    assert unexplained_local_imports(example, "m") == ["m:8: import json"]
    assert unexplained_local_imports("def g():\n    # slow\n    import jax\n    import flax\n", "m") == []
