"""submitit against the real development cluster: the behaviour the SLURM executor relies on.

Run with `python -m pytest tests/slurm -m slurm` after `bash slurm/start-dev-cluster.sh`.
"""

import os
import subprocess
import time
from collections.abc import Sequence

import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from . import jobs
from .conftest import SlurmCluster, scontrol_config

pytestmark = pytest.mark.slurm

WAIT_S = 60.0
POLL_S = 0.5


def wait_done(job_list: Sequence[submitit.Job], timeout_s: float = WAIT_S) -> None:
    """Wait until every job is finished, asking sacct now rather than on submitit's schedule."""
    deadline = time.monotonic() + timeout_s
    while not all(job.done(force_check=True) for job in job_list):
        if time.monotonic() > deadline:
            states = {job.job_id: job.state for job in job_list}
            pytest.fail(f"jobs not finished after {timeout_s} s: {states}")
        time.sleep(POLL_S)


def sacct_states(job_id: str) -> dict[str, str]:
    """Map each allocation of `job_id` (array tasks as `<id>_<task>`) to its sacct state."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line)


def wait_for_sacct(job_id: str, expected: dict[str, str], timeout_s: float = 30.0) -> None:
    """Wait until sacct reports `expected`; job records reach slurmdbd a moment after the end."""
    deadline = time.monotonic() + timeout_s
    while (states := sacct_states(job_id)) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"sacct for {job_id} shows {states}, expected {expected}")
        time.sleep(POLL_S)


def wait_running(job: submitit.Job, timeout_s: float = WAIT_S) -> None:
    """Wait until squeue shows the job running."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = subprocess.run(
            ["squeue", "-h", "-j", job.job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if state == "RUNNING":
            return
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} not running after {timeout_s} s (squeue: {state!r})")
        time.sleep(POLL_S)


def test_map_array_is_one_array_job(executor: submitit.AutoExecutor) -> None:
    array = executor.map_array(jobs.describe_task, [1, 2, 3])

    array_ids = {job.job_id.split("_")[0] for job in array}
    assert len(array_ids) == 1, f"expected one array job, got ids {[j.job_id for j in array]}"
    array_id = array_ids.pop()
    assert [job.job_id for job in array] == [f"{array_id}_{task}" for task in range(3)]

    wait_done(array)
    results = [job.result() for job in array]
    assert [result["square"] for result in results] == [1, 4, 9]
    assert [result["array_task_id"] for result in results] == ["0", "1", "2"]
    assert {result["array_job_id"] for result in results} == {array_id}
    assert {result["partition"] for result in results} == {"debug"}

    wait_for_sacct(array_id, {f"{array_id}_{task}": "COMPLETED" for task in range(3)})


@pytest.mark.usefixtures("gpu_cluster")
def test_gpus_per_task_alone_is_refused(executor: submitit.AutoExecutor) -> None:
    # submitit writes --nodes and --gpus-per-task but no --ntasks; sbatch insists on one.
    executor.update_parameters(slurm_partition="gpu", slurm_gpus_per_task=1)

    with pytest.raises(FailedJobError, match="--gpus-per-task used without"):
        executor.submit(jobs.visible_gpus)


@pytest.mark.usefixtures("gpu_cluster")
def test_gpu_task_sees_cuda_visible_devices(executor: submitit.AutoExecutor) -> None:
    executor.update_parameters(
        slurm_partition="gpu",
        slurm_gpus_per_task=1,
        slurm_additional_parameters={"ntasks": 1},
    )

    job = executor.submit(jobs.visible_gpus)

    wait_done([job])
    devices = job.result()
    assert devices, "CUDA_VISIBLE_DEVICES was not set in a task given --gpus-per-task=1"
    assert len(devices.split(",")) == 1, f"one GPU per task expected, got {devices!r}"


def test_failing_task_raises_with_remote_traceback(executor: submitit.AutoExecutor) -> None:
    job = executor.submit(jobs.fail, "deliberate failure 4127")

    wait_done([job])
    with pytest.raises(FailedJobError) as caught:
        job.result()

    message = str(caught.value)
    assert "Traceback" in message
    assert "DeliberateError: deliberate failure 4127" in message
    wait_for_sacct(job.job_id, {job.job_id: "FAILED"})


def test_cancelled_task_raises_uncompleted(executor: submitit.AutoExecutor) -> None:
    job = executor.submit(jobs.sleep_then_return, 300.0)
    wait_running(job)

    job.cancel()

    wait_done([job])
    assert job.state.startswith("CANCELLED"), job.state
    with pytest.raises(UncompletedJobError):
        job.result()


def test_max_array_size_is_readable(slurm_cluster: SlurmCluster) -> None:
    max_array_size = int(scontrol_config()["MaxArraySize"])

    assert max_array_size == slurm_cluster.max_array_size
    expected = os.environ.get("DEHBWS_DEVSLURM_MAX_ARRAY_SIZE")
    if expected is not None:
        assert max_array_size == int(expected)
    # Array task ids run from 0 to MaxArraySize - 1: a rung needs at least a few of them.
    assert max_array_size >= 3
