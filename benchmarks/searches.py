"""One-rung DEHB-WS searches in this process, timed from outside the coordinator.

An executor wrapper times each batch the coordinator hands over, and the task records carry
`task_seconds`, `train_seconds` and `evaluate_seconds`; the rest of a search's wall time is the
coordinator's own: asking and telling DEHB, the manifest, accepting results, averaging the
shards into the next supernet, writing history and state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dehbws.executors import make_executor
from dehbws.executors.base import Executor, OnDone
from dehbws.methods import run_search
from dehbws.presets import RunSettings, SearchSettings, preset
from dehbws.run_folder import RunFolder
from dehbws.settings import DataSettings, NetworkSettings, TrainSettings
from dehbws.task import TaskSpec


class TimingExecutor(Executor):
    """Delegates to another executor and adds up the wall time spent inside its batches."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.name = inner.name
        self.batch_seconds = 0.0

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        self.run_batch(specs, on_done, state_dir=None)

    def run_batch(
        self, specs: Sequence[TaskSpec], on_done: OnDone, *, state_dir: Path | None
    ) -> None:
        started_s = time.perf_counter()
        try:
            self.inner.run_batch(specs, on_done, state_dir=state_dir)
        finally:
            self.batch_seconds += time.perf_counter() - started_s


@dataclass(frozen=True)
class SearchTiming:
    """Where the wall time of one search went, in seconds."""

    evaluations: int
    wall: float
    in_executor: float
    task: float
    train: float
    evaluate: float

    @property
    def coordinator(self) -> float:
        """Wall time outside the executor's batches: the coordinator's own work."""
        return self.wall - self.in_executor

    @property
    def not_training(self) -> float:
        """Everything but training and validating the subnets (both sides of the executor)."""
        return self.wall - self.train - self.evaluate


def one_rung_settings(
    *,
    evaluations: int,
    max_epochs: int,
    network: NetworkSettings,
    subset_fraction: float,
    batch_size: int,
    threads: int,
    executor: str,
) -> RunSettings:
    """A DEHB-WS search whose first rung (at 1 epoch) is cut to `evaluations` jobs, then ends."""
    base = preset("tiny")
    return dataclasses.replace(
        base,
        network=network,
        data=DataSettings(subset_fraction=subset_fraction),
        train=TrainSettings(
            batch_size=batch_size, bn_recalibration_batches=2, num_threads=threads
        ),
        search=SearchSettings(
            fevals=evaluations,
            min_epochs=1,
            max_epochs=max_epochs,
            eta=3,
            warmup_epochs=0,
            finetune_epochs=0,
            method="dehb-ws",
        ),
        executor=executor,
    )


def timed_search(root: Path, settings: RunSettings, cache_dir: Path) -> SearchTiming:
    """Run the search in a new folder `root` and account for its wall time."""
    folder = RunFolder(root)
    folder.create(settings)
    executor = TimingExecutor(make_executor(settings.executor, log_dir=folder.task_log_dir))

    # The dataset is prepared before the clock starts, as a real run does once per study.
    from dehbws.data import load_dataset

    load_dataset(settings.data, resolution=settings.network.resolution, cache_dir=cache_dir)

    started_s = time.perf_counter()
    with folder.lock():
        run_search(folder, executor, data_cache_dir=cache_dir)
    wall_s = time.perf_counter() - started_s

    records = task_records(root)
    return SearchTiming(
        evaluations=len(records),
        wall=wall_s,
        in_executor=executor.batch_seconds,
        task=sum(float(record.get("task_seconds") or 0.0) for record in records),
        train=sum(float(record.get("train_seconds") or 0.0) for record in records),
        evaluate=sum(float(record.get("evaluate_seconds") or 0.0) for record in records),
    )


def task_records(root: Path) -> list[dict[str, Any]]:
    """Every task result record of the run folder, from batches/*/results/*.json."""
    paths = sorted(root.glob("batches/*/results/e*.json"))
    return [json.loads(path.read_text()) for path in paths]


def quiet_logging() -> None:
    """Keep per-evaluation lines (and the note on the unreached top budget) off the output."""
    logging.getLogger("dehbws").setLevel(logging.ERROR)
