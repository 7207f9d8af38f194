"""README keeps up with the code: the schema table and the two set-up commands."""

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
