"""Runs each batch as SLURM array jobs through submitit, and reattaches to them after a restart.

A batch (one rung) becomes one array job, one task per evaluation, split only where it has more
tasks than the cluster's MaxArraySize. The job ids are written to the batch folder
(`batches/NNNN/jobs.json`) before the coordinator waits, so a coordinator that was killed and
started again waits for the tasks that are still queued or running instead of submitting them
twice; only tasks whose job ended without a result are submitted again.

Waiting is cheap for the cluster: the coordinator looks at the tasks' result files every few
seconds and asks sacct (one call for all jobs) at a modest interval, which is how it notices
tasks that were cancelled, killed or ran out of time or memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from dehbws.errors import UserError
from dehbws.executors.base import (
    Executor,
    OnDone,
    Progress,
    TaskOutcome,
    log_tail,
    raised_exception,
)
from dehbws.executors.slurm_settings import (
    SlurmSettings,
    container_python,
    sbatch_parameters,
    split_array,
)
from dehbws.run_folder import read_json, write_json_atomic
from dehbws.task import TaskRunner, TaskSpec

logger = logging.getLogger(__name__)

JOBS_FILE = "jobs.json"
# SLURM's own default, used when `scontrol show config` cannot be read.
DEFAULT_MAX_ARRAY_SIZE = 1001
# How often a preempted or timed-out task may be requeued before it counts as failed.
MAX_REQUEUES = 3


class JobStore:
    """The SLURM job ids of a batch's tasks, in `jobs.json`, one list per task (each attempt).

    Tasks are named by their result file (`e00042`, `finetune-15`), so the warm-up, every rung
    and the final evaluations each have their own store.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.values: dict[str, Any] = (
            read_json(self.path) if self.path.exists() else {"arrays": [], "tasks": {}}
        )

    @staticmethod
    def key(spec: TaskSpec) -> str:
        return Path(spec.result).stem

    def latest(self, spec: TaskSpec) -> str | None:
        """The job id of the task's last attempt, if it was ever submitted."""
        attempts = self.values["tasks"].get(self.key(spec)) or []
        return str(attempts[-1]) if attempts else None

    def record(self, array_job_id: str, jobs: dict[str, str], *, job_name: str) -> None:
        """Add one submitted array; written atomically before anyone waits on it."""
        self.values["arrays"].append(
            {
                "array_job_id": array_job_id,
                "job_name": job_name,
                "tasks": len(jobs),
                "submitted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
        )
        for key, job_id in jobs.items():
            self.values["tasks"].setdefault(key, []).append(job_id)
        write_json_atomic(self.path, self.values)


@dataclass
class _Waiting:
    """A task whose job the executor waits for."""

    spec: TaskSpec
    job: Any  # submitit.SlurmJob


class SlurmExecutor(Executor):
    """Each batch is one SLURM array job; each task one subnet training on one GPU (or CPU).

    `log_dir` (on the shared filesystem) receives submitit's files and the tasks' logs, named
    `<array job>_<task>_0_log.out/.err`. `binds` are the folders a container must see (the run
    folder and the data).
    """

    name = "slurm"

    def __init__(
        self,
        settings: SlurmSettings,
        log_dir: Path,
        *,
        run_name: str = "run",
        binds: Sequence[Path] = (),
        poll_interval_s: float = 2.0,
        sacct_interval_s: float = 15.0,
        max_array_size: int | None = None,
    ) -> None:
        self.settings = settings
        self.log_dir = Path(log_dir).resolve()
        self.run_name = run_name
        self.binds = tuple(Path(folder) for folder in binds)
        self.poll_interval_s = poll_interval_s
        self.sacct_interval_s = sacct_interval_s
        self._max_array_size = max_array_size

    # -- the sbatch request ---------------------------------------------------------------------

    @property
    def max_array_size(self) -> int:
        """Tasks per array job at most: the cluster's MaxArraySize (task ids stay below it)."""
        if self._max_array_size is None:
            self._max_array_size = cluster_max_array_size()
        return self._max_array_size

    @property
    def python(self) -> str | None:
        """How the tasks start Python: in the container, or (None) as this coordinator does."""
        if self.settings.container is None:
            return None
        return container_python(
            self.settings.container,
            gpus=self.settings.gpus_per_task,
            binds=(*self.binds, self.log_dir),
        )

    def submitit_executor(self, job_name: str = "dehbws") -> submitit.SlurmExecutor:
        """A submitit executor with this executor's settings; tests submit probes through it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            executor = submitit.SlurmExecutor(
                folder=self.log_dir, max_num_timeout=MAX_REQUEUES, python=self.python
            )
        except RuntimeError as error:  # submitit's "Could not detect srun"
            raise UserError(
                f"{error} `dehbws submit` runs where sbatch, srun and sacct work (a login node "
                "of the cluster); on a single machine use `dehbws run`."
            ) from None
        executor.update_parameters(job_name=job_name, **sbatch_parameters(self.settings))
        return executor

    def check(self) -> None:
        """Ask sbatch whether the cluster accepts these settings, without submitting anything.

        `sbatch --test-only` validates partition, GPUs, account, QOS and every extra option, so
        a mistake shows before a run folder is made or a warm-up is trained.
        """
        from submitit.slurm.slurm import _make_sbatch_string

        if shutil.which("sbatch") is None:
            raise UserError(
                "sbatch is not on PATH: `dehbws submit` runs on a login node of a SLURM "
                "cluster; on a single machine use `dehbws run` instead."
            )
        script = _make_sbatch_string(
            command="true",
            folder=self.log_dir,
            job_name="dehbws-check",
            map_count=1,
            **sbatch_parameters(self.settings),
        )
        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="dehbws-check-") as file:
            file.write(script)
            file.flush()
            answer = subprocess.run(
                ["sbatch", "--test-only", file.name],
                capture_output=True,
                text=True,
                timeout=120,
                env=task_submission_environment(),
            )
        if answer.returncode != 0:
            raise UserError(
                f"sbatch refuses the tasks' request ({self.describe()}): "
                f"{_sbatch_complaint(answer.stderr)}. Fix the option it names (`sinfo -s` lists "
                "the partitions and their GPUs, `sacctmgr show assoc user=$USER` your accounts "
                "and QOS) and run the command again; a run that already started continues with "
                "`dehbws submit --resume DIR` and the corrected option."
            )
        logger.debug("sbatch --test-only accepts the request: %s", answer.stderr.strip())

    def describe(self) -> str:
        """The request in words, for log lines and messages."""
        settings = self.settings
        parts = [
            f"partition {settings.partition or '(default)'}",
            f"{settings.gpus_per_task} GPU(s) per task",
            f"{settings.time_min} min",
        ]
        if settings.cpus_per_task:
            parts.append(f"{settings.cpus_per_task} CPUs")
        if settings.mem_gb:
            parts.append(f"{settings.mem_gb:g} GB")
        if settings.container:
            parts.append(f"container {settings.container}")
        return ", ".join(parts)

    # -- running a batch ------------------------------------------------------------------------

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        self.run_batch(specs, on_done, state_dir=None)

    def run_batch(
        self, specs: Sequence[TaskSpec], on_done: OnDone, *, state_dir: Path | None
    ) -> None:
        """Reattach to the batch's live jobs, submit the rest, report each task as it ends.

        Without `state_dir` the job ids go beside the first task's result file.
        """
        if not specs:
            return
        store = JobStore(Path(state_dir or Path(specs[0].result).parent) / JOBS_FILE)
        specs = [self._on_device(spec) for spec in specs]
        waiting, to_submit = self._reattach(store, specs)
        for indices in split_array(len(to_submit), self.max_array_size):
            waiting += self._submit([to_submit[index] for index in indices], store)
        self._wait(waiting, on_done)

    def _on_device(self, spec: TaskSpec) -> TaskSpec:
        """The spec with the device that the GPU request implies (cuda with GPUs, else cpu)."""
        device = self.settings.task_device
        if spec.train.device == device:
            return spec
        return dataclasses.replace(spec, train=dataclasses.replace(spec.train, device=device))

    def _reattach(
        self, store: JobStore, specs: list[TaskSpec]
    ) -> tuple[list[_Waiting], list[TaskSpec]]:
        """Split the specs into tasks whose stored job is still alive, and those to submit."""
        known = [(spec, store.latest(spec)) for spec in specs]
        earlier = [
            _Waiting(spec, submitit.SlurmJob(folder=self.log_dir, job_id=job_id))
            for spec, job_id in known
            if job_id is not None
        ]
        to_submit = [spec for spec, job_id in known if job_id is None]
        if not earlier:
            return [], to_submit

        earlier[0].job.watcher.update()  # one sacct call for all of them
        alive = []
        for task in earlier:
            if Path(task.spec.result).exists():
                alive.append(task)  # finished since the coordinator looked
            elif _ended(task):
                to_submit.append(task.spec)  # failed, cancelled, or its result was rejected
            elif _state(task) == "UNKNOWN" and not _in_queue(task.job.job_id):
                to_submit.append(task.spec)  # unknown to sacct and squeue: gone
            else:
                alive.append(task)
        if alive:
            logger.info(
                "reattached to %d tasks of job(s) %s still queued, running or finished",
                len(alive),
                ", ".join(sorted({task.job.job_id.split("_")[0] for task in alive})),
            )
        if len(alive) < len(earlier):
            logger.debug("%d earlier tasks ended without a result", len(earlier) - len(alive))
        return alive, to_submit

    def _submit(self, specs: list[TaskSpec], store: JobStore) -> list[_Waiting]:
        """Submit the specs as one array job and record its ids before returning."""
        job_name = f"dehbws-{self.run_name}-{_batch_label(specs[0])}"
        executor = self.submitit_executor(job_name)
        executor.update_parameters(array_parallelism=self.settings.array_parallelism or len(specs))
        submitted_at = time.time()
        try:
            with _submission_environment():
                jobs = executor.map_array(TaskRunner(), specs)
        except (FailedJobError, FailedSubmissionError) as error:
            raise UserError(
                f"sbatch refused the array job {job_name} ({self.describe()}): "
                f"{_sbatch_complaint(str(error))}. Fix the option and continue with "
                "`dehbws submit --resume DIR`."
            ) from None

        array_job_id = jobs[0].job_id.split("_")[0]
        store.record(
            array_job_id,
            {store.key(spec): job.job_id for spec, job in zip(specs, jobs, strict=True)},
            job_name=job_name,
        )
        for job in jobs:
            _drop_stale_result(job, submitted_at)
        logger.info(
            "submitted array job %s (%s): %d tasks, %s",
            array_job_id,
            job_name,
            len(jobs),
            self.describe(),
        )
        return [_Waiting(spec, job) for spec, job in zip(specs, jobs, strict=True)]

    def _wait(self, waiting: list[_Waiting], on_done: OnDone) -> None:
        """Report each task as it ends: result files often, sacct every `sacct_interval_s`."""
        progress = Progress(len(waiting), "tasks")
        last_sacct_s = time.monotonic()
        while waiting:
            if time.monotonic() - last_sacct_s >= self.sacct_interval_s:
                waiting[0].job.watcher.update()
                last_sacct_s = time.monotonic()
                states = Counter(_state(task) for task in waiting)
                logger.debug("sacct: %s", ", ".join(f"{n} {s}" for s, n in states.items()))

            finished = [task for task in waiting if _ended(task)]
            for task in finished:
                waiting.remove(task)
                on_done(_outcome(task))
                progress.advance()
            if not finished:
                progress.show()
                time.sleep(self.poll_interval_s)
        progress.close()


# What a job's environment says about the job itself; sbatch reads the user's settings from
# SBATCH_* variables and the configuration from SLURM_CONF, which stay.
_KEPT_SLURM_VARIABLES = frozenset({"SLURM_CONF", "SLURM_CLUSTERS", "SLURM_TIME_FORMAT"})


def task_submission_environment() -> dict[str, str]:
    """This process's environment without the SLURM_* variables of the job it runs in.

    sbatch hands the submitting environment on to the tasks, and a coordinator that runs as a
    SLURM job (slurm/coordinator.sbatch) would pass its own allocation along: srun in a task
    then finds, for example, the coordinator's SLURM_MEM_PER_NODE beside the task's
    SLURM_MEM_PER_CPU and refuses to start.
    """
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SLURM_", "SLURMD_")) or name in _KEPT_SLURM_VARIABLES
    }


@contextlib.contextmanager
def _submission_environment() -> Iterator[None]:
    """Submit (submitit runs sbatch itself) with `task_submission_environment()`."""
    saved = dict(os.environ)
    dropped = set(saved) - set(task_submission_environment())
    if dropped:
        logger.debug("submitting without this job's variables %s", sorted(dropped))
    for name in dropped:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update({name: saved[name] for name in dropped})


def _state(task: _Waiting) -> str:
    """The job's state from the last sacct call (no new call)."""
    return str(task.job.watcher.get_state(task.job.job_id, mode="cache"))


def _ended(task: _Waiting) -> bool:
    """Whether the task wrote its result, or its job ended according to the last sacct call."""
    job = task.job
    return (
        Path(task.spec.result).exists()
        or job.paths.result_pickle.exists()
        or job.watcher.is_done(job.job_id, mode="cache")
    )


def _outcome(task: _Waiting) -> TaskOutcome:
    """The task's record, or why it has none, with the first line saying what happened.

    The record is read from the task's JSON result file, never from submitit's result pickle,
    so that a file planted in the log folder cannot run code in the coordinator. The file is
    written atomically and whole, so a task that wrote it succeeded even if its job was stopped
    a moment later. Without it, a result pickle means the task raised (its traceback is at the
    end of its log); no pickle means the job ended outside Python: cancelled, killed, out of
    memory or out of time.
    """
    job = task.job
    log_path = str(job.paths.stderr)
    result_path = Path(task.spec.result)
    if result_path.exists():
        logger.debug("job %s finished %s", job.job_id, task.spec.name)
        return TaskOutcome(task.spec, read_json(result_path), log_path=log_path)

    tail = log_tail(job.paths.stderr)
    if job.paths.result_pickle.exists():
        first = f"{_raised(tail)} (job {job.job_id})"
    else:
        state = job.watcher.get_state(job.job_id, mode="force")
        why = (
            "it failed before Python started or outside it; see its log"
            if state.startswith("FAILED")
            else "cancelled, killed, out of memory or out of time"
        )
        first = f"job {job.job_id} ended {state} without a result ({why})"
    return TaskOutcome(task.spec, None, "\n".join([first, *tail]), log_path)


def _raised(log_lines: list[str]) -> str:
    """The exception line of the traceback in a task's log (e.g. `ValueError: ...`)."""
    return raised_exception(log_lines) or "the task raised an exception (see its log)"


def _sbatch_complaint(text: str) -> str:
    """sbatch's error lines, joined into one sentence."""
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return "; ".join(lines or [line.strip() for line in text.splitlines() if line.strip()][-1:])


def _batch_label(spec: TaskSpec) -> str:
    if spec.kind in ("search", "warmup"):
        return f"b{spec.batch:04d}"
    return f"{spec.kind}-{spec.end_epoch}"


def _in_queue(job_id: str) -> bool:
    """Whether squeue still lists the job (for ids that sacct does not know)."""
    answer = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=60
    )
    return answer.returncode == 0 and bool(answer.stdout.strip())


def _drop_stale_result(job: Any, submitted_at: float) -> None:
    """Remove a result file left by an older job with the same id (ids restart on a new
    cluster state), which would make this job look finished."""
    path = job.paths.result_pickle
    if path.exists() and path.stat().st_mtime < submitted_at:
        logger.warning("removing %s, left by an older job with the same id", path)
        path.unlink(missing_ok=True)


def cluster_max_array_size() -> int:
    """MaxArraySize from `scontrol show config` (SLURM's default 1001 if it cannot be read)."""
    try:
        answer = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("cannot read MaxArraySize (%s); assuming %d", error, DEFAULT_MAX_ARRAY_SIZE)
        return DEFAULT_MAX_ARRAY_SIZE
    return parse_max_array_size(answer.stdout)


def parse_max_array_size(config_text: str) -> int:
    """MaxArraySize from the text of `scontrol show config`."""
    for line in config_text.splitlines():
        name, separator, value = line.partition("=")
        if separator and name.strip() == "MaxArraySize" and value.strip().isdigit():
            return int(value.strip())
    logger.warning("scontrol shows no MaxArraySize; assuming %d", DEFAULT_MAX_ARRAY_SIZE)
    return DEFAULT_MAX_ARRAY_SIZE
