"""The interface every executor implements: run one batch of tasks, report each as it ends."""

from __future__ import annotations

import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dehbws.task import TaskSpec


@dataclass(frozen=True)
class TaskOutcome:
    """How one task ended: its result record, or why it produced none."""

    spec: TaskSpec
    record: dict[str, Any] | None
    error: str | None = None
    log_path: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.record is not None


OnDone = Callable[[TaskOutcome], None]


def log_tail(path: Path | str, lines: int = 30) -> list[str]:
    """The last lines of a task's log (where Python and SLURM say why it ended)."""
    try:
        return Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Fault|Interrupt)\b(:.*)?$")


def raised_exception(log_lines: Sequence[str]) -> str | None:
    """The exception line of the last traceback in a task's log (e.g. `ValueError: ...`)."""
    for line in reversed(log_lines):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return None


class Executor(ABC):
    """Runs a batch of tasks, the shape of one SLURM array job, and reports each outcome."""

    name: str = "executor"

    @abstractmethod
    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        """Run every task; call `on_done` once per task, in the order they end."""

    def run_batch(
        self, specs: Sequence[TaskSpec], on_done: OnDone, *, state_dir: Path | None
    ) -> None:
        """Run one batch of the run folder, whose files for it live in `state_dir`.

        An executor whose tasks outlive the coordinator (SLURM) records there which jobs run
        them, so that a restarted coordinator waits for those jobs instead of submitting them
        again. The others have nothing to record and just `run`.
        """
        self.run(specs, on_done)


class Progress:
    """A one-line progress display on a terminal; silent otherwise (logs stay clean)."""

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.started = time.monotonic()
        self.enabled = sys.stderr.isatty()

    def advance(self) -> None:
        self.done += 1
        self.show()

    def show(self) -> None:
        if not self.enabled:
            return
        elapsed_s = time.monotonic() - self.started
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed_s:6.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
