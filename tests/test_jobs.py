"""Sweep files, overrides and job specs: everything decided before a model is loaded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lsbench.errors import LsbenchError
from lsbench.scenario.jobs import (
    BASELINE,
    HF_BASELINE,
    JobSpec,
    RunSpec,
    Settings,
    baseline_of,
    compare_job,
    parse_int_list,
    sweep_job,
)

SWEEPS = sorted((Path(__file__).resolve().parent.parent / "sweeps").glob("*.toml"))


def settings(**values: object) -> Settings:
    """Settings from `section__key=value` keywords (top-level keys have no section)."""
    s = Settings()
    for name, value in values.items():
        section, _, key = name.rpartition("__")
        s.override(section, key, value)
    return s


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- parse_int_list ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("4,8,12", [4, 8, 12]),
    (" 4 , 8 ,", [4, 8]),
    ("12,4,12,8", [12, 4, 8]),  # duplicates dropped, first-seen order kept
    ("4:28:4", [4, 8, 12, 16, 20, 24, 28]),  # stop included
    ("1:10:3", [1, 4, 7, 10]),
    ("1:9:3", [1, 4, 7]),
    ("2:4", [2, 3, 4]),
    ("1,5:7", [1, 5, 6, 7]),
    (6, [6]),
    ([3, 1], [3, 1]),
])
def test_parse_int_list(text: str | int | list, expected: list[int]) -> None:
    assert parse_int_list(text) == expected


def test_parse_int_list_all_needs_layer_count() -> None:
    assert parse_int_list("all", num_layers=4) == [1, 2, 3, 4]
    assert parse_int_list("all", num_layers=32) == list(range(1, 33))
    with pytest.raises(LsbenchError, match="layer count"):
        parse_int_list("all")


@pytest.mark.parametrize("text", ["a", "4,x", "4:", ":4", "1:2:0", "1:8:-2", "1:2:3:4", "4.5",
                                  "", ",", "28:4:4", "all4"])
def test_parse_int_list_refuses_bad_strings(text: str) -> None:
    with pytest.raises(LsbenchError, match="exit layers"):
        parse_int_list(text, num_layers=32)


def test_parse_int_list_names_what_it_parses() -> None:
    with pytest.raises(LsbenchError, match="num_speculations"):
        parse_int_list("two", what="num_speculations")


@pytest.mark.parametrize("value", [["a"], [4.5]])
def test_parse_int_list_refuses_bad_toml_lists(value: list) -> None:
    with pytest.raises(LsbenchError):
        parse_int_list(value)


# --- sweep files and overrides ----------------------------------------------------------------

SWEEP_TOML = """
name = "mine"
model = "org/model"
dtype = "float32"

[data]
dataset = "xsum"
limit = 5

[decoding]
max_new_tokens = 32

[sweep]
exit_layers = "4:12:4"
num_speculations = [2, 4]
repeats = 2
warmup = 0
"""


def test_settings_from_file(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", SWEEP_TOML)
    s = Settings.from_file(path)
    assert s.source == str(path)
    assert s.get("", "model") == "org/model" and s.get("data", "limit") == 5
    assert s.get("sweep", "num_speculations") == [2, 4]
    assert s.get("data", "split", "test") == "test"  # default for what the file leaves out
    job = sweep_job(s, 32)
    assert job.name == "mine" and job.model == "org/model" and job.dtype == "float32"
    assert job.dataset.name == "xsum" and job.dataset.limit == 5
    assert job.decoding.max_new_tokens == 32 and (job.repeats, job.warmup) == (2, 0)
    assert job.sweep_file == str(path)
    assert [(r.exit_layer, r.num_speculations) for r in job.runs[1:]] == [
        (4, 2), (4, 4), (8, 2), (8, 4), (12, 2), (12, 4)]


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = write(tmp_path / "my-sweep.toml", 'model = "org/model"\n')
    assert sweep_job(Settings.from_file(path), 8).name == "my-sweep"
    assert sweep_job(settings(model="org/model"), 8).name == "sweep"


@pytest.mark.parametrize(("text", "unknown", "where"), [
    ('modle = "x"\n', "modle", "top level"),
    ("[data]\nlimt = 3\n", "limt", "[data]"),
    ("[sweep]\nexit_layer = [4]\n", "exit_layer", "[sweep]"),
    ("[decoding]\ntemp = 0.5\n", "temp", "[decoding]"),
    ("[compare]\ndraft = ['x/y']\n", "draft", "[compare]"),
    ("[sweep.pld]\nk = [4]\n", "k", "[sweep.pld]"),
])
def test_unknown_keys_refused(tmp_path: Path, text: str, unknown: str, where: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(LsbenchError) as info:
        Settings.from_file(path)
    message = str(info.value)
    assert str(path) in message and f"unknown key(s) {unknown} in {where}" in message
    assert "allowed:" in message


def test_sweep_file_overrides_layers_and_k_per_strategy(tmp_path: Path) -> None:
    path = write(tmp_path / "mixed.toml", 'model = "org/m"\n[sweep]\nexit_layers = [2, 4]\n'
                 'num_speculations = [3]\nstrategies = ["layerskip", "pld", "exit"]\n'
                 '[sweep.pld]\nnum_speculations = [4, 8]\n[sweep.exit]\nexit_layers = "6"\n')
    job = sweep_job(Settings.from_file(path), 8)
    assert job.runs == (BASELINE, RunSpec("layerskip", 2, 3), RunSpec("layerskip", 4, 3),
                        RunSpec("pld", 0, 4), RunSpec("pld", 0, 8), RunSpec("exit", 6, 0))
    bad = write(tmp_path / "bad.toml", 'model = "org/m"\n[sweep]\nstrategies = ["exit"]\n'
                '[sweep.exit]\nexit_layers = [9]\n')
    with pytest.raises(LsbenchError, match="exit layer 9 out of range"):
        sweep_job(Settings.from_file(bad), 8)
    with pytest.raises(LsbenchError, match=r"\[sweep.pld\] must be a table"):
        Settings.from_file(write(tmp_path / "bad2.toml", '[sweep]\npld = 4\n'))


def test_section_that_is_not_a_table_refused(tmp_path: Path) -> None:
    with pytest.raises(LsbenchError, match=r"\[data\] must be a table"):
        Settings.from_file(write(tmp_path / "bad.toml", 'data = "xsum"\n'))


@pytest.mark.parametrize("text", ['model = "unterminated\n', "[data\n", "limit = = 3\n"])
def test_invalid_toml_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(LsbenchError, match="is not valid TOML"):
        Settings.from_file(path)


def test_binary_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LsbenchError, match="is not valid TOML"):
        Settings.from_file(path)


def test_missing_file_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.toml", tmp_path):  # a directory is not a sweep file either
        with pytest.raises(LsbenchError, match="sweep file not found"):
            Settings.from_file(path)


def test_no_file_is_empty_settings() -> None:
    s = Settings.from_file(None)
    assert s.raw == {} and s.source == ""
    with pytest.raises(LsbenchError, match="no model given"):
        sweep_job(s, 4)


def test_overrides_beat_file_values(tmp_path: Path) -> None:
    s = Settings.from_file(write(tmp_path / "s.toml", SWEEP_TOML))
    s.override("data", "limit", 2)
    s.override("sweep", "exit_layers", "1,3")
    s.override("sweep", "num_speculations", "3")
    s.override("decoding", "max_new_tokens", 8)
    s.override("", "model", "other/model")
    s.override("decoding", "temperature", 0.5)  # a section the file has, a key it lacks
    s.override("compare", "drafts", ["x/y"])  # a section the file lacks
    s.override("data", "dataset", None)  # None: the option was not given, the file wins
    job = sweep_job(s, 32)
    assert job.model == "other/model" and job.dataset.name == "xsum"
    assert job.dataset.limit == 2 and job.decoding.max_new_tokens == 8
    assert job.decoding.temperature == 0.5 and s.get("compare", "drafts") == ["x/y"]
    assert job.runs == (BASELINE, RunSpec("layerskip", 1, 3), RunSpec("layerskip", 3, 3))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("decoding__max_new_tokens", 0, "max_new_tokens"),
    ("decoding__top_p", 0.0, "top_p"),
    ("decoding__top_p", 1.5, "top_p"),
    ("sweep__repeats", 0, "repeats"),
    ("sweep__warmup", -1, "warmup"),
    ("sweep__num_speculations", "0,2", "num_speculations"),
])
def test_bad_knobs_refused(key: str, value: object, match: str) -> None:
    with pytest.raises(LsbenchError, match=match):
        sweep_job(settings(model="org/model", **{key: value}), 8)


def test_sampling_needs_positive_temperature() -> None:
    with pytest.raises(LsbenchError, match="temperature"):
        sweep_job(settings(model="m/m", decoding__sample=True, decoding__temperature=0.0), 8)
    # greedy ignores the temperature
    assert sweep_job(settings(model="m/m", decoding__temperature=0.0), 8).decoding.temperature == 0


def test_non_numeric_file_values_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", 'model = "m/m"\n[data]\nlimit = "three"\n')
    with pytest.raises(LsbenchError):
        sweep_job(Settings.from_file(path), 8)


# --- sweep_job ----------------------------------------------------------------------------------

def test_sweep_job_runs() -> None:
    job = sweep_job(settings(model="org/m", sweep__exit_layers="4:12:4",
                             sweep__num_speculations="2,4,8"), 32)
    assert job.runs[0] == BASELINE and job.runs[0].strategy == "ar"
    assert len(job.runs) == 1 + 3 * 3
    assert {(r.strategy, r.exit_layer, r.num_speculations) for r in job.runs[1:]} == {
        ("layerskip", e, k) for e in (4, 8, 12) for k in (2, 4, 8)}
    assert all(r.draft_model == "" for r in job.runs)
    assert len({job.run_id(r) for r in job.runs}) == len(job.runs)


def test_sweep_job_defaults() -> None:
    job = sweep_job(settings(model="org/m"), 6)
    assert job.runs == (BASELINE, *(RunSpec("layerskip", e, 4) for e in range(1, 7)))
    assert job.dataset.name == "lee-news" and job.dataset.limit == 8
    # "auto" is resolved when the job is built, so the run id names what is measured.
    expected = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    assert (job.repeats, job.warmup, job.device, job.dtype) == (1, 1, *expected)
    assert job.decoding.max_new_tokens == 64 and not job.decoding.do_sample


@pytest.mark.parametrize("layers", ["0", "33", "30:34:2", "all,40"])
def test_sweep_job_refuses_out_of_range_layers(layers: str) -> None:
    with pytest.raises(LsbenchError, match=r"org/m has 32 layers, choose 1\.\.32"):
        sweep_job(settings(model="org/m", sweep__exit_layers=layers), 32)


def test_sweep_job_names_each_bad_layer() -> None:
    with pytest.raises(LsbenchError, match=r"exit layers 5, 9 out of range"):
        sweep_job(settings(model="org/m", sweep__exit_layers="1,5,9"), 4)


def test_sweep_job_hf_early_exit() -> None:
    job = sweep_job(settings(model="org/m", sweep__exit_layers="2,4",
                             sweep__num_speculations="3",
                             sweep__strategies=["layerskip", "hf-early-exit"]), 8)
    # a transformers reference brings its own engine's baseline, hf-ar, right after ar
    assert job.runs == (BASELINE, HF_BASELINE, RunSpec("layerskip", 2, 3),
                        RunSpec("layerskip", 4, 3), RunSpec("hf-early-exit", 2, 3),
                        RunSpec("hf-early-exit", 4, 3))
    assert [baseline_of(r) for r in job.runs] == [BASELINE, HF_BASELINE, BASELINE, BASELINE,
                                                  HF_BASELINE, HF_BASELINE]
    plain = sweep_job(settings(model="org/m", sweep__exit_layers="2"), 8)
    assert HF_BASELINE not in plain.runs


@pytest.mark.parametrize("strategy", ["spec", "ar", "hf-assisted", "layerskp"])
def test_sweep_job_refuses_other_strategies(strategy: str) -> None:
    with pytest.raises(LsbenchError, match=f"unknown sweep strategy '{strategy}'; choose from "
                       "layerskip, hf-early-exit, pld, hf-pld, exit"):
        sweep_job(settings(model="org/m", sweep__strategies=["layerskip", strategy]), 8)


def test_sweep_job_pld_over_k_and_exit_over_layers() -> None:
    job = sweep_job(settings(model="org/m", sweep__exit_layers="2,4",
                             sweep__num_speculations="3,5",
                             sweep__strategies=["layerskip", "pld", "exit", "hf-pld"]), 8)
    # hf-pld brings transformers' own baseline, hf-ar, right after lsbench's.
    assert job.runs == (BASELINE, HF_BASELINE, RunSpec("layerskip", 2, 3),
                        RunSpec("layerskip", 2, 5),
                        RunSpec("layerskip", 4, 3), RunSpec("layerskip", 4, 5),
                        RunSpec("pld", 0, 3), RunSpec("pld", 0, 5),
                        RunSpec("exit", 2, 0), RunSpec("exit", 4, 0),
                        RunSpec("hf-pld", 0, 3), RunSpec("hf-pld", 0, 5))
    assert [r.label for r in job.runs[6:9]] == ["pld k=3", "pld k=5", "exit E=2 (lossy)"]
    assert len({job.run_id(r) for r in job.runs}) == len(job.runs)


# --- compare_job --------------------------------------------------------------------------------

def test_compare_job_runs() -> None:
    job = compare_job(settings(model="big/target", compare__drafts=["a/small", "b/small"],
                               compare__early_exit="4,8", compare__num_speculations="2,4",
                               compare__repeats=3, compare__warmup=0), 32)
    assert job.runs[0] == BASELINE
    expected = [BASELINE]
    for k in (2, 4):
        expected += [RunSpec("spec", 0, k, "a/small"), RunSpec("spec", 0, k, "b/small"),
                     RunSpec("layerskip", 4, k), RunSpec("layerskip", 8, k)]
    assert list(job.runs) == expected
    assert (job.repeats, job.warmup) == (3, 0)


def test_compare_job_hf_reference_and_single_sides() -> None:
    job = compare_job(settings(model="t/t", compare__drafts=["d/d"], compare__hf_reference=True),
                      16)
    assert job.runs == (BASELINE, HF_BASELINE, RunSpec("spec", 0, 4, "d/d"),
                        RunSpec("hf-assisted", 0, 4, "d/d"))
    job = compare_job(settings(model="t/t", compare__early_exit=[4], compare__hf_reference=True),
                      16)
    assert job.runs == (BASELINE, HF_BASELINE, RunSpec("layerskip", 4, 4),
                        RunSpec("hf-early-exit", 4, 4))


def test_compare_job_pld_pseudo_draft() -> None:
    job = compare_job(settings(model="t/t", compare__drafts=["d/d", "pld"],
                               compare__num_speculations="2,4", compare__hf_reference=True), 16)
    expected = [BASELINE, HF_BASELINE]
    for k in (2, 4):
        expected += [RunSpec("spec", 0, k, "d/d"), RunSpec("pld", 0, k),
                     RunSpec("hf-assisted", 0, k, "d/d"), RunSpec("hf-pld", 0, k)]
    assert list(job.runs) == expected
    assert all(r.draft_model == "" for r in job.runs if "pld" in r.strategy)  # nothing to load
    job = compare_job(settings(model="t/t", compare__drafts="pld"), 16)
    assert job.runs == (BASELINE, RunSpec("pld", 0, 4))


def test_compare_job_refuses_nothing_to_compare() -> None:
    for s in (settings(model="t/t"), settings(model="t/t", compare__drafts=[]),
              settings(model="t/t", compare__early_exit="")):
        with pytest.raises(LsbenchError, match="nothing to compare"):
            compare_job(s, 16)


def test_compare_job_single_draft_string() -> None:
    try:
        job = compare_job(settings(model="t/t", compare__drafts="org/model"), 16)
    except LsbenchError:
        return  # refusing a string is fine too
    assert {r.draft_model for r in job.runs if r.draft_model} == {"org/model"}


def test_compare_job_refuses_out_of_range_early_exit() -> None:
    with pytest.raises(LsbenchError, match="t/t has 16 layers"):
        compare_job(settings(model="t/t", compare__early_exit="8,17"), 16)


# --- run_id -----------------------------------------------------------------------------------

def _job() -> JobSpec:
    return sweep_job(settings(model="org/m", data__dataset="xsum", data__limit=3,
                              sweep__exit_layers="2", sweep__num_speculations="4"), 8)


def test_run_id_is_stable() -> None:
    a, b = _job(), _job()
    assert [a.run_id(r) for r in a.runs] == [b.run_id(r) for r in b.runs]
    run_id = a.run_id(a.runs[1])
    assert len(run_id) == 16 and int(run_id, 16) >= 0
    # Knobs that do not change what is measured keep the id, so reruns resume.
    for same in (replace(a, name="other"), replace(a, repeats=5), replace(a, warmup=0),
                 replace(a, sweep_file="x.toml")):
        assert same.run_id(a.runs[1]) == run_id


def test_run_id_differs_when_any_knob_differs() -> None:
    job = _job()
    run = job.runs[1]
    variants = [
        replace(job, model="org/other"), replace(job, revision="abc"),
        replace(job, max_input_tokens=256), replace(job, dtype="bfloat16"),
        replace(job, device="cuda"),
        replace(job, dataset=replace(job.dataset, name="cnn_dailymail")),
        replace(job, dataset=replace(job.dataset, seed=1)),
        replace(job, dataset=replace(job.dataset, split="validation")),
        replace(job, decoding=replace(job.decoding, max_new_tokens=65)),
        replace(job, decoding=replace(job.decoding, do_sample=True)),
        replace(job, decoding=replace(job.decoding, temperature=0.7)),
        replace(job, decoding=replace(job.decoding, top_k=5)),
        replace(job, decoding=replace(job.decoding, top_p=0.9)),
        replace(job, decoding=replace(job.decoding, seed=1)),
    ]
    ids = {job.run_id(run)} | {v.run_id(run) for v in variants}
    runs = [RunSpec("layerskip", 3, 4), RunSpec("layerskip", 2, 5), RunSpec("hf-early-exit", 2, 4),
            RunSpec("spec", 0, 4, "d/d"), RunSpec("spec", 0, 4, "e/e"), BASELINE]
    ids |= {job.run_id(r) for r in runs}
    assert len(ids) == 1 + len(variants) + len(runs)
    # The selection is prefix-stable: a larger limit only adds examples, the runs stay the same.
    assert replace(job, dataset=replace(job.dataset, limit=4)).run_id(run) == job.run_id(run)


# --- the shipped sweep files --------------------------------------------------------------------

@pytest.mark.skipif(not SWEEPS, reason="no sweeps/*.toml yet")
@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_sweep_files_build_jobs(path: Path) -> None:
    s = Settings.from_file(path)
    if not s.get("", "model"):
        s.override("", "model", "org/model")
    if s.get("", "device", "auto").startswith("cuda") and not torch.cuda.is_available():
        with pytest.raises(LsbenchError, match="CUDA is not available"):
            (compare_job if "compare" in s.raw else sweep_job)(s, 32)
        s.override("", "device", "cpu")
    job = (compare_job if "compare" in s.raw else sweep_job)(s, 32)
    assert job.runs[0] == BASELINE and len(job.runs) > 1
    assert len({job.run_id(r) for r in job.runs}) == len(job.runs)
    assert job.name and job.dataset.limit >= 1 and job.decoding.max_new_tokens >= 1
    assert all(1 <= r.exit_layer <= 32 for r in job.runs if r.strategy in ("layerskip",
                                                                            "hf-early-exit"))
