"""--compile/--no-compile and `[sweep] compile`: defaults per device, the job identity, the flag
reaching generate(), compilation in warm-up (compile_s), and a compile failure as one line.

The compiled engine itself is tested with the engine; here generate() is wrapped so that the
plumbing is tested whether or not the compiled engine is built."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import lsbench.scenario.jobs
import lsbench.scenario.runner
from lsbench.engine.generation import DecodingConfig
from lsbench.errors import LsbenchError
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import HF_COMPILED, Settings, compare_job, sweep_job
from lsbench.scenario.runner import engine_generate, is_compile_failure
from tests.test_cli import assert_refused, invoke, sweep_args
from tests.test_runner import job_settings, write_jsonl

COMPILE_S = 0.5  # what the fake compiler takes on a run's first call


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """generate() as the runner calls it, recording (strategy, max_new_tokens, compiled): an
    eager generation marked compiled, the first call of each configuration taking COMPILE_S
    longer (its "compilation")."""
    real = lsbench.scenario.runner.generate
    calls: list[tuple[str, int, bool]] = []
    seen: set[tuple] = set()

    def fake(strategy, model, prompt, cfg, *, compiled=False, **kwargs):
        calls.append((strategy, cfg.max_new_tokens, compiled))
        key = (strategy, kwargs.get("exit_layer"), kwargs.get("k"))
        if compiled and key not in seen:
            seen.add(key)
            time.sleep(COMPILE_S)
        gen = real(strategy, model, prompt, cfg, compiled=False, **kwargs)
        return dataclasses.replace(gen, compiled=compiled)

    monkeypatch.setattr(lsbench.scenario.runner, "generate", fake)
    return calls


def test_compile_defaults_to_eager_on_cpu_and_on_cuda(tiny_model_dir, data_file, monkeypatch):
    def job(**values):
        return sweep_job(job_settings(tiny_model_dir, data_file, sweep__exit_layers="1", **values),
                         4)

    assert job().compiled is lsbench.scenario.jobs.COMPILE_ON_CPU is False
    assert job(sweep__compile=True).compiled and not job(sweep__compile=False).compiled
    # CUDA (pretended: no GPU is needed to decide a default) compiles unless told not to.
    monkeypatch.setattr(lsbench.scenario.jobs, "resolve_device", lambda name: "cuda:0")
    assert job().compiled and not job(sweep__compile=False).compiled


def test_toml_compile_is_read_and_checked(tiny_model_dir, data_file, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(f'model = "{tiny_model_dir}"\ndevice = "cpu"\n'
                    f'[data]\ndataset = "jsonl:{data_file}"\n[sweep]\ncompile = true\n'
                    'exit_layers = [1]\n')
    assert sweep_job(Settings.from_file(path), 4).compiled
    path.write_text(path.read_text().replace("compile = true", 'compile = "yes"'))
    with pytest.raises(LsbenchError, match=r"\[sweep\] compile must be of type bool"):
        sweep_job(Settings.from_file(path), 4)
    path.write_text(path.read_text().replace('compile = "yes"', "compiled = true"))
    with pytest.raises(LsbenchError, match=r"unknown key.*compiled"):
        Settings.from_file(path)


@pytest.mark.parametrize("command,section", [("sweep", "sweep"), ("compare", "compare"),
                                             ("scan", "sweep")])
def test_a_bad_compile_value_is_one_line(tiny_model_dir, data_file, tmp_path, command, section):
    path = tmp_path / "bad.toml"
    path.write_text(f'model = "{tiny_model_dir}"\ndevice = "cpu"\n[data]\n'
                    f'dataset = "jsonl:{data_file}"\n[{section}]\ncompile = 1\n'
                    + ('early_exit = [2]\n' if command == "compare" else ""))
    assert_refused(invoke(command, path), f"[{section}] compile must be of type bool")


def test_the_engine_is_part_of_the_run_id(tiny_model_dir, data_file):
    s = dict(sweep__exit_layers="1", sweep__strategies=["layerskip", "hf-early-exit"])
    eager = sweep_job(job_settings(tiny_model_dir, data_file, **s), 4)
    compiled = sweep_job(job_settings(tiny_model_dir, data_file, sweep__compile=True, **s), 4)
    assert eager.runs == compiled.runs
    for run in eager.runs:
        # lsbench's loops: two engines, two runs; transformers' runs are the same either way
        same = run.strategy.startswith("hf-")
        assert (eager.run_id(run) == compiled.run_id(run)) is same
        assert compiled.engine_compiled(run) is not same and not eager.engine_compiled(run)


def test_compare_adds_the_compiled_peer_only_for_the_compiled_engine(tiny_model_dir, data_file):
    def runs(**values):
        return compare_job(job_settings(tiny_model_dir, data_file, compare__early_exit="2",
                                        compare__hf_reference=True, **values), 4).runs

    assert HF_COMPILED not in runs()
    compiled = runs(compare__compile=True)
    assert [r.strategy for r in compiled[:3]] == ["ar", "hf-ar", "hf-ar-compiled"]
    assert HF_COMPILED not in compare_job(job_settings(
        tiny_model_dir, data_file, compare__early_exit="2", compare__compile=True), 4).runs


def test_sweep_compile_reaches_generate_and_compiles_in_warm_up(tiny_model_dir, data_file,
                                                                tmp_path, fake_engine):
    out = tmp_path / "c.parquet"
    # --warmup 0; warm-up generations are 16 tokens, measured ones 20
    result = invoke(*sweep_args(tiny_model_dir, data_file, out, "--compile",
                                "--max-new-tokens", 20))
    assert result.exit_code == 0, result.output
    df = ResultStore(out).rows()
    assert len(df) == 2 * 3 and df.compiled.all()
    # Each run warmed up once although --warmup 0: its compilation is there, never timed.
    warm = [c for c in fake_engine if c[1] == 16]
    measured = [c for c in fake_engine if c[1] == 20]
    assert len(measured) == 6 and len(warm) == 3 and all(c[2] for c in fake_engine)
    assert fake_engine[:3] == warm
    assert (df.compile_s >= COMPILE_S).all()  # each run's first call, a warm-up
    assert {"eager_head", "defer_threshold", "device_loop"} <= set(df.columns)
    assert not df.eager_head.any() and not df.device_loop.any()  # the CPU's default policy
    assert df[df.strategy == "ar"].defer_threshold.isna().all()

    fake_engine.clear()
    result = invoke(*sweep_args(tiny_model_dir, data_file, out, "--no-compile",
                                "--max-new-tokens", 20))
    assert result.exit_code == 0, result.output
    df = ResultStore(out).rows()
    eager = df[~df.compiled.astype(bool)]
    assert len(df) == 2 * 2 * 3 and len(eager) == 2 * 3  # measured anew, not resumed
    assert (eager.compile_s == 0).all()
    assert len(fake_engine) == 6 and not any(c[2] for c in fake_engine)  # --warmup 0 kept


def compile_failure() -> Exception:
    """What a failing torch.compile raises: dynamo's wrapper around inductor's C++ error."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError

    inner = CppCompileError(["g++", "kernel.cpp"], "kernel.cpp:1:1: error: bad\nline two")
    try:
        raise BackendCompilerFailed(lambda *a: None, inner, None) from inner
    except BackendCompilerFailed as exc:
        return exc


def test_compile_failures_are_recognised_through_their_causes():
    assert is_compile_failure(compile_failure())
    try:
        try:
            raise compile_failure()
        except Exception as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert is_compile_failure(outer)
    assert not is_compile_failure(RuntimeError("shape mismatch"))
    assert not is_compile_failure(torch.cuda.OutOfMemoryError("oom"))


def test_engine_generate_turns_only_compile_failures_into_one_line(target, monkeypatch):
    def fail(exc):
        def generate(*args, **kwargs):
            raise exc
        monkeypatch.setattr(lsbench.scenario.runner, "generate", generate)

    cfg = DecodingConfig(max_new_tokens=2)
    fail(compile_failure())
    with pytest.raises(LsbenchError) as info:
        engine_generate("ar", target, [1, 5], cfg, compiled=True, compiles=True)
    message = str(info.value)
    assert "--no-compile" in message and "BackendCompilerFailed" in message
    assert "\n" not in message
    with pytest.raises(type(compile_failure())):  # a run that does not compile: untouched
        engine_generate("ar", target, [1, 5], cfg)
    fail(RuntimeError("not a compiler's"))
    with pytest.raises(RuntimeError, match="not a compiler's"):
        engine_generate("ar", target, [1, 5], cfg, compiled=True, compiles=True)


def test_a_compile_failure_mid_sweep_is_one_line_and_keeps_stored_rows(
        tiny_model_dir, data_file, tmp_path, monkeypatch):
    real = lsbench.scenario.runner.generate
    calls = 0

    def fails_in_second_unit(strategy, model, prompt, cfg, *, compiled=False, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3 + 3 + 2:  # warm-ups, the first unit, then the second unit's second run
            raise compile_failure()  # a shape compiled for the first time (a recompile)
        return dataclasses.replace(real(strategy, model, prompt, cfg, **kwargs),
                                   compiled=compiled)

    monkeypatch.setattr(lsbench.scenario.runner, "generate", fails_in_second_unit)
    out = tmp_path / "f.parquet"
    result = invoke(*sweep_args(tiny_model_dir, data_file, out, "--compile"))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--no-compile" in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert "CppCompileError: C++ compile error" in errors[0]  # the compiler's reason, folded
    df = ResultStore(out).rows()
    assert len(df) == 3 and df.example_index.eq(0).all()  # the first unit, whole


def test_scan_records_the_engine_it_priced_with(tiny_model_dir, data_file, tmp_path,
                                                fake_engine):
    out = tmp_path / "s.scan.parquet"
    result = invoke("scan", "--model", tiny_model_dir, "--dataset", f"jsonl:{data_file}",
                    "--limit", 1, "--max-new-tokens", 6, "-k", "2", "-e", "1", "--no-pld",
                    "--thresholds", "0.5", "--compile", "--out", out)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(out)
    assert len(rows) and rows.compiled.all()
    assert fake_engine and all(c[2] for c in fake_engine)  # warm-up and measured alike
