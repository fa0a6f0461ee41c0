"""The run folder: its layout, settings, state, history and the lock held by the coordinator.

Layout (paths relative to the run folder; users parse these files):

    settings.json            the run's settings, human readable
    state.json               progress: finished batches, supernet version, counters
    history.jsonl            one JSON object per finished search evaluation
    warmup.jsonl             one JSON object per warm-up subnet
    supernet/v0000.h5 ...    immutable supernet versions
    batches/0003/manifest.json       the jobs of batch 3 (one rung, or the warm-up)
    batches/0003/shards/e00042.h5    weights of evaluation 42
    batches/0003/results/e00042.json its result
    logs/coordinator.log, logs/tasks/  logs
    dehb/                    DEHB's own log
    result.json              the final incumbent and its finetuning

Small JSON files are written atomically (temp file, fsync, rename), so a kill at any moment
leaves either the old or the new version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dehbws.errors import UserError
from dehbws.presets import RunSettings
from dehbws.store import supernet_filename

SETTINGS_FILE = "settings.json"
STATE_FILE = "state.json"
HISTORY_FILE = "history.jsonl"
WARMUP_FILE = "warmup.jsonl"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"
LAYOUT_VERSION = 1


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(value, file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def read_json(path: Path) -> Any:
    """Parse a JSON file, with a clear error naming the file when it is broken."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} is not valid JSON ({error}); restore it or start a new run."
        ) from None


@dataclass
class RunState:
    """Progress that survives a restart. Everything else is recomputed from files."""

    layout_version: int = LAYOUT_VERSION
    batches_done: int = 0
    supernet_version: int = 0
    evaluations_done: int = 0
    epochs_spent: int = 0
    history_bytes: int = 0
    warmup_bytes: int = 0
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class RunFolder:
    """Paths and small files of one run folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    # -- paths ------------------------------------------------------------------------------

    def supernet_path(self, version: int) -> Path:
        return self.root / "supernet" / supernet_filename(version)

    def batch_dir(self, batch: int) -> Path:
        return self.root / "batches" / f"{batch:04d}"

    def manifest_path(self, batch: int) -> Path:
        return self.batch_dir(batch) / "manifest.json"

    def shard_path(self, batch: int, evaluation: int) -> Path:
        return self.batch_dir(batch) / "shards" / f"e{evaluation:05d}.h5"

    def result_path(self, batch: int, evaluation: int) -> Path:
        return self.batch_dir(batch) / "results" / f"e{evaluation:05d}.json"

    @property
    def task_log_dir(self) -> Path:
        return self.root / "logs" / "tasks"

    @property
    def history_path(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def warmup_path(self) -> Path:
        return self.root / WARMUP_FILE

    @property
    def result_file(self) -> Path:
        return self.root / RESULT_FILE

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    # -- settings and state -----------------------------------------------------------------

    def exists(self) -> bool:
        return (self.root / SETTINGS_FILE).exists()

    def create(self, settings: RunSettings) -> None:
        """Start a new run here; refuses a folder that holds anything else."""
        if self.exists():
            stored = self.load_settings()
            if stored == settings:
                raise UserError(
                    f"run folder {self.root} already holds this run; continue it with "
                    f"`dehbws run --resume {self.root}`."
                )
            raise UserError(
                f"run folder {self.root} belongs to another run (preset {stored.preset!r}, "
                "other settings); choose a new --run-dir, or continue that run with "
                f"`dehbws run --resume {self.root}`."
            )
        if self.root.exists() and any(self.root.iterdir()):
            raise UserError(
                f"run folder {self.root} is not empty and holds no dehbws run; choose a new or "
                "empty --run-dir."
            )

        # Owner and group only: submitit job files in here are pickles that run when loaded.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        os.chmod(self.root, 0o750)
        write_json_atomic(self.root / SETTINGS_FILE, settings.to_dict())
        self.save_state(RunState())

    def load_settings(self) -> RunSettings:
        path = self.root / SETTINGS_FILE
        if not path.exists():
            raise UserError(
                f"{self.root} is not a dehbws run folder (no {SETTINGS_FILE}); start a run with "
                "`dehbws run --run-dir DIR`."
            )
        return RunSettings.from_dict(read_json(path))

    def load_state(self) -> RunState:
        values = read_json(self.root / STATE_FILE)
        known = set(RunState.__dataclass_fields__)
        if not isinstance(values, dict) or set(values) - known:
            raise UserError(f"{self.root / STATE_FILE} is not a dehbws state file.")
        state = RunState(**values)
        if state.layout_version != LAYOUT_VERSION:
            raise UserError(
                f"{self.root} was written with run-folder layout {state.layout_version}, this "
                f"dehbws reads layout {LAYOUT_VERSION}."
            )
        return state

    def save_state(self, state: RunState) -> None:
        write_json_atomic(self.root / STATE_FILE, state.__dict__)

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files a killed coordinator left behind; returns how many.

        Only the coordinator's own folders are swept: task outputs are cleaned by the task
        that owns them (see `dehbws.task`), since a task may still be running elsewhere.
        """
        patterns = [".*.tmp", "supernet/.*.tmp", "batches/*/.*.tmp", "final/.*.tmp"]
        removed = 0
        for pattern in patterns:
            for path in self.root.glob(pattern):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- history ----------------------------------------------------------------------------

    def append_lines(self, path: Path, records: list[dict[str, Any]], valid_bytes: int) -> int:
        """Append JSON lines after the first `valid_bytes` bytes; returns the new length.

        Bytes past `valid_bytes` belong to a batch that was interrupted before the state file
        recorded it, so they are dropped before the batch is written again.
        """
        with open(path, "a+b") as file:
            file.truncate(valid_bytes)
            file.seek(valid_bytes)
            for record in records:
                file.write((json.dumps(record, sort_keys=True) + "\n").encode())
            file.flush()
            os.fsync(file.fileno())
            return file.tell()

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history_path.exists():
            return []
        return [json.loads(line) for line in self.history_path.read_text().splitlines() if line]

    # -- lock -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder for one coordinator; a second one gets a clear error."""
        path = self.root / LOCK_FILE
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Path(path).read_text().strip() or "another process"
                raise UserError(
                    f"run folder {self.root} is in use by {holder}; wait for it to finish or "
                    "stop it before resuming."
                ) from None
            os.ftruncate(handle, 0)
            os.write(handle, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            yield
        finally:
            os.close(handle)
