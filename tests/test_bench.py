"""`make bench-engine`: the side-by-side run on a tiny local model, and its cost model."""

from __future__ import annotations

import pytest

from lsbench import bench
from tests.test_runner import write_jsonl

L, K = 30, 4


def test_cost_model_ceiling_is_one_when_extra_tokens_are_free():
    # Weight-read bound: a (k+1)-token call costs what a 1-token call costs. Both sides then
    # read the same weights per round, and the shared cache cannot save wall time.
    unit = bench.UnitCosts(layer_1=1.0, layer_k1=1.0, head_1=3.0, head_k1=3.0)
    for e in (1, 8, 16, 29):
        assert unit.hf_early_exit_round(L, e, K) == pytest.approx(unit.layerskip_round(L, e, K))


def test_cost_model_matches_design_layer_token_counts_when_compute_bound():
    # Compute bound with a free head: time is proportional to layer-token evaluations, so the
    # ratio is DESIGN.md's L*(k+1) + k*E against k*E + E + (L-E)*(k+1).
    unit = bench.UnitCosts(layer_1=1.0, layer_k1=K + 1.0, head_1=0.0, head_k1=0.0)
    for e in (4, 8, 16, 28):
        ours = K * e + e + (L - e) * (K + 1)
        theirs = K * e + L * (K + 1)
        assert unit.layerskip_round(L, e, K) == pytest.approx(ours)
        assert unit.hf_early_exit_round(L, e, K) == pytest.approx(theirs)
    assert unit.hf_early_exit_round(L, 16, K) / unit.layerskip_round(L, 16, K) > 1.4


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
    assert [line.split()[0] for line in lines] == ["ar", "layerskip", "layerskip"]
    assert out.count("per round:") == 2 and "a ceiling of" in out
