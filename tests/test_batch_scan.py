"""The scan's batch curve: each row's rounds in a batch are its batch-1 rounds, a batch prices
round i at its costliest row's and runs until its slowest row ends, the crossover follows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lsbench.engine.batch import generate_batch
from lsbench.engine.generation import DecodingConfig
from lsbench.scenario.costs import CostTable
from lsbench.scenario.replay import Replay, Round
from lsbench.scenario.scan import Point, batch_curve, predict_batches, replay_point
from tests.test_cli import invoke
from tests.test_scan import _trace, deep  # noqa: F401  (the module's fixture)

RAGGED = [[1, 5, 9, 17, 33, 4, 60, 12], [1, 70, 71], [1, 40, 41, 42, 43, 44]]


@pytest.mark.parametrize("strategy,e,k", [("layerskip", 2, 3), ("pld", 0, 2)])
def test_batched_rows_round_exactly_as_their_batch_1_replay(deep, strategy, e, k):  # noqa: F811
    cfg = DecodingConfig(max_new_tokens=12)
    batch = generate_batch(strategy, deep, RAGGED, cfg, k=k, exit_layer=e or None)
    for prompt, row in zip(RAGGED, batch.rows, strict=True):
        out, traces = _trace(deep, prompt, cfg)
        rep = replay_point(Point(strategy, k, e), out, traces, {}, cfg, prompt)
        assert row.tokens == out  # greedy: every row equals its own ar output
        assert row.accepted == [r.accepted for r in rep.rounds]
        assert row.drafted == [r.drafted for r in rep.rounds]


def _rounds(*accepted: int, k: int = 2) -> Replay:
    return Replay(tuple(Round(k, a, a + 1, False, 0, False) for a in accepted), k,
                  sum(a + 1 for a in accepted))


def test_a_batch_prices_each_round_at_its_costliest_row() -> None:
    # layer[n-1] = n: a round's price grows with what it does; pld rounds here cost
    # layers(L, 3) + head; a round that accepts a draft pays one more head call (lazy head)
    table = CostTable(2, (1.0, 2.0, 3.0), 0.0, (10.0, 20.0, 30.0))
    short, long = _rounds(0, 2), _rounds(2, 2, 0, 1)
    one = [table.decode_seconds(r, "pld") for r in (short, long)]
    ends = table.batch_decode_seconds([short, long], "pld")
    per_round = [table.round_seconds(r, "pld") for r in long.rounds]
    assert ends[1] == pytest.approx(sum(per_round)) == pytest.approx(one[1])
    # the short row's first round rides with a costlier one (accepted 0 vs 2): it pays more
    assert ends[0] == pytest.approx(per_round[0] + per_round[1]) and ends[0] > one[0]
    assert table.batch_decode_seconds([short, long], "ar") == [
        short.decode_tokens * table.ar_step(), long.decode_tokens * table.ar_step()]


def test_predict_batches_and_the_predicted_crossover(deep) -> None:  # noqa: F811
    cfg = DecodingConfig(max_new_tokens=10)
    examples = {i: _trace(deep, p, cfg) for i, p in enumerate(RAGGED)}
    prompts = dict(enumerate(RAGGED))
    cheap = CostTable(deep.num_layers, (1.0,) * 4, 0.0, (1.0,) * 4)
    # at batch 2 a call costs its tokens: verifying k+1 tokens is no longer free
    wide = CostTable(deep.num_layers, (1.0, 2.0, 3.0, 4.0), 0.0, (1.0, 2.0, 3.0, 4.0))
    rows = predict_batches([Point("layerskip", 3, 3)], examples, prompts, {1: cheap, 2: wide},
                           cfg)
    assert rows.groupby("batch_size").batch_id.apply(list).to_dict() == {
        1: [0, 1, 2], 2: [0, 0, 1]}
    one = rows[rows.batch_size == 1].set_index("example_index").predicted_speedup
    for i, (out, traces) in examples.items():  # batch 1: the ordinary prediction
        rep = replay_point(Point("layerskip", 3, 3), out, traces, {}, cfg, RAGGED[i])
        want = (rep.decode_tokens * cheap.ar_step()
                / cheap.decode_seconds(rep, "layerskip", 3))
        assert one[i] == pytest.approx(want)
    curve = batch_curve(rows)
    assert len(curve) == 2 and curve.predicted_crossover.nunique() <= 1


def test_batch_curve_crossover_by_construction() -> None:
    rows = pd.DataFrame([
        {"strategy": s, "exit_layer": e, "num_speculations": 2, "batch_size": b,
         "predicted_speedup": v}
        for s, e, values in (("layerskip", 2, {1: 1.4, 4: 1.05, 16: 0.7}),
                             ("pld", 0, {1: 0.9, 4: 0.8, 16: 0.7}))
        for b, v in values.items() for _ in range(3)])
    curve = batch_curve(rows).set_index(["strategy", "batch_size"])
    assert curve.loc[("layerskip", 4), "predicted_speedup"] == pytest.approx(1.05)
    assert set(curve.loc["layerskip"].predicted_crossover) == {4}
    assert curve.loc["pld"].predicted_crossover.isna().all()


def test_scan_batch_size_prints_the_curve_and_its_crossover(tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    from tests.test_runner import write_jsonl

    data = write_jsonl(tmp_path / "a.jsonl")
    result = invoke("scan", "--model", tiny_model_dir, "--dataset", f"jsonl:{data}",
                    "--limit", 3, "-e", "2", "-k", "2", "--max-new-tokens", 8, "--warmup", 0,
                    "--batch-size", "1,2", "--verify", 1, "--out", tmp_path / "s.scan.parquet")
    assert result.exit_code == 0, result.output
    assert "predicted speedup on ar of the same batch" in result.stdout
    lines = [x for x in result.stdout.splitlines() if x.startswith("predicted crossover:")]
    assert len(lines) == 2 and lines[0].startswith("predicted crossover: layerskip E=2 k=2 ")
    assert lines[1].startswith("predicted crossover: pld k=2 ")
    # --verify times its points at every batch size, each with its own ar
    assert "measured at every batch size" in result.stdout
    verified = pd.read_parquet(tmp_path / "s.parquet")
    assert set(verified.batch_size) == {1, 2}
    assert set(verified[verified.batch_size == 2].strategy) >= {"ar"}
