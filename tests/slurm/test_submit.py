"""`dehbws submit` and the SLURM executor against the development cluster.

Every test runs the tiny preset on real data through real array jobs: a search with an injected
failure that is retried, a task cancelled with scancel, a coordinator killed mid-rung and
restarted, a task requeued through submitit's preemption path, and a request sbatch refuses.
Run with `python -m pytest tests/slurm -m slurm` after `bash slurm/start-dev-cluster.sh
--fake-gpus 2`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import submitit

from dehbws.executors.base import TaskOutcome
from dehbws.executors.slurm import JOBS_FILE, SlurmExecutor
from dehbws.executors.slurm_settings import SlurmSettings
from dehbws.presets import preset
from dehbws.run_folder import read_json
from dehbws.schedule import WORST_FITNESS
from dehbws.space import build_space, to_plain
from dehbws.store import read_tensors
from dehbws.task import TaskSpec, run_task
from dehbws.task_checkpoint import checkpoint_path

from . import jobs
from .conftest import SlurmCluster

pytestmark = pytest.mark.slurm

# One rung of three 1-epoch subnets (and, with 4 evaluations, one 3-epoch promotion).
TINY_SEARCH = ["--preset", "tiny", "--warmup-epochs", "0", "--finetune-epochs", "0"]
RUN_TIMEOUT_S = 240.0


def dehbws(*args: str) -> list[str]:
    """The command line of `dehbws ARGS`."""
    return [sys.executable, "-m", "dehbws.cli", *args]


def environment(faults: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """This environment with the injected faults (sbatch hands it on to the tasks)."""
    env = {key: value for key, value in os.environ.items() if key != "DEHBWS_FAULT_INJECT"}
    # The coordinator job finds `dehbws` beside this Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if faults:
        env["DEHBWS_FAULT_INJECT"] = json.dumps(faults)
    return env


def run_dehbws(
    *args: str, faults: list[dict[str, Any]] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        dehbws(*args),
        capture_output=True,
        text=True,
        env=environment(faults),
        timeout=RUN_TIMEOUT_S,
    )


def start_dehbws(run_dir: Path, *args: str, faults: list[dict[str, Any]]) -> subprocess.Popen[str]:
    """`dehbws ARGS` in the background, its output in RUN_DIR's parent."""
    output = (run_dir.parent / f"{run_dir.name}-coordinator.out").open("a")
    return subprocess.Popen(
        dehbws(*args),
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment(faults),
    )


REPO = Path(__file__).resolve().parents[2]


def submit_coordinator(folder: Path, *args: str, faults: list[dict[str, Any]]) -> str:
    """sbatch slurm/coordinator.sbatch ARGS from `folder`; returns the coordinator's job id."""
    answer = subprocess.run(
        ["sbatch", "--parsable", "--mem=2G", str(REPO / "slurm" / "coordinator.sbatch"), *args],
        capture_output=True,
        text=True,
        cwd=folder,
        env=environment(faults),
        timeout=60,
        check=True,
    )
    return answer.stdout.strip().split(";")[0]


def wait_for_job_end(job_id: str, timeout_s: float) -> str:
    """The state a (non-array) job ended in, from sacct."""
    ended: list[str] = []

    def has_ended() -> bool:
        state = sacct_tasks(job_id).get(job_id, ("", "PENDING"))[1]
        ended[:] = [state]
        return state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")

    wait_for(f"job {job_id} ending", has_ended, timeout_s, poll_s=2.0)
    return ended[0]


def wait_for(what: str, condition: Any, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(poll_s)


def jobs_of(run_dir: Path, batch: int) -> dict[str, Any]:
    return dict(read_json(run_dir / "batches" / f"{batch:04d}" / JOBS_FILE))


def history(run_dir: Path) -> dict[int, dict[str, Any]]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return {record["evaluation"]: record for record in map(json.loads, lines)}


def sacct_tasks(array_job_id: str) -> dict[str, tuple[str, str]]:
    """Each task of an array job as sacct lists it: id -> (job name, state)."""
    out = subprocess.run(
        ["sacct", "-j", array_job_id, "-X", "-n", "-P", "-o", "JobID,JobName,State"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    return {job_id: (name, state) for job_id, name, state in rows}


def squeue_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()


def result_path(run_dir: Path, batch: int, evaluation: int) -> Path:
    return run_dir / "batches" / f"{batch:04d}" / "results" / f"e{evaluation:05d}.json"


def fault_fired(run_dir: Path, batch: int, evaluation: int) -> Any:
    """Whether the task started and counted its injected fault (see dehbws.task_faults)."""
    return result_path(run_dir, batch, evaluation).with_suffix(".faults").exists


@pytest.mark.usefixtures("slurm_cluster")
def test_submit_runs_each_rung_as_one_array_job_and_retries_a_failure(tmp_path: Path) -> None:
    run_dir = tmp_path / "search"
    faults = [
        {"action": "raise", "batch": 0, "evaluation": 0, "times": 1},  # retried, then fine
        {"action": "raise", "batch": 0, "evaluation": 1, "times": 2},  # fails both attempts
    ]

    result = run_dehbws(
        "submit",
        *TINY_SEARCH,
        "--fevals",
        "4",
        "--max-retries",
        "1",
        "--run-dir",
        str(run_dir),
        "--partition",
        "debug",
        "--gpus-per-task",
        "0",
        "--cpus-per-task",
        "1",
        faults=faults,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # The search went on past the failure: e1 is recorded with the worst fitness.
    lines = history(run_dir)
    assert sorted(lines) == [0, 1, 2, 3]
    assert [lines[e]["status"] for e in (0, 2, 3)] == ["ok"] * 3
    assert lines[1]["status"] == "failed"
    assert lines[1]["fitness"] == WORST_FITNESS
    assert "InjectedFault" in lines[1]["error"]

    # The rung was one array of three tasks; the retry one array of the two that failed.
    rung = jobs_of(run_dir, 0)
    assert [array["tasks"] for array in rung["arrays"]] == [3, 2]
    assert {key: len(ids) for key, ids in rung["tasks"].items()} == {
        "e00000": 2,
        "e00001": 2,
        "e00002": 1,
    }
    first_array = rung["arrays"][0]["array_job_id"]
    assert [rung["tasks"][f"e0000{e}"][0] for e in range(3)] == [
        f"{first_array}_{task}" for task in range(3)
    ]
    tasks = sacct_tasks(first_array)
    assert set(tasks) == {f"{first_array}_{task}" for task in range(3)}
    assert {name for name, _ in tasks.values()} == {"dehbws-search-b0000"}
    assert sorted(state for _, state in tasks.values()) == ["COMPLETED", "FAILED", "FAILED"]
    promotion = jobs_of(run_dir, 1)
    assert [array["tasks"] for array in promotion["arrays"]] == [1]

    # Each task's log is named by its job and task id; the coordinator names the failed one's.
    log_dir = run_dir / "logs" / "tasks"
    failed_log = log_dir / f"{rung['tasks']['e00001'][-1]}_0_log.err"
    assert failed_log.exists()
    assert "InjectedFault" in failed_log.read_text()
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
    assert f"(log: {failed_log})" in coordinator_log
    assert "InjectedFault: injected fault in search e00001" in coordinator_log
    submission = (log_dir / f"{first_array}_submission.sh").read_text()
    assert "export HDF5_USE_FILE_LOCKING=FALSE" in submission
    assert read_json(run_dir / "executor.json")["slurm"]["partition"] == "debug"


@pytest.mark.usefixtures("slurm_cluster")
def test_a_cancelled_task_is_retried(tmp_path: Path) -> None:
    # The coordinator runs as a SLURM job itself, through slurm/coordinator.sbatch.
    run_dir = tmp_path / "cancel"
    faults = [{"action": "sleep", "batch": 0, "evaluation": 1, "seconds": 300, "times": 1}]
    coordinator = submit_coordinator(
        tmp_path,
        *TINY_SEARCH,
        "--fevals",
        "3",
        "--max-retries",
        "1",
        "--run-dir",
        str(run_dir),
        "--gpus-per-task",
        "0",
        faults=faults,
    )
    try:
        jobs_file = run_dir / "batches" / "0000" / JOBS_FILE
        wait_for("the rung's submission", jobs_file.exists)
        sleeper = jobs_of(run_dir, 0)["tasks"]["e00001"][0]
        # Cancelled once its fault fired (the start is counted), so that the retry runs plainly.
        wait_for(f"task {sleeper} sleeping", fault_fired(run_dir, 0, 1))
        subprocess.run(["scancel", sleeper], check=True, timeout=30)
        state = wait_for_job_end(coordinator, RUN_TIMEOUT_S)
    finally:
        subprocess.run(["scancel", coordinator], timeout=30)
    output = "\n".join(path.read_text() for path in tmp_path.glob("*.out"))
    assert state == "COMPLETED", output[-3000:]

    lines = history(run_dir)
    assert [lines[e]["status"] for e in range(3)] == ["ok"] * 3
    attempts = jobs_of(run_dir, 0)["tasks"]["e00001"]
    assert len(attempts) == 2 and attempts[0] == sleeper
    assert read_json(result_path(run_dir, 0, 1))["slurm_job"] == attempts[1]
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
    assert f"job {sleeper} ended CANCELLED" in coordinator_log
    assert "retrying 1 failed tasks" in coordinator_log


def test_a_restarted_coordinator_reattaches_without_resubmitting(
    gpu_cluster: SlurmCluster, tmp_path: Path
) -> None:
    # GPU tasks on the fake GPUs: two run at a time, and each sees its own device.
    run_dir = tmp_path / "reattach"
    faults = [{"action": "sleep", "batch": 0, "evaluation": 0, "seconds": 60, "times": 1}]
    gpu_request = ["--partition", "gpu", "--gpus-per-task", "1", "--device", "cpu"]
    first = start_dehbws(
        run_dir,
        "submit",
        *TINY_SEARCH,
        "--fevals",
        "3",
        "--run-dir",
        str(run_dir),
        *gpu_request,
        faults=faults,
    )
    try:
        # Killed mid-rung: e0 sleeps in its task, e1 has finished, e2 is queued or running.
        e1_done = result_path(run_dir, 0, 1).exists
        wait_for("e0 sleeping and e1 finished", lambda: fault_fired(run_dir, 0, 0)() and e1_done())
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    before = jobs_of(run_dir, 0)
    assert not result_path(run_dir, 0, 0).exists(), "e0 finished before the kill"
    assert squeue_state(before["tasks"]["e00000"][0]) == "RUNNING"

    restarted = run_dehbws("submit", "--resume", str(run_dir), faults=faults)
    assert restarted.returncode == 0, restarted.stderr[-3000:]

    # Nothing was submitted again: the same array, one job per task.
    after = jobs_of(run_dir, 0)
    assert after == before
    assert [array["tasks"] for array in after["arrays"]] == [3]
    assert all(len(ids) == 1 for ids in after["tasks"].values())
    lines = history(run_dir)
    assert [lines[e]["status"] for e in range(3)] == ["ok"] * 3
    for evaluation in range(3):
        key = f"e{evaluation:05d}"
        record = read_json(result_path(run_dir, 0, evaluation))
        assert record["slurm_job"] == before["tasks"][key][0]
    reattached = re.search(r"reattached to (\d) tasks", restarted.stderr)
    reused = re.search(r"reusing (\d) finished tasks", restarted.stderr)
    assert reattached and reused, restarted.stderr[-3000:]
    assert int(reattached[1]) + int(reused[1]) == 3
    for evaluation in range(3):
        devices = read_json(result_path(run_dir, 0, evaluation))["cuda_visible_devices"]
        assert devices is not None and len(devices.split(",")) == 1, devices


def tiny_spec(folder: Path, cache_dir: Path, name: str) -> TaskSpec:
    """A 3-epoch training from scratch of one tiny subnet, on one thread."""
    settings = preset("tiny")
    config = to_plain(build_space(seed=3).sample_configuration())
    return TaskSpec(
        kind="scratch",
        batch=0,
        evaluation=0,
        config=config,
        base_version=None,
        base_supernet=None,
        start_epoch=0,
        end_epoch=3,
        seed=11,
        shard=str(folder / f"{name}.h5"),
        result=str(folder / f"{name}.json"),
        network=settings.network,
        data=settings.data,
        train=dataclasses.replace(settings.train, num_threads=1),
        data_cache_dir=str(cache_dir),
    )


@pytest.mark.usefixtures("slurm_cluster")
def test_a_requeued_task_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dehbws.data import prepare_dataset

    settings = preset("tiny")
    cache_dir = tmp_path / "data"
    prepare_dataset(settings.data, resolution=settings.network.resolution, cache_dir=cache_dir)
    spec = tiny_spec(tmp_path / "slurm", cache_dir, "requeued")
    slow = {"action": "slow_epochs", "kind": "scratch", "evaluation": 0, "seconds": 8}
    monkeypatch.setenv("DEHBWS_FAULT_INJECT", json.dumps([slow]))
    executor = SlurmExecutor(
        SlurmSettings(partition="debug", gpus_per_task=0, cpus_per_task=1, time_min=10),
        tmp_path / "logs",
        run_name="requeue",
        poll_interval_s=1.0,
        sacct_interval_s=3.0,
    )

    outcomes: list[TaskOutcome] = []
    state_dir = tmp_path / "state"
    waiter = threading.Thread(
        target=executor.run_batch, args=([spec], outcomes.append), kwargs={"state_dir": state_dir}
    )
    waiter.start()
    try:
        # Interrupt it while it sleeps after its first epoch, as SLURM's preemption would.
        wait_for("the first epoch's checkpoint", checkpoint_path(spec).exists, 150)
        job_id = read_json(state_dir / JOBS_FILE)["tasks"]["requeued"][0]
        submitit.SlurmJob(folder=tmp_path / "logs", job_id=job_id)._interrupt()
    finally:
        waiter.join(timeout=RUN_TIMEOUT_S)
    assert not waiter.is_alive(), "the executor still waits for the requeued task"

    assert len(outcomes) == 1 and outcomes[0].succeeded, outcomes
    record = outcomes[0].record
    assert record is not None
    assert record["slurm_job"] == job_id
    assert record["restarts"] >= 1
    assert record["resumed_from_epoch"] in (1, 2)
    assert "requeueing, it resumes from its checkpoint" in Path(outcomes[0].log_path).read_text()
    assert not checkpoint_path(spec).exists()

    # The same task without an interruption ends with the same weights and error.
    monkeypatch.delenv("DEHBWS_FAULT_INJECT")
    plain = tiny_spec(tmp_path / "plain", cache_dir, "uninterrupted")
    expected = run_task(plain)
    assert record["valid_error"] == expected["valid_error"]
    resumed_weights = read_tensors(Path(spec.shard))  # type: ignore[arg-type]
    plain_weights = read_tensors(Path(plain.shard))  # type: ignore[arg-type]
    assert resumed_weights.keys() == plain_weights.keys()
    for name, value in plain_weights.items():
        np.testing.assert_array_equal(resumed_weights[name], value, err_msg=name)


@pytest.mark.usefixtures("slurm_cluster")
def test_a_request_sbatch_refuses_exits_2_before_the_run_folder_exists(tmp_path: Path) -> None:
    run_dir = tmp_path / "refused"

    result = run_dehbws(
        "submit", *TINY_SEARCH, "--run-dir", str(run_dir), "--partition", "no-such-partition"
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "sbatch refuses" in result.stderr and "partition" in result.stderr.lower()
    assert not run_dir.exists()


STAND_IN_APPTAINER = """#!/bin/bash
# Stands in for apptainer: notes its arguments, checks the image, runs the command after it.
printf '%s\\n' "$*" >> "{record}"
[[ "$1" == exec ]] || exit 64
shift
while [[ "$1" == --* ]]; do
  if [[ "$1" == --bind ]]; then shift 2; else shift; fi
done
[[ -f "$1" ]] || {{ echo "no image $1" >&2; exit 65; }}
shift
[[ "$1" == python ]] || exit 66
shift
exec "{python}" "$@"
"""


def test_container_tasks_start_through_apptainer_exec(
    gpu_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Apptainer itself cannot be installed here: a stand-in checks the command line the tasks
    # run under srun and starts this Python, so the task really runs through it.
    bin_dir, record = tmp_path / "bin", tmp_path / "apptainer-calls.txt"
    bin_dir.mkdir()
    shim = bin_dir / "apptainer"
    shim.write_text(STAND_IN_APPTAINER.format(record=record, python=sys.executable))
    shim.chmod(0o755)
    image = tmp_path / "dehbws.sif"
    image.write_bytes(b"image")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    settings = SlurmSettings(partition="gpu", gpus_per_task=1, container=str(image))
    executor = SlurmExecutor(settings, tmp_path / "logs", binds=[run_dir])

    job = executor.submitit_executor("dehbws-container").submit(jobs.visible_gpus)

    wait_for("the container task", lambda: job.done(force_check=True), 120, poll_s=1.0)
    assert job.result(), "the task in the container saw no GPU"
    calls = record.read_text().splitlines()
    assert calls == [
        f"exec --nv --bind {tmp_path / 'logs'},{run_dir} {image} python -u -m "
        f"submitit.core._submit {tmp_path / 'logs'}"
    ]
