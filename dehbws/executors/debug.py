"""Runs tasks one after another in this process, so a debugger can step into them."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator, Sequence

from dehbws.executors.base import Executor, OnDone, Progress, TaskOutcome
from dehbws.task import TaskSpec, run_task

logger = logging.getLogger(__name__)


class DebugExecutor(Executor):
    """In-process execution: breakpoints work, exceptions keep their traceback."""

    name = "debug"

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        progress = Progress(len(specs), "tasks")
        for spec in specs:
            try:
                with _torch_threads_kept():
                    record = run_task(spec)
            except Exception as error:  # a failed task must not end the search
                logger.debug("%s raised", spec.name, exc_info=True)
                message = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
                on_done(TaskOutcome(spec, None, error=message))
            else:
                on_done(TaskOutcome(spec, record))
            progress.advance()
        progress.close()


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """A task sets torch's thread count for itself; in this process it must not outlast it.

    Otherwise every later task, and a reference run in the same process, would train with
    another thread count and (on the CPU) round its sums differently.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
