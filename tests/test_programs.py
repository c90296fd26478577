"""One command-line style (neco_jax/program.py): absl flags defined only in program modules that nothing imports,
each program run by `program.run`, no argparse and no hand-made FlagValues; a bad command line is one line with
exit status 2, an unknown config field named with the nearest names."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import ml_collections
import pytest
from programs import run_program

from neco_jax import program

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    path.relative_to(ROOT).as_posix(): path.read_text()
    for folder in ("neco_jax", "input_pipeline", "evaluation", "configs", "bench")
    for path in sorted((ROOT / folder).rglob("*.py"))
} | {"main.py": (ROOT / "main.py").read_text()}


def _module(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_program(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
        for node in tree.body
    )


def _calls(tree: ast.AST) -> list[str]:
    return [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]


TREES = {path: ast.parse(source) for path, source in SOURCES.items()}
PROGRAMS = sorted(path for path, tree in TREES.items() if _is_program(tree))


def test_the_programs_are_found():
    expected = {"main.py", "evaluation/__main__.py", "evaluation/suite.py", "neco_jax/convert/__main__.py"}
    assert expected | {"neco_jax/plot.py", "bench/train_step.py"} <= set(PROGRAMS)


@pytest.mark.parametrize("path", PROGRAMS)
def test_each_program_runs_through_program_run(path):
    main_block = next(node for node in TREES[path].body if isinstance(node, ast.If) and _is_program(ast.Module([node])))
    assert "program.run" in _calls(main_block), f"{path}: end with `program.run(main)` (neco_jax/program.py)"


def test_flags_are_defined_only_in_programs_and_no_module_imports_a_program():
    """A program's flags exist only in its own process: a module that others import must define none (they would
    appear in, and could clash with, every program that imports it)."""
    defining = sorted(
        path
        for path, tree in TREES.items()
        if any(".DEFINE_" in call or call == "DEFINE_flag" for call in _calls(tree))
    )
    assert set(defining) <= set(PROGRAMS)
    program_modules = {_module(p) for p in PROGRAMS} | {"evaluation.__main__", "neco_jax.convert.__main__"}
    test_sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("*.py")}
    importers = []
    for name, source in list(SOURCES.items()) + list(test_sources.items()):
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            importers += [f"{name}: {n}" for n in names if n in program_modules]
    assert importers == []


def test_no_argparse_and_no_hand_made_flag_values():
    test_sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("*.py")}
    trees = list(TREES.items()) + [(name, ast.parse(source)) for name, source in test_sources.items()]
    offenders = [
        f"{path}: {call}"
        for path, tree in trees
        for call in _calls(tree)
        if call.endswith(("ArgumentParser", "FlagValues"))
    ]
    assert offenders == []


def test_unknown_field_names_the_nearest_fields():
    config = ml_collections.ConfigDict({"optim": {"batch_size": 1, "lr_heads": 0.1}, "seed": 0})
    assert program.unknown_field(config, "optim.batch_size") is None
    assert program.unknown_field(config, "optim.batchsize") == (
        "the config has no field or section 'batchsize' (did you mean 'batch_size'?); config.optim has: batch_size, "
        "lr_heads"
    )
    assert (
        program.unknown_field(config, "zzz.a")
        == "the config has no field or section 'zzz'; the config has: optim, seed"
    )
    assert program.unknown_field(config, "seed.x") == "config.seed is a value, not a section"


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "expected a subcommand and its input, got nothing"),
        (["tojax", "x.pth", "--out=o"], "expected a subcommand and its input, got tojax x.pth"),
        (["to-jax", "x.pth"], "to-jax needs --out"),
        (["to-jax", "x.pth", "--out=o", "--layout=timm"], "--layout does not apply to to-jax"),
        (["to-torch", "folder", "--out=o.pth", "--arch=vit_tiny_test"], "--arch does not apply to to-torch"),
        (["to-torch", "folder", "--out=o.pth"], "to-torch needs --layout=dinov2, timm or hf"),
        (["to-torch", "folder", "--out=o.pth", "--layout=onnx"], "flag --layout=onnx: value should be one of"),
        (["to-jax", "x.pth", "--out=o", "--outt=p"], "Unknown command line flag 'outt'"),
    ],
)
def test_convert_command_line_mistakes_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert run_program("neco_jax.convert", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "module,argv,message",
    [
        ("evaluation", [], "flag --config=None: Flag --config must have a value other than None"),
        ("evaluation", ["--config=configs/eval/nope.py"], "config file 'configs/eval/nope.py' does not exist"),
        (
            "evaluation",
            ["--config=configs/eval/voc_linear.py", "--config.linear.epoch=3"],
            "--config.linear.epoch: the config has no field or section 'epoch' (did you mean 'epochs'?)",
        ),
        ("evaluation", ["--config=configs/eval/voc_linear.py", "extra"], "unexpected arguments: extra"),
        ("neco_jax.plot", [], "name one training workdir"),
        ("evaluation.suite", ["--checkpoint=c", "--data_dir=d"], "flag --workdir=None: Flag --workdir must have"),
    ],
)
def test_other_programs_command_line_mistakes_are_one_line(capsys, monkeypatch, module, argv, message):
    monkeypatch.chdir(ROOT)
    assert run_program(module, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err


def test_a_program_runs_the_cycle_collector_less_often(capsys):
    """program.run sets the collector's threshold before anything else (the demo's run: 12.4 -> 11.8 s)."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's default
    try:
        assert run_program("neco_jax.plot") == 2  # no workdir named: one error line
        assert gc.get_threshold() == (100_000, 10, 10)
    finally:
        gc.set_threshold(*before)
    assert capsys.readouterr().err.startswith("error: name one training workdir")
