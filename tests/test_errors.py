"""One hierarchy of user errors, each defined once in the two errors modules, and `cli`, the one place where a
CLI turns a UserError into one line and exit status 2."""

import ast
import functools
from pathlib import Path

import pytest

import input_pipeline.errors
from neco_jax import errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("input_pipeline", "neco_jax", "evaluation", "configs")
ERRORS_MODULES = (Path("input_pipeline/errors.py"), Path("neco_jax/errors.py"))


@functools.cache
def exception_classes() -> dict[str, list[tuple[Path, list[str]]]]:
    """name -> [(file, base names)] of every class in the packages (and main.py) whose name ends in Error or
    that derives from a class named *Error, *Exception or from another such class."""
    found = {}
    for path in [ROOT / "main.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]
                if node.name.endswith("Error") or any(b.endswith(("Error", "Exception")) for b in bases):
                    found.setdefault(node.name, []).append((path.relative_to(ROOT), bases))
    return found


def user_errors(classes) -> set[str]:
    """The names of the classes that derive from UserError (by their bases' names)."""
    names = {"UserError"}
    while True:
        more = {n for n, defs in classes.items() if any(set(bases) & names for _, bases in defs)} - names
        if not more:
            return names
        names |= more


def test_every_error_class_is_defined_once_and_user_errors_in_an_errors_module():
    classes = exception_classes()
    assert {n: [str(p) for p, _ in d] for n, d in classes.items() if len(d) > 1} == {}
    for name in user_errors(classes):
        assert classes[name][0][0] in ERRORS_MODULES, f"{name} is a UserError defined outside the errors modules"
    # The others are a module's internal signals, caught where they are raised, never shown to a user.
    assert set(classes) - user_errors(classes) == {
        "UndecodableImageError",
        "InvalidTrial",
        "RefusedGlobal",
        "StoppedBeforeTheLoop",
    }


def test_one_root_and_neco_jax_errors_exports_every_user_error():
    assert errors.UserError is input_pipeline.errors.UserError
    exported = {n for n in errors.__all__ if isinstance(getattr(errors, n), type)}
    assert exported == user_errors(exception_classes())
    assert all(issubclass(getattr(errors, n), errors.UserError) for n in exported)


def test_cli_prints_a_user_error_as_one_line_and_returns_2(capsys):
    @errors.cli
    def main(value):
        if value == "user":
            raise errors.ConfigError("config.x=1 must be >= 2")
        if value == "bug":
            raise RuntimeError("a bug keeps its traceback")
        return 0

    assert main("ok") == 0
    assert main("user") == 2
    assert capsys.readouterr().err == "error: config.x=1 must be >= 2\n"
    with pytest.raises(RuntimeError):
        main("bug")
