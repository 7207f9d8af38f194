"""Runs a job on a Ray cluster (`--ray local:N | auto | ADDRESS`).

Each worker is a Ray actor that owns one device: one GPU (`num_gpus=1`), or on CPUs a disjoint
set of cores, pinned with CPU affinity and matched by torch's thread count. It loads the models
once and warms up once. The unit of work is one example with all of its runs and repeats, so
every speedup is still taken against a baseline measured in the same process on the same
device. Units go out longest prompt first to whichever worker is free (`ray.wait`); a unit's
rows come back together, and the driver alone writes them to the store. When a worker dies its
unit goes back to the queue and runs, whole, on another worker: nothing is lost, nothing is
duplicated, and each example's rows come from one worker. Never prints: progress goes to a
callback.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lsbench.errors import LsbenchError, one_line
from lsbench.jobs import JobSpec, RunSpec
from lsbench.runner import (
    JobOutcome,
    ProgressEvent,
    begin_job,
    measure_unit,
    pending_units,
    prepare_job,
    shard_examples,
    stored_baselines,
    validate,
    warm_up,
)
from lsbench.store import ResultStore

INSTALL_HINT = "--ray needs Ray: pip install 'lsbench[cluster]'"


@dataclass(frozen=True)
class RayTarget:
    """Where to run: `local` workers on a fresh cluster on this machine, or an existing one."""
    address: str | None  # None: start a local cluster; "auto" or "HOST:PORT" / "ray://..."
    local_workers: int = 0


def parse_ray(text: str) -> RayTarget:
    m = re.fullmatch(r"local:(\d+)", text.strip())
    if m:
        if int(m.group(1)) < 1:
            raise LsbenchError(f"--ray local:N needs N >= 1, got {text!r}")
        return RayTarget(None, int(m.group(1)))
    if text.strip() == "auto" or re.fullmatch(r"(ray://)?[\w.-]+:\d+", text.strip()):
        return RayTarget(text.strip())
    raise LsbenchError(f"--ray must be local:N, auto or a cluster ADDRESS (host:port), "
                       f"got {text!r}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise LsbenchError(INSTALL_HINT) from None
    return ray


def claim_cores(count: int, wait_s: float = 60.0) -> tuple[list[int], list[int]]:
    """`count` cores of this machine no other lsbench worker holds: an flock per core, held
    while the returned descriptors stay open (a dead worker's cores are free again). Waits
    up to `wait_s` for workers that are shutting down."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _try_claim(count)
        except LsbenchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _try_claim(count: int) -> tuple[list[int], list[int]]:
    lock_dir = Path(tempfile.gettempdir()) / "lsbench-cores"
    lock_dir.mkdir(exist_ok=True)
    cores, fds = [], []
    for core in sorted(os.sched_getaffinity(0)):
        fd = os.open(lock_dir / f"cpu{core}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        cores.append(core)
        fds.append(fd)
        if len(cores) == count:
            return cores, fds
    for fd in fds:
        os.close(fd)
    raise LsbenchError(f"no {count} free CPU cores left on this machine for another worker")


class Worker:
    """One Ray actor: one device, the job's models loaded once."""

    def __init__(self, job: JobSpec, index: int, cores: int, runs: list[RunSpec], cwd: str):
        import torch

        if os.path.isdir(cwd):  # relative model and data paths mean what they mean to the user
            os.chdir(cwd)
        self._core_locks: list[int] = []
        if cores:  # a CPU worker: its own cores, and as many torch threads
            pinned, self._core_locks = claim_cores(cores)
            os.sched_setaffinity(0, pinned)
            torch.set_num_threads(len(pinned))
        self.prepared = prepare_job(job)
        if cores:
            torch.set_num_threads(cores)  # a job's --threads must not oversubscribe the cores
            self.prepared.env["threads"] = cores
        self.prepared.env["worker"] = f"w{index}-pid{os.getpid()}"
        warm_up(self.prepared, runs)

    def pid(self) -> int:
        return os.getpid()

    def measure(self, example_index: int, repeats: list[int], done: set, baselines: dict
                ) -> list[dict]:
        rows: list[dict] = []
        for rep in repeats:
            rows += measure_unit(self.prepared, example_index, rep, done, baselines)
        return rows


def run_job_on_ray(job: JobSpec, store: ResultStore, target: RayTarget, *, force: bool = False,
                   on_progress: Callable[[ProgressEvent], None] | None = None,
                   shard: tuple[int, int] | None = None,
                   on_workers: Callable[[list], None] | None = None) -> JobOutcome:
    """run_job's result on a Ray cluster. `on_workers` receives the actor handles (tests)."""
    ray = import_ray()
    emit = on_progress or (lambda _event: None)
    validate(job)
    with store.locked():
        begin_job(job, store, force)
        emit(ProgressEvent("load", 0, 0, "starting Ray"))
        # The driver loads data, not models: prompt lengths order the units.
        from lsbench.data import build_prompt, load_examples
        from lsbench.models import load_tokenizer

        examples, _ = load_examples(job.dataset)
        tokenizer = load_tokenizer(job.model, job.revision)
        lengths = [len(build_prompt(tokenizer, ex.article, job.max_input_tokens).ids)
                   for ex in examples]
        done_keys = store.completed_keys()
        selected = set(shard_examples(len(examples), shard))
        units: dict[int, list[int]] = {}
        for i, rep in pending_units(job, [ex.example_id for ex in examples], done_keys):
            if i in selected:
                units.setdefault(i, []).append(rep)
        todo = sum(1 for i, reps in units.items() for rep in reps for r in job.runs
                   if (job.run_id(r), examples[i].example_id, rep) not in done_keys)
        total = len(selected) * job.repeats * len(job.runs)
        done = total - todo
        if not units:
            emit(ProgressEvent("done", done, total, "done"))
            return JobOutcome(0, total)
        queue = deque(sorted(units, key=lambda i: (-lengths[i], i)))  # longest prompt first
        # A stored baseline pairs with a worker's runs only if measured in that worker's
        # environment (measure_unit checks it).
        baselines = stored_baselines(job, store.rows())
        pending_runs = [r for r in job.runs
                        if any((job.run_id(r), examples[i].example_id, rep) not in done_keys
                               for i, reps in units.items() for rep in reps)]

        started = _start(ray, target)
        dead = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
        workers: list = []
        try:
            workers = _spawn(ray, job, target, pending_runs, min(len(queue), _capacity(ray, job,
                                                                                       target)))
            emit(ProgressEvent("load", done, total, f"{len(workers)} Ray workers loading"))
            try:
                ray.get([w.pid.remote() for w in workers])
            except dead as e:
                raise LsbenchError(f"a Ray worker failed to start: {one_line(e)}") from None
            if on_workers:
                on_workers(workers)
            idle, running = list(workers), {}
            while queue or running:
                while idle and queue:
                    i = queue.popleft()
                    keys = {k for k in done_keys if k[1] == examples[i].example_id}
                    base = {k: v for k, v in baselines.items() if k[1] == examples[i].example_id}
                    worker = idle.pop()
                    running[worker.measure.remote(i, units[i], keys, base)] = (worker, i)
                if not running:
                    raise LsbenchError("every Ray worker died; rerun to resume")
                ready, _ = ray.wait(list(running), num_returns=1)
                worker, i = running.pop(ready[0])
                try:
                    rows = ray.get(ready[0])
                except dead:
                    queue.appendleft(i)  # the unit runs again, whole, on another worker
                    emit(ProgressEvent("measure", done, total,
                                       f"a worker died; example {i + 1} queued again"))
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise LsbenchError(f"a Ray worker failed on example {i + 1}: "
                                       f"{one_line(e.cause or e)}") from None
                for row in rows:
                    store.append([row])
                done += len(rows)
                idle.append(worker)
                emit(ProgressEvent("measure", done, total,
                                   f"{len(workers)} workers · example {i + 1}/{len(examples)}"))
        finally:
            for w in workers:
                ray.kill(w)
            if started:
                ray.shutdown()
        store.compact()
    emit(ProgressEvent("done", done, total, "done"))
    return JobOutcome(todo, total - todo)


def _start(ray, target: RayTarget) -> bool:
    """Connect to or start the cluster; True when this call started it."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False,
              "configure_logging": False}
    try:
        if target.address is None:
            ray.init(num_cpus=_local_cpus(target), **kwargs)
        else:
            ray.init(address=target.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise LsbenchError(f"cannot reach the Ray cluster at {target.address} ({e})") from None
    return True


def _local_cpus(target: RayTarget) -> int:
    return max(target.local_workers, len(os.sched_getaffinity(0)))


def _use_gpus(ray, job: JobSpec) -> bool:
    return job.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1


def _cores_per_worker(ray, job: JobSpec, target: RayTarget) -> int:
    if job.threads:
        return job.threads
    if target.local_workers:  # this machine's cores (those Ray may use), split evenly
        cpus = min(len(os.sched_getaffinity(0)), int(ray.cluster_resources().get("CPU", 1)))
        return max(1, cpus // target.local_workers)
    return 1


def _capacity(ray, job: JobSpec, target: RayTarget) -> int:
    if target.local_workers:
        return target.local_workers
    if _use_gpus(ray, job):
        return int(ray.cluster_resources()["GPU"])
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // _cores_per_worker(ray, job,
                                                                                   target))


def _spawn(ray, job: JobSpec, target: RayTarget, runs: list[RunSpec], count: int) -> list:
    if _use_gpus(ray, job):
        actor = ray.remote(num_gpus=1, num_cpus=1, max_restarts=0)(Worker)
        return [actor.remote(job, i, 0, runs, os.getcwd()) for i in range(count)]
    cores = _cores_per_worker(ray, job, target)
    actor = ray.remote(num_cpus=cores, max_restarts=0)(Worker)
    return [actor.remote(job, i, cores, runs, os.getcwd()) for i in range(count)]
