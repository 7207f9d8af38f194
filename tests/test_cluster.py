"""--ray: a real local Ray cluster (2 CPUs) started in the test, shut down at the end."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from lsbench.errors import LsbenchError
from lsbench.jobs import sweep_job
from lsbench.launchers import RayTarget, parse_ray, run_job_on_ray
from lsbench.runner import ProgressEvent
from lsbench.store import ResultStore
from tests.test_cli import assert_refused, invoke, sweep_args
from tests.test_runner import KEY, job_settings, write_jsonl

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
    # the cluster has 2 CPUs: one core, and one torch thread, per worker
    assert b.worker.nunique() == 2 and (b.threads == 1).all() and (b.host != "").all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "two.parquet"]


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
        if event.phase == "measure" and not killed and workers:
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
