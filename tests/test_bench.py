"""`make bench-engine`: the side-by-side run on a tiny local model, and its cost model."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from lsbench.benchmarks import bench
from tests.test_runner import write_jsonl

L, K = 30, 4


def test_shared_cache_alone_saves_no_time_when_extra_tokens_are_free():
    # Weight-read bound: a (k+1)-token call costs what a 1-token call costs. DESIGN's round
    # then reads the same weights as transformers' and saves no time; deferring the last
    # draft still saves its shallow pass.
    unit = bench.UnitCosts(layer_1=1.0, layer_k=1.0, layer_k1=1.0, head_1=3.0, head_k1=3.0)
    for e in (1, 8, 16, 29):
        theirs = unit.hf_early_exit_round(L, e, K)
        assert unit.layerskip_round(L, e, K, defer=False) == pytest.approx(theirs)
        assert unit.layerskip_round(L, e, K) == pytest.approx(theirs - e)


def test_cost_model_matches_design_layer_token_counts_when_compute_bound():
    # Compute bound with a free head: time is proportional to layer-token evaluations, so the
    # rounds are DESIGN.md's k*E + E + (L-E)*(k+1) (L less when the last draft is deferred and
    # a draft rejected) against transformers' k*E + L*(k+1).
    unit = bench.UnitCosts(layer_1=1.0, layer_k=K, layer_k1=K + 1.0, head_1=0.0, head_k1=0.0)
    for e in (4, 8, 16, 28, L):
        design = K * e + e + (L - e) * (K + 1)
        assert unit.layerskip_round(L, e, K, defer=False) == pytest.approx(design)
        assert unit.layerskip_round(L, e, K) == pytest.approx(design - L)
        assert unit.hf_early_exit_round(L, e, K) == pytest.approx(K * e + L * (K + 1))
    assert unit.hf_early_exit_round(L, 16, K) / unit.layerskip_round(L, 16, K, defer=False) > 1.4


@pytest.fixture(params=["as built", "with a compiled engine"])
def engine(request, monkeypatch) -> str:
    """The engine as it is, and one whose compiled mode works (eager decoding marked
    compiled), so that the compiled lines are checked whether or not the engine is built."""
    if request.param != "as built":
        real = bench.generate

        def generate(*args, compiled=False, **kwargs):
            return dataclasses.replace(real(*args, **kwargs), compiled=compiled)

        monkeypatch.setattr(bench, "generate", generate)
    return request.param


def test_bench_runs_side_by_side_and_reports_identical_outputs(tiny_model_dir, tmp_path, capsys,
                                                               engine):
    data = write_jsonl(tmp_path / "articles.jsonl")
    code = bench.main(["--model", str(tiny_model_dir), "--dataset", f"jsonl:{data}",
                       "--prompts", "2", "--max-new-tokens", "8", "--k", "3",
                       "--exit-layers", "1,4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "greedy outputs identical to ar for every strategy: yes" in out
    assert "unit costs: decoder layer" in out
    lines = [line for line in out.splitlines() if " vs " in line and "tok/s" in line]
    assert [line.split()[0] for line in lines] == ["ar", "pld", "layerskip", "layerskip"]
    assert "pld vs hf-pld" in out and "drafted nothing" in out
    assert out.count("per round:") == 2 and "a ceiling of" in out
    assert "engine policy: default (lazy head, E/L deferral)" in out  # CPU: work unchanged
    assert out.count("deferral break-even: measured") == 2
    # The compiled engine's lines, in their forms, or the reason it cannot run (not built yet)
    forms = {"compiled ar vs eager ar": r"\d+\.\d\dx \(target > 1x\)",
             "compiled ar vs hf-ar-compiled": r"\d+\.\d\dx \(target >= 1\.00x; goal 1\.20x\)",
             "compiled layerskip vs eager layerskip at E=1 k=3": r"\d+\.\d\dx",
             "ops per decoded token \\(ar\\)": r"eager \d+, compiled \d+ \(target M <= N / 5\)",
             "compiled ar roofline": r"\d+% of copy bandwidth \(target >= 80%\)"}
    unavailable = "compiled engine unavailable: " in out
    assert not (unavailable and engine != "as built")
    for line, form in forms.items():
        tail = "compiled engine unavailable: .+" if unavailable else form
        assert re.search(rf"^{line}: {tail}$", out, flags=re.M), line
    if unavailable:  # transformers' compiled generate() is measured all the same
        assert re.search(r"hf-ar-compiled \d+\.\d\d tok/s, eager ar \d+\.\d\d tok/s", out)


@pytest.mark.parametrize("args", [["--exit-layers", "2,9"], ["--device", "tpu"]])
def test_bench_refuses_bad_input_in_one_line(tiny_model_dir, tmp_path, args):
    data = write_jsonl(tmp_path / "articles.jsonl")
    cmd = [sys.executable, "-m", "lsbench.benchmarks.bench", "--model", str(tiny_model_dir),
           "--dataset", f"jsonl:{data}", "--prompts", "1", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
