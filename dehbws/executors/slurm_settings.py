"""What a SLURM array task asks for, how it is stored in the run folder, and the sbatch request.

The settings are plain values checked when they are made, so a mistake on the command line or in
a hand-edited `executor.json` ends with one message naming the value and the fix. They are kept
apart from settings.json because they describe where a run executes, not what it computes: a
resumed run may change them (another partition, a longer time limit) and still continue.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dehbws.errors import UserError

EXECUTOR_FILE = "executor.json"
# The tasks read HDF5 files on shared filesystems, where HDF5's file locks fail.
TASK_ENVIRONMENT: dict[str, str] = {"HDF5_USE_FILE_LOCKING": "FALSE", "PYTHONUNBUFFERED": "1"}
# sbatch options that dehbws sets itself: either a typed option exists, or changing the option
# would break how submitit finds the task's files and signals.
RESERVED_SBATCH_KEYS: dict[str, str] = {
    "partition": "--partition",
    "time": "--time-min",
    "mem": "--mem-gb",
    "cpus-per-task": "--cpus-per-task",
    "gpus-per-task": "--gpus-per-task",
    "account": "--account",
    "qos": "--qos",
    "array": "--array-parallelism",
    "signal": "--signal-delay-s",
    "output": "",
    "error": "",
    "open-mode": "",
    "ntasks": "",
    "ntasks-per-node": "",
    "nodes": "",
    "job-name": "",
}
TASK_DEVICES: tuple[str, ...] = ("cpu", "cuda")
_SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class SlurmSettings:
    """The resources of one array task and how the arrays are submitted.

    None leaves a value to the cluster's defaults. `sbatch_args` holds further sbatch options
    (`constraint`: `a100` becomes `--constraint=a100`); `container` is an Apptainer image that
    every task runs in. `device` is where the tasks train; None means on their GPU when they
    ask for one and on the CPU otherwise (`cpu` together with GPUs is for the development
    cluster, whose GPUs are stand-ins).
    """

    partition: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    array_parallelism: int | None = None
    sbatch_args: dict[str, str] = field(default_factory=dict)
    container: str | None = None
    signal_delay_s: int = 90
    device: str | None = None

    def __post_init__(self) -> None:
        _check_count("gpus_per_task", self.gpus_per_task, "--gpus-per-task", minimum=0)
        _check_count("time_min", self.time_min, "--time-min", minimum=1)
        _check_count("signal_delay_s", self.signal_delay_s, "--signal-delay-s", minimum=0)
        if self.cpus_per_task is not None:
            _check_count("cpus_per_task", self.cpus_per_task, "--cpus-per-task", minimum=1)
        if self.array_parallelism is not None:
            _check_count(
                "array_parallelism", self.array_parallelism, "--array-parallelism", minimum=1
            )
        if self.mem_gb is not None and (
            isinstance(self.mem_gb, bool)
            or not isinstance(self.mem_gb, int | float)
            or not self.mem_gb > 0
        ):
            raise UserError(
                f"mem_gb is {self.mem_gb!r}, but must be a number > 0 (GB of memory per task), "
                "for example --mem-gb 16; leave it out to use the cluster's default."
            )
        for name in ("partition", "account", "qos", "container"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                option = f"--{name}"
                raise UserError(
                    f"{name} is {value!r}, but must be a non-empty name; give {option} a value "
                    "or leave it out."
                )
        if not isinstance(self.sbatch_args, dict):
            raise UserError(f"sbatch_args is {self.sbatch_args!r}, but must be an object.")
        for key, value in self.sbatch_args.items():
            _check_sbatch_key(key, value)
        self._check_device()

    def _check_device(self) -> None:
        if self.device is not None and self.device not in TASK_DEVICES:
            raise UserError(
                f"device is {self.device!r}, but the SLURM tasks train on one of "
                f"{list(TASK_DEVICES)}; pass --device cpu or --device cuda, or leave it out."
            )
        if self.device == "cuda" and self.gpus_per_task == 0:
            raise UserError(
                "device is 'cuda', but gpus_per_task is 0, so the tasks would get no GPU; pass "
                "--gpus-per-task 1 (or more), or --device cpu."
            )

    @property
    def task_device(self) -> str:
        """Where the tasks train: `device`, else on their GPU when they ask for one."""
        if self.device is not None:
            return self.device
        return "cuda" if self.gpus_per_task > 0 else "cpu"

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> SlurmSettings:
        """Settings from `executor.json`'s "slurm" object, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict):
            raise UserError(f"the SLURM settings must be a JSON object, got {values!r}.")
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"the SLURM settings have unknown keys {unknown}; known keys are {sorted(known)}."
            )
        return cls(**values)

    def replace(self, **changes: Any) -> SlurmSettings:
        """A copy with the given (not None) values changed, as on a resume."""
        return dataclasses.replace(
            self, **{key: value for key, value in changes.items() if value is not None}
        )


def _check_count(name: str, value: Any, option: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(
            f"{name} is {value!r}, but must be an integer >= {minimum}; pass for example "
            f"{option} {max(minimum, 1)}."
        )


def _check_sbatch_key(key: Any, value: Any) -> None:
    if not isinstance(key, str) or not _SBATCH_KEY.match(key):
        raise UserError(
            f"--sbatch-arg names the sbatch option {key!r}, but an option name is letters, "
            "digits, '-' and '_'; write KEY=VALUE, for example --sbatch-arg constraint=a100."
        )
    typed = RESERVED_SBATCH_KEYS.get(key.replace("_", "-"))
    if typed is not None:
        instead = f"use {typed} instead" if typed else "dehbws sets it itself"
        raise UserError(
            f"--sbatch-arg sets {key!r}, which dehbws manages: {instead} (remove "
            f"--sbatch-arg {key}=...)."
        )
    if not isinstance(value, str):
        raise UserError(f"--sbatch-arg {key} has the value {value!r}, but must be text.")


def parse_sbatch_args(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (as given to --sbatch-arg) as a dict; raises UserError on bad ones."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not separator or not key:
            raise UserError(
                f"--sbatch-arg is {pair!r}, but must be KEY=VALUE (an sbatch option without "
                "its dashes), for example --sbatch-arg constraint=a100 or --sbatch-arg "
                "exclude=node17."
            )
        _check_sbatch_key(key, value)
        parsed[key] = value
    return parsed


# -- persistence ---------------------------------------------------------------------------------


def load_slurm_settings(root: Path) -> SlurmSettings | None:
    """The SLURM settings stored in a run folder, or None if the run was never submitted."""
    from dehbws.run_folder import read_json

    path = Path(root) / EXECUTOR_FILE
    if not path.exists():
        return None
    stored = read_json(path)
    if not isinstance(stored, dict) or "slurm" not in stored:
        raise UserError(f"{path} holds no SLURM settings; delete it or restore it.")
    return SlurmSettings.from_dict(stored["slurm"])


def save_slurm_settings(root: Path, settings: SlurmSettings) -> None:
    """Store the settings in the run folder, so that `dehbws submit --resume` reuses them."""
    from dehbws.run_folder import write_json_atomic

    write_json_atomic(
        Path(root) / EXECUTOR_FILE, {"executor": "slurm", "slurm": settings.to_dict()}
    )


# -- what sbatch receives ------------------------------------------------------------------------


def sbatch_parameters(settings: SlurmSettings) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one task of an array: one task, one node."""
    parameters: dict[str, Any] = {
        "time": settings.time_min,
        "nodes": 1,
        # One process per array task; sbatch also needs a task count for --gpus-per-task.
        "ntasks_per_node": 1,
        "signal_delay_s": settings.signal_delay_s,
        "setup": [f"export {name}={value}" for name, value in TASK_ENVIRONMENT.items()],
    }
    optional = {
        "partition": settings.partition,
        "cpus_per_task": settings.cpus_per_task,
        "account": settings.account,
        "qos": settings.qos,
        "mem": None if settings.mem_gb is None else mem_flag(settings.mem_gb),
        "gpus_per_task": settings.gpus_per_task or None,
    }
    parameters.update({key: value for key, value in optional.items() if value is not None})
    if settings.sbatch_args:
        parameters["additional_parameters"] = dict(settings.sbatch_args)
    return parameters


def mem_flag(mem_gb: float) -> str:
    """sbatch's --mem value: whole gigabytes as `16G`, fractions in megabytes (`1536M`)."""
    if float(mem_gb).is_integer():
        return f"{int(mem_gb)}G"
    return f"{round(mem_gb * 1024)}M"


def container_python(image: str, *, gpus: int, binds: Sequence[Path] = ()) -> str:
    """The shell words that start Python inside the image, for submitit's `python` parameter.

    `--nv` gives the container the host's NVIDIA driver; the run folder and the data are bound
    in, since a site's Apptainer configuration may not mount the shared filesystem by itself.
    """
    words = ["apptainer", "exec"]
    if gpus > 0:
        words.append("--nv")
    folders = sorted({str(Path(folder).resolve()) for folder in binds})
    if folders:
        words += ["--bind", ",".join(folders)]
    words += [image, "python"]
    return " ".join(shlex.quote(word) for word in words)


def split_array(count: int, max_array_size: int) -> list[range]:
    """Index ranges of at most `max_array_size` tasks: array task ids must stay below it."""
    if max_array_size < 1:
        raise ValueError(f"max_array_size is {max_array_size}, but must be >= 1.")
    return [
        range(start, min(start + max_array_size, count))
        for start in range(0, count, max_array_size)
    ]
