"""Tasks that fail in every way a cluster makes them fail, on a real tiny search.

The local executor runs each task as its own process; DEHBWS_FAULT_INJECT makes chosen tasks
raise, hang past their time limit, get killed mid-training, or end "successfully" with a
truncated, bit-rotted, incomplete or NaN shard. Each must be retried, then recorded as failed,
and nothing it wrote may reach the supernet: every supernet version is recomputed here from
the accepted shards with plain h5py and numpy and compared.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import tiny_settings

from dehbws.coordinator import Coordinator
from dehbws.executors.local import LocalExecutor
from dehbws.run_folder import RunFolder
from dehbws.task_faults import FAULT_VARIABLE

# (kind, batch, evaluation, action, times): with max_retries=1 a fault that fires twice makes
# the evaluation fail for good.
FAULTS = [
    ("warmup", 0, 0, "nan_weights", 1),
    ("warmup", 0, 1, "corrupt_shard", 1),
    ("warmup", 0, 2, "drop_tensor", 1),
    ("search", 1, 0, "raise", 1),
    ("search", 1, 1, "truncate_shard", 2),
    ("search", 1, 2, "hang", 1),
    ("search", 2, 3, "kill_mid_training", 1),
]
TIMEOUT_MIN = 0.5


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, read without dehbws."""
    with h5py.File(path, "r", locking=False) as file:
        return {name: file[name][()] for name in file}


def _masked_mean(base: dict[str, np.ndarray], shards: list[dict[str, np.ndarray]]) -> dict:
    """Each tensor: base plus the mean change over the shards that hold it."""
    expected = {}
    for name, value in base.items():
        users = [shard[name] for shard in shards if name in shard]
        if not users:
            expected[name] = value
            continue
        delta = sum(u.astype(np.float64) - value.astype(np.float64) for u in users) / len(users)
        mean = value.astype(np.float64) + delta
        expected[name] = np.rint(mean).astype(value.dtype) if value.dtype.kind in "iu" else mean
    return expected


def _starts(folder: RunFolder, kind: str, batch: int, evaluation: int) -> int:
    counter = folder.result_path(batch, evaluation).with_suffix(".faults")
    return int(counter.read_text()) if counter.exists() else 0


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faulty")
    folder = RunFolder(root / "run")
    folder.create(tiny_settings(fevals=4, warmup_subnets=3, max_retries=1))
    faults = [
        {"kind": kind, "batch": batch, "evaluation": evaluation, "action": action, "times": times}
        for kind, batch, evaluation, action, times in FAULTS
    ]
    executor = LocalExecutor(
        folder.task_log_dir, max_parallel=2, timeout_min=TIMEOUT_MIN, poll_interval_s=0.2
    )

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(FAULT_VARIABLE, json.dumps(faults))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dehbws").addHandler(handler)
    try:
        result = Coordinator(folder, executor, data_cache_dir=root / "cache").run()
    finally:
        logging.getLogger("dehbws").removeHandler(handler)
        monkeypatch.undo()
    return {"folder": folder, "result": result, "messages": messages}


def test_every_faulty_task_was_retried_and_the_run_finished(faulty_run: dict[str, Any]) -> None:
    folder: RunFolder = faulty_run["folder"]
    for kind, batch, evaluation, action, _times in FAULTS:
        assert _starts(folder, kind, batch, evaluation) == 2, (kind, evaluation, action)

    history = folder.read_history()
    assert [line["evaluation"] for line in history] == [0, 1, 2, 3]
    assert folder.load_state().finished
    assert faulty_run["result"]["incumbent"] is not None


def test_a_task_that_keeps_failing_is_recorded_failed_with_its_reason(
    faulty_run: dict[str, Any],
) -> None:
    folder: RunFolder = faulty_run["folder"]
    by_evaluation = {line["evaluation"]: line for line in folder.read_history()}

    failed = by_evaluation[1]
    assert failed["status"] == "failed" and failed["fitness"] == 1.0
    assert failed["shard"] is None and failed["merged_into"] is None
    assert "unusable result" in failed["error"] and "e00001.h5" in failed["error"]
    assert not folder.shard_path(1, 1).exists(), "the damaged shard was left in place"
    for evaluation in (0, 2, 3):
        assert by_evaluation[evaluation]["status"] == "ok"


def test_hung_and_killed_tasks_were_stopped_and_resumed(faulty_run: dict[str, Any]) -> None:
    folder: RunFolder = faulty_run["folder"]
    messages = faulty_run["messages"]

    assert any("runs longer than" in m and "e00002" in m for m in messages), messages
    killed = json.loads(folder.result_path(2, 3).read_text())
    # Killed after its first epoch, the retry continued from that epoch's checkpoint.
    assert killed["status"] == "ok" and killed["resumed_from_epoch"] == 2
    rejected = [m for m in messages if "unusable result" in m]
    for reason in ("non-finite", "cannot be read back", "missing", "cannot be read as HDF5"):
        assert any(reason in m for m in rejected), (reason, rejected)


def test_supernets_are_the_masked_mean_of_accepted_shards_only(
    faulty_run: dict[str, Any],
) -> None:
    folder: RunFolder = faulty_run["folder"]
    warmup = [json.loads(line) for line in folder.warmup_path.read_text().splitlines()]
    lines = warmup + folder.read_history()
    last = folder.load_state().supernet_version
    assert last == 3

    for version in range(1, last + 1):
        merged = [line for line in lines if line.get("merged_into") == version]
        assert all(line["status"] == "ok" for line in merged)
        base = _tensors(folder.supernet_path(version - 1))
        expected = _masked_mean(base, [_tensors(folder.root / line["shard"]) for line in merged])
        stored = _tensors(folder.supernet_path(version))
        assert stored.keys() == base.keys()
        for name, value in stored.items():
            assert np.all(np.isfinite(value)), f"v{version} {name} is not finite"
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert len([line for line in warmup if line["merged_into"] == 1]) == 3
