"""Plain, validated settings shared by the coordinator and the tasks.

Everything here is a frozen dataclass of JSON-friendly values, so a task on another machine
receives exactly what the coordinator decided and the run folder can store it as text.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from dehbws.errors import UserError

SplitName = Literal["jahs", "official"]
SPLIT_NAMES: tuple[str, ...] = ("jahs", "official")
RESOLUTIONS: tuple[float, ...] = (0.25, 0.5, 1.0)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class NetworkSettings:
    """The fixed part of the JAHS-Bench-201 network: width W, cells per stage N, resolution R."""

    width: int = 16
    cells_per_stage: int = 5
    resolution: float = 1.0

    def __post_init__(self) -> None:
        _check_int("width", self.width, minimum=1)
        _check_int("cells_per_stage", self.cells_per_stage, minimum=1)
        if self.resolution not in RESOLUTIONS:
            raise UserError(
                f"resolution is {self.resolution!r}, but must be one of {RESOLUTIONS} "
                "(the image side is 32 * resolution pixels)."
            )


@dataclass(frozen=True)
class DataSettings:
    """Where Fashion-MNIST comes from and which part of it a run uses.

    `subset_fraction` keeps that fraction of every split (per class, so it stays balanced);
    1.0 uses everything.
    """

    data_dir: str | None = None
    split: str = "jahs"
    subset_fraction: float = 1.0
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLIT_NAMES:
            raise UserError(
                f"split is {self.split!r}, but must be one of {list(SPLIT_NAMES)}: 'jahs' is "
                "JAHS-Bench-201's 44,100/18,900/7,000 split, 'official' the 10k test set."
            )
        if not isinstance(self.subset_fraction, (int, float)) or not (
            0.0 < self.subset_fraction <= 1.0
        ):
            raise UserError(
                f"subset_fraction is {self.subset_fraction!r}, but must be a number in (0, 1]."
            )
        _check_int("split_seed", self.split_seed, minimum=0)


@dataclass(frozen=True)
class TrainSettings:
    """The JAHS-Bench-201 training recipe's fixed parts, and how fast it runs.

    The fast-path options change speed, not the recipe: `channels_last` stores activations
    NHWC (what GPU convolution kernels prefer), `precision` "bf16" runs the forward pass under
    bfloat16 autocast (weights, optimiser and loss stay float32), and `compile` wraps the
    network in `torch.compile`. They work on the CPU too, through the same code.
    """

    batch_size: int = 256
    schedule_epochs: int = 200
    momentum: float = 0.9
    bn_recalibration_batches: int = 10
    device: str = "cpu"
    num_threads: int = 0
    channels_last: bool = False
    precision: str = "fp32"
    compile: bool = False

    # Keys a settings.json may lack (files written before they existed): they take the default.
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ("channels_last", "precision", "compile")

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("schedule_epochs", self.schedule_epochs, minimum=1)
        _check_int("bn_recalibration_batches", self.bn_recalibration_batches, minimum=0)
        _check_int("num_threads", self.num_threads, minimum=0)
        if not isinstance(self.device, str) or not re.fullmatch(
            rf"({'|'.join(DEVICE_TYPES)})(:[0-9]+)?", self.device
        ):
            raise UserError(
                f"device is {self.device!r}, but must be 'cpu', 'cuda' or 'cuda:N' "
                "(--device cpu or --device cuda)."
            )
        _check_bool("channels_last", self.channels_last)
        _check_bool("compile", self.compile)
        if self.precision not in PRECISIONS:
            raise UserError(
                f"precision is {self.precision!r}, but must be one of {list(PRECISIONS)}: "
                "'fp32' trains in float32, 'bf16' under bfloat16 autocast (--precision bf16)."
            )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} is {value!r}, but must be an integer >= {minimum}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name} is {value!r}, but must be true or false.")


def to_plain(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a plain dict (for JSON)."""
    return dataclasses.asdict(settings)
