"""Batch sizes in the runner: jobs at several batch sizes, rows with their batch, speedup on
the same batch composition, resume per whole batch, hf-ar's batched reference, the batched
cost columns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lsbench.scenario.runner
from lsbench.backend.kv_cache import capacity_for
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.hf_reference import generate_hf, generate_hf_batch
from lsbench.errors import LsbenchError
from lsbench.results.store import ResultStore
from lsbench.scenario.accounting import (
    batch_costs,
    batch_memory_bytes,
    peak_gflops,
    roofline_s,
)
from lsbench.scenario.jobs import RunSpec, compare_job, sweep_job
from lsbench.scenario.runner import (
    Batch,
    JobOutcome,
    check_batches_fit,
    job_batches,
    prepare_job,
    run_job,
    shard_batches,
    unit_order,
)
from tests.test_runner import KEY, by_key, job_settings, write_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


def batch_job(model_dir: Path, data: Path, sizes: str = "1,2", limit: int = 3):
    return sweep_job(job_settings(model_dir, data, data__limit=limit, sweep__exit_layers="2",
                                  sweep__num_speculations="2",
                                  sweep__strategies=["layerskip", "pld"],
                                  sweep__batch_sizes=sizes), 4)


@pytest.fixture(scope="module")
def batched(tiny_model_dir: Path, data_file: Path, tmp_path_factory):
    job = batch_job(tiny_model_dir, data_file)
    store = ResultStore(tmp_path_factory.mktemp("results") / "batch.parquet")
    outcome = run_job(job, store)
    return job, ResultStore(store.path).rows(), outcome


# --- jobs ------------------------------------------------------------------------------------

def test_every_run_at_every_batch_size_and_batch_1_ids_unchanged(tiny_model_dir: Path,
                                                                  data_file: Path) -> None:
    job = batch_job(tiny_model_dir, data_file, "1,4")
    plain = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=3,
                                   sweep__exit_layers="2", sweep__num_speculations="2",
                                   sweep__strategies=["layerskip", "pld"]), 4)
    assert [r.batch_size for r in job.runs] == [1, 1, 1, 4, 4, 4]
    assert job.runs[:3] == plain.runs  # batch 1 is the job without batching ...
    assert [job.run_id(r) for r in job.runs[:3]] == [plain.run_id(r) for r in plain.runs]
    assert len({job.run_id(r) for r in job.runs}) == 6  # ... and each batch size its own runs
    assert job.runs[3] == RunSpec("ar", batch_size=4) and job.runs[3].label == "ar B=4"


def test_batch_sizes_refused_in_one_line(tiny_model_dir: Path, data_file: Path) -> None:
    with pytest.raises(LsbenchError, match="batch sizes must be >= 1"):
        batch_job(tiny_model_dir, data_file, "0,2")
    with pytest.raises(LsbenchError, match="cannot parse batch sizes"):
        batch_job(tiny_model_dir, data_file, "two")
    s = job_settings(tiny_model_dir, data_file, compare__early_exit="2",
                     compare__hf_reference=True, compare__batch_sizes="1,4")
    with pytest.raises(LsbenchError, match="hf-early-exit cannot run at batch size 4: "
                       "transformers' assisted generation is batch 1 only"):
        compare_job(s, 4)
    s.override("compare", "batch_sizes", [1])
    assert compare_job(s, 4).runs  # batch 1 keeps every reference


def test_batches_units_and_shards() -> None:
    from lsbench.scenario.data import DatasetSpec
    from lsbench.scenario.jobs import JobSpec

    job = JobSpec("j", "m", DatasetSpec("lee-news"), DecodingConfig(),
                  (RunSpec("ar"), RunSpec("pld", 0, 2), RunSpec("ar", batch_size=2),
                   RunSpec("pld", 0, 2, batch_size=2)))
    batches = job_batches(job, 5)
    assert batches == [Batch(1, i, (i,)) for i in range(5)] + [
        Batch(2, 0, (0, 1)), Batch(2, 1, (2, 3)), Batch(2, 2, (4,))]
    assert shard_batches(batches, (2, 2)) == [Batch(1, 1, (1,)), Batch(1, 3, (3,)),
                                              Batch(2, 1, (2, 3))]
    # a unit of batch size B orders that size's runs only; batch 1 seeds as it always has
    assert set(unit_order(job, Batch(2, 1, (2, 3)), 0)) == set(job.runs[2:])
    assert unit_order(job, 3, 1) == unit_order(job, Batch(1, 3, (3,)), 1)
    assert set(unit_order(job, 3, 1)) == set(job.runs[:2])


# --- rows --------------------------------------------------------------------------------------

def test_rows_carry_their_batch(batched) -> None:
    _job, df, outcome = batched
    assert len(df) == 6 * 3 and outcome == JobOutcome(18, 0) and not df.duplicated(KEY).any()
    one, two = df[df.batch_size == 1], df[df.batch_size == 2]
    assert len(one) == len(two) == 9
    assert (one.batch_id == one.example_index).all()
    assert (two.batch_id == two.example_index // 2).all()
    assert (one.batch_decode_s == one.decode_s).all()
    assert (one.batch_tokens_per_s == one.new_tokens / one.decode_s).all()
    for _, g in two.groupby(["run_id", "batch_id", "repeat"]):
        assert g.batch_decode_s.nunique() == 1 and g.batch_prefill_s.nunique() == 1
        assert g.batch_tokens_per_s.iloc[0] == pytest.approx(
            g.new_tokens.sum() / g.batch_decode_s.iloc[0])
        assert g.position_in_example.nunique() == 1  # one run decodes the batch at once
    assert set(two.groupby(["batch_id"]).example_id.nunique()) == {2, 1}


def test_speedup_is_taken_on_ar_of_the_same_batch(batched) -> None:
    _job, df, _ = batched
    ar = df[df.strategy == "ar"].set_index(["batch_size", "example_id"]).ms_per_token
    for _, r in df.iterrows():
        base = ar[(r.batch_size, r.example_id)]
        assert r.baseline_ms_per_token == base and r.speedup == base / r.ms_per_token
    # the batch-2 rows are not priced against batch-1 ar (measured apart: other timings)
    assert (ar.xs(2).sort_index() != ar.xs(1).sort_index()).any()


def test_greedy_rows_agree_with_ar_of_the_batch_and_of_batch_1(batched) -> None:
    _job, df, _ = batched
    two = df[df.batch_size == 2]
    assert two[two.strategy != "ar"].matches_baseline.all()
    assert (two[two.strategy != "ar"].first_mismatch == -1).all()
    ar1 = df[(df.strategy == "ar") & (df.batch_size == 1)].set_index("example_id").output_ids
    ar2 = two[two.strategy == "ar"]
    # batched ar's own row compares with batch-1 ar: recorded, never skipped (float64: equal)
    assert ar2.first_mismatch.notna().all() and ar2.lossless_verdict.notna().all()
    assert ar2.matches_baseline.tolist() == [list(o) == list(ar1[e]) for o, e in
                                             zip(ar2.output_ids, ar2.example_id, strict=True)]


def test_batched_costs(batched) -> None:
    _job, df, _ = batched
    assert (df.peak_gflops > 0).all() and df.peak_gflops.nunique() == 1
    one = df[df.batch_size == 1]
    assert np.allclose(one.roofline_fraction, one.achieved_gbps / one.peak_gbps)


def test_batch_costs_share_the_weight_reads() -> None:
    # Both rows carry their batch's counts: 1000 bytes and 40 FLOPs for the two of them.
    rows = [{"weight_bytes_read": 1000, "flops_decode": 40.0, "flops_prefill": 8.0}] * 2
    out = batch_costs(rows, [3, 5], 2.0, peak=1e-9, peak_gflops=1e-9)
    # 1000 bytes read once for both rows: 500 each; 1000 B / (1e-9 GB/s) = 1000 s vs
    # 40 FLOPs / (1e-9 GFLOP/s) = 40 s: weight reads bound the batch
    assert [r["weight_bytes_read"] for r in out] == [500, 500]
    assert [r["flops_decode"] for r in out] == [20.0, 20.0]
    assert [r["flops_prefill"] for r in out] == [4.0, 4.0]
    assert out[0]["flops_per_output_token"] == 40.0 / 8
    assert out[0]["achieved_gbps"] == out[1]["achieved_gbps"] == pytest.approx(1000 / 2 / 1e9)
    assert out[0]["peak_gflops"] == 1e-9
    assert out[0]["roofline_fraction"] == pytest.approx(1000 / 2.0)
    assert roofline_s(1000, 4000.0, 1e-9, 1e-9) == pytest.approx(4000)  # compute-bound
    assert math.isnan(roofline_s(1000, 1.0, math.nan, math.nan))


def test_peak_gflops_measured_once_per_process() -> None:
    first = peak_gflops("cpu")
    assert first > 0 and peak_gflops("cpu") == first


# --- resume ------------------------------------------------------------------------------------

def test_a_batch_that_cannot_fit_is_refused_before_anything_runs(
        tiny_model_dir: Path, data_file: Path) -> None:
    job = batch_job(tiny_model_dir, data_file, "1,2")
    prepared = prepare_job(job)
    adapter = prepared.loaded.adapter
    longest = max(len(p.ids) for p in prepared.prompts)
    capacity = capacity_for(longest, prepared.cfg.max_new_tokens, 2)
    # the cache term is exact: what a static cache of 2 rows at that capacity allocates
    cache = adapter.new_cache(2, capacity)
    with torch.inference_mode():
        adapter.run_layers(adapter.embed(torch.tensor([[1, 2, 3]] * 2)), cache, 0,
                           adapter.num_layers)
    assert batch_memory_bytes(adapter, 2, capacity, 0) == cache.capacity_bytes() > 0
    need = batch_memory_bytes(adapter, 2, capacity, longest)
    assert need > batch_memory_bytes(adapter, 1, capacity, longest)
    check_batches_fit(prepared, job.runs, free_bytes=need)  # just fits
    with pytest.raises(LsbenchError, match=r"^batch size 2 does not fit on cpu: its KV cache "
                       r"and activations need about [\d.]+ GB, [\d.]+ GB is free; choose a "
                       r"smaller --batch-size \(the largest that fits here: 1\)$"):
        check_batches_fit(prepared, job.runs, free_bytes=need - 1)
    with pytest.raises(LsbenchError, match=r"^batch size 1 does not fit .*--batch-size$"):
        check_batches_fit(prepared, job.runs, free_bytes=1)
    check_batches_fit(prepared, job.runs)  # off CUDA: nothing to check


def test_out_of_memory_mid_job_is_one_line_and_keeps_the_stored_batches(
        tiny_model_dir: Path, data_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.parquet"
    job = batch_job(tiny_model_dir, data_file, "1,2")  # batch 1's units are measured first
    real = lsbench.scenario.runner._generate_batch

    def out_of_memory_at_batch_2(prepared, run, prompts, cfg):
        if run.batch_size == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(prepared, run, prompts, cfg)

    monkeypatch.setattr(lsbench.scenario.runner, "_generate_batch", out_of_memory_at_batch_2)
    with pytest.raises(LsbenchError, match=r"^out of memory at batch size 2 \(CUDA out of "
                       r"memory\. Tried to allocate 2\.00 GiB\); choose a smaller "
                       r"--batch-size$"):
        run_job(job, ResultStore(path))
    stored = ResultStore(path).rows()
    assert len(stored) == 3 * 3 and set(stored.batch_size) == {1}  # every batch-1 row kept


def test_a_batch_is_stored_whole_or_not_at_all(tiny_model_dir: Path, data_file: Path,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.parquet"
    job = batch_job(tiny_model_dir, data_file, "2")  # units: batch (0, 1), batch (2,)
    calls = 0
    real = lsbench.scenario.runner._generate_batch

    def crash_in_second_batch(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 5:  # the second run of the second batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lsbench.scenario.runner, "_generate_batch", crash_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_job(job, ResultStore(path))
    monkeypatch.undo()
    before = by_key(ResultStore(path).rows())
    assert len(before) == 3 * 2  # the first batch whole, nothing of the one in flight
    stored = ResultStore(path).rows()
    assert set(stored.example_index) == {0, 1} and (stored.batch_id == 0).all()

    assert run_job(job, ResultStore(path)) == JobOutcome(3, 6)
    df = ResultStore(path).rows()
    assert len(df) == 9 and not df.duplicated(KEY).any()
    after = by_key(df)
    assert {k: after[k] for k in before} == before

    # a run added later is priced on the stored ar rows of the same batch
    wider = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=3,
                                   sweep__exit_layers="1,2", sweep__num_speculations="2",
                                   sweep__strategies=["layerskip", "pld"],
                                   sweep__batch_sizes="2"), 4)
    assert run_job(wider, ResultStore(path)) == JobOutcome(3, 9)
    df = ResultStore(path).rows()
    ar = df[df.run_id == job.run_id(job.runs[0])].set_index("example_id").ms_per_token
    new = df[df.exit_layer == 1]
    assert len(new) == 3 and (new.baseline_ms_per_token == new.example_id.map(ar)).all()

    # a raised --limit grows the last batch: its missing rows are measured, none duplicated
    grown = batch_job(tiny_model_dir, data_file, "2", limit=4)
    assert run_job(grown, ResultStore(path)).measured == 3
    df = ResultStore(path).rows()
    assert not df.duplicated(KEY).any() and (df[df.example_index == 3].batch_id == 1).all()


# --- hf-ar at batch B ----------------------------------------------------------------------

def test_hf_ar_batch_equals_batch_1_with_ragged_prompts(target) -> None:
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    cfg = DecodingConfig(max_new_tokens=6, stop_token_ids=(2,))
    batch = generate_hf_batch(target, prompts, cfg)
    singles = [generate_hf(target, p, cfg, "hf-ar") for p in prompts]
    assert [r.tokens for r in batch.rows] == [s.tokens for s in singles]
    assert batch.new_tokens == sum(len(s.tokens) for s in singles)
    assert all(r.decode_s <= batch.decode_s for r in batch.rows)
    assert all(r.decode_tokens == len(r.tokens) - 1 for r in batch.rows)


def test_hf_ar_rows_stop_on_their_own_stop_token(target) -> None:
    prompts = [[5, 6, 7], [11, 12, 13, 14]]
    free = generate_hf_batch(target, prompts, DecodingConfig(max_new_tokens=6))
    stop = free.rows[0].tokens[2]  # row 0's third token becomes a stop token
    cfg = DecodingConfig(max_new_tokens=6, stop_token_ids=(stop,))
    batch = generate_hf_batch(target, prompts, cfg)
    singles = [generate_hf(target, p, cfg, "hf-ar") for p in prompts]
    assert [r.tokens for r in batch.rows] == [s.tokens for s in singles]
    assert len(batch.rows[0].tokens) <= 3


def test_hf_ar_batched_in_a_job(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    s = job_settings(tiny_model_dir, data_file, data__limit=3, compare__early_exit="2",
                     compare__hf_reference=True, compare__batch_sizes="1")
    assert any(r.strategy == "hf-ar" for r in compare_job(s, 4).runs)
    from lsbench.scenario.jobs import HF_BASELINE, base_job

    job = base_job(s, [RunSpec("ar", batch_size=2), RunSpec("hf-ar", batch_size=2),
                       HF_BASELINE], "compare")
    run_job(job, ResultStore(tmp_path / "hf.parquet"))
    df = pd.read_parquet(tmp_path / "hf.parquet")
    hf2 = df[(df.strategy == "hf-ar") & (df.batch_size == 2)]
    assert len(hf2) == 3 and hf2.matches_baseline.all()  # vs batch-1 hf-ar
    assert (hf2.speedup == 1.0).all() and (hf2.baseline_strategy == "hf-ar").all()


# --- the command line ------------------------------------------------------------------------

def test_sweep_and_compare_take_batch_size(tiny_model_dir: Path, data_file: Path,
                                           tmp_path: Path) -> None:
    from tests.test_cli import assert_refused, invoke, sweep_args

    out = tmp_path / "s.parquet"
    result = invoke(*sweep_args(tiny_model_dir, data_file, out, "--batch-size", "1,2"))
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out)
    assert sorted(df.batch_size.unique()) == [1, 2] and len(df) == 2 * 3 * 2
    text = " ".join(result.stdout.split())  # the table titles wrap at the terminal's width
    assert "at batch size 1 (aggregate" in text and "at batch size 2 (aggregate" in text
    assert sum(line.startswith("crossover: ") for line in result.stdout.splitlines()) == 2
    report = invoke("report", out, "--table", "batch", "--format", "csv")
    header = report.stdout.splitlines()[0]
    assert report.exit_code == 0 and header.startswith("file,model,dataset,strategy")
    assert ",batch,aggregate tokens/s,x batch 1," in header and header.endswith(",crossover")
    assert_refused(invoke("compare", "--model", tiny_model_dir, "--dataset", f"jsonl:{data_file}",
                          "--early-exit", 2, "--hf-reference", "--batch-size", "1,2",
                          "--out", tmp_path / "c.parquet"),
                   "hf-early-exit cannot run at batch size 2",
                   "transformers' assisted generation is batch 1 only")
    assert_refused(invoke(*sweep_args(tiny_model_dir, data_file, tmp_path / "x.parquet",
                                      "--batch-size", "0")), "batch sizes must be >= 1")
