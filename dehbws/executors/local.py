"""Runs tasks as subprocesses through submitit's LocalExecutor, a few at a time.

Results are read from the task's JSON result file, never from submitit's result pickle, so a
file planted in the run folder cannot run code in the coordinator. A task that runs longer than
`timeout_min` is killed and reported as failed (the coordinator then retries it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from dehbws.executors.base import (
    Executor,
    OnDone,
    Progress,
    TaskOutcome,
    log_tail,
    raised_exception,
)
from dehbws.task import TaskSpec, run_task

logger = logging.getLogger(__name__)

# After asking a task to stop (SIGINT), wait this long before killing it outright.
_KILL_GRACE_S = 5.0


@dataclass
class _Running:
    spec: TaskSpec
    job: Any
    started: float
    stop_asked: float | None = None


class LocalExecutor(Executor):
    """Each task is a fresh Python process, as on a cluster; logs go to `log_dir`."""

    name = "local"

    def __init__(
        self,
        log_dir: Path,
        *,
        max_parallel: int = 1,
        timeout_min: float = 24 * 60,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.max_parallel = max_parallel
        self.timeout_min = timeout_min
        self.poll_interval_s = poll_interval_s

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        executor = submitit.LocalExecutor(folder=str(self.log_dir / "%j"))
        # submitit's own limit (which would requeue the task) stays out of the way of ours.
        executor.update_parameters(timeout_min=int(self.timeout_min) + 10)
        waiting = list(specs)
        running: list[_Running] = []
        progress = Progress(len(specs), "tasks")

        while waiting or running:
            # Keep at most max_parallel tasks running: one CPU or GPU each.
            while waiting and len(running) < self.max_parallel:
                spec = waiting.pop(0)
                job = executor.submit(run_task, spec)
                logger.debug("%s started as local job %s", spec.name, job.job_id)
                running.append(_Running(spec, job, time.monotonic()))

            finished = [task for task in running if task.job.done()]
            for task in finished:
                running.remove(task)
                on_done(self._outcome(task))
                progress.advance()
            for task in running:
                self._stop_if_late(task)
            if not finished:
                progress.show()
                time.sleep(self.poll_interval_s)
        progress.close()

    def _stop_if_late(self, task: _Running) -> None:
        now = time.monotonic()
        if task.stop_asked is None and now - task.started > self.timeout_min * 60:
            logger.warning(
                "%s runs longer than %g min; stopping it", task.spec.name, self.timeout_min
            )
            task.job.cancel(check=False)
            task.stop_asked = now
        elif task.stop_asked is not None and now - task.stop_asked > _KILL_GRACE_S:
            # A task that ignores SIGINT (stuck in C code) is killed with its process group.
            process = getattr(task.job, "_process", None)
            if process is not None and process.poll() is None:
                process.kill()

    def _outcome(self, task: _Running) -> TaskOutcome:
        spec, log_path = task.spec, str(task.job.paths.stderr)
        result = Path(spec.result)
        if result.exists():
            try:
                return TaskOutcome(spec, json.loads(result.read_text()), log_path=log_path)
            except (OSError, ValueError) as problem:
                return TaskOutcome(spec, None, f"unreadable result {result}: {problem}", log_path)
        if task.stop_asked is not None:
            message = f"TimeoutError: stopped after the time limit of {self.timeout_min:g} min"
        else:
            message = raised_exception(log_tail(log_path)) or (
                f"local job {task.job.job_id} ended without a result (killed or crashed)"
            )
        return TaskOutcome(spec, None, error=message, log_path=log_path)
