"""Deliberate task failures, for the tests of retries, cancellation and requeueing only.

Nothing happens unless the environment variable DEHBWS_FAULT_INJECT holds a JSON list of
faults (a single object is also accepted), for example

    DEHBWS_FAULT_INJECT='[{"action": "raise", "batch": 1, "evaluation": 2, "times": 1}]'

Each fault names the task it hits (`kind`, default "search"; `batch`, default any;
`evaluation`) and fires on the task's first `times` starts (default 1; a retry or a requeue is
a new start, counted in a small file beside the task's result). Actions:

- `raise`: raise InjectedFault when the task starts;
- `exit`: end the process at once with SIGKILL, leaving no result (like a killed task);
- `sleep`: sleep `seconds` before training (long enough to be cancelled);
- `slow_epochs`: sleep `seconds` after every training epoch (long enough to be interrupted);
- `hang`: block when the task starts until the process is killed (a task past its time limit);
- `kill_mid_training`: SIGKILL the process as soon as its first epoch checkpoint is saved;
- `truncate_shard`: after the task ends, cut its shard to half its bytes (a partial write);
- `corrupt_shard`: after the task ends, overwrite the stored bytes of one tensor (bit rot);
- `nan_weights`: after the task ends, set one tensor of its shard to NaN (a silent divergence);
- `drop_tensor`: after the task ends, delete one tensor from its shard (an incomplete shard).

The shard faults act after the task wrote its result, so the task reports success and only the
coordinator's checks stand between the damaged shard and the supernet.

A value that is not such a list stops the task with ValueError, so a typo in a test fails
loudly instead of testing nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dehbws.task import TaskSpec

logger = logging.getLogger(__name__)

FAULT_VARIABLE = "DEHBWS_FAULT_INJECT"
START_ACTIONS: tuple[str, ...] = ("raise", "exit", "sleep", "hang", "kill_mid_training")
SHARD_ACTIONS: tuple[str, ...] = ("truncate_shard", "corrupt_shard", "nan_weights", "drop_tensor")
ACTIONS: tuple[str, ...] = (*START_ACTIONS, "slow_epochs", *SHARD_ACTIONS)


class InjectedFault(RuntimeError):
    """The failure a `raise` fault causes; its message names the task."""


@dataclass(frozen=True)
class Fault:
    """One deliberate failure of one task."""

    action: str
    evaluation: int
    kind: str = "search"
    batch: int | None = None
    times: int = 1
    seconds: float = 0.0

    def hits(self, spec: TaskSpec) -> bool:
        return (
            spec.kind == self.kind
            and spec.evaluation == self.evaluation
            and (self.batch is None or spec.batch == self.batch)
        )


def active_faults(spec: TaskSpec) -> list[Fault]:
    """The faults that fire in this start of the task (counting the start); usually none."""
    text = os.environ.get(FAULT_VARIABLE)
    if not text:
        return []
    faults = [fault for fault in _parse(text) if fault.hits(spec)]
    if not faults:
        return []
    starts = _count_start(Path(spec.result).with_suffix(".faults"))
    return [fault for fault in faults if starts <= fault.times]


def inject_at_start(spec: TaskSpec, faults: list[Fault]) -> None:
    """Carry out the faults that act when the task starts."""
    for fault in faults:
        if fault.action == "sleep":
            logger.warning("%s: injected fault, sleeping %.0f s", spec.name, fault.seconds)
            time.sleep(fault.seconds)
        elif fault.action == "raise":
            raise InjectedFault(f"injected fault in {spec.name} of batch {spec.batch}")
        elif fault.action == "exit":
            logger.warning("%s: injected fault, killing this process", spec.name)
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "hang":
            logger.warning("%s: injected fault, hanging until killed", spec.name)
            while True:
                time.sleep(60)
        elif fault.action == "kill_mid_training":
            _kill_after_first_checkpoint(spec)


def inject_at_end(spec: TaskSpec, faults: list[Fault]) -> None:
    """Carry out the faults that damage the task's shard after it wrote its result."""
    for fault in faults:
        if fault.action not in SHARD_ACTIONS or spec.shard is None:
            continue
        logger.warning("%s: injected fault %s on %s", spec.name, fault.action, spec.shard)
        if fault.action == "truncate_shard":
            path = Path(spec.shard)
            os.truncate(path, path.stat().st_size // 2)
        else:
            _damage_tensor(Path(spec.shard), fault.action)


def epoch_delay_s(faults: list[Fault]) -> float:
    """How long to sleep after each epoch (slow_epochs faults)."""
    return sum(fault.seconds for fault in faults if fault.action == "slow_epochs")


def _kill_after_first_checkpoint(spec: TaskSpec) -> None:
    """Watch for the task's first epoch checkpoint and SIGKILL the process once it exists."""
    from dehbws.task_checkpoint import checkpoint_path

    path = checkpoint_path(spec)

    def watch() -> None:
        while not path.exists():
            time.sleep(0.02)
        logger.warning("%s: injected fault, killing this process mid-training", spec.name)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="fault-kill", daemon=True).start()


def _damage_tensor(path: Path, action: str) -> None:
    """Damage the largest floating-point tensor of a shard in place."""
    import h5py
    import numpy as np

    with h5py.File(path, "r+", locking=False) as file:
        name = max(
            (key for key in file if file[key].dtype.kind == "f"), key=lambda key: file[key].size
        )
        dataset = file[name]
        if action == "nan_weights":
            dataset[...] = np.full(dataset.shape, np.nan, dtype=dataset.dtype)
            return
        if action == "drop_tensor":
            del file[name]
            return
        offset = _data_offset(dataset)
        size = dataset.size * dataset.dtype.itemsize
    # Bit rot: the file stays readable as HDF5, only the tensor's stored bytes change.
    with open(path, "r+b") as raw:
        raw.seek(offset)
        flipped = bytes(255 - byte for byte in raw.read(size))
        raw.seek(offset)
        raw.write(flipped)


def _data_offset(dataset: Any) -> int:
    """Where a dataset's bytes start in the file (first chunk for chunked datasets)."""
    if dataset.chunks is None:
        return int(dataset.id.get_offset())
    return int(dataset.id.get_chunk_info(0).byte_offset)


def _parse(text: str) -> list[Fault]:
    try:
        values: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{FAULT_VARIABLE} is not JSON ({error}): {text!r}") from None
    if isinstance(values, dict):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(value, dict) for value in values):
        raise ValueError(f"{FAULT_VARIABLE} must be a JSON list of objects, got {text!r}")
    faults = []
    for value in values:
        try:
            fault = Fault(**value)
        except TypeError as error:
            raise ValueError(f"{FAULT_VARIABLE} has a bad fault {value!r}: {error}") from None
        if fault.action not in ACTIONS:
            raise ValueError(f"{FAULT_VARIABLE}: action {fault.action!r} is not in {ACTIONS}")
        faults.append(fault)
    return faults


def _count_start(path: Path) -> int:
    """Add one to the task's start count and return it."""
    starts = int(path.read_text()) + 1 if path.exists() else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(starts))
    return starts
