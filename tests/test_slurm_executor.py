"""The SLURM executor's parts that need no cluster: settings, the sbatch request, array splits,
the job store, and the mistakes `dehbws submit` turns into exit code 2.

What needs a real cluster is in tests/slurm/test_submit.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from dehbws.errors import UserError
from dehbws.executors import make_executor
from dehbws.executors.slurm import (
    JobStore,
    SlurmExecutor,
    _raised,
    parse_max_array_size,
    task_submission_environment,
)
from dehbws.executors.slurm_settings import (
    EXECUTOR_FILE,
    SlurmSettings,
    container_python,
    load_slurm_settings,
    mem_flag,
    parse_sbatch_args,
    save_slurm_settings,
    sbatch_parameters,
    split_array,
)

# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"gpus_per_task": -1}, ["gpus_per_task is -1", "--gpus-per-task"]),
        ({"time_min": 0}, ["time_min is 0", ">= 1", "--time-min"]),
        ({"cpus_per_task": 0}, ["cpus_per_task is 0", "--cpus-per-task"]),
        ({"array_parallelism": 0}, ["array_parallelism is 0", "--array-parallelism"]),
        ({"mem_gb": 0}, ["mem_gb is 0", "--mem-gb 16"]),
        ({"mem_gb": True}, ["mem_gb is True"]),
        ({"partition": " "}, ["partition is ' '", "--partition"]),
        ({"device": "tpu"}, ["device is 'tpu'", "cpu", "cuda"]),
        ({"device": "cuda", "gpus_per_task": 0}, ["'cuda'", "gpus_per_task is 0"]),
        ({"sbatch_args": {"partition": "x"}}, ["'partition'", "use --partition instead"]),
        ({"sbatch_args": {"output": "x"}}, ["'output'", "dehbws sets it itself"]),
    ],
)
def test_bad_settings_name_the_value_and_the_fix(
    changes: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(UserError) as caught:
        SlurmSettings(**changes)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_the_tasks_train_on_their_gpu_unless_told_otherwise() -> None:
    assert SlurmSettings().task_device == "cuda"
    assert SlurmSettings(gpus_per_task=0).task_device == "cpu"
    assert SlurmSettings(gpus_per_task=2, device="cpu").task_device == "cpu"


def test_replace_keeps_what_is_not_given() -> None:
    stored = SlurmSettings(partition="gpu", time_min=30, qos="high")

    resumed = stored.replace(time_min=90, partition=None, qos=None)

    assert (resumed.partition, resumed.time_min, resumed.qos) == ("gpu", 90, "high")


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["constraint=a100"], {"constraint": "a100"}),
        (["--exclude=node[1-3]", "mail-type=END"], {"exclude": "node[1-3]", "mail-type": "END"}),
        (["comment=a=b"], {"comment": "a=b"}),
        ([], {}),
    ],
)
def test_sbatch_args_are_key_value_pairs(pairs: list[str], expected: dict[str, str]) -> None:
    assert parse_sbatch_args(pairs) == expected


@pytest.mark.parametrize(
    ("pair", "fragment"),
    [
        ("constraint", "KEY=VALUE"),
        ("=a100", "KEY=VALUE"),
        ("time=10", "use --time-min instead"),
        ("array=0-3", "use --array-parallelism instead"),
        ("gpus_per_task=2", "use --gpus-per-task instead"),
        ("bad key=1", "letters, digits"),
    ],
)
def test_bad_sbatch_args_are_refused(pair: str, fragment: str) -> None:
    with pytest.raises(UserError, match="--sbatch-arg") as caught:
        parse_sbatch_args([pair])
    assert fragment in str(caught.value)


def test_settings_round_trip_through_the_run_folder(tmp_path: Path) -> None:
    settings = SlurmSettings(
        partition="gpu",
        gpus_per_task=2,
        mem_gb=12.5,
        sbatch_args={"constraint": "a100"},
        device="cpu",
    )
    assert load_slurm_settings(tmp_path) is None

    save_slurm_settings(tmp_path, settings)

    assert load_slurm_settings(tmp_path) == settings


def test_a_hand_edited_executor_file_with_unknown_keys_is_refused(tmp_path: Path) -> None:
    (tmp_path / EXECUTOR_FILE).write_text('{"executor": "slurm", "slurm": {"gpu": 1}}')

    with pytest.raises(UserError, match=r"unknown keys \['gpu'\]"):
        load_slurm_settings(tmp_path)


# -- the sbatch request --------------------------------------------------------------------------


def sbatch_script(settings: SlurmSettings, tasks: int = 5, parallelism: int = 2) -> str:
    """The script submitit writes for an array of `tasks` tasks with these settings."""
    return _make_sbatch_string(
        command="python -m submitit.core._submit /logs",
        folder="/logs",
        job_name="dehbws-test",
        map_count=tasks,
        array_parallelism=parallelism,
        **sbatch_parameters(settings),
    )


def test_the_sbatch_script_asks_for_one_task_with_its_gpus() -> None:
    settings = SlurmSettings(
        partition="gpu",
        gpus_per_task=1,
        cpus_per_task=4,
        mem_gb=16,
        time_min=90,
        account="proj",
        qos="normal",
        sbatch_args={"constraint": "a100"},
    )

    lines = set(sbatch_script(settings).splitlines())

    for expected in [
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --nodes=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16G",
        "#SBATCH --time=90",
        "#SBATCH --account=proj",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint=a100",
        "#SBATCH --array=0-4%2",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --output=/logs/%A_%a_0_log.out",
        "#SBATCH --error=/logs/%A_%a_0_log.err",
        "export HDF5_USE_FILE_LOCKING=FALSE",
    ]:
        assert expected in lines, expected


def test_a_cpu_request_names_no_gpus_and_leaves_defaults_to_the_cluster() -> None:
    script = sbatch_script(SlurmSettings(gpus_per_task=0))

    assert "gpus" not in script
    for option in ("--partition", "--mem=", "--cpus-per-task", "--account", "--qos"):
        assert option not in script, option


@pytest.mark.parametrize(("mem_gb", "flag"), [(16, "16G"), (16.0, "16G"), (1.5, "1536M")])
def test_memory_is_whole_gigabytes_or_megabytes(mem_gb: float, flag: str) -> None:
    assert mem_flag(mem_gb) == flag


def test_container_tasks_start_python_inside_the_image(tmp_path: Path) -> None:
    run_dir = tmp_path / "my run"

    gpu = container_python("/img/dehbws.sif", gpus=1, binds=[run_dir, tmp_path / "data"])
    cpu = container_python("/img/dehbws.sif", gpus=0)

    assert gpu == (
        f"apptainer exec --nv --bind '{tmp_path / 'data'},{run_dir}' /img/dehbws.sif python"
    )
    assert cpu == "apptainer exec /img/dehbws.sif python"


def test_the_executor_binds_its_log_folder_into_the_container(tmp_path: Path) -> None:
    settings = SlurmSettings(container="/img/dehbws.sif", gpus_per_task=0)
    executor = SlurmExecutor(settings, tmp_path / "logs", binds=[tmp_path / "run"])

    assert executor.python == (
        f"apptainer exec --bind {tmp_path / 'logs'},{tmp_path / 'run'} /img/dehbws.sif python"
    )
    assert SlurmExecutor(SlurmSettings(), tmp_path).python is None


@pytest.mark.parametrize(
    ("count", "max_array_size", "sizes"),
    [(0, 1001, []), (5, 1001, [5]), (1001, 1001, [1001]), (2500, 1001, [1001, 1001, 498])],
)
def test_split_array_covers_every_task_once_within_max_array_size(
    count: int, max_array_size: int, sizes: list[int]
) -> None:
    parts = split_array(count, max_array_size)

    assert [len(part) for part in parts] == sizes
    assert [index for part in parts for index in part] == list(range(count))


def test_split_array_refuses_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="max_array_size is 0"):
        split_array(3, 0)


def test_max_array_size_is_read_from_scontrol_output() -> None:
    config = "ClusterName = dev\nMaxArraySize            = 4\nMaxJobCount = 10000\n"

    assert parse_max_array_size(config) == 4
    assert parse_max_array_size("nothing here") == 1001


# -- the job store and outcomes -------------------------------------------------------------------


def test_the_job_store_keeps_every_attempt_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "batches" / "0001" / "jobs.json"
    path.parent.mkdir(parents=True)
    store = JobStore(path)
    assert store.values == {"arrays": [], "tasks": {}}

    store.record("41", {"e00003": "41_0", "e00004": "41_1"}, job_name="dehbws-r-b0001")
    store.record("57", {"e00004": "57_0"}, job_name="dehbws-r-b0001")

    reread = JobStore(path)
    assert reread.values["tasks"] == {"e00003": ["41_0"], "e00004": ["41_1", "57_0"]}
    assert [(a["array_job_id"], a["tasks"]) for a in reread.values["arrays"]] == [
        ("41", 2),
        ("57", 1),
    ]
    assert all(a["job_name"] == "dehbws-r-b0001" for a in reread.values["arrays"])
    assert not list(path.parent.glob("*.tmp")), "the store was not written atomically"


def test_the_error_line_of_a_task_log_is_its_exception() -> None:
    log = [
        "Traceback (most recent call last):",
        '  File "task.py", line 3, in run_task',
        "dehbws.task_faults.InjectedFault: injected fault in search e00001 of batch 0",
        "srun: error: vm: task 0: Exited with exit code 1",
    ]

    assert _raised(log) == (
        "dehbws.task_faults.InjectedFault: injected fault in search e00001 of batch 0"
    )
    assert "see its log" in _raised(["srun: error: task 0: Killed"])


def test_make_executor_sends_a_slurm_run_to_dehbws_submit(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dehbws submit --resume"):
        make_executor("slurm", log_dir=tmp_path)

    executor = make_executor("slurm", log_dir=tmp_path, slurm=SlurmSettings(gpus_per_task=0))

    assert isinstance(executor, SlurmExecutor)


# -- `dehbws submit` mistakes ---------------------------------------------------------------------


def submit(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dehbws.cli", "submit", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--gpus-per-task", "-1"], ["gpus_per_task is -1"]),
        (["--mem-gb", "0"], ["mem_gb is 0"]),
        (["--sbatch-arg", "constraint"], ["KEY=VALUE"]),
        (["--sbatch-arg", "time=30"], ["use --time-min instead"]),
        (["--executor", "local"], ["--executor is not an option of `dehbws submit`"]),
        (["--max-parallel", "2"], ["--array-parallelism"]),
        (["--container", "/no/such/image.sif"], ["'/no/such/image.sif'", "apptainer build"]),
        (["--device", "cuda", "--gpus-per-task", "0"], ["gpus_per_task is 0"]),
        (["--preset", "huge"], ["'huge'", "smoke"]),
        (["--eta", "1"], ["eta is 1"]),
    ],
)
def test_bad_submit_options_exit_2_before_the_run_folder_exists(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    run_dir = tmp_path / "run"

    result = submit("--run-dir", str(run_dir), *args)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not run_dir.exists()


def test_submit_needs_exactly_one_of_run_dir_and_resume(tmp_path: Path) -> None:
    neither = submit("--preset", "tiny")
    empty = submit("--resume", str(tmp_path))

    assert neither.returncode == 2 and "exactly one of --run-dir" in neither.stderr
    assert empty.returncode == 2 and "holds no run" in empty.stderr
    assert "Traceback" not in neither.stderr + empty.stderr


def test_submit_without_sbatch_says_where_to_run_it(tmp_path: Path) -> None:
    # Only Python's own folder on PATH: no sbatch, as on a laptop.
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    run_dir = tmp_path / "run"

    result = submit("--preset", "tiny", "--run-dir", str(run_dir), env=env)

    assert result.returncode == 2, result.stderr
    assert "sbatch is not on PATH" in result.stderr and "dehbws run" in result.stderr
    assert not run_dir.exists()


def test_tasks_do_not_inherit_the_allocation_of_a_coordinator_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "SLURM_JOB_ID": "48",
        "SLURM_MEM_PER_NODE": "2048",
        "SLURMD_NODENAME": "vm",
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "SBATCH_ACCOUNT": "proj",
    }.items():
        monkeypatch.setenv(name, value)

    env = task_submission_environment()

    assert "SLURM_JOB_ID" not in env and "SLURM_MEM_PER_NODE" not in env
    assert "SLURMD_NODENAME" not in env
    assert env["SLURM_CONF"] == "/etc/slurm/slurm.conf" and env["SBATCH_ACCOUNT"] == "proj"
    assert env["PATH"] == os.environ["PATH"]
    assert os.environ["SLURM_MEM_PER_NODE"] == "2048", "the coordinator's own view changed"
