"""Runs tasks as subprocesses through submitit's LocalExecutor, a few at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from dehbws.executors.base import Executor, OnDone, Progress, TaskOutcome
from dehbws.task import TaskSpec, run_task

logger = logging.getLogger(__name__)


class LocalExecutor(Executor):
    """Each task is a fresh Python process, as on a cluster; logs go to `log_dir`."""

    name = "local"

    def __init__(
        self,
        log_dir: Path,
        *,
        max_parallel: int = 1,
        timeout_min: int = 24 * 60,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.max_parallel = max_parallel
        self.timeout_min = timeout_min
        self.poll_interval_s = poll_interval_s

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        executor = submitit.LocalExecutor(folder=str(self.log_dir / "%j"))
        executor.update_parameters(timeout_min=self.timeout_min)
        waiting = list(specs)
        running: list[tuple[TaskSpec, Any]] = []
        progress = Progress(len(specs), "tasks")

        while waiting or running:
            # Keep at most max_parallel tasks running: one CPU or GPU each.
            while waiting and len(running) < self.max_parallel:
                spec = waiting.pop(0)
                job = executor.submit(run_task, spec)
                logger.debug("%s started as local job %s", spec.name, job.job_id)
                running.append((spec, job))

            finished = [(spec, job) for spec, job in running if job.done()]
            for spec, job in finished:
                running.remove((spec, job))
                on_done(_outcome(spec, job))
                progress.advance()
            if not finished:
                progress.show()
                time.sleep(self.poll_interval_s)
        progress.close()


def _outcome(spec: TaskSpec, job: Any) -> TaskOutcome:
    log_path = str(job.paths.stderr)
    try:
        record = job.result()
    except Exception as error:  # submitit raises FailedJobError or UncompletedJobError
        return TaskOutcome(spec, None, error=f"{type(error).__name__}: {error}", log_path=log_path)
    return TaskOutcome(spec, record, log_path=log_path)
