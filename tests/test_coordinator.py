"""The search loop on real data with the debug executor: bookkeeping, merging and resume."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Crash, CrashAfter, tiny_settings

from dehbws.coordinator import BatchFailedError, Coordinator
from dehbws.executors import DebugExecutor
from dehbws.executors.base import Executor, OnDone, TaskOutcome
from dehbws.run_folder import RunFolder
from dehbws.store import ShardInput, merge_shards, read_tensors
from dehbws.task import TaskSpec

HISTORY_KEYS = {
    "config",
    "config_id",
    "bracket",
    "rung",
    "fidelity",
    "epochs_trained",
    "valid_error",
    "cost",
    "train_seconds",
    "status",
    "base_version",
    "shard",
    "kept",
    "merged_into",
}


class Recording(Executor):
    """Debug execution that remembers which evaluations it ran."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.ran: list[tuple[str, int]] = []
        self.fail = fail or set()
        self.inner = DebugExecutor()

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        for spec in specs:
            self.ran.append((spec.kind, spec.evaluation))
            if spec.kind == "search" and spec.evaluation in self.fail:
                on_done(TaskOutcome(spec, None, error="RuntimeError: injected"))
            else:
                self.inner.run([spec], on_done)


def _run(folder: RunFolder, executor: Executor, cache: Path) -> dict[str, Any]:
    return Coordinator(folder, executor, data_cache_dir=cache).run()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunFolder, Path]:
    """One uninterrupted tiny search, shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("finished")
    folder = RunFolder(root / "run")
    folder.create(tiny_settings())
    _run(folder, DebugExecutor(), root / "cache")
    return folder, root / "cache"


def test_history_has_one_complete_line_per_evaluation(
    finished_run: tuple[RunFolder, Path],
) -> None:
    folder, _ = finished_run
    history = folder.read_history()
    settings = folder.load_settings()

    assert [line["evaluation"] for line in history] == list(range(settings.search.fevals))
    for line in history:
        assert set(line) >= HISTORY_KEYS
        assert line["cost"] == line["epochs_trained"] == line["fidelity"] - line["start_epoch"]
        assert line["status"] == "ok" and 0.0 <= line["valid_error"] <= 1.0
        assert (folder.root / line["shard"]).exists()
        assert line["merged_into"] in (None, line["batch"] + 1)
        assert line["base_version"] == line["batch"]
        if line["merged_into"] is not None:
            assert line["kept"]


def test_supernet_versions_equal_the_merge_of_kept_shards(
    finished_run: tuple[RunFolder, Path], tmp_path: Path
) -> None:
    folder, _ = finished_run
    state = folder.load_state()
    history = folder.read_history()
    assert state.supernet_version == state.batches_done

    for version in range(2, state.supernet_version + 1):
        merged = [line for line in history if line["merged_into"] == version]
        recomputed = tmp_path / f"v{version}.h5"
        merge_shards(
            folder.supernet_path(version - 1),
            [
                ShardInput(folder.root / line["shard"], folder.supernet_path(version - 1))
                for line in merged
            ],
            recomputed,
            {},
        )
        stored = read_tensors(folder.supernet_path(version))
        for name, value in read_tensors(recomputed).items():
            np.testing.assert_array_equal(stored[name], value)


def test_unused_tensors_keep_their_value(finished_run: tuple[RunFolder, Path]) -> None:
    folder, _ = finished_run
    history = folder.read_history()
    version = history[0]["batch"] + 1
    before = read_tensors(folder.supernet_path(version - 1))
    after = read_tensors(folder.supernet_path(version))
    used: set[str] = set()
    for line in history:
        if line["merged_into"] == version:
            used |= set(read_tensors(folder.root / line["shard"]))

    assert used, "the first rung merged nothing"
    for name in set(before) - used:
        np.testing.assert_array_equal(before[name], after[name])
    assert any(not np.array_equal(before[name], after[name]) for name in used)


def test_result_names_the_max_fidelity_incumbent(finished_run: tuple[RunFolder, Path]) -> None:
    folder, _ = finished_run
    result = json.loads(folder.result_file.read_text())
    history = folder.read_history()
    top = [line for line in history if line["fidelity"] == 3]

    assert (
        result["incumbent"]["evaluation"] == min(top, key=lambda x: x["valid_error"])["evaluation"]
    )
    assert result["fevals"] == len(history)
    warmup = folder.load_settings().search
    assert result["epochs_spent"] == sum(line["epochs_trained"] for line in history) + (
        warmup.warmup_epochs * warmup.warmup_subnets
    )


@pytest.mark.parametrize("crash_after", [0, 1, 4])
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    finished_run: tuple[RunFolder, Path], new_run: Any, crash_after: int
) -> None:
    reference, cache = finished_run
    folder = new_run(reference.load_settings())

    with pytest.raises(Crash):
        _run(folder, CrashAfter(crash_after), cache)
    recording = Recording()
    _run(folder, recording, cache)

    # Nothing that finished before the crash ran again.
    finished_before = crash_after + 1  # the task whose report the crash interrupted is done
    assert len(recording.ran) == 2 + 8 - finished_before  # warm-up subnets + evaluations

    def strip(line: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in line.items() if k != "train_seconds"}

    assert [strip(x) for x in folder.read_history()] == [
        strip(x) for x in reference.read_history()
    ]
    last = reference.load_state().supernet_version
    assert folder.load_state().supernet_version == last
    expected, actual = (
        read_tensors(reference.supernet_path(last)),
        read_tensors(folder.supernet_path(last)),
    )
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value)


def test_failed_tasks_are_retried_then_recorded_and_never_merged(
    finished_run: tuple[RunFolder, Path], new_run: Any
) -> None:
    _, cache = finished_run
    folder = new_run(tiny_settings(max_retries=2, warmup_epochs=0))
    executor = Recording(fail={1})

    _run(folder, executor, cache)

    assert executor.ran.count(("search", 1)) == 3
    line = folder.read_history()[1]
    assert line["status"] == "failed" and line["valid_error"] is None
    assert line["fitness"] == 1.0 and line["merged_into"] is None and line["shard"] is None
    assert "injected" in line["error"]


def test_a_batch_where_every_task_fails_stops_the_run(
    finished_run: tuple[RunFolder, Path], new_run: Any
) -> None:
    _, cache = finished_run
    folder = new_run(tiny_settings(max_retries=0, warmup_epochs=0))

    with pytest.raises(BatchFailedError, match="all 3 tasks of batch 0 failed"):
        _run(folder, Recording(fail={0, 1, 2}), cache)
    assert folder.read_history() == []
    assert folder.load_state().batches_done == 0

    _run(folder, Recording(), cache)  # fixed: the run continues
    assert len(folder.read_history()) == 8


def test_a_corrupt_shard_is_rerun(finished_run: tuple[RunFolder, Path], new_run: Any) -> None:
    _, cache = finished_run
    folder = new_run(tiny_settings(warmup_epochs=0))
    with pytest.raises(Crash):
        _run(folder, CrashAfter(2), cache)
    shard = folder.shard_path(0, 0)
    shard.write_bytes(shard.read_bytes()[:100])

    recording = Recording()
    _run(folder, recording, cache)
    assert ("search", 0) in recording.ran and ("search", 1) not in recording.ran


def test_vanilla_dehb_trains_every_evaluation_from_scratch(
    finished_run: tuple[RunFolder, Path], new_run: Any
) -> None:
    _, cache = finished_run
    folder = new_run(tiny_settings(method="dehb"))

    result = _run(folder, Recording(), cache)

    history = folder.read_history()
    assert len(history) == 8
    for line in history:
        assert line["start_epoch"] == 0 and line["epochs_trained"] == line["fidelity"]
        assert line["base_version"] is None and line["shard"] is None
        assert line["merged_into"] is None
    assert not (folder.root / "supernet").exists()
    assert result["supernet"] is None
    assert result["epochs_spent"] == sum(line["fidelity"] for line in history)


def test_in_process_tasks_leave_torch_threads_as_they_were(
    finished_run: tuple[RunFolder, Path], new_run: Any
) -> None:
    _, cache = finished_run
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    settings = tiny_settings(fevals=2, warmup_epochs=0, finetune_epochs=0)
    folder = new_run(
        dataclasses.replace(
            settings, train=dataclasses.replace(settings.train, num_threads=wanted)
        )
    )

    _run(folder, DebugExecutor(), cache)

    # Each task set its own thread count; the process got its own back.
    assert all(line["status"] == "ok" for line in folder.read_history())
    assert torch.get_num_threads() == before
