"""Runs a job or a scan on a Ray cluster (`--ray local:N | auto | ADDRESS`).

Each worker is a Ray actor that owns one device: one GPU (`num_gpus=1`), or on CPUs a disjoint
set of cores, pinned with CPU affinity and matched by torch's thread count. It loads the models
once and warms up once. The unit of work is one example with all of its runs and repeats, so
every speedup is still taken against a baseline measured in the same process on the same
device. Units go out longest prompt first to whichever worker is free (`ray.wait`); a unit's
rows come back together, and the driver alone writes them to the store. When a worker dies its
unit goes back to the queue and runs, whole, on another worker: nothing is lost, nothing is
duplicated, and each example's rows come from one worker. A scan's unit is one example too:
its timed baseline and teacher-forced pass, priced with unit costs its worker measured (each
worker fits its round overhead once, on the first example, as a scan in one process does).
Never prints: progress goes to a callback.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lsbench.errors import LsbenchError, one_line
from lsbench.results.store import ResultStore
from lsbench.scenario.data import load_examples
from lsbench.scenario.jobs import JobSpec, RunSpec
from lsbench.scenario.runner import (
    Batch,
    JobOutcome,
    ProgressEvent,
    batch_runs,
    begin_job,
    check_stored_environment,
    expected_environments,
    job_batches,
    measure_unit,
    pending_units,
    prepare_job,
    shard_batches,
    stored_baselines,
    validate,
    warm_up,
)
from lsbench.scenario.scan import (
    ScanResult,
    ScanSpec,
    calibrate_scan,
    prepare_scan,
    scan_example,
    scan_result,
    validate_scan,
)

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


def _own_device(cores: int, cwd: str) -> None:
    """An actor's first step: the user's directory, and on CPUs its own pinned cores with as
    many torch threads (held until the actor exits)."""
    import torch

    if os.path.isdir(cwd):  # relative model and data paths mean what they mean to the user
        os.chdir(cwd)
    if cores:
        pinned, _CORE_LOCKS[:] = claim_cores(cores)
        os.sched_setaffinity(0, pinned)
        torch.set_num_threads(len(pinned))


_CORE_LOCKS: list[int] = []  # this actor process's core flocks (see claim_cores)


class Worker:
    """One Ray actor of a sweep or compare job: one device, the job's models loaded once."""

    def __init__(self, index: int, cores: int, cwd: str, job: JobSpec, runs: list[RunSpec]):
        import torch

        _own_device(cores, cwd)
        self.prepared = prepare_job(job)
        if cores:
            torch.set_num_threads(cores)  # a job's --threads must not oversubscribe the cores
            self.prepared.env["threads"] = cores
        self.prepared.env["worker"] = f"w{index}-pid{os.getpid()}"
        warm_up(self.prepared, runs)

    def pid(self) -> int:
        return os.getpid()

    def ready(self) -> tuple[list[int], dict]:
        """Prompt lengths (the order units go out in) and the environment of this worker's
        rows (what resuming into a file must match)."""
        return ([len(p.ids) for p in self.prepared.prompts],
                expected_environments(self.prepared.job, self.prepared))

    def measure(self, batch: Batch, repeats: list[int], done: set, baselines: dict
                ) -> list[dict]:
        rows: list[dict] = []
        for rep in repeats:
            rows += measure_unit(self.prepared, batch, rep, done, baselines)
        return rows


class ScanWorker:
    """One Ray actor of a scan: one device, the models loaded once, the round overhead fitted
    once in this process; every example it scans is priced with unit costs it measured."""

    def __init__(self, index: int, cores: int, cwd: str, spec: ScanSpec):
        _own_device(cores, cwd)
        self.session = prepare_scan(spec)
        self.session.env["worker"] = f"w{index}-pid{os.getpid()}"
        calibrate_scan(self.session)

    def pid(self) -> int:
        return os.getpid()

    def ready(self) -> tuple[list[int], dict]:
        return [len(p.ids) for p in self.session.prompts], {}

    def scan(self, example_index: int) -> tuple[list[dict], list[dict]]:
        return scan_example(self.session, example_index)


def run_job_on_ray(job: JobSpec, store: ResultStore, target: RayTarget, *, force: bool = False,
                   on_progress: Callable[[ProgressEvent], None] | None = None,
                   shard: tuple[int, int] | None = None,
                   on_workers: Callable[[list], None] | None = None) -> JobOutcome:
    """run_job's result on a Ray cluster. `on_workers` receives the actor handles (tests)."""
    ray = import_ray()
    emit = on_progress or (lambda _event: None)
    validate(job)
    with store.locked():
        begin_job(job, store, force)  # the prologue run_job has
        # The driver loads data, no model: the workers report prompt lengths.
        examples, _ = load_examples(job.dataset)
        done_keys = store.completed_keys()
        # A unit of work is one batch (one example at batch size 1) with all its repeats.
        batches = shard_batches(job_batches(job, len(examples)), shard)
        units: dict[int, list[int]] = {}
        for batch, rep in pending_units(job, [ex.example_id for ex in examples], done_keys):
            if batch in batches:
                units.setdefault(batches.index(batch), []).append(rep)
        todo = sum(1 for i, reps in units.items() for rep in reps
                   for r in batch_runs(job, batches[i].size) for e in batches[i].examples
                   if (job.run_id(r), examples[e].example_id, rep) not in done_keys)
        total = job.repeats * sum(len(b.examples) * len(batch_runs(job, b.size))
                                  for b in batches)
        done = total - todo
        if not units:
            emit(ProgressEvent("done", done, total, "done"))
            return JobOutcome(0, total)
        stored = store.rows()
        # A stored baseline pairs with a worker's runs only if measured in that worker's
        # environment (measure_unit checks it).
        baselines = stored_baselines(job, stored)
        pending_runs = [r for r in job.runs
                        if any((job.run_id(r), examples[e].example_id, rep) not in done_keys
                               for i, reps in units.items() if batches[i].size == r.batch_size
                               for rep in reps for e in batches[i].examples)]

        def submit(worker, i: int):
            ids = {examples[e].example_id for e in batches[i].examples}
            keys = {k for k in done_keys if k[1] in ids}
            base = {k: v for k, v in baselines.items() if k[1] in ids}
            return worker.measure.remote(batches[i], units[i], keys, base)

        def finished(i: int, rows: list[dict], workers: int) -> None:
            nonlocal done
            store.append(rows)  # a unit's rows together, as run_job stores them
            done += len(rows)
            emit(ProgressEvent("measure", done, total,
                               f"{workers} workers · {unit_name(batches[i], len(examples))}"))

        emit(ProgressEvent("load", done, total, "starting Ray"))
        with ray_workers(ray, target, job, len(units), Worker, job, pending_runs) as workers:
            emit(ProgressEvent("load", done, total, f"{len(workers)} Ray workers loading"))
            if on_workers:
                on_workers(workers)

            def started(info: tuple[list[int], dict], first: bool) -> None:
                if not force:  # as run_job: resume only into rows of this environment
                    check_stored_environment(stored, info[1], store.path)
                if first:
                    emit(ProgressEvent("measure", done, total, "workers measuring"))

            hand_out(ray, workers, units, submit,
                     lambda i, rows: finished(i, rows, len(workers)),
                     lambda i: emit(ProgressEvent(
                         "measure", done, total, "a worker died; "
                         f"{unit_name(batches[i], len(examples))} queued again")), started,
                     length=lambda i, lengths: max(lengths[e] for e in batches[i].examples))
        store.compact()
    emit(ProgressEvent("done", done, total, "done"))
    return JobOutcome(todo, total - todo)


def run_scan_on_ray(spec: ScanSpec, target: RayTarget,
                    on_progress: Callable[[ProgressEvent], None] | None = None,
                    on_workers: Callable[[list], None] | None = None) -> ScanResult:
    """run_scan's result on a Ray cluster: each example scanned whole by one worker, against
    its own baseline and unit costs; the driver gathers the rows in example order."""
    ray = import_ray()
    emit = on_progress or (lambda _event: None)
    validate_scan(spec)
    examples, _ = load_examples(spec.job.dataset)
    n = len(examples)
    results: dict[int, tuple[list[dict], list[dict]]] = {}

    def finished(i: int, result: tuple[list[dict], list[dict]], workers: int) -> None:
        results[i] = result
        emit(ProgressEvent("measure", len(results), n,
                           f"{workers} workers · example {i + 1}/{n}"))

    emit(ProgressEvent("load", 0, n, "starting Ray"))
    with ray_workers(ray, target, spec.job, n, ScanWorker, spec) as workers:
        emit(ProgressEvent("load", 0, n, f"{len(workers)} Ray workers loading"))
        if on_workers:
            on_workers(workers)

        def started(_info: tuple[list[int], dict], first: bool) -> None:
            if first:
                emit(ProgressEvent("measure", 0, n, "workers measuring"))

        hand_out(ray, workers, range(n), lambda worker, i: worker.scan.remote(i),
                 lambda i, result: finished(i, result, len(workers)),
                 lambda i: emit(ProgressEvent("measure", len(results), n, "a worker died; "
                                              f"example {i + 1} queued again")), started)
    return scan_result([r for i in sorted(results) for r in results[i][0]],
                       [t for i in sorted(results) for t in results[i][1]])


# --- the machinery both drivers share ------------------------------------------------------

@contextmanager
def ray_workers(ray, target: RayTarget, job: JobSpec, wanted: int, actor_class, *args
                ) -> Iterator[list]:
    """Up to `wanted` actors of `actor_class(index, cores, cwd, *args)`, as many as the cluster
    has devices (or core sets) for; killed at the end, and a cluster this call started shut
    down."""
    started = _start(ray, target)
    workers: list = []
    try:
        workers = _spawn(ray, job, target, actor_class, args,
                         min(wanted, _capacity(ray, job, target)))
        yield workers
    finally:
        for w in workers:
            ray.kill(w)
        if started:
            ray.shutdown()


def unit_name(batch: Batch, num_examples: int) -> str:
    if batch.size == 1:
        return f"example {batch.batch_id + 1}/{num_examples}"
    return f"batch {batch.batch_id + 1} of {batch.size} examples"


def hand_out(ray, workers: list, units: Iterable[int], submit: Callable[[object, int], object],
             finished: Callable[[int, object], None], requeued: Callable[[int], None],
             started: Callable[[tuple[list[int], dict], bool], None],
             length: Callable[[int, list[int]], int] = lambda i, lengths: lengths[i]) -> None:
    """Hand example units to whichever worker is free (`ray.wait`) until every unit has
    finished. A worker gets its first unit as soon as it has loaded, without waiting for the
    others: `started(its ready(), first)` sees it first (and may refuse it), and the first
    worker's prompt lengths order the units, longest prompt first (`length(i, lengths)`:
    unit i's, by default example i's). `submit(worker, i)` starts
    unit i, `finished(i, result)` takes its result. A unit whose worker died goes back to the
    front of the queue (`requeued(i)`) and runs again, whole, on another worker."""
    dead = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
    units = list(units)
    pending = {w.ready.remote(): (w, None) for w in workers}  # None: the worker is loading
    queue: deque | None = None
    idle: list = []
    failed = ""
    while queue is None or queue or any(i is not None for _, i in pending.values()):
        while queue is not None and idle and queue:
            i = queue.popleft()
            worker = idle.pop()
            pending[submit(worker, i)] = (worker, i)
        if not pending:
            raise LsbenchError(f"a Ray worker failed to start: {failed}" if queue is None
                               else "every Ray worker died; rerun to resume")
        ready, _ = ray.wait(list(pending), num_returns=1)
        worker, i = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except dead as e:
            if i is None:  # died loading: the others may still start
                failed = one_line(e)
            else:
                queue.appendleft(i)
                requeued(i)
            continue
        except ray.exceptions.RayTaskError as e:
            what = "to start" if i is None else f"on example {i + 1}"
            raise LsbenchError(f"a Ray worker failed {what}: {one_line(e.cause or e)}") from None
        if i is None:
            started(result, queue is None)
            if queue is None:
                queue = deque(sorted(units, key=lambda i: (-length(i, result[0]), i)))
        else:
            finished(i, result)
        idle.append(worker)


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


def _spawn(ray, job: JobSpec, target: RayTarget, actor_class, args: tuple, count: int
           ) -> list:
    if _use_gpus(ray, job):
        actor = ray.remote(num_gpus=1, num_cpus=1, max_restarts=0)(actor_class)
        return [actor.remote(i, 0, os.getcwd(), *args) for i in range(count)]
    cores = _cores_per_worker(ray, job, target)
    actor = ray.remote(num_cpus=cores, max_restarts=0)(actor_class)
    return [actor.remote(i, cores, os.getcwd(), *args) for i in range(count)]
