"""The `python -m` scripts' one-line errors (errors.run_main)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lsbench.errors import LsbenchError, run_main

ROOT = Path(__file__).resolve().parent.parent


def test_run_main_turns_bad_input_into_one_line_and_exit_1(capsys):
    def bad() -> int:
        raise LsbenchError("no model named 'x'")

    with pytest.raises(SystemExit) as exit_info:
        run_main(bad)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: no model named 'x'\n"


def test_run_main_passes_the_entrys_status_and_lets_bugs_through():
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: 3)
    assert exit_info.value.code == 3
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(lambda: 1 // 0)


@pytest.mark.parametrize("module", ["lsbench.benchmarks.bench_cluster",
                                    "lsbench.benchmarks.bench"])
def test_benchmark_scripts_refuse_an_unknown_model_in_one_line(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr
