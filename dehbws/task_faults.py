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
- `slow_epochs`: sleep `seconds` after every training epoch (long enough to be interrupted).

A value that is not such a list stops the task with ValueError, so a typo in a test fails
loudly instead of testing nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dehbws.task import TaskSpec

logger = logging.getLogger(__name__)

FAULT_VARIABLE = "DEHBWS_FAULT_INJECT"
ACTIONS: tuple[str, ...] = ("raise", "exit", "sleep", "slow_epochs")


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


def epoch_delay_s(faults: list[Fault]) -> float:
    """How long to sleep after each epoch (slow_epochs faults)."""
    return sum(fault.seconds for fault in faults if fault.action == "slow_epochs")


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
