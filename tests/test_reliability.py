"""Faults done to real runs: the coordinator killed at exact moments, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dehbws.faults import KILL_VARIABLE
from dehbws.run_folder import RunFolder
from dehbws.store import read_tensors

# Where to kill the coordinator, one entry per process: a named point and which arrival there.
# Together they cover asking, waiting on tasks, telling, averaging, writing the supernet
# tensor by tensor, appending the history and committing the state.
KILL_PLAN = [
    ("task-done", 1),  # in the warm-up
    ("supernet-tensor", 7),  # halfway through writing the warmed-up supernet
    ("asked", 1),
    ("manifest", 1),
    ("task-done", 1),
    ("task-done", 2),
    ("told", 1),
    ("told", 3),
    ("merge", 1),
    ("supernet-tensor", 3),
    ("supernet-tensor", 30),
    ("history", 1),
    ("committed", 1),
    ("asked", 1),
    ("task-done", 1),
    ("told", 1),
    ("merge", 1),
    ("history", 1),
    ("asked", 2),
    ("manifest", 1),
    ("task-done", 2),
    ("supernet-tensor", 1),
    ("committed", 2),
    ("told", 2),
    ("merge", 2),
]


def _dehbws(run_dir: Path, *args: str, kill_at: str | None = None) -> int:
    environment = dict(os.environ)
    environment.pop(KILL_VARIABLE, None)
    if kill_at is not None:
        environment[KILL_VARIABLE] = kill_at
    result = subprocess.run(
        [sys.executable, "-m", "dehbws.cli", "run", "--executor", "debug", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(result.stderr)
    return result.returncode


def _task_seconds(folder: RunFolder) -> dict[str, float]:
    return {
        str(path): json.loads(path.read_text())["task_seconds"]
        for path in folder.root.glob("batches/*/results/*.json")
        if "task_seconds" in json.loads(path.read_text())
    }


def _strip(line: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in line.items() if key != "train_seconds"}


def test_killed_at_many_moments_the_run_ends_as_if_uninterrupted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # The reference runs in a fresh process too, as every killed run does, so that nothing an
    # earlier test left in this process (torch's thread count, say) can change its numbers.
    reference = RunFolder(tmp_path / "reference")
    code = _dehbws(
        reference.root,
        "--preset",
        "tiny",
        "--run-dir",
        str(reference.root),
        "--cache-dir",
        str(cache),
    )
    assert code == 0

    run_dir = tmp_path / "killed"
    folder = RunFolder(run_dir)
    kills = 0
    finished_tasks: dict[str, float] = {}
    first = True
    for point, count in KILL_PLAN:
        args = (
            ["--preset", "tiny", "--run-dir", str(run_dir)]
            if first
            else ["--resume", str(run_dir)]
        )
        code = _dehbws(run_dir, *args, "--cache-dir", str(cache), kill_at=f"{point}:{count}")
        first = False
        kills += code == -signal.SIGKILL

        # A task that had finished is never trained again.
        now = _task_seconds(folder)
        for path, seconds in finished_tasks.items():
            assert now.get(path) == seconds, f"{path} was retrained"
        finished_tasks = now
        if code == 0:
            break

    if not folder.load_state().finished:
        assert _dehbws(run_dir, "--resume", str(run_dir), "--cache-dir", str(cache)) == 0
    assert kills >= 20

    # Same history, every evaluation once, and the same unbroken chain of supernets.
    history = folder.read_history()
    assert [line["evaluation"] for line in history] == list(range(8))
    assert [_strip(line) for line in history] == [_strip(x) for x in reference.read_history()]
    last = reference.load_state().supernet_version
    assert folder.load_state().supernet_version == last
    assert sorted(p.name for p in (run_dir / "supernet").iterdir()) == [
        f"v{v:04d}.h5" for v in range(last + 1)
    ]
    for version in range(last + 1):
        expected = read_tensors(reference.supernet_path(version))
        actual = read_tensors(folder.supernet_path(version))
        assert expected.keys() == actual.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(actual[name], value, err_msg=f"v{version} {name}")
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"
