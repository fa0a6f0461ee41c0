"""Small functions that the SLURM tests run as jobs.

submitit pickles the function it submits. The conftest registers this module with cloudpickle
to be pickled by value, so a job can run these functions without importing the test tree (whose
package name depends on how pytest was started).
"""

import os
import time


class DeliberateError(RuntimeError):
    """Raised by `fail` so a test can recognise its own error in the remote traceback."""


def describe_task(value: int) -> dict[str, str | int]:
    """Return `value` squared together with the SLURM variables the task saw."""
    return {
        "square": value * value,
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", ""),
        "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
        "partition": os.environ.get("SLURM_JOB_PARTITION", ""),
    }


def visible_gpus() -> str:
    """Return CUDA_VISIBLE_DEVICES as the task saw it (empty when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def fail(message: str) -> None:
    """Raise `DeliberateError(message)` inside the job."""
    raise DeliberateError(message)


def sleep_then_return(seconds: float) -> float:
    """Sleep for `seconds` and return them; long enough to be cancelled first."""
    time.sleep(seconds)
    return seconds
