"""run_job end to end on the tiny saved model: rows, derived columns, losslessness, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import lsbench.scenario.runner
from lsbench import __version__
from lsbench.errors import LsbenchError
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import JobSpec, Settings, compare_job, sweep_job
from lsbench.scenario.runner import JobOutcome, ProgressEvent, run_job
from tests.conftest import VOCAB_WORDS

KEY = ["run_id", "example_id", "repeat"]

# Four articles in the tiny tokenizer's words; three have a reference summary.
EXAMPLES = [
    {"id": "n1", "article": "the news said w1 w2 w3 on the article w4 and w5",
     "reference": "news w1 w2"},
    {"id": "n2", "article": "w10 w11 w12 of the summary was by w13 with w14"},
    {"id": "n3", "prompt": "a w20 w21 is in the w22 that w23 for w24",
     "reference": "w20 w21 w22"},
    {"id": "n4", "article": "it was w30 w31 to w32 and w33 w34 said", "reference": "w33 said"},
]
REFERENCES = {e["id"]: e.get("reference") for e in EXAMPLES}


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def save_truncated(src: Path, dst: Path, num_layers: int) -> Path:
    """The target's first `num_layers` layers with its embeddings, head and tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(src)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def save_other_vocab(src: Path, dst: Path) -> Path:
    """The same weights with a tokenizer of the same size but other words."""
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)
    words = [w.replace("w", "v") for w in VOCAB_WORDS]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>").save_pretrained(dst)
    return dst


def job_settings(model_dir: Path, data: Path, **values: object) -> Settings:
    """float64 on CPU: greedy argmax has no floating-point ties, so equality is exact."""
    s = Settings()
    base = {"model": str(model_dir), "dtype": "float64", "device": "cpu",
            "data__dataset": f"jsonl:{data}", "data__limit": 2,
            "decoding__max_new_tokens": 8, "sweep__warmup": 0, "compare__warmup": 0}
    for name, value in {**base, **values}.items():
        section, _, key = name.rpartition("__")
        s.override(section, key, value)
    return s


def plain(row: dict) -> dict:
    """A row with arrays as lists and NaN as None, comparable with ==."""
    def fix(v: object) -> object:
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, float) and math.isnan(v):
            return None
        return v
    return {k: fix(v) for k, v in row.items()}


def by_key(df: pd.DataFrame) -> dict[tuple, dict]:
    return {(r["run_id"], r["example_id"], int(r["repeat"])): plain(r)
            for r in df.to_dict("records")}


# --- one sweep, shared by the tests that only read it ----------------------------------------

class Sweep:
    def __init__(self, job: JobSpec, df: pd.DataFrame, outcome: JobOutcome,
                 events: list[ProgressEvent]):
        self.job, self.df, self.outcome, self.events = job, df, outcome, events


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


@pytest.fixture(scope="module")
def sweep(tiny_model_dir: Path, data_file: Path, tmp_path_factory) -> Sweep:
    job = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=3,
                                 sweep__exit_layers="1,2,4", sweep__num_speculations="1,3",
                                 sweep__repeats=2, sweep__warmup=1), 4)
    store = ResultStore(tmp_path_factory.mktemp("results") / "sweep.parquet")
    events: list[ProgressEvent] = []
    outcome = run_job(job, store, on_progress=events.append)
    return Sweep(job, ResultStore(store.path).rows(), outcome, events)


def test_one_row_per_run_example_and_repeat(sweep: Sweep) -> None:
    df, job = sweep.df, sweep.job
    assert len(job.runs) == 1 + 3 * 2
    assert len(df) == len(job.runs) * 3 * 2
    assert sweep.outcome == JobOutcome(measured=len(df), skipped=0)
    assert not df.duplicated(KEY).any()
    assert set(df.run_id) == {job.run_id(r) for r in job.runs}
    assert sorted(df["repeat"].unique()) == [0, 1]
    assert df.example_id.nunique() == 3 and set(df.example_id) <= set(REFERENCES)
    assert sorted(df.example_index.unique()) == [0, 1, 2]
    assert (df.groupby("example_id").example_index.nunique() == 1).all()
    assert (df.decode_tokens > 0).all() and (df.new_tokens == df.decode_tokens + 1).all()
    assert (df.new_tokens <= 8).all() and (df.sweep_name == job.name).all()


def test_baseline_rows(sweep: Sweep) -> None:
    df = sweep.df
    base = df[df.is_baseline]
    assert len(base) == 3 * 2 and (base.strategy == "ar").all()
    assert (base.run_id == sweep.job.run_id(sweep.job.runs[0])).all()
    assert (base.speedup == 1.0).all() and base.matches_baseline.all()
    assert (base.baseline_ms_per_token == base.ms_per_token).all()
    assert (base.rounds == base.decode_tokens).all() and (base.mean_accepted_len == 1.0).all()
    assert base.acceptance_rate.isna().all()
    assert all(len(h) == 0 for h in base.accept_hist)
    assert (base.exit_layer == 0).all() and (base.num_speculations == 0).all()
    assert not df[~df.is_baseline].is_baseline.any() and (df[~df.is_baseline].strategy
                                                          == "layerskip").all()


def test_greedy_layerskip_is_lossless(sweep: Sweep) -> None:
    df = sweep.df
    base = {(r.example_id, r.repeat): list(r.output_ids) for r in df[df.is_baseline].itertuples()}
    ls = df[df.strategy == "layerskip"]
    assert len(ls) == 6 * 3 * 2 and ls.matches_baseline.all()
    for r in ls.itertuples():
        assert list(r.output_ids) == base[(r.example_id, r.repeat)]
    # exiting at the last layer drafts with the full model: every draft is accepted
    last = ls[ls.exit_layer == 4]
    assert (last.acceptance_rate == 1.0).all()
    assert (last.mean_accepted_len > 1.0).all()


def test_derived_columns_follow_their_definitions(sweep: Sweep) -> None:
    df = sweep.df
    base_ms = {(r.example_id, r.repeat): r.ms_per_token for r in df[df.is_baseline].itertuples()}
    approx = pytest.approx
    for r in df.to_dict("records"):
        k = r["num_speculations"]
        assert r["tokens_per_s"] == approx(r["decode_tokens"] / r["decode_s"], rel=1e-12)
        assert r["ms_per_token"] == approx(1000 * r["decode_s"] / r["decode_tokens"], rel=1e-12)
        assert r["total_s"] == approx(r["prefill_s"] + r["decode_s"], rel=1e-12)
        assert r["e2e_tokens_per_s"] == approx(r["new_tokens"] / r["total_s"], rel=1e-12)
        assert r["mean_accepted_len"] == approx(r["decode_tokens"] / r["rounds"], rel=1e-12)
        assert r["baseline_ms_per_token"] == base_ms[(r["example_id"], r["repeat"])]
        assert r["speedup"] == approx(r["baseline_ms_per_token"] / r["ms_per_token"], rel=1e-12)
        assert r["flops_per_output_token"] == approx(r["flops_decode"] / r["decode_tokens"],
                                                     rel=1e-12)
        assert r["flops_prefill"] > 0 and r["flops_decode"] > 0
        for col in ("layer_tokens_prefill", "layer_tokens_decode", "attn_pairs_prefill",
                    "attn_pairs_decode"):
            assert len(r[col]) == r["model_num_layers"] == 4
        assert list(r["layer_tokens_prefill"]) == [r["prompt_tokens"]] * 4
        if r["strategy"] != "layerskip":
            continue
        drafted, accepted = list(r["drafted_per_round"]), list(r["accepted_per_round"])
        assert len(drafted) == len(accepted) == r["rounds"] > 0
        assert all(0 <= a <= d <= k for a, d in zip(accepted, drafted, strict=True))
        assert r["acceptance_rate"] == approx(sum(accepted) / sum(drafted), rel=1e-12)
        hist = list(r["accept_hist"])
        assert len(hist) == k + 1 and sum(hist) == r["rounds"]
        assert hist == [accepted.count(i) for i in range(k + 1)]
        # layers below the exit see every drafted token; the deep layers only verify
        assert r["layer_tokens_decode"][0] >= r["layer_tokens_decode"][-1]


def test_roofline_columns(sweep: Sweep) -> None:
    df = sweep.df
    # float64 tiny Llama (hidden 32, intermediate 64, 2 KV heads of 8, vocab 84): per layer
    # 9280 weights, LM head + final norm 84 * 32 + 32, one embedding row 32; 8 bytes each.
    per_ar_token = 8 * (4 * 9280 + 84 * 32 + 32 + 32)
    ar = df[df.strategy == "ar"]
    assert (ar.weight_bytes_read == ar.decode_tokens * per_ar_token).all()
    assert (df.weight_bytes_read > 0).all()
    assert df.peak_gbps.nunique() == 1 and df.peak_gbps.iloc[0] > 0
    assert np.allclose(df.achieved_gbps, df.weight_bytes_read / df.decode_s / 1e9)
    assert np.allclose(df.roofline_fraction, df.achieved_gbps / df.peak_gbps)


def test_rouge_is_nan_exactly_without_reference(sweep: Sweep) -> None:
    df = sweep.df
    has_ref = df.example_id.map(lambda i: REFERENCES[i] is not None)
    assert has_ref.any() and (~has_ref).any()  # the selection covers both cases
    for col in ("rouge1", "rouge2", "rougeL"):
        assert df.loc[has_ref, col].notna().all() and df.loc[~has_ref, col].isna().all()
        assert df.loc[has_ref, col].between(0, 1).all()


def test_metadata_columns(sweep: Sweep) -> None:
    import torch
    import transformers

    df, job = sweep.df, sweep.job
    assert (df.torch_version == torch.__version__).all()
    assert (df.transformers_version == transformers.__version__).all()
    assert (df.lsbench_version == __version__).all()
    assert (df.dtype == "float64").all() and (df.device == "cpu").all()
    assert (df.threads >= 1).all() and df.device_name.str.len().gt(0).all()
    assert df.dataset_fingerprint.nunique() == 1 and len(df.dataset_fingerprint.iloc[0]) == 16
    assert (df.dataset == job.dataset.name).all() and (df.model == job.model).all()
    assert (df.model_num_layers == 4).all() and (df.model_params > 0).all()
    assert (df.prompt_format == "article-summary").all() and (df.max_new_tokens == 8).all()
    assert df.timestamp.map(lambda t: pd.Timestamp(t).tzinfo is not None).all()
    assert (df.draft_model == "").all() and (df.draft_num_layers == 0).all()


def test_progress_reaches_total(sweep: Sweep) -> None:
    events, total = sweep.events, len(sweep.df)
    assert events[0].phase == "load"
    assert {e.phase for e in events} == {"load", "warmup", "measure", "done"}
    measure = [e for e in events if e.phase == "measure"]
    assert all(e.total == total for e in measure)
    assert [e.done for e in measure] == sorted(e.done for e in measure)
    assert measure[-1].done == total
    # warm-up: `warmup` generations for each of the 7 runs, before any measurement
    warm = [e for e in events if e.phase == "warmup"]
    assert len(warm) == 7 and events.index(warm[-1]) < events.index(measure[0])


# --- resume and --force ---------------------------------------------------------------------

def test_resume_after_crash_and_force(tiny_model_dir: Path, data_file: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.parquet"
    # another job's rows in the same file must survive everything below
    other = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=1,
                                   decoding__max_new_tokens=4, sweep__exit_layers="2"), 4)
    run_job(other, ResultStore(path))
    other_rows = by_key(ResultStore(path).rows())
    assert len(other_rows) == 2

    job = sweep_job(job_settings(tiny_model_dir, data_file, sweep__exit_layers="1,3",
                                 sweep__num_speculations="2"), 4)
    calls = 0
    real_generate = lsbench.scenario.runner._generate

    def crash_in_second_unit(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 5:  # the second run of the second (example, repeat) unit
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(lsbench.scenario.runner, "_generate", crash_in_second_unit)
    with pytest.raises(KeyboardInterrupt):
        run_job(job, ResultStore(path))
    monkeypatch.undo()
    before = by_key(ResultStore(path).rows())
    assert len(before) == 2 + 3  # the first unit whole, nothing of the one in flight

    events: list[ProgressEvent] = []
    assert run_job(job, ResultStore(path), on_progress=events.append) == JobOutcome(3, 3)
    measure = [e for e in events if e.phase == "measure"]
    assert measure[0].done == 3 and measure[-1].done == measure[-1].total == 6
    df = ResultStore(path).rows()
    assert len(df) == 2 + 6 and not df.duplicated(KEY).any()
    after = by_key(df)
    assert {k: after[k] for k in before} == before  # nothing measured earlier was touched
    mine = df[df.run_id.isin({job.run_id(r) for r in job.runs})]
    assert len(mine) == 6 and mine.matches_baseline.all()
    assert (mine.speedup == mine.baseline_ms_per_token / mine.ms_per_token).all()

    # a run added later is measured against the baseline stored earlier (same environment)
    wider = sweep_job(job_settings(tiny_model_dir, data_file, sweep__exit_layers="1,2,3",
                                   sweep__num_speculations="2"), 4)
    assert run_job(wider, ResultStore(path)) == JobOutcome(2, 6)
    df = ResultStore(path).rows()
    base_ms = df[df.run_id == job.run_id(job.runs[0])].set_index("example_id").ms_per_token
    new = df[df.run_id == wider.run_id(wider.runs[2])]
    assert len(new) == 2 and (new.baseline_ms_per_token == new.example_id.map(base_ms)).all()
    ResultStore(path).drop_runs({wider.run_id(wider.runs[2])})
    after = by_key(ResultStore(path).rows())

    # a rerun has nothing left to do and changes nothing
    assert run_job(job, ResultStore(path)) == JobOutcome(0, 6)
    assert by_key(ResultStore(path).rows()) == after

    # --force measures this job again, and only this job
    assert run_job(job, ResultStore(path), force=True) == JobOutcome(6, 0)
    forced = by_key(ResultStore(path).rows())
    assert forced.keys() == after.keys()
    mine_keys = [k for k in after if k not in other_rows]
    assert all(forced[k]["decode_s"] != after[k]["decode_s"] for k in mine_keys)
    assert all(forced[k]["output_ids"] == after[k]["output_ids"] for k in mine_keys)
    assert {k: forced[k] for k in other_rows} == other_rows


# --- draft models -----------------------------------------------------------------------------

def test_spec_with_truncated_draft_is_lossless(tiny_model_dir: Path, data_file: Path,
                                               tmp_path: Path) -> None:
    draft = save_truncated(tiny_model_dir, tmp_path / "draft", 2)
    job = compare_job(job_settings(tiny_model_dir, data_file, compare__drafts=[str(draft)],
                                   compare__early_exit="2", compare__num_speculations="2"), 4)
    assert [r.strategy for r in job.runs] == ["ar", "spec", "layerskip"]
    store = ResultStore(tmp_path / "c.parquet")
    assert run_job(job, store) == JobOutcome(6, 0)
    df = store.rows()
    base = {r.example_id: list(r.output_ids) for r in df[df.is_baseline].itertuples()}
    assert df.matches_baseline.all()
    assert all(list(r.output_ids) == base[r.example_id] for r in df.itertuples())
    spec = df[df.strategy == "spec"]
    assert len(spec) == 2 and (spec.draft_model == str(draft)).all()
    assert (spec.draft_num_layers == 2).all()
    assert (spec.draft_params > 0).all() and (spec.draft_params < spec.model_params).all()
    assert all(len(x) == 2 and sum(x) > 0 for x in spec.draft_layer_tokens_decode)
    assert (spec.draft_head_tokens_decode > 0).all()
    assert all(len(h) == 3 and sum(h) == n for h, n in zip(spec.accept_hist, spec.rounds,
                                                             strict=True))
    # the truncated draft is layerskip at E=2 without the shared cache: same drafts, same
    # acceptance
    ls = df[df.strategy == "layerskip"].set_index("example_id")
    for r in spec.itertuples():
        assert list(r.accepted_per_round) == list(ls.loc[r.example_id, "accepted_per_round"])


def test_draft_with_other_vocabulary_refused(tiny_model_dir: Path, data_file: Path,
                                             tmp_path: Path) -> None:
    draft = save_other_vocab(tiny_model_dir, tmp_path / "other")
    job = compare_job(job_settings(tiny_model_dir, data_file, compare__drafts=[str(draft)]), 4)
    path = tmp_path / "c.parquet"
    with pytest.raises(LsbenchError, match="another tokenizer"):
        run_job(job, ResultStore(path))
    assert not path.exists()
