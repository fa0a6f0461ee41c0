"""A task's training state after each epoch, so that a requeued or retried task continues there.

The file sits next to the task's shard (`e00042.ckpt.pt` beside `e00042.h5`), holds only plain
tensors and numbers (it is read with `weights_only=True`, so loading it runs no code), and is
replaced atomically. Training is deterministic per epoch, so a task resumed after epoch e ends
with the same weights as one that never stopped. The file is removed once the result is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dehbws.task import TaskSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainingState:
    """Where training stopped: the next epoch to train, weights, optimiser state, totals."""

    next_epoch: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    train_seconds: float
    images_seen: int


def checkpoint_path(spec: TaskSpec) -> Path:
    """The task's checkpoint file, beside its shard (or its result when it writes none)."""
    return Path(spec.shard or spec.result).with_suffix(".ckpt.pt")


def _identity(spec: TaskSpec) -> str:
    """What must match for a checkpoint to belong to this task (the device may differ)."""
    return json.dumps(
        {
            "kind": spec.kind,
            "batch": spec.batch,
            "evaluation": spec.evaluation,
            "config": spec.config,
            "seed": spec.seed,
            "base_version": spec.base_version,
            "start_epoch": spec.start_epoch,
            "end_epoch": spec.end_epoch,
            "schedule_epochs": spec.train.schedule_epochs,
        },
        sort_keys=True,
    )


def save_training_state(spec: TaskSpec, state: TrainingState) -> None:
    """Write the checkpoint atomically: a reader sees the previous epoch's or this one's."""
    import torch

    path = checkpoint_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "identity": _identity(spec),
        "next_epoch": state.next_epoch,
        "model": {name: tensor.detach().cpu() for name, tensor in state.model.items()},
        "optimizer": state.optimizer,
        "train_seconds": state.train_seconds,
        "images_seen": state.images_seen,
    }
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    logger.debug("%s: checkpoint after epoch %d in %s", spec.name, state.next_epoch - 1, path)


def load_training_state(spec: TaskSpec) -> TrainingState | None:
    """The task's checkpoint, or None when there is none or it belongs to another task."""
    import torch

    path = checkpoint_path(spec)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file only costs the epochs it held
        logger.warning("%s: ignoring unreadable checkpoint %s (%s)", spec.name, path, error)
        return None
    if (
        not isinstance(payload, dict)
        or payload.get("format_version") != FORMAT_VERSION
        or payload.get("identity") != _identity(spec)
    ):
        logger.warning("%s: ignoring checkpoint %s of another task", spec.name, path)
        return None
    kinds: dict[str, type | tuple[type, ...]] = {
        "next_epoch": int,
        "model": dict,
        "optimizer": dict,
        "train_seconds": (int, float),
        "images_seen": int,
    }
    malformed = [
        key
        for key, kind in kinds.items()
        if isinstance(payload.get(key), bool) or not isinstance(payload.get(key), kind)
    ]
    if malformed:
        logger.warning("%s: ignoring malformed checkpoint %s (bad %s)", spec.name, path, malformed)
        return None
    state = TrainingState(
        next_epoch=payload["next_epoch"],
        model=payload["model"],
        optimizer=payload["optimizer"],
        train_seconds=float(payload["train_seconds"]),
        images_seen=payload["images_seen"],
    )
    if not spec.start_epoch < state.next_epoch <= spec.end_epoch:
        logger.warning("%s: ignoring checkpoint %s at epoch %d", spec.name, path, state.next_epoch)
        return None
    return state


def remove_training_state(spec: TaskSpec) -> None:
    """Delete the checkpoint once the task's result is written."""
    checkpoint_path(spec).unlink(missing_ok=True)
