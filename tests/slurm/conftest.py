"""Fixtures for the tests that run against a real SLURM cluster.

Start the development cluster first with `bash slurm/start-dev-cluster.sh`; without it these
tests skip and say so.
"""

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest
import submitit

from . import jobs

START_HINT = "start it with `bash slurm/start-dev-cluster.sh` (as root or with sudo)"
READY_STATES = {"idle", "mixed", "allocated", "completing"}

# The job runs `python -m submitit.core._submit` in the submission folder, where this test
# package may not be importable (or importable under another name); by value it needs no import.
cloudpickle.register_pickle_by_value(jobs)


@dataclass(frozen=True)
class SlurmCluster:
    """What the tests need to know about the running cluster."""

    node: str
    max_array_size: int
    gpus: int


def scontrol_config() -> dict[str, str]:
    """Parse `scontrol show config` into a mapping from setting name to value."""
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    settings = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            settings[name.strip()] = value.strip()
    return settings


def node_gpus(node: str) -> int:
    """How many GPUs (gres `gpu:N`) the node offers; 0 when it has none."""
    gres = subprocess.run(
        ["sinfo", "-h", "-N", "-n", node, "-o", "%G"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    counts = re.findall(r"gpu(?::[\w-]+)?:(\d+)", gres.splitlines()[0] if gres else "")
    return sum(int(count) for count in counts)


def _ready_node() -> tuple[str | None, str]:
    """Return (a node that accepts jobs, "") or (None, why not)."""
    if shutil.which("sinfo") is None:
        return None, "`sinfo` is not installed"
    try:
        answer = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return None, "`sinfo` did not answer within 15 s"
    if answer.returncode != 0:
        return None, f"`sinfo` failed: {answer.stderr.strip()}"
    for line in answer.stdout.splitlines():
        node, _, state = line.partition(" ")
        if state.strip() in READY_STATES:
            return node, ""
    return None, f"no node is idle (sinfo says: {answer.stdout.strip() or 'nothing'})"


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The running development cluster; skips the test when there is none."""
    node, why_not = _ready_node()
    if node is None:
        pytest.skip(f"no SLURM cluster: {why_not}; {START_HINT}")
    return SlurmCluster(
        node=node,
        max_array_size=int(scontrol_config()["MaxArraySize"]),
        gpus=node_gpus(node),
    )


@pytest.fixture
def gpu_cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    """The running cluster, when its node offers GPUs; skips the test otherwise."""
    if slurm_cluster.gpus == 0:
        pytest.skip(
            f"node {slurm_cluster.node} has no GPUs (gres); start the cluster with "
            "`bash slurm/start-dev-cluster.sh --fake-gpus 2`"
        )
    return slurm_cluster


@pytest.fixture
def executor(slurm_cluster: SlurmCluster, tmp_path: Path) -> submitit.AutoExecutor:
    """A SLURM executor on partition debug whose folder is new for every test.

    A fresh folder matters: a wiped cluster starts again at job id 1, and an old result file
    under a reused folder would make a new job look finished.
    """
    auto = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    auto.update_parameters(timeout_min=5, cpus_per_task=1, slurm_partition="debug")
    return auto
