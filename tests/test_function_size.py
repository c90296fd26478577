"""Functions stay small enough to read: none in neco_jax/ or input_pipeline/ longer than 80 lines (its whole
definition, docstring included) or with more than 8 parameters (self and cls not counted). Read from the
source with `ast`, so nested functions and methods count too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("neco_jax", "input_pipeline")
MAX_LINES = 80
MAX_PARAMETERS = 8


def _functions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def _parameters(node) -> list[str]:
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_no_function_is_over_80_lines():
    functions = list(_functions())
    assert len(functions) > 300  # the packages were found
    sizes = {name: node.end_lineno - node.lineno + 1 for name, node in functions}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_no_function_has_more_than_8_parameters():
    counts = {name: _parameters(node) for name, node in _functions()}
    assert not {name: p for name, p in counts.items() if len(p) > MAX_PARAMETERS}
