"""`make bench-engine`: the side-by-side run on a tiny local model, and its cost model."""

from __future__ import annotations

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


def test_bench_runs_side_by_side_and_reports_identical_outputs(tiny_model_dir, tmp_path, capsys):
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
