"""Issue 9 in the runner: shuffled units, per-engine baselines, honest memory, environment
checks on resume, schema versions, and losslessness verdicts in bf16."""

from __future__ import annotations

import copy
import gc
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lsbench.scenario.runner
from lsbench.errors import LsbenchError
from lsbench.reporting.report import summarize
from lsbench.results.schema import COLUMN_NAMES, SCHEMA_VERSION
from lsbench.results.store import ResultStore, read_results
from lsbench.scenario.jobs import compare_job, sweep_job
from lsbench.scenario.quality import float32_copy_on_cpu
from lsbench.scenario.runner import JobOutcome, prepare_job, run_job, unit_order
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_runner import job_settings, save_truncated, write_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


def test_runs_are_measured_in_a_seeded_shuffled_order_per_unit(tiny_model_dir, data_file,
                                                                 tmp_path, monkeypatch):
    job = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=3, sweep__repeats=2,
                                 sweep__exit_layers="1,2,3,4", sweep__num_speculations="2"), 4)
    calls = []
    real = lsbench.scenario.runner._generate

    def record(loaded, run, prompt, cfg):
        calls.append(run)
        return real(loaded, run, prompt, cfg)

    monkeypatch.setattr(lsbench.scenario.runner, "_generate", record)
    run_job(job, ResultStore(tmp_path / "s.parquet"))
    df = ResultStore(tmp_path / "s.parquet").rows()
    units = [(i, rep) for rep in range(2) for i in range(3)]
    orders = [unit_order(job, i, rep) for i, rep in units]
    assert calls == [run for order in orders for run in order]  # measured in that order
    assert unit_order(job, 1, 1) == orders[4]  # reproducible
    assert len({tuple(o) for o in orders}) > 1 and {o.index(job.runs[0]) for o in orders} != {0}
    for (i, rep), order in zip(units, orders, strict=True):
        unit = df[(df.example_index == i) & (df.repeat == rep)]
        position = dict(zip(unit.run_id, unit.position_in_example, strict=True))
        assert [position[job.run_id(r)] for r in order] == list(range(len(job.runs)))
        assert unit.matches_baseline.all()


@pytest.fixture(scope="module")
def compared(tiny_model_dir, data_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    draft = save_truncated(tiny_model_dir, tmp / "draft", 2)
    job = compare_job(job_settings(tiny_model_dir, data_file, compare__drafts=[str(draft)],
                                   compare__early_exit="2", compare__num_speculations="2",
                                   compare__hf_reference=True), 4)
    store = ResultStore(tmp / "c.parquet")
    assert run_job(job, store) == JobOutcome(12, 0)
    return job, store.rows()


def test_each_engine_is_compared_with_its_own_autoregressive_baseline(compared):
    job, df = compared
    assert [r.strategy for r in job.runs] == ["ar", "hf-ar", "spec", "layerskip", "hf-assisted",
                                              "hf-early-exit"]
    expected = {"ar": "ar", "spec": "ar", "layerskip": "ar", "hf-ar": "hf-ar",
                "hf-assisted": "hf-ar", "hf-early-exit": "hf-ar"}
    assert (df.baseline_strategy == df.strategy.map(expected)).all()
    assert set(df[df.is_baseline].strategy) == {"ar", "hf-ar"}
    for _, unit in df.groupby(["example_id", "repeat"]):
        ms = dict(zip(unit.strategy, unit.ms_per_token, strict=True))
        for r in unit.itertuples():
            assert r.baseline_ms_per_token == ms[r.baseline_strategy]
            assert r.speedup == pytest.approx(ms[r.baseline_strategy] / r.ms_per_token)
    assert df.matches_baseline.all() and (df.lossless_verdict == "exact").all()
    assert (df.first_mismatch == -1).all() and df.mismatch_margin.isna().all()


def test_memory_columns_are_per_run(compared):
    _, df = compared
    target = tiny_model(num_layers=4)  # the saved tiny model: float32 weights, loaded float64
    target_bytes = sum(p.numel() for p in target.parameters()) * 8
    draft_bytes = sum(p.numel() for p in tiny_model(num_layers=2).parameters()) * 8
    uses_draft = df.strategy.isin(["spec", "hf-assisted"])
    assert (df[~uses_draft].weight_bytes == target_bytes).all()
    assert (df[uses_draft].weight_bytes == target_bytes + draft_bytes).all()
    # Capacity: layers x (keys, values) x rows allocated (at least 256) x kv heads x head dim x 8 B
    per_layer = 2 * 256 * 2 * 8 * 8
    capacity = dict(zip(df.strategy, df.kv_cache_capacity_bytes, strict=False))
    assert capacity["ar"] == capacity["layerskip"] == 4 * per_layer
    assert capacity["spec"] == (4 + 2) * per_layer  # the draft model's own cache too
    # Committed: the same per token, times the tokens whose KV was computed (prompt and every
    # new token but the last, which is never fed back), whatever the capacity.
    per_token = 2 * 2 * 8 * 8
    for strategy in ("ar", "layerskip"):
        row = df[df.strategy == strategy].iloc[0]
        committed = row.prompt_tokens + row.new_tokens - 1
        assert row.kv_cache_bytes == 4 * per_token * committed, strategy
        assert row.kv_cache_bytes < row.kv_cache_capacity_bytes
    assert all(v > 0 for v in df.kv_cache_bytes)
    assert df.peak_mem_delta_bytes.isna().all()  # CPU: no per-run allocator peak
    assert "peak_mem_bytes" not in df.columns


def test_resume_refuses_rows_from_another_environment(tiny_model_dir, data_file, tmp_path,
                                                      monkeypatch):
    job = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=1,
                                 sweep__exit_layers="2"), 4)
    path = tmp_path / "r.parquet"
    run_job(job, ResultStore(path))
    wider = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=2,
                                   sweep__exit_layers="2"), 4)
    snapshot = path.read_bytes()
    real = lsbench.scenario.runner.environment
    for key, value in (("torch_version", "1.0.0"), ("threads", 97), ("git_commit", "abc"),
                       ("device_name", "Other CPU")):
        monkeypatch.setattr(lsbench.scenario.runner, "environment",
                            lambda *a, key=key, value=value: {**real(*a), key: value})
        with pytest.raises(LsbenchError, match=f"{key}.*--force.*--out") as err:
            run_job(wider, ResultStore(path))
        assert "\n" not in str(err.value)
        assert path.read_bytes() == snapshot
    # --force measures every run of the job again, all in this environment
    assert run_job(wider, ResultStore(path), force=True) == JobOutcome(4, 0)
    assert (ResultStore(path).rows().device_name == "Other CPU").all()


def _as_version_1(src: Path, dst: Path) -> Path:
    table = pq.read_table(src)
    new = ["position_in_example", "weight_bytes", "kv_cache_bytes", "kv_cache_capacity_bytes",
           "peak_mem_delta_bytes",
           "baseline_strategy", "mismatch_margin", "lossless_verdict", "draft_revision"]
    table = table.drop_columns(new)
    n = table.num_rows
    table = table.append_column("peak_mem_bytes", pa.array([123] * n, pa.int64()))
    table = table.append_column("peak_mem_reserved_bytes", pa.array([0] * n, pa.int64()))
    meta = {"schema_version": 1, "created_by": "lsbench 0.1", "written_by": "lsbench 0.1"}
    pq.write_table(table.replace_schema_metadata({b"lsbench": json.dumps(meta).encode()}), dst)
    return dst


def test_version_1_files_are_read_but_never_resumed(tiny_model_dir, data_file, tmp_path):
    job = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=1,
                                 sweep__exit_layers="2"), 4)
    run_job(job, ResultStore(tmp_path / "v2.parquet"))
    old = _as_version_1(tmp_path / "v2.parquet", tmp_path / "v1.parquet")
    df = read_results([old])
    assert list(df.columns) == [*COLUMN_NAMES, "source_file"] and len(df) == 2
    assert df.position_in_example.isna().all() and df.lossless_verdict.isna().all()
    assert len(summarize(df)) == 2  # reports still work
    snapshot = old.read_bytes()
    with pytest.raises(LsbenchError, match=r"schema version 1.*--force.*--out"):
        run_job(job, ResultStore(old))
    assert old.read_bytes() == snapshot
    assert run_job(job, ResultStore(old), force=True) == JobOutcome(2, 0)
    assert ResultStore(old).schema_version == SCHEMA_VERSION


# --- losslessness in bf16 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bf16")
    tiny_model(seed=3, dtype=torch.bfloat16, num_layers=4, hidden=64).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_bf16_flips_are_near_ties_and_a_wrong_output_is_a_mismatch(bf16_dir, data_file,
                                                                    tmp_path):
    job = sweep_job(job_settings(bf16_dir, data_file, dtype="bfloat16", data__limit=4,
                                 decoding__max_new_tokens=24, sweep__exit_layers="1,2,3,4",
                                 sweep__num_speculations="1,3"), 4)
    store = ResultStore(tmp_path / "bf16.parquet")
    run_job(job, store)
    df = store.rows()
    assert set(df.lossless_verdict) <= {"exact", "near-tie"}
    flips = df[df.lossless_verdict == "near-tie"]
    assert (flips.first_mismatch >= 0).all() and (flips.mismatch_margin >= 0).all()
    assert (df[df.lossless_verdict == "exact"].first_mismatch == -1).all()

    prepared = prepare_job(job)
    prompt = prepared.prompts[0]
    base = df[(df.strategy == "ar") & (df.example_index == 0)].output_ids.iloc[0].tolist()
    reference = tiny_model(seed=3, dtype=torch.float32, num_layers=4, hidden=64)
    with torch.inference_mode():
        logits = reference(torch.tensor([[*prompt.ids, *base[:3]]])).logits[0, -1]
    worst = int(logits.argmin())
    wrong = [*base[:3], worst, *base[4:]]
    verdict = lsbench.scenario.runner._losslessness(prepared, prompt, wrong, base)
    assert verdict["first_mismatch"] == 3 and verdict["lossless_verdict"] == "MISMATCH"
    gap = float(logits[base[3]] - logits[worst])
    assert verdict["mismatch_margin"] == pytest.approx(gap, rel=1e-3)
    assert math.isnan(lsbench.scenario.runner._losslessness(prepared, prompt, base, base)
                      ["mismatch_margin"])


def _float32_models_of(cls: type) -> list[torch.nn.Module]:
    gc.collect()
    return [m for m in gc.get_objects() if isinstance(m, cls)
            and next(m.parameters()).dtype == torch.float32]


def test_a_bf16_verdict_keeps_no_float32_model_and_its_margin_is_float32s(bf16_dir, data_file):
    """Issue 18: the fp32 margin is recomputed on a host copy that nothing keeps after the
    verdict (the old deep copy on the model's device stayed in the prepared job)."""
    job = sweep_job(job_settings(bf16_dir, data_file, dtype="bfloat16", data__limit=1,
                                 decoding__max_new_tokens=8, sweep__exit_layers="2",
                                 sweep__num_speculations="1"), 4)
    prepared = prepare_job(job)
    model, prompt = prepared.loaded.target.model, prepared.prompts[0]
    before = len(_float32_models_of(type(model)))
    base = [5, 6, 7, 8]
    with torch.inference_mode():
        expected = copy.deepcopy(model).float()(torch.tensor([[*prompt.ids, *base[:2]]])
                                                ).logits[0, -1]
    wrong = [*base[:2], int(expected.argmin()), base[3]]
    verdict = lsbench.scenario.runner._losslessness(prepared, prompt, wrong, base)
    assert verdict["first_mismatch"] == 2
    gap = float(expected[base[2]] - expected[wrong[2]])
    assert verdict["mismatch_margin"] == pytest.approx(gap, rel=1e-6, abs=1e-6)
    assert len(_float32_models_of(type(model))) == before  # the copy is gone
    assert next(model.parameters()).dtype == torch.bfloat16  # the target is untouched


def test_the_float32_copy_is_on_the_host_tied_and_equal_to_the_target():
    model = tiny_model(seed=4, dtype=torch.bfloat16, num_layers=2, tie_word_embeddings=True)
    reference = float32_copy_on_cpu(model)
    assert {p.device.type for p in reference.parameters()} == {"cpu"}
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    assert reference.lm_head.weight is reference.get_input_embeddings().weight
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(),
                                 strict=True):
        assert torch.equal(p.float(), q), name
    assert next(model.parameters()).dtype == torch.bfloat16
