"""Executors run one batch of tasks: in process (debug), as local processes, or on SLURM."""

from __future__ import annotations

from pathlib import Path

from dehbws.errors import UserError
from dehbws.executors.base import Executor, TaskOutcome
from dehbws.executors.debug import DebugExecutor

__all__ = ["DebugExecutor", "Executor", "TaskOutcome", "make_executor"]


def make_executor(name: str, *, log_dir: Path, max_parallel: int = 1) -> Executor:
    """The executor called `name`."""
    if name == "debug":
        return DebugExecutor()
    if name == "local":
        from dehbws.executors.local import LocalExecutor

        return LocalExecutor(log_dir, max_parallel=max_parallel)
    raise UserError(f"executor is {name!r}, but must be 'debug' or 'local' for `dehbws run`.")
