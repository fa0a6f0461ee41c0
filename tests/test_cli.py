"""The command line as a user meets it: clear errors with exit code 2, and a real search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dehbws.run_folder import RunFolder


def dehbws(
    *args: str, cwd: Path | None = None, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dehbws.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout_s,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--preset", "huge"], ["'huge'", "smoke"]),
        (["--eta", "1"], ["eta is 1", ">= 2"]),
        (["--min-epochs", "9", "--max-epochs", "3"], ["min_epochs is 9", "--max-epochs"]),
        (["--fevals", "-5"], ["fevals is -5"]),
        (["--subset-fraction", "0"], ["subset_fraction is 0"]),
        (["--max-epochs", "500", "--min-epochs", "50"], ["max_epochs is 500", "schedule"]),
        (["--split", "mine"], ["mine"]),
    ],
)
def test_bad_settings_exit_2_without_traceback(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    run_dir = tmp_path / "run"
    assert_user_error(dehbws("run", "--run-dir", str(run_dir), *args), *fragments)
    assert not run_dir.exists()


def test_a_foreign_run_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    RunFolder(run_dir).create(__import__("dehbws.presets").presets.preset("tiny"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    assert_user_error(
        dehbws("run", "--run-dir", str(run_dir), "--preset", "smoke"),
        "belongs to another run",
        "--resume",
    )
    assert_user_error(
        dehbws("run", "--run-dir", str(run_dir), "--preset", "tiny"),
        "already holds this run",
        "--resume",
    )
    assert_user_error(
        dehbws("run", "--resume", str(run_dir), "--fevals", "3"), "keeps its settings"
    )
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_folder_that_is_no_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert_user_error(dehbws("run", "--run-dir", str(tmp_path)), "not empty")
    assert_user_error(dehbws("run", "--resume", str(tmp_path)), "not a dehbws run folder")
    assert_user_error(dehbws("status", str(tmp_path)), "not a dehbws run folder")
    assert_user_error(dehbws("run", "--preset", "tiny"), "--run-dir")


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    result = dehbws(
        "run",
        "--preset",
        "tiny",
        "--run-dir",
        str(tmp_path / "run"),
        "--data-dir",
        str(tmp_path / "nowhere"),
    )
    assert_user_error(result, "nowhere", "dataset-fashion-mnist")


def test_a_second_coordinator_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    folder = RunFolder(run_dir)
    folder.create(__import__("dehbws.presets").presets.preset("tiny"))
    with folder.lock():
        assert_user_error(dehbws("run", "--resume", str(run_dir)), "in use by pid")


def test_smoke_search_through_the_cli_survives_a_kill(tmp_path: Path) -> None:
    """A real search on real data with the local executor, killed once and resumed."""
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "dehbws.cli",
        "run",
        "--preset",
        "tiny",
        "--executor",
        "local",
        "--run-dir",
        str(run_dir),
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Kill the coordinator as soon as the first rung is committed (the warm-up is batch 0).
    history = run_dir / "history.jsonl"
    state_path = run_dir / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if state_path.exists() and json.loads(state_path.read_text())["batches_done"] >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read() if process.stdout else ""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    committed_bytes = json.loads(state_path.read_text())["history_bytes"]
    committed = history.read_bytes()[:committed_bytes].decode().splitlines()
    assert committed, "the first rung was committed before the kill"

    resumed = dehbws("run", "--resume", str(run_dir), "--executor", "local")
    assert resumed.returncode == 0, resumed.stderr

    # The committed evaluations were kept as they were, not trained again.
    assert history.read_text().splitlines()[: len(committed)] == committed
    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert [record["evaluation"] for record in records] == list(range(8))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["incumbent"]["fidelity"] == 3
    assert 0.0 <= result["finetune"]["finetune-1"]["test_accuracy"] <= 1.0

    status = dehbws("status", str(run_dir))
    assert status.returncode == 0
    assert "evaluations:  8 of 8" in status.stdout and "finetune-1" in status.stdout

    scratch = dehbws(
        "finetune", str(run_dir), "--epochs", "1", "--from-scratch", "--executor", "debug"
    )
    assert scratch.returncode == 0, scratch.stderr
    assert "test accuracy" in scratch.stdout
