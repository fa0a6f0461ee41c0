"""What every benchmark shares: result rows, the table, data loading and fixed subnets."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the averaging workers must not pay for importing torch
    from dehbws.data import FashionMNIST

# A subnet with every edge a 3x3 convolution: the most expensive cell of the space.
HEAVY_CONFIG: dict[str, Any] = {
    "Op1": 2, "Op2": 2, "Op3": 2, "Op4": 2, "Op5": 2, "Op6": 2,
    "Activation": "ReLU", "LearningRate": 0.1, "WeightDecay": 5e-4, "TrivialAugment": False,
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One measured figure, its target and whether it met the target (None: no target)."""

    item: str
    figure: str
    value: float
    target: str
    passed: bool | None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table: item, figure, value, target, PASS/FAIL, detail."""
    header = ("item", "figure", "value", "target", "result", "detail")
    lines = [
        (row.item, row.figure, f"{row.value:.4g}", row.target, verdict(row.passed), row.detail)
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(5)]
    out = []
    for line in [header, *lines]:
        cells = [str(cell).ljust(width) for cell, width in zip(line[:5], widths, strict=True)]
        out.append("  ".join([*cells, str(line[5])]).rstrip())
    return "\n".join(out)


def load_data(cache_dir: Path, *, subset_fraction: float, resolution: float) -> FashionMNIST:
    """The real Fashion-MNIST (jahs split), prepared once into `cache_dir`."""
    from dehbws.data import load_dataset
    from dehbws.settings import DataSettings

    settings = DataSettings(subset_fraction=subset_fraction)
    return load_dataset(settings, resolution=resolution, cache_dir=cache_dir)


def alternate(
    first: Callable[[], float], second: Callable[[], float], *, rounds: int
) -> tuple[list[float], list[float]]:
    """Measure first, second, first, second, ... so slow phases of a shared machine hit both."""
    values: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        values[0].append(first())
        values[1].append(second())
    return values


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the pairwise ratios of two alternated measurement series."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return statistics.median(ratios)


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one call."""
    started_s = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started_s
