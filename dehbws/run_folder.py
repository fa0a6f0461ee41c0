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
import errno
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


# Below this much free space a run folder counts as full: a task's shard or a supernet version
# would not fit, and failures there say nothing about the configuration being evaluated.
MIN_FREE_BYTES = 1 << 20
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
_STORAGE_TEXTS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


class StorageError(UserError):
    """The run folder cannot be written (full, over quota or read-only); nothing is lost."""


def storage_problem(error: BaseException | str | None) -> str | None:
    """What is wrong with the storage if `error` (or its text) is a full or read-only disk."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[error.errno]
    text = str(error or "")
    # h5py and torch report write failures with the C library's text and no errno.
    for phrase in _STORAGE_TEXTS:
        if phrase in text:
            return phrase.lower()
    return None


def storage_problem_at(path: Path) -> str | None:
    """Whether the file system holding `path` is read-only or (nearly) full."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "read-only file system"
    free_bytes = stats.f_bavail * stats.f_frsize
    if free_bytes < MIN_FREE_BYTES:
        return f"only {free_bytes // 1024} KiB free"
    return None


def storage_message(problem: str, root: Path, what: str) -> str:
    """The one paragraph a user reads when the run folder cannot be written."""
    return (
        f"{what}: {problem}. Every finished evaluation is kept; free space (or make {root} "
        f"writable again) and continue with `dehbws run --resume {root}`."
    )


def storage_error(error: BaseException) -> StorageError | None:
    """A StorageError for `error` if it is a full or read-only disk, else None.

    Its message names the file that could not be written and the resume command of the run
    folder that holds it.
    """
    problem = storage_problem(error)
    if problem is None:
        return None
    filename = getattr(error, "filename", None)
    if not filename:
        return StorageError(storage_message(problem, Path("RUN_DIR"), "writing the run folder"))
    path = Path(filename).absolute()
    root = next((folder for folder in path.parents if (folder / SETTINGS_FILE).exists()), path)
    return StorageError(storage_message(problem, root, f"writing {path}"))


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


_STATE_KINDS = {"extra": "an object", "finished": "true or false"}


def _fits_state(value: Any, expected: str) -> bool:
    if expected == "an object":
        return isinstance(value, dict)
    if expected == "true or false":
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
        try:
            return RunSettings.from_dict(read_json(path))
        except UserError as error:
            raise UserError(
                f"{path}: {error} Restore the file as dehbws wrote it, or start a new run."
            ) from None

    def load_state(self) -> RunState:
        path = self.root / STATE_FILE
        values = read_json(path)
        known = set(RunState.__dataclass_fields__)
        if not isinstance(values, dict) or set(values) != known:
            raise UserError(
                f"{path} is not a dehbws state file (it must be an object with the keys "
                f"{sorted(known)}); restore it or start a new run."
            )
        for name, value in values.items():
            expected = _STATE_KINDS.get(name, "a non-negative integer")
            if not _fits_state(value, expected):
                raise UserError(
                    f"{path}: {name} is {value!r}, but must be {expected}; "
                    "restore the file or start a new run."
                )
        state = RunState(**values)
        if state.layout_version != LAYOUT_VERSION:
            raise UserError(
                f"{self.root} was written with run-folder layout {state.layout_version}, this "
                f"dehbws reads layout {LAYOUT_VERSION}."
            )
        return state

    def check_resumable(self) -> None:
        """Raise UserError, before anything is written, if the folder cannot be resumed.

        Checks the state file and that every recorded configuration lies in the search space
        (a hand-edited manifest would otherwise reach DEHB or a task).
        """
        from dehbws.space import validate_config

        state = self.load_state()
        for batch in range(state.batches_done + 1):
            path = self.manifest_path(batch)
            if not path.exists():
                continue
            manifest = read_json(path)
            jobs = manifest.get("jobs") if isinstance(manifest, dict) else None
            configs = manifest.get("configs") if isinstance(manifest, dict) else None
            recorded = configs
            if jobs is not None:
                # Anything but a list of job objects is no manifest (checked just below).
                recorded = (
                    [job.get("config") if isinstance(job, dict) else None for job in jobs]
                    if isinstance(jobs, list)
                    else None
                )
            if not isinstance(recorded, list) or not all(isinstance(c, dict) for c in recorded):
                raise UserError(f"{path} is not a dehbws manifest; restore it or start a new run.")
            for config in recorded:
                try:
                    validate_config(config)
                except UserError as error:
                    raise UserError(
                        f"{path} records a configuration outside the search space: {error} "
                        "Restore the file as dehbws wrote it, or start a new run."
                    ) from None

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
        """The committed history lines (bytes an interrupted batch appended are ignored)."""
        if not self.history_path.exists():
            return []
        committed = self.history_path.read_bytes()[: self.load_state().history_bytes]
        lines = []
        for number, line in enumerate(committed.decode(errors="replace").splitlines(), 1):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(
                    f"{self.history_path} line {number} is not JSON; restore the file or start "
                    "a new run."
                ) from None
        return lines

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
