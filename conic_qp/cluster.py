"""Cohorts on Dask distributed: a local cluster, an existing scheduler, or SLURM/PBS/LSF.

``--cluster`` names where slides run:

* ``local`` / ``local:N``: a :class:`distributed.LocalCluster` of N worker processes on this
  machine (default: one per GPU, else a few);
* ``ADDRESS`` (``tcp://host:8786`` or ``host:8786``): an existing scheduler and its workers;
* ``slurm`` / ``pbs`` / ``lsf``: a dask-jobqueue cluster built from ``--cluster-config
  FILE.yaml`` (cores, memory, GPUs per job, walltime, queue, account, job directives, number of
  jobs) and scaled to it; the scheduler runs in this process, workers run as batch jobs.

One task per slide (:func:`run_job_task`, calling :func:`conic_qp.cohort.run_slide_job`). Every
worker advertises the resource ``slides=1`` and every task needs one, so a worker runs one
slide at a time whatever its thread count, and its network threads use the worker's cores;
with GPUs each worker process owns one GPU (``CUDA_VISIBLE_DEVICES`` set per worker by
:class:`WorkerSetup` before CUDA starts). Models are cached per worker process. Post-processing
inside a worker uses threads (a Dask worker is a daemonic process and may not start child
processes). A worker that dies mid-slide (killed, out of memory, node lost) is replaced by its
nanny or the batch system and the scheduler runs the slide again elsewhere
(``distributed.scheduler.allowed-failures``); outputs are written to temporary names and
renamed, so a killed run leaves nothing half-written.

Dask, distributed and dask-jobqueue are optional (extra ``distributed``) and imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conic_qp.errors import ConicQPError, option

if TYPE_CHECKING:
    from conic_qp.cohort import SlideJob, SlideResult
    from conic_qp.predict import Progress

try:  # a plugin must inherit from WorkerPlugin; cluster.py is imported only to use a cluster
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - without the extra, open_cluster says what to install
    _WorkerPlugin = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

__all__ = [
    "JOBQUEUE_KINDS",
    "ClusterSpec",
    "DaskRunner",
    "WorkerSetup",
    "jobqueue_job_script",
    "jobqueue_kwargs",
    "load_cluster_config",
    "open_cluster",
    "run_job_task",
]

JOBQUEUE_KINDS: tuple[str, ...] = ("slurm", "pbs", "lsf")
#: The resource every worker offers once and every slide task takes: one slide per worker.
SLIDE_RESOURCE = "slides"
INSTALL = "install the distributed extra: pip install 'conic-qp[distributed]'"
#: Keys of the cluster YAML that conic-qp uses itself; all others go to dask-jobqueue.
_OWN_KEYS = ("kind", "jobs", "minimum_jobs", "maximum_jobs", "gpus", "retries", "torch_threads")


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConicQPError(
            f"running on a cluster needs {module}, which is not installed; {INSTALL}"
        )


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ClusterSpec:
    """Where a cohort runs (parsed from ``--cluster`` and ``--cluster-config``).

    ``kind``: ``local``, ``address``, ``slurm``, ``pbs`` or ``lsf``; ``n_workers`` for local;
    ``address`` of an existing scheduler; ``config`` the YAML's mapping (jobqueue settings);
    ``torch_threads`` per worker (default: the worker's cores); ``gpus`` per worker process
    for local clusters (device indices, one worker each).
    """

    kind: str
    n_workers: int | None = None
    address: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    torch_threads: int | None = None
    gpus: tuple[int, ...] = ()
    dashboard: bool = True

    @classmethod
    def parse(cls, text: str, config: str | os.PathLike[str] | None = None) -> ClusterSpec:
        """``local[:N]``, ``ADDRESS``, ``slurm``, ``pbs`` or ``lsf`` (+ the config file)."""
        text = str(text).strip()
        data = load_cluster_config(config) if config is not None else {}
        kind = text.lower()
        if kind in ("", "yaml") and data.get("kind"):
            kind = str(data["kind"]).lower()
        torch_threads = data.get("torch_threads")
        if kind == "local" or kind.startswith("local:"):
            n: int | None = None
            if ":" in kind:
                try:
                    n = int(kind.split(":", 1)[1])
                except ValueError:
                    n = 0
                if n < 1:
                    raise ConicQPError(
                        f"{option('cluster')} {text!r}: the number of local workers must be a "
                        "positive integer, e.g. local:2"
                    )
            return cls("local", n_workers=n, config=data, torch_threads=torch_threads)
        if kind in JOBQUEUE_KINDS:
            if config is None:
                raise ConicQPError(
                    f"{option('cluster')} {kind} needs a job description: pass "
                    f"{option('cluster_config')} FILE.yaml (cores, memory, walltime, queue...; "
                    "see docs/cohorts.md)"
                )
            return cls(kind, config=data, torch_threads=torch_threads)
        if re.fullmatch(r"(tcp|tls|ucx|inproc|ws|wss)://\S+|[\w.\-]+:\d+", text):
            address = text if "://" in text else f"tcp://{text}"
            return cls("address", address=address, config=data, torch_threads=torch_threads)
        raise ConicQPError(
            f"{option('cluster')} {text!r} is not local[:N], a scheduler address "
            "(tcp://host:8786) or one of slurm, pbs, lsf"
        )

    @property
    def retries(self) -> int:
        value = self.config.get("retries", 2)
        return int(value) if isinstance(value, int) and value >= 0 else 2

    def describe(self) -> str:
        if self.kind == "local":
            return f"local cluster ({self.n_workers or 'default'} workers)"
        if self.kind == "address":
            return f"scheduler {self.address}"
        return f"{self.kind.upper()} cluster"


def load_cluster_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The cluster YAML as a mapping (validated: a mapping, known types for our own keys)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConicQPError(f"cluster config {p} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConicQPError(f"cannot read cluster config {p} ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConicQPError(f"cluster config {p} is not valid YAML ({exc})".split("\n")[0]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConicQPError(f"cluster config {p} must be a mapping of settings (key: value)")
    for key in ("jobs", "minimum_jobs", "maximum_jobs", "gpus", "retries", "torch_threads"):
        value = data.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ConicQPError(
                f"cluster config {p}: {key} must be a whole number >= 0, got {value!r}"
            )
    for key in ("job_extra_directives", "job_script_prologue", "worker_extra_args"):
        value = data.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ConicQPError(f"cluster config {p}: {key} must be a list of strings")
    return data


# ------------------------------------------------------------------------------ jobqueue


def jobqueue_kwargs(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """dask-jobqueue constructor arguments for ``kind`` from the cluster YAML.

    conic-qp's own keys are removed; ``gpus`` (per job) becomes the batch system's GPU request
    (SLURM ``--gres=gpu:N``, PBS ``ngpus`` in ``select``, LSF ``-gpu "num=N"``) and one worker
    process per GPU; every worker offers ``slides=1``.
    """
    if kind not in JOBQUEUE_KINDS:
        raise ValueError(f"not a jobqueue kind: {kind}")
    kw = {k: v for k, v in config.items() if k not in _OWN_KEYS}
    gpus = int(config.get("gpus") or 0)
    cores = kw.get("cores")
    memory = kw.get("memory")
    if cores is None or memory is None:
        raise ConicQPError(
            f"the {kind} cluster config needs cores and memory per job (e.g. cores: 8, "
            "memory: 32GB)"
        )
    processes = max(1, gpus)
    kw.setdefault("processes", processes)
    directives = list(kw.pop("job_extra_directives", []) or [])
    if gpus:
        if kind == "slurm":
            directives.append(f"--gres=gpu:{gpus}")
        elif kind == "pbs" and "resource_spec" not in kw:
            kw["resource_spec"] = f"select=1:ncpus={cores}:ngpus={gpus}:mem={memory}"
        elif kind == "lsf":
            directives.append(f'-gpu "num={gpus}"')
    if directives:
        kw["job_extra_directives"] = directives
    extra = list(kw.pop("worker_extra_args", []) or [])
    if "--resources" not in extra:
        extra += ["--resources", f"{SLIDE_RESOURCE}=1"]
    kw["worker_extra_args"] = extra
    kw.setdefault("job_name", "conic-qp")
    return kw


def _jobqueue_classes(kind: str) -> tuple[Any, Any]:
    _require("dask_jobqueue")
    import dask_jobqueue

    cluster = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster"}[kind]
    job = {"slurm": "SLURMJob", "pbs": "PBSJob", "lsf": "LSFJob"}[kind]
    module = importlib.import_module(f"dask_jobqueue.{kind}")
    return getattr(dask_jobqueue, cluster), getattr(module, job)


def jobqueue_job_script(
    kind: str, config: Mapping[str, Any], scheduler: str = "tcp://scheduler:8786"
) -> str:
    """The batch script one worker job would run (no scheduler or batch system needed)."""
    _, job_cls = _jobqueue_classes(kind)
    kw = jobqueue_kwargs(kind, config)
    try:
        job = job_cls(scheduler=scheduler, name="conic-qp-worker", **kw)
    except TypeError as exc:
        raise ConicQPError(
            f"the {kind} cluster config has a setting dask-jobqueue rejects ({exc})"
        ) from None
    return str(job.job_script())


# --------------------------------------------------------------------------- the workers


class WorkerSetup(_WorkerPlugin):
    """Dask worker plugin: network threads, one GPU per worker process, warm imports.

    ``torch_threads``: intra-op threads of the network (default: the worker's thread count).
    ``split_gpus``: give each worker process one of the GPUs visible to it, by the number at
    the end of its name (local clusters name workers 0, 1, ...; dask-jobqueue appends the
    process index within a job).
    """

    name = "conic-qp-setup"

    def __init__(self, torch_threads: int | None = None, split_gpus: bool = False) -> None:
        self.torch_threads = torch_threads
        self.split_gpus = split_gpus

    def setup(self, worker: Any) -> None:
        if self.split_gpus:
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
            match = re.search(r"(\d+)$", str(worker.name))
            if visible and match:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(match.group(1)) % len(visible)]
        threads = self.torch_threads or int(getattr(worker.state, "nthreads", 0) or 0) or 1
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        import torch

        torch.set_num_threads(threads)
        import conic_qp.predict  # noqa: F401  (import once, before the first slide)

    def teardown(self, worker: Any) -> None:
        return None


def worker_name() -> str | None:
    """The address of the Dask worker running the calling task (None outside a worker)."""
    with contextlib.suppress(ImportError, ValueError):
        from distributed import get_worker

        return str(get_worker().address)
    return None


def run_job_task(job: SlideJob) -> SlideResult:
    """A Dask task: one slide on this worker, models from the worker's cache."""
    from conic_qp.cohort import run_slide_job

    return run_slide_job(job, worker=worker_name())


def _local_gpus() -> list[int]:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            return list(range(torch.cuda.device_count()))
    return []


@contextlib.contextmanager
def open_cluster(
    spec: ClusterSpec, *, device: str = "auto", worker_env: Mapping[str, str] | None = None
) -> Iterator[Any]:
    """A connected :class:`distributed.Client` for ``spec``; the cluster is closed on exit.

    ``device``: the run's device (``cpu`` keeps local workers off GPUs). ``worker_env``: extra
    environment of the worker processes of a **local** cluster only (handed to the processes
    this one starts, never written to a job script; other clusters' workers have their own).
    """
    _require("distributed")
    import dask
    import distributed

    allowed = max(3, spec.retries + 1)
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed}):
        cluster: Any = None
        split = False
        threads = spec.torch_threads
        dashboard = ":8787" if spec.dashboard and importlib.util.find_spec("bokeh") else None
        try:
            if spec.kind == "local":
                gpus = list(spec.gpus) or ([] if device == "cpu" else _local_gpus())
                n = spec.n_workers or (
                    len(gpus) if gpus else min(4, max(1, (os.cpu_count() or 2) // 2))
                )
                per_worker = max(1, (os.cpu_count() or 1) // n)
                env = dict(worker_env or {})
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
                    split = True
                cluster = distributed.LocalCluster(
                    n_workers=n,
                    threads_per_worker=per_worker,
                    processes=True,
                    resources={SLIDE_RESOURCE: 1},
                    dashboard_address=dashboard,
                    env=env,
                    silence_logs=logging.ERROR,
                )
                threads = threads or per_worker
                client = distributed.Client(cluster)
            elif spec.kind == "address":
                assert spec.address is not None
                try:
                    client = distributed.Client(spec.address, timeout="30s")
                except OSError as exc:
                    raise ConicQPError(
                        f"cannot reach the Dask scheduler at {spec.address} ({exc}); start it "
                        "(dask scheduler) or check the address"
                    ) from None
            else:
                cluster_cls, _ = _jobqueue_classes(spec.kind)
                kw = jobqueue_kwargs(spec.kind, spec.config)
                if dashboard is None:
                    kw.setdefault("scheduler_options", {}).setdefault("dashboard_address", None)
                try:
                    cluster = cluster_cls(**kw)
                except TypeError as exc:
                    raise ConicQPError(
                        f"the {spec.kind} cluster config has a setting dask-jobqueue rejects ({exc})"
                    ) from None
                split = int(spec.config.get("gpus") or 0) > 1
                maximum = spec.config.get("maximum_jobs")
                if maximum:
                    cluster.adapt(minimum_jobs=int(spec.config.get("minimum_jobs") or 0),
                                  maximum_jobs=int(maximum))  # fmt: skip
                else:
                    cluster.scale(jobs=int(spec.config.get("jobs") or 1))
                client = distributed.Client(cluster)
            client.register_plugin(WorkerSetup(threads, split_gpus=split), name=WorkerSetup.name)
            try:
                yield client
            finally:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()


def dashboard_link(client: Any) -> str | None:
    """The Dask dashboard's URL, when the dashboard is served (bokeh installed)."""
    if importlib.util.find_spec("bokeh") is None:
        return None
    with contextlib.suppress(Exception):
        return str(client.dashboard_link)
    return None


# ----------------------------------------------------------------------------- the runner


class DaskRunner:
    """Runs a cohort's jobs as Dask tasks, one per slide; results in completion order.

    ``client``: a connected :class:`distributed.Client`. ``retries``: reruns of a task that
    raised (failures are captured as results, so this covers only errors outside the slide's
    run, e.g. a worker that cannot deserialise the job). A slide whose worker died is rerun by
    the scheduler (``allowed-failures``), then reported as failed. ``task``: what a worker runs
    per job (default :func:`run_job_task`); a picklable ``task(job) -> SlideResult`` that
    captures its failures (OMERO jobs pass theirs: a dropped connection logs in again).
    """

    def __init__(
        self,
        client: Any,
        *,
        retries: int = 2,
        task: Callable[[SlideJob], SlideResult] | None = None,
    ) -> None:
        self.client = client
        self.retries = retries
        self.task = task or run_job_task

    def _resources(self) -> dict[str, int] | None:
        """Require the slide resource only when every worker offers it (workers a user started
        by hand may not; then a warning says how to start them)."""
        info = self.client.scheduler_info()
        workers = list((info.get("workers") or {}).values())
        if workers and all(SLIDE_RESOURCE in (w.get("resources") or {}) for w in workers):
            return {SLIDE_RESOURCE: 1}
        if workers:
            log.warning(
                "some Dask workers do not offer the resource %s=1; a worker may then run several "
                "slides at once: start workers with --nthreads 1 or --resources %s=1",
                SLIDE_RESOURCE,
                SLIDE_RESOURCE,
            )
        return None if workers else {SLIDE_RESOURCE: 1}

    def run(
        self,
        jobs: Sequence[SlideJob],
        on_result: Callable[[SlideResult], None],
        on_start: Callable[[SlideJob], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        from distributed import as_completed

        from conic_qp.cohort import SlideResult

        for job in jobs:
            if job.model is None:
                raise ValueError(f"job {job.key} names no model; a Dask runner needs ModelSpecs")
        token = uuid.uuid4().hex[:8]
        resources = self._resources()
        futures: dict[Any, SlideJob] = {}
        try:
            for job in jobs:
                if on_start is not None:
                    on_start(job)
                future = self.client.submit(
                    self.task,
                    job,
                    key=f"conic-qp-slide-{token}-{job.key}",
                    pure=False,
                    retries=self.retries,
                    resources=resources,
                )
                futures[future] = job
            for future in as_completed(list(futures)):
                job = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # KilledWorker, a task error outside the slide run
                    result = SlideResult(
                        job.key, job.ref, "failed", error=f"{type(exc).__name__}: {exc}"
                    )
                on_result(result)
                future.release()
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.cancel(list(futures))
            raise


def with_model_spec(jobs: Sequence[SlideJob], spec: Any) -> list[SlideJob]:
    """The jobs with ``model`` set (for runners that load models themselves)."""
    return [dataclasses.replace(j, model=spec) if j.model is None else j for j in jobs]
