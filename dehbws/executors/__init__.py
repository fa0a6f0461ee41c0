"""Executors run one batch of tasks: in process (debug), as local processes, or on SLURM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dehbws.errors import UserError
from dehbws.executors.base import Executor, TaskOutcome
from dehbws.executors.debug import DebugExecutor

if TYPE_CHECKING:
    from dehbws.executors.slurm_settings import SlurmSettings

__all__ = ["DebugExecutor", "Executor", "TaskOutcome", "make_executor"]


def make_executor(
    name: str,
    *,
    log_dir: Path,
    max_parallel: int = 1,
    timeout_min: float = 24 * 60.0,
    slurm: SlurmSettings | None = None,
    run_name: str = "run",
    binds: Sequence[Path] = (),
) -> Executor:
    """The executor called `name`; "slurm" needs the tasks' `slurm` settings."""
    if name == "debug":
        return DebugExecutor()
    if name == "local":
        from dehbws.executors.local import LocalExecutor

        return LocalExecutor(log_dir, max_parallel=max_parallel, timeout_min=timeout_min)
    if name == "slurm":
        if slurm is None:
            raise UserError(
                "this run executes its tasks on SLURM; continue it with `dehbws submit --resume "
                "DIR`, or pass --executor local (or debug) to run its tasks on this machine."
            )
        from dehbws.executors.slurm import SlurmExecutor

        return SlurmExecutor(slurm, log_dir, run_name=run_name, binds=binds)
    raise UserError(
        f"executor is {name!r}, but must be 'debug' or 'local' for `dehbws run` ('slurm' runs "
        "through `dehbws submit`)."
    )
