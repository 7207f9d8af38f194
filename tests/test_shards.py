"""--shard I/N and lsbench merge: shards of a job merge into the unsharded job's rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lsbench.errors import LsbenchError
from lsbench.launcher.shards import parse_shard, shard_path
from tests.test_cli import assert_refused, invoke, sweep_args
from tests.test_runner import KEY, plain, write_jsonl

# Columns that legitimately differ between two measurements of the same generation.
TIMING = {"prefill_s", "decode_s", "draft_s", "total_s", "tokens_per_s", "e2e_tokens_per_s",
          "ms_per_token", "baseline_ms_per_token", "speedup", "peak_mem_delta_bytes",
          "achieved_gbps", "peak_gbps", "roofline_fraction", "timestamp", "ttft_s", "tpot_s",
          "itl_p50_s", "itl_p90_s", "itl_p99_s", "step_end_s",
          "batch_prefill_s", "batch_decode_s", "batch_tokens_per_s"}


def test_parse_shard_and_shard_path() -> None:
    assert parse_shard("2/3") == (2, 3) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/3", "4/3", "2", "a/b", "-1/2"):
        with pytest.raises(LsbenchError, match="--shard must be I/N"):
            parse_shard(bad)
    assert shard_path(Path("r/x.parquet"), (2, 3)) == Path("r/x.shard-2-of-3.parquet")
    assert shard_path(Path("r/x.shard-1-of-3.parquet"), (2, 3)) == Path("r/x.shard-2-of-3.parquet")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


def by_key(df: pd.DataFrame) -> dict:
    return {tuple(r[k] for k in KEY): {c: v for c, v in plain(r).items() if c not in TIMING}
            for r in df.to_dict("records")}


def test_three_shards_merge_into_the_unsharded_sweep(tiny_model_dir: Path, data_file: Path,
                                                    tmp_path: Path) -> None:
    whole = tmp_path / "whole.parquet"
    out = tmp_path / "x.parquet"
    assert invoke(*sweep_args(tiny_model_dir, data_file, whole, "--limit", 3)).exit_code == 0
    for i in (1, 2, 3):
        result = invoke(*sweep_args(tiny_model_dir, data_file, out, "--limit", 3,
                                    "--shard", f"{i}/3"))
        assert result.exit_code == 0, result.output
        shard = pd.read_parquet(tmp_path / f"x.shard-{i}-of-3.parquet")
        assert set(shard.example_index) == {i - 1} and len(shard) == 3  # 3 runs, 1 example
    assert not out.exists()
    shards = [tmp_path / f"x.shard-{i}-of-3.parquet" for i in (3, 1, 2)]
    result = invoke("merge", out, *shards)
    assert result.exit_code == 0, result.output
    assert f"merged 9 rows from 3 files into {out}" in result.stderr
    merged, reference = pd.read_parquet(out), pd.read_parquet(whole)
    assert len(merged) == len(reference) == 9 and not merged.duplicated(KEY).any()
    assert by_key(merged) == by_key(reference)
    assert list(merged.example_index) == sorted(merged.example_index)

    # refusals, one line each, nothing written
    assert_refused(invoke("merge", tmp_path / "m1.parquet", shards[0], shards[0]),
                   "is in both", "refusing to merge")
    other = tmp_path / "other.parquet"
    assert invoke(*sweep_args(tiny_model_dir, data_file, other, "--limit", 1, "-e", 2)
                  ).exit_code == 0
    assert_refused(invoke("merge", tmp_path / "m2.parquet", shards[0], other),
                   "is from another job", "run ids differ")
    longer = tmp_path / "longer.parquet"  # same runs, another selection of examples
    assert invoke(*sweep_args(tiny_model_dir, data_file, longer, "--limit", 4, "--shard", "4/4")
                  ).exit_code == 0
    assert_refused(invoke("merge", tmp_path / "m3.parquet", shards[0],
                          tmp_path / "longer.shard-4-of-4.parquet"),
                   "dataset fingerprint differ")
    assert_refused(invoke("merge", out, *shards), "already exists")
    assert not any((tmp_path / f"m{i}.parquet").exists() for i in (1, 2, 3))
    assert_refused(invoke(*sweep_args(tiny_model_dir, data_file, out, "--shard", "3/2")),
                   "--shard must be I/N")


def test_report_warns_about_a_run_measured_on_different_devices(tmp_path: Path) -> None:
    from lsbench.results.store import ResultStore
    from tests.test_report import make_row

    path = tmp_path / "mixed.parquet"
    store = ResultStore(path)
    store.append([make_row(run_id="r0", strategy="ar", is_baseline=True, example_id=f"e{i}",
                           repeat=0, device_name=name, speedup=1.0)
                  for i, name in enumerate(["GPU A", "GPU B"])])
    result = invoke("report", path, "--table", "summary")
    assert result.exit_code == 0, result.output
    assert ("warning: run r0 (ar) has rows from different devices: "
            "GPU A, GPU B") in result.stderr
