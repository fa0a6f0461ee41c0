"""Per-epoch task checkpoints: a task stopped after any epoch ends exactly as one never stopped.

The stop is real: the task runs with the real data and network and is interrupted right after a
checkpoint is written, as a requeued SLURM task is; it is then started again with the same spec.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dehbws.task as task_module
from dehbws.data import prepare_dataset
from dehbws.presets import preset
from dehbws.space import build_space, to_plain
from dehbws.store import read_tensors
from dehbws.task import TaskSpec, run_task
from dehbws.task_checkpoint import (
    TrainingState,
    checkpoint_path,
    load_training_state,
    save_training_state,
)

EPOCHS = 3


class Stopped(Exception):
    """Stands for the end of a process that was preempted after a checkpoint."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = preset("tiny")
    folder = tmp_path_factory.mktemp("checkpoint-data")
    prepare_dataset(settings.data, resolution=settings.network.resolution, cache_dir=folder)
    return folder


def make_spec(folder: Path, cache_dir: Path, name: str, **changes: Any) -> TaskSpec:
    """A 3-epoch training from scratch of one tiny subnet with TrivialAugment, on one thread."""
    settings = preset("tiny")
    config = to_plain(build_space(seed=3).sample_configuration())
    config["TrivialAugment"] = True
    spec = TaskSpec(
        kind="scratch",
        batch=0,
        evaluation=0,
        config=config,
        base_version=None,
        base_supernet=None,
        start_epoch=0,
        end_epoch=EPOCHS,
        seed=11,
        shard=str(folder / f"{name}.h5"),
        result=str(folder / f"{name}.json"),
        network=settings.network,
        data=settings.data,
        train=dataclasses.replace(settings.train, num_threads=1),
        data_cache_dir=str(cache_dir),
    )
    return dataclasses.replace(spec, **changes)


def stop_after_checkpoints(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make the task stop right after its `count`-th checkpoint is on disk."""
    save = task_module.save_training_state
    saved: list[int] = []

    def save_then_stop(spec: TaskSpec, state: TrainingState) -> None:
        save(spec, state)
        saved.append(state.next_epoch)
        if len(saved) == count:
            raise Stopped(f"stopped after epoch {state.next_epoch - 1}")

    monkeypatch.setattr(task_module, "save_training_state", save_then_stop)


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    spec = make_spec(tmp_path_factory.mktemp("uninterrupted"), cache_dir, "plain")
    record = run_task(spec)
    assert record["status"] == "ok"
    return record, read_tensors(Path(spec.shard or ""))


@pytest.mark.parametrize("stopped_after", [1, 2])
def test_a_resumed_task_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    uninterrupted: tuple[dict[str, Any], dict[str, np.ndarray]],
    stopped_after: int,
) -> None:
    spec = make_spec(tmp_path, cache_dir, "resumed")
    stop_after_checkpoints(monkeypatch, stopped_after)
    with pytest.raises(Stopped):
        run_task(spec)
    assert not Path(spec.result).exists()
    assert load_training_state(spec) is not None
    monkeypatch.undo()

    record = run_task(spec)

    expected_record, expected_weights = uninterrupted
    assert record["resumed_from_epoch"] == stopped_after
    assert record["valid_error"] == expected_record["valid_error"]
    assert record["images_seen"] == expected_record["images_seen"]
    weights = read_tensors(Path(spec.shard or ""))
    assert weights.keys() == expected_weights.keys()
    for name, value in expected_weights.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    assert not checkpoint_path(spec).exists(), "the checkpoint outlived the result"


def test_a_checkpoint_of_another_task_is_ignored(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = make_spec(tmp_path, cache_dir, "task")
    other = dataclasses.replace(spec, seed=spec.seed + 1)
    save_training_state(other, TrainingState(2, {"w": torch.ones(2)}, {}, 1.0, 10))

    with caplog.at_level(logging.WARNING):
        assert load_training_state(spec) is None
    assert "of another task" in caplog.text
    assert load_training_state(other) is not None


@pytest.mark.parametrize(
    ("content", "next_epoch", "why"),
    [(b"not a checkpoint", None, "unreadable"), (None, 0, "at epoch 0"), (None, 9, "at epoch 9")],
)
def test_a_damaged_or_out_of_range_checkpoint_is_ignored(
    tmp_path: Path,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
    content: bytes | None,
    next_epoch: int | None,
    why: str,
) -> None:
    spec = make_spec(tmp_path, cache_dir, "task")
    if content is not None:
        checkpoint_path(spec).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(spec).write_bytes(content)
    else:
        assert next_epoch is not None
        save_training_state(spec, TrainingState(next_epoch, {}, {}, 0.0, 0))

    with caplog.at_level(logging.WARNING):
        assert load_training_state(spec) is None
    assert why in caplog.text


def test_a_finished_task_returns_its_result_and_drops_a_leftover_checkpoint(
    tmp_path: Path, cache_dir: Path
) -> None:
    spec = make_spec(tmp_path, cache_dir, "task", end_epoch=1)
    first = run_task(spec)
    save_training_state(spec, TrainingState(1, {}, {}, 0.0, 0))

    again = run_task(spec)

    assert again == first
    assert not checkpoint_path(spec).exists()


def test_the_checkpoint_sits_beside_the_shard_or_the_result(
    tmp_path: Path, cache_dir: Path
) -> None:
    spec = make_spec(tmp_path, cache_dir, "e00042")
    assert checkpoint_path(spec) == tmp_path / "e00042.ckpt.pt"
    without_shard = dataclasses.replace(spec, shard=None, result=str(tmp_path / "r" / "x.json"))
    assert checkpoint_path(without_shard) == tmp_path / "r" / "x.ckpt.pt"
