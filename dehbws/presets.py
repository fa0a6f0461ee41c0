"""Run settings: what a search does, and the named presets users start from."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dehbws.errors import UserError
from dehbws.schedule import rung_budgets
from dehbws.settings import DataSettings, NetworkSettings, TrainSettings, _check_int

EXECUTORS: tuple[str, ...] = ("debug", "local", "slurm")
# dehb-ws: subnets inherit from the supernet and train the increment of their budget;
# dehb: vanilla DEHB, every evaluation trains from scratch for its whole budget;
# smac: SMAC4MF (dehbws.baselines.smac_mf), from scratch like dehb; fixed-cnn: no search, the
# fixed CNN baseline (dehbws.baselines.fixed_cnn), trained by `dehbws compare`.
METHODS: tuple[str, ...] = ("dehb-ws", "dehb", "smac", "fixed-cnn")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class SearchSettings:
    """The DEHB-WS schedule: budgets, stopping criterion, warm-up and final finetuning."""

    fevals: int = 60
    min_epochs: int = 3
    max_epochs: int = 27
    eta: int = 3
    seed: int = 0
    warmup_epochs: int = 10
    warmup_subnets: int = 9
    finetune_epochs: int = 15
    max_retries: int = 1
    method: str = "dehb-ws"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method is {self.method!r}, but must be one of {list(METHODS)}.")
        _check_int("fevals", self.fevals, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.seed > MAX_SEED:
            # ConfigSpace and torch take seeds of at most 32 and 64 bits.
            raise UserError(f"seed is {self.seed}, but must be at most {MAX_SEED} (2**32 - 1).")
        _check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        _check_int("warmup_subnets", self.warmup_subnets, minimum=1)
        _check_int("finetune_epochs", self.finetune_epochs, minimum=0)
        _check_int("max_retries", self.max_retries, minimum=0)
        rung_budgets(self.min_epochs, self.max_epochs, self.eta)

    @property
    def weight_sharing(self) -> bool:
        """Whether subnets inherit from (and are merged into) a supernet."""
        return self.method == "dehb-ws"


@dataclass(frozen=True)
class RunSettings:
    """Everything that defines a run; stored as settings.json in the run folder."""

    preset: str
    network: NetworkSettings = field(default_factory=NetworkSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    executor: str = "local"
    max_parallel_tasks: int = 1
    # A local task still running after this long is stopped and retried (a hung task).
    task_timeout_min: float = 24 * 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or not self.preset:
            raise UserError(f"preset is {self.preset!r}, but must be a preset name.")
        if self.executor not in EXECUTORS:
            raise UserError(
                f"executor is {self.executor!r}, but must be one of {list(EXECUTORS)}."
            )
        _check_int("max_parallel_tasks", self.max_parallel_tasks, minimum=1)
        timeout = self.task_timeout_min
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (0 < timeout < math.inf)
        ):
            raise UserError(
                f"task_timeout_min is {timeout!r}, but must be a positive number of minutes."
            )
        for name, epochs in (
            ("max_epochs", self.search.max_epochs),
            ("warmup_epochs", self.search.warmup_epochs),
        ):
            if epochs > self.train.schedule_epochs:
                raise UserError(
                    f"{name} is {epochs}, but the learning-rate schedule has only "
                    f"{self.train.schedule_epochs} epochs; lower --{name.replace('_', '-')}."
                )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSettings:
        """Rebuild settings from settings.json, rejecting unknown keys with a clear message."""
        sections = {
            "network": NetworkSettings,
            "data": DataSettings,
            "train": TrainSettings,
            "search": SearchSettings,
        }
        if not isinstance(values, dict):
            raise UserError(f"settings must be a JSON object, got {type(values).__name__}.")
        _check_keys("settings", values, cls)

        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            section = sections.get(key)
            if section is None:
                kwargs[key] = value
                continue
            if not isinstance(value, dict):
                raise UserError(f"settings section {key!r} must be an object, got {value!r}.")
            _check_keys(key, value, section)
            kwargs[key] = section(**value)
        return cls(**kwargs)


def _check_keys(section: str, values: dict[str, Any], cls: Any) -> None:
    """Every key present, none unknown, and each value of its field's JSON type."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{section} has unknown keys {unknown}; known keys are {sorted(fields)}.")
    missing = sorted(set(fields) - set(values) - set(getattr(cls, "OPTIONAL_KEYS", ())))
    if missing:
        raise UserError(
            f"{section} lacks the keys {missing}; a dehbws settings file has them all."
        )

    for name, spec in fields.items():
        kinds = [kind.strip() for kind in str(spec.type).split("|")]
        if not set(kinds) <= set(_JSON_KINDS):
            continue  # a section, checked by its own class
        if name not in values:
            continue  # optional: takes the default
        value = values[name]
        if not any(_JSON_KINDS[kind](value) for kind in kinds):
            expected = " or ".join(_KIND_WORDS[kind] for kind in kinds)
            raise UserError(f"{section}.{name} is {value!r}, but must be {expected}.")


# How a settings value of each annotated type looks in JSON (bool is no int here).
_JSON_KINDS = {
    "int": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "float": lambda value: (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ),
    "str": lambda value: isinstance(value, str),
    "bool": lambda value: isinstance(value, bool),
    "None": lambda value: value is None,
}
_KIND_WORDS = {
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "bool": "true or false",
    "None": "null",
}


PRESETS: dict[str, RunSettings] = {
    # Finishes in a few minutes on two CPU cores: a tiny network on a tenth of the data.
    "smoke": RunSettings(
        preset="smoke",
        network=NetworkSettings(width=4, cells_per_stage=1, resolution=0.5),
        data=DataSettings(subset_fraction=0.1),
        train=TrainSettings(batch_size=256, bn_recalibration_batches=4),
        search=SearchSettings(
            fevals=20,
            min_epochs=1,
            max_epochs=9,
            eta=3,
            warmup_epochs=1,
            warmup_subnets=3,
            finetune_epochs=3,
        ),
        executor="local",
    ),
    # The DEHB-WS study: the paper's network, budgets 3..27, eta 3, 60 evaluations. For GPUs.
    "paper": RunSettings(
        preset="paper",
        network=NetworkSettings(width=16, cells_per_stage=5, resolution=1.0),
        data=DataSettings(subset_fraction=1.0),
        train=TrainSettings(device="cuda"),
        search=SearchSettings(
            fevals=60,
            min_epochs=3,
            max_epochs=27,
            eta=3,
            warmup_epochs=10,
            warmup_subnets=9,
            finetune_epochs=15,
        ),
        executor="local",
    ),
    # For tests: seconds per evaluation.
    "tiny": RunSettings(
        preset="tiny",
        network=NetworkSettings(width=2, cells_per_stage=1, resolution=0.25),
        data=DataSettings(subset_fraction=0.02),
        train=TrainSettings(batch_size=128, bn_recalibration_batches=2),
        search=SearchSettings(
            fevals=8,
            min_epochs=1,
            max_epochs=3,
            eta=3,
            warmup_epochs=1,
            warmup_subnets=2,
            finetune_epochs=1,
        ),
        executor="debug",
    ),
}


def preset(name: str) -> RunSettings:
    """The named preset, or a UserError listing the known ones."""
    if name not in PRESETS:
        raise UserError(f"preset is {name!r}, but must be one of {sorted(PRESETS)}.")
    return PRESETS[name]
