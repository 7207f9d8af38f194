"""README and the tree keep up with the code: the schema table, the two set-up commands, the
module table, and the engine's function length."""

from __future__ import annotations

import re
from pathlib import Path

from lsbench.results.schema import COLUMNS

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_documents_every_results_column():
    documented = set(re.findall(r"^\| `([a-zA-Z0-9_]+)` \|", README, flags=re.M))
    assert documented >= {name for name, _, _ in COLUMNS}


def test_readme_gives_the_two_setup_commands_and_make_has_them():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    for target in ("sweep", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, flags=re.M)


def test_readme_documents_every_scan_column():
    from lsbench.results.scan_schema import SCAN_COLUMNS, TRACE_COLUMNS

    documented = set(re.findall(r"^\| `([a-zA-Z0-9_]+)` \|", README, flags=re.M))
    assert documented >= {name for name, _, _ in [*SCAN_COLUMNS, *TRACE_COLUMNS]}


def test_readme_module_table_matches_the_tree():
    """Every module of the package has a line in the README's module table, under its room,
    and the table names no module that is gone."""
    table = README.split("| module | job |", 1)[1].split("\n\n", 1)[0]
    documented, room = set(), ""
    for line in table.splitlines()[2:]:
        first = line.split("|")[1].strip()
        if first.startswith("**`"):
            room = first.strip("*`").rstrip("/") + "/"
            continue
        for name in re.findall(r"`([^`]+\.py)`", first):
            documented.add(name if "/" in name else f"lsbench/{room}{name}")
    package = Path(__file__).parents[1] / "lsbench"
    tree = {f"lsbench/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
            if p.name != "__init__.py"}
    assert documented == tree


def test_no_function_in_the_engine_is_over_60_lines():
    """The decoding loops stay readable top to bottom: every function in `engine/`, nested
    ones included, fits in 60 lines (decorators and docstrings count)."""
    import ast

    engine = Path(__file__).parents[1] / "lsbench" / "engine"
    long = []
    for path in sorted(engine.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - first + 1 > 60:
                    long.append(f"{path.name}:{node.name}")
    assert not long
