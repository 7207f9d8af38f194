"""--ray: a real local Ray cluster (2 CPUs) started in the test, shut down at the end."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lsbench.errors import LsbenchError
from lsbench.launcher.ray_cluster import RayTarget, parse_ray, run_job_on_ray
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import sweep_job
from lsbench.scenario.runner import ProgressEvent
from tests.test_cli import assert_refused, invoke, sweep_args
from tests.test_runner import KEY, job_settings, write_jsonl
from tests.test_scan_cli import scan_args

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")


def test_parse_ray() -> None:
    assert parse_ray("local:2") == RayTarget(None, 2)
    assert parse_ray("auto") == RayTarget("auto")
    assert parse_ray("10.0.0.1:6379") == RayTarget("10.0.0.1:6379")
    for bad in ("local:0", "local", "here"):
        with pytest.raises(LsbenchError, match="--ray"):
            parse_ray(bad)


def test_sweep_on_local_ray_matches_one_process(cluster, tiny_model_dir: Path, data_file: Path,
                                                tmp_path: Path) -> None:
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert invoke(*sweep_args(tiny_model_dir, data_file, one, "--limit", 4)).exit_code == 0
    result = invoke(*sweep_args(tiny_model_dir, data_file, two, "--limit", 4, "--ray", "local:2"))
    assert result.exit_code == 0, result.output
    a, b = pd.read_parquet(one), pd.read_parquet(two)
    assert len(b) == len(a) == 12 and not b.duplicated(KEY).any()
    assert set(map(tuple, b[KEY].values)) == set(map(tuple, a[KEY].values))
    merged = a.merge(b, on=KEY)
    assert (merged.output_ids_x.map(list) == merged.output_ids_y.map(list)).all()
    assert b.matches_baseline.all()
    assert (a.worker == "").all() and b.worker.str.fullmatch(r"w[01]-pid\d+").all()
    assert b.groupby("example_id").worker.nunique().max() == 1  # a unit stays on one worker
    # the cluster has 2 CPUs: one core, and one torch thread, per worker (a worker starts
    # measuring as soon as it has loaded, so on tiny units one may do them all)
    assert (b.threads == 1).all() and (b.host != "").all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "two.parquet"]


def test_ray_hands_out_whole_batches(cluster, tiny_model_dir: Path, data_file: Path,
                                     tmp_path: Path) -> None:
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    args = ("--limit", 3, "--batch-size", "2")
    assert invoke(*sweep_args(tiny_model_dir, data_file, one, *args)).exit_code == 0
    result = invoke(*sweep_args(tiny_model_dir, data_file, two, *args, "--ray", "local:2"))
    assert result.exit_code == 0, result.output
    a, b = pd.read_parquet(one), pd.read_parquet(two)
    assert len(b) == len(a) == 9 and not b.duplicated(KEY).any()
    assert set(map(tuple, b[KEY].values)) == set(map(tuple, a[KEY].values))
    assert (b.batch_size == 2).all() and (b.batch_id == b.example_index // 2).all()
    assert b.groupby("batch_id").worker.nunique().max() == 1  # a batch stays on one worker
    merged = a.merge(b, on=KEY)
    assert (merged.output_ids_x.map(list) == merged.output_ids_y.map(list)).all()


def test_a_killed_worker_s_unit_runs_again_elsewhere(cluster, tiny_model_dir: Path,
                                                     data_file: Path, tmp_path: Path) -> None:
    job = sweep_job(job_settings(tiny_model_dir, data_file, data__limit=4,
                                 sweep__exit_layers="1,2,3", sweep__num_speculations="1,2",
                                 decoding__max_new_tokens=16, sweep__repeats=2), 4)
    store = ResultStore(tmp_path / "k.parquet")
    workers: list = []
    killed: list[int] = []
    events: list[ProgressEvent] = []

    def on_progress(event: ProgressEvent) -> None:
        events.append(event)
        if event.phase == "measure" and not killed and workers and len(store.rows()):
            finished = store.rows().worker.iloc[0]
            pids = ray.get([w.pid.remote() for w in workers])
            victim = next(p for p in pids if not finished.endswith(f"pid{p}"))
            os.kill(victim, signal.SIGKILL)  # mid-unit: it got its first unit with the other
            killed.append(victim)

    outcome = run_job_on_ray(job, store, RayTarget(None, 2), on_progress=on_progress,
                             on_workers=workers.extend)
    df = ResultStore(store.path).rows()
    assert killed and any("queued again" in e.detail for e in events)
    assert outcome.measured == len(df) == 4 * len(job.runs) * 2
    assert not df.duplicated(KEY).any()  # every (run, example, repeat) exactly once
    assert df.groupby("example_id").worker.nunique().max() == 1
    assert df.matches_baseline.all()


def test_ray_refusals(tiny_model_dir: Path, data_file: Path, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r.parquet"
    assert_refused(invoke(*sweep_args(tiny_model_dir, data_file, out, "--ray", "here")),
                   "--ray must be local:N, auto or a cluster ADDRESS")
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # Ray not installed
    assert_refused(invoke(*sweep_args(tiny_model_dir, data_file, out, "--ray", "local:2")),
                   "--ray needs Ray: pip install 'lsbench[cluster]'")
    assert not out.exists()
    scan_out = tmp_path / "r.scan.parquet"
    assert_refused(invoke(*scan_args(tiny_model_dir, data_file, scan_out, "--ray", "local:2")),
                   "--ray needs Ray: pip install 'lsbench[cluster]'")
    assert_refused(invoke(*scan_args(tiny_model_dir, data_file, scan_out, "--ray", "there")),
                   "--ray must be local:N, auto or a cluster ADDRESS")
    assert not scan_out.exists()


def test_ray_resume_refuses_rows_from_another_environment(cluster, tiny_model_dir: Path,
                                                          data_file: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "env.parquet"
    assert invoke(*sweep_args(tiny_model_dir, data_file, out, "--limit", 1)).exit_code == 0
    table = pq.read_table(out)  # as if measured with another torch
    column = table.schema.get_field_index("torch_version")
    table = table.set_column(column, "torch_version",
                             pa.array(["1.0.0"] * table.num_rows, pa.string()))
    pq.write_table(table, out)
    snapshot = out.read_bytes()
    result = invoke(*sweep_args(tiny_model_dir, data_file, out, "--limit", 2, "--ray", "local:2"))
    # refused once the workers report their environment (as run_job, after loading): the
    # header and progress came first, then one line
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0])
    assert "torch_version '1.0.0'" in errors[0] and "--force" in errors[0]
    assert out.read_bytes() == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.parquet"]


PREDICTED = ["new_tokens", "predicted_acceptance_rate", "predicted_mean_accepted_len",
             "predicted_rounds", "predicted_accept_hist", "predicted_drafted_per_round",
             "predicted_accepted_per_round", "predicted_deferred_per_round",
             "predicted_offpath_drafts", "trace_ar_mismatches"]
POINT = ["example_id", "strategy", "exit_layer", "num_speculations", "confidence_threshold"]


def test_scan_on_local_ray_predicts_what_one_process_predicts(cluster, tiny_model_dir: Path,
                                                               data_file: Path,
                                                               tmp_path: Path) -> None:
    from lsbench.scenario.scan import trace_path

    one, two = tmp_path / "one.scan.parquet", tmp_path / "two.scan.parquet"
    assert invoke(*scan_args(tiny_model_dir, data_file, one, "--limit", 4)).exit_code == 0
    result = invoke(*scan_args(tiny_model_dir, data_file, two, "--limit", 4, "--ray", "local:2",
                               "--verify", 1))
    assert result.exit_code == 0, result.output
    a, b = pd.read_parquet(one), pd.read_parquet(two)
    assert len(b) == len(a) and not b.duplicated(POINT).any()
    assert list(b.example_index) == list(a.example_index)  # example order, each exactly once
    assert sorted(set(b.example_index)) == [0, 1, 2, 3]
    merged = a.merge(b, on=POINT, validate="one_to_one")
    for col in PREDICTED:
        assert (merged[f"{col}_x"].map(_plain) == merged[f"{col}_y"].map(_plain)).all(), col
    ta, tb = pd.read_parquet(trace_path(one)), pd.read_parquet(trace_path(two))
    assert list(ta.argmax.map(list)) == list(tb.argmax.map(list))
    assert (a.worker == "").all() and (b.host != "").all()
    assert b.worker.str.fullmatch(r"w[01]-pid\d+").all() and (b.threads == 1).all()
    assert b.groupby("example_id").worker.nunique().max() == 1
    assert (b.predicted_speedup > 0).all()
    verified = pd.read_parquet(tmp_path / "two.parquet")  # --verify timed on the cluster too
    assert verified.worker.str.fullmatch(r"w[01]-pid\d+").all()
    assert "predicted vs measured" in result.output


def _plain(value: object) -> object:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def test_each_scan_worker_prices_with_its_own_costs(cluster, tiny_model_dir: Path,
                                                    data_file: Path) -> None:
    from lsbench.launcher.ray_cluster import run_scan_on_ray
    from lsbench.scenario.scan import scan_spec

    s = job_settings(tiny_model_dir, data_file, data__limit=4, decoding__max_new_tokens=10,
                     sweep__num_speculations="1:3", sweep__warmup=0)
    spec = scan_spec(s, 4)
    # both workers loaded before the first unit goes out, so both scan examples
    rows = run_scan_on_ray(spec, RayTarget(None, 2),
                           on_workers=lambda ws: ray.get([w.pid.remote() for w in ws])).rows
    assert sorted(set(rows.example_index)) == [0, 1, 2, 3] and rows.worker.nunique() == 2
    # an example's baseline and unit costs come from the one worker that scanned it
    assert rows.groupby("example_id").worker.nunique().max() == 1
    assert rows.groupby("example_id").cost_table.nunique().max() == 1
    assert rows.groupby("example_id").baseline_ms_per_token.nunique().max() == 1
    # each worker fitted its round overhead once and priced every example it scanned with it
    rounds = rows.assign(round=rows.cost_table.map(lambda t: json.loads(t)["round"]))
    assert rounds.groupby("worker")["round"].nunique().max() == 1


def test_sweep_auto_scans_and_measures_on_the_cluster(cluster, tiny_model_dir: Path,
                                                     data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.parquet"
    result = invoke("sweep", "--model", tiny_model_dir, "--dataset", f"jsonl:{data_file}",
                    "--limit", 2, "--max-new-tokens", 8, "-k", "1:2", "--warmup", 0,
                    "--exit-layers", "auto", "--top", 1, "--ray", "local:2", "--out", out)
    assert result.exit_code == 0, result.output
    scanned = pd.read_parquet(tmp_path / "auto.scan.parquet")
    measured = pd.read_parquet(out)
    assert sorted(set(scanned.example_index)) == [0, 1] and len(set(measured.run_id)) == 2
    for df in (scanned, measured):
        assert df.worker.str.fullmatch(r"w[01]-pid\d+").all()
