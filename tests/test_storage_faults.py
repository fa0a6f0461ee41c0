"""A run folder that fills up or turns read-only mid-search: a clear error, then a clean resume.

The run folder lives on a small tmpfs, so the disk really fills while a real tiny search
writes shards and supernet versions. The search must stop with exit code 2 and a message that
says what happened and how to continue; a resume while the folder is read-only must change
nothing; once space is back, the resumed search must end exactly like an uninterrupted one.
Mounting needs root (CI runs as root); elsewhere the tests are skipped with that reason.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

# Big enough for the warm-up and the first rung (about 3 MB), too small for the whole search
# (about 4.5 MB of supernet versions and shards).
SMALL_TMPFS = "3500k"
ROOMY_TMPFS = "64m"
RUN_OPTIONS = [
    "--preset",
    "tiny",
    "--executor",
    "debug",
    "--fevals",
    "5",
    "--finetune-epochs",
    "0",
]


def _dehbws(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from dehbws.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", f"size={SMALL_TMPFS}", "tmpfs", str(mount_point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _remount(mount_point: Path, options: str) -> None:
    result = _mount("-o", f"remount,{options}", str(mount_point))
    assert result.returncode == 0, result.stderr


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _search_results(run_dir: Path) -> list[tuple[Any, ...]]:
    lines = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [
        (line["evaluation"], line["config"], line["fidelity"], line["valid_error"], line["kept"])
        for line in lines
    ]


def _final_supernet(run_dir: Path) -> dict[str, np.ndarray]:
    version = json.loads((run_dir / "state.json").read_text())["supernet_version"]
    with h5py.File(run_dir / "supernet" / f"v{version:04d}.h5", "r", locking=False) as file:
        return {name: file[name][()] for name in file}


def _assert_clear_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("dehbws: error:"), result.stderr
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_full_then_read_only_run_folder_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    reference_dir = tmp_path / "reference"
    reference = _dehbws(
        "run", "--run-dir", str(reference_dir), "--cache-dir", str(cache), *RUN_OPTIONS
    )
    assert reference.returncode == 0, reference.stderr
    run_dir = small_disk / "run"

    # The disk fills mid-search.
    full = _dehbws("run", "--run-dir", str(run_dir), "--cache-dir", str(cache), *RUN_OPTIONS)
    _assert_clear_error(full, "no space left on device", f"--resume {run_dir}")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["batches_done"] >= 2 and not state["finished"], f"no rung committed: {state}"
    committed = (run_dir / "history.jsonl").read_bytes()[: state["history_bytes"]]
    assert committed.count(b"\n") >= 1

    # Read-only: the resume refuses and leaves every file as it was.
    _remount(small_disk, "ro")
    before = _file_digests(run_dir)
    read_only = _dehbws("run", "--resume", str(run_dir))
    _assert_clear_error(read_only, "read-only file system", f"--resume {run_dir}")
    assert _file_digests(run_dir) == before

    # Space is back: the search finishes as if it had never stopped.
    _remount(small_disk, f"rw,size={ROOMY_TMPFS}")
    resumed = _dehbws("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "history.jsonl").read_bytes().startswith(committed)
    assert _search_results(run_dir) == _search_results(reference_dir)
    expected, stored = _final_supernet(reference_dir), _final_supernet(run_dir)
    assert stored.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
