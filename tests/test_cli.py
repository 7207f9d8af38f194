"""The `lsbench` command line: sweep, compare, report, plot, refusals and a SIGKILL mid-sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import transformers
from typer.testing import CliRunner

import lsbench.scenario.runner
from lsbench import __version__
from lsbench.cli import app
from lsbench.results.store import ResultStore, read_results
from tests.test_runner import KEY, by_key, save_truncated, write_jsonl

runner = CliRunner()
APP = [sys.executable, "-c", "from lsbench.cli import app; app()"]
# One torch thread: on a busy 2-core machine two spinning threads make the tiny model 10x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The same CLI with every measured generation slowed down, so that a SIGKILL lands mid-sweep.
SLOW_APP = [sys.executable, "-c", "import time, lsbench.scenario.runner as r; g = r._generate; "
            "r._generate = lambda *a: (time.sleep(0.15), g(*a))[1]; "
            "from lsbench.cli import app; app()"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> str:
    """Exit code 1 and exactly one line on stderr, naming the problem; nothing on stdout."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


@pytest.fixture(scope="module")
def draft_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return save_truncated(tiny_model_dir, tmp_path_factory.mktemp("draft"), 2)


def sweep_args(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["sweep", "--model", model, "--dataset", f"jsonl:{data}", "--limit", 2, "-e", "1,3",
            "-k", 2, "--max-new-tokens", 8, "--warmup", 0, "--out", out, *extra]


@pytest.fixture(scope="module")
def swept(tiny_model_dir: Path, data_file: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "sweep.parquet"
    return out, invoke(*sweep_args(tiny_model_dir, data_file, out))


@pytest.fixture(scope="module")
def compared(tiny_model_dir: Path, draft_dir: Path, data_file: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "compare.parquet"
    return out, invoke("compare", "--model", tiny_model_dir, "--draft", draft_dir,
                       "--early-exit", 2, "--dataset", f"jsonl:{data_file}", "--limit", 2,
                       "-k", 2, "--max-new-tokens", 8, "--warmup", 0, "--out", out)


@pytest.fixture
def no_measuring(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and stops) any attempt to load a model or start measuring."""
    calls: list[str] = []

    def forbidden(name: str):
        def call(*args: object, **kwargs: object):
            calls.append(name)
            raise AssertionError(f"{name} called")
        return call

    monkeypatch.setattr(lsbench.scenario.runner, "run_job", forbidden("run_job"))
    monkeypatch.setattr(lsbench.scenario.runner, "load_model", forbidden("load_model"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        forbidden("from_pretrained"))
    return calls


# --- sweep and compare ------------------------------------------------------------------------

def test_sweep_with_pld_and_lossy_exit(tiny_model_dir: Path, data_file: Path,
                                       tmp_path: Path) -> None:
    out = tmp_path / "sweep.parquet"
    args = sweep_args(tiny_model_dir, data_file, out, "--strategy", "layerskip", "--strategy",
                      "pld", "--strategy", "exit")
    result = invoke(*[a if a != "1,3" else "1,4" for a in args])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    verdict = [line for line in lines if line.startswith("best lossless: ")]
    lossy = [line for line in lines if line.startswith("best lossy: ")]
    assert len(verdict) == 1 and "lossy" not in verdict[0].removeprefix("best lossless: ")
    assert len(lossy) == 1 and "unverified (lossy)" in lossy[0] and "ROUGE-L" in lossy[0]
    assert "prompt lookup" in result.stdout and "no-draft" in result.stdout
    df = pd.read_parquet(out)
    assert set(df.strategy) == {"ar", "layerskip", "pld", "exit"}
    assert df[df.strategy != "exit"].matches_baseline.all()
    assert (df.lossy == (df.strategy == "exit")).all()


def test_sweep(swept) -> None:
    out, result = swept
    assert result.exit_code == 0, result.output
    assert "autoregressive" in result.stdout
    assert "early exit @ layer 1" in result.stdout and "early exit @ layer 3" in result.stdout
    assert "best lossless: early exit @ layer" in result.stdout
    assert "roofline: autoregressive decoding reads weights at" in result.stdout
    assert "measured 6 generations, 0 already in" in result.stderr
    df = pd.read_parquet(out)
    assert len(df) == 3 * 2 and not df.duplicated(KEY).any()
    assert sorted(df.exit_layer.unique()) == [0, 1, 3] and set(df.num_speculations) == {0, 2}
    assert df.matches_baseline.all() and (df.sweep_name == "sweep").all()


def test_sweep_rerun_measures_nothing(swept, tiny_model_dir: Path, data_file: Path) -> None:
    out, _ = swept
    before = out.read_bytes()
    result = invoke(*sweep_args(tiny_model_dir, data_file, out))
    assert result.exit_code == 0, result.output
    assert "measured 0 generations, 6 already in" in result.stderr
    assert "early exit @ layer 3" in result.stdout  # the table is printed again
    assert out.read_bytes() == before


def test_sweep_file_with_overrides(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    sweep_file = tmp_path / "tiny-sweep.toml"
    sweep_file.write_text(f'model = "{tiny_model_dir}"\n[data]\ndataset = "jsonl:{data_file}"\n'
                          "limit = 3\n[decoding]\nmax_new_tokens = 4\n"
                          "[sweep]\nexit_layers = [1, 2, 3]\nnum_speculations = [3]\nwarmup = 0\n")
    out = tmp_path / "out.parquet"
    result = invoke("sweep", sweep_file, "--limit", 1, "-e", 2, "--out", out)
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out)
    assert list(df.exit_layer) == [0, 2] and list(df.num_speculations) == [0, 3]
    assert (df.sweep_name == "tiny-sweep").all() and (df.sweep_file == str(sweep_file)).all()
    assert (df.max_new_tokens == 4).all() and df.example_id.nunique() == 1


def test_compare_draft_pld_loads_no_model(tiny_model_dir: Path, data_file: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "compare.parquet"
    result = invoke("compare", "--model", tiny_model_dir, "--draft", "pld", "--hf-reference",
                    "--dataset", f"jsonl:{data_file}", "--limit", 1, "-k", 2,
                    "--max-new-tokens", 8, "--warmup", 0, "--out", out)
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out)
    # Measured in a shuffled order; hf-pld comes with its own baseline, hf-ar.
    assert sorted(df.strategy) == ["ar", "hf-ar", "hf-pld", "pld"]
    assert (df.draft_model == "").all()
    assert df.matches_baseline.all() and "best lossless: prompt lookup" in result.stdout


def test_compare(compared) -> None:
    out, result = compared
    assert result.exit_code == 0, result.output
    assert "autoregressive" in result.stdout and "early exit @ layer 2" in result.stdout
    df = pd.read_parquet(out)
    assert len(df) == 3 * 2 and set(df.strategy) == {"ar", "spec", "layerskip"}
    assert df.matches_baseline.all() and (df.sweep_name == "compare").all()
    assert (df[df.strategy == "spec"].draft_num_layers == 2).all()


# --- report and plot ---------------------------------------------------------------------------

def test_report_markdown(swept, compared) -> None:
    result = invoke("report", swept[0], "--format", "md")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "GFLOPs/input" in lines[0] and "ms/output token" in lines[0]
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert set(lines[1]) <= set("|-:")
    assert len(lines) == 2 + 3  # header, rule, one line per run
    both = invoke("report", swept[0], compared[0])
    assert both.exit_code == 0 and len(both.stdout.splitlines()) == 2 + 3 + 3
    assert "file" in both.stdout.splitlines()[0]


def test_report_csv(swept, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "table.csv"
    result = invoke("report", swept[0], "--format", "csv", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and str(out) in result.stderr
    table = pd.read_csv(out)
    assert len(table) == 3 and "GFLOPs/input" in table.columns
    assert table["speedup"].iloc[0] == 1.0
    summary = invoke("report", swept[0], "--table", "summary", "--format", "csv")
    assert summary.exit_code == 0 and "speedup_median" in summary.stdout.splitlines()[0]


def test_plot(swept, compared, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    result = invoke("plot", swept[0], compared[0], "--out", out)
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert sorted(Path(line) for line in result.stdout.split()) == pngs


@pytest.mark.parametrize("args", [("report", "missing.parquet"),
                                  ("plot", "missing.parquet"),
                                  ("report", "{swept}", "--format", "xlsx"),
                                  ("report", "{swept}", "--table", "nope")])
def test_report_and_plot_refusals(swept, args: tuple[str, ...]) -> None:
    result = invoke(*(a.format(swept=swept[0]) for a in args))
    assert_refused(result)


def test_version() -> None:
    result = invoke("version")
    assert result.exit_code == 0 and result.stdout.strip() == f"lsbench {__version__}"


# --- refusals, all before any model is loaded -------------------------------------------------

@pytest.mark.parametrize(("extra", "fragments"), [
    (["-e", 9], ["exit layer 9 out of range", "has 4 layers"]),
    (["-e", "2:x"], ["cannot parse exit layers"]),
    (["-k", 0], ["num_speculations must be >= 1"]),
    (["--strategy", "spec"], ["sweep strategy 'spec'"]),
    (["--max-new-tokens", 0], ["max_new_tokens"]),
    (["--dataset", "nope"], ["unknown dataset 'nope'"]),
    (["--dataset", "jsonl:/no/such/file.jsonl"], ["dataset file not found"]),
    (["--model", "not/a/real/model/path"], ["unknown model 'not/a/real/model/path'"]),
    (["--model", "doesnotexist"], ["unknown model 'doesnotexist'"]),
])
def test_sweep_refusals(no_measuring: list[str], tiny_model_dir: Path, data_file: Path,
                        tmp_path: Path, extra: list[object], fragments: list[str]) -> None:
    out = tmp_path / "r.parquet"
    result = invoke(*sweep_args(tiny_model_dir, data_file, out), *extra)
    assert_refused(result, *fragments)
    assert no_measuring == [] and not out.exists()


def test_missing_sweep_file_refused(no_measuring: list[str], tmp_path: Path) -> None:
    assert_refused(invoke("sweep", tmp_path / "nope.toml"), "sweep file not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\nexit_layer = 3\n")
    assert_refused(invoke("sweep", bad), "unknown key(s) exit_layer in")
    assert_refused(invoke("sweep", "--dataset", "xsum"), "no model given")
    assert no_measuring == []


def test_model_directories_refused(no_measuring: list[str], data_file: Path,
                                   tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    for model, fragment in ((empty, "without config.json"),
                            (gpt2, "unsupported architecture 'gpt2'")):
        result = invoke("sweep", "--model", model, "--dataset", f"jsonl:{data_file}",
                        "--out", tmp_path / "r.parquet")
        assert_refused(result, fragment)
    assert no_measuring == []


def test_compare_refusals(no_measuring: list[str], tiny_model_dir: Path, data_file: Path,
                          tmp_path: Path) -> None:
    common = ["--model", tiny_model_dir, "--dataset", f"jsonl:{data_file}",
              "--out", tmp_path / "c.parquet"]
    assert_refused(invoke("compare", *common), "nothing to compare")
    assert_refused(invoke("compare", *common, "--early-exit", 5), "out of range")
    assert_refused(invoke("compare", *common, "--draft", "doesnotexist"),
                   "unknown model 'doesnotexist'")
    assert no_measuring == [] and not (tmp_path / "c.parquet").exists()


@pytest.mark.parametrize("kind", ["random bytes", "foreign parquet", "directory"])
def test_results_file_not_ours_is_refused_and_untouched(
        no_measuring: list[str], tiny_model_dir: Path, data_file: Path, tmp_path: Path,
        kind: str) -> None:
    out = tmp_path / "r.parquet"
    if kind == "random bytes":
        out.write_bytes(os.urandom(4096))
    elif kind == "foreign parquet":
        pd.DataFrame({"run_id": ["x"], "score": [1.0]}).to_parquet(out)
    else:
        out.mkdir()
    before = out.read_bytes() if out.is_file() else None
    result = invoke(*sweep_args(tiny_model_dir, data_file, out))
    line = assert_refused(result, str(out))
    assert ("is a directory" if kind == "directory" else "refusing to overwrite it") in line
    assert no_measuring == []
    if before is not None:
        assert out.read_bytes() == before
        assert_refused(invoke("report", out), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]  # no temp files left


@pytest.mark.parametrize("extra", [["--dtype", "int8"], ["--device", "cuda:7"],
                                   ["--limit", 0], ["--max-input-tokens", 0]])
def test_late_refusals(no_measuring: list[str], tiny_model_dir: Path, data_file: Path,
                       tmp_path: Path, extra: list[object]) -> None:
    assert_refused(invoke(*sweep_args(tiny_model_dir, data_file, tmp_path / "r.parquet"),
                          *extra))
    assert no_measuring == []


def test_unknown_device_refused(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    result = invoke(*sweep_args(tiny_model_dir, data_file, tmp_path / "r.parquet"),
                    "--device", "tpu")
    assert_refused(result, "tpu")


def test_error_text_is_printed_verbatim(no_measuring: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\nexit_layer = 3\n")
    assert_refused(invoke("sweep", bad), "unknown key(s) exit_layer in [sweep]")


def test_refusal_in_a_real_process(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    args = [str(a) for a in sweep_args(tiny_model_dir, data_file, out, "-e", 9)]
    proc = subprocess.run([*APP, *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=ENV)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: exit layer 9 out of range: {tiny_model_dir} has 4 layers, choose 1..4"]
    assert not out.exists()


# --- SIGKILL mid-sweep, then resume -------------------------------------------------------------

def _rows(path: Path) -> pd.DataFrame:
    """What a reader sees mid-run: the file and its part files."""
    return read_results([path]).drop(columns="source_file")


def test_sigkill_then_resume(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.parquet"
    args = ["sweep", "--model", str(tiny_model_dir), "--dataset", f"jsonl:{data_file}",
            "--limit", "3", "-e", "1,2,3,4", "-k", "1,2", "--max-new-tokens", "16",
            "--warmup", "0", "--out", str(out)]
    total = (1 + 4 * 2) * 3
    proc = subprocess.Popen([*SLOW_APP, *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            df = _rows(out) if (tmp_path / ".k.parquet.parts").exists() else None
            if df is not None and len(df) >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    killed = _rows(out)
    assert 4 <= len(killed) < total and not killed.duplicated(KEY).any()
    before = by_key(killed)

    done = subprocess.run([*APP, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"measured {total - len(killed)} generations, {len(killed)} already in" in done.stderr
    final = pd.read_parquet(out)
    assert len(final) == total and not final.duplicated(KEY).any()
    after = by_key(final)
    assert {k: after[k] for k in before} == before
    assert final.matches_baseline.all()
    # no temp, part or lock files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.parquet"]


def test_second_lsbench_on_the_same_out_refused(tiny_model_dir: Path, data_file: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    first = [str(a) for a in sweep_args(tiny_model_dir, data_file, out, "--limit", 1)]
    assert invoke(*first).exit_code == 0
    before = out.read_bytes()
    args = [str(a) for a in sweep_args(tiny_model_dir, data_file, out, "-e", "2,4")]
    # Measures one generation, then hangs in the second: it holds the lock until killed.
    stuck = [sys.executable, "-c", "import time, lsbench.scenario.runner as r; "
             "g = r._generate; n = []; r._generate = lambda *a: (n.append(1), "
             "time.sleep(600 if len(n) > 1 else 0), g(*a))[2]; from lsbench.cli import app; app()"]
    holder = subprocess.Popen([*stuck, *args], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        lock, parts = tmp_path / ".s.parquet.lock", tmp_path / ".s.parquet.parts"
        while not lock.exists() and time.monotonic() < deadline:
            assert holder.poll() is None
            time.sleep(0.02)
        time.sleep(0.5)  # the lock file exists just before flock() takes it
        listing = sorted(p.name for p in parts.glob("part-*.parquet"))
        second = subprocess.run([*APP, *first], cwd=tmp_path, env=ENV, capture_output=True,
                                text=True, timeout=120)
        alive = holder.poll() is None
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert alive, "the first sweep ended before the second one started"
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr.strip().splitlines() == [
        f"error: results file {out} is being written by another lsbench (pid {holder.pid}); "
        "wait for it to finish or choose another --out"]
    assert out.read_bytes() == before
    assert set(listing) <= {p.name for p in parts.glob("part-*.parquet")}


def test_compact_command(tiny_model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.parquet"
    store = ResultStore(out)
    store.append([{"run_id": "a", "example_id": "e", "repeat": 0}])
    assert not out.exists()
    result = invoke("compact", out)
    assert result.exit_code == 0, result.output
    assert "c.parquet: 1 rows" in result.stderr
    assert pd.read_parquet(out).run_id.tolist() == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]
    assert "nothing to compact" in invoke("compact", out).stderr
    assert_refused(invoke("compact", tmp_path / "missing.parquet"), "not found")
