"""What one array task runs: inherit from a supernet version, train, evaluate, write a shard.

A task receives a `TaskSpec` of plain values, reads exactly the files the spec names and
writes exactly one shard and one result file. Running it twice gives the same files, so a
requeued or retried task is harmless; a finished task returns its stored result at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dehbws.errors import DivergedError
from dehbws.settings import DataSettings, NetworkSettings, TrainSettings
from dehbws.store import read_tensors, write_tensors

logger = logging.getLogger(__name__)

TASK_KINDS: tuple[str, ...] = ("search", "warmup", "finetune", "scratch")


@dataclass(frozen=True)
class TaskSpec:
    """Everything one evaluation needs, as plain values (it is pickled into a SLURM job).

    Paths are absolute. `base_supernet` is None for training from scratch. The subnet trains
    epochs [start_epoch, end_epoch) of a cosine schedule over `train.schedule_epochs` epochs.
    """

    kind: str
    batch: int
    evaluation: int
    config: dict[str, Any]
    base_version: int | None
    base_supernet: str | None
    start_epoch: int
    end_epoch: int
    seed: int
    shard: str | None
    result: str
    network: NetworkSettings
    data: DataSettings
    train: TrainSettings
    data_cache_dir: str
    evaluate_test: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind} e{self.evaluation:05d}"


def evaluation_seed(run_seed: int, kind: str, evaluation: int) -> int:
    """A seed for one evaluation, derived from the run's seed and the evaluation's identity."""
    sequence = np.random.SeedSequence([run_seed, TASK_KINDS.index(kind), evaluation])
    return int(sequence.generate_state(1)[0])


def run_task(spec: TaskSpec) -> dict[str, Any]:
    """Train and evaluate one subnet; returns (and stores) its result record."""
    result_path = Path(spec.result)
    if result_path.exists():
        logger.info("%s already finished; reusing %s", spec.name, result_path)
        return dict(json.loads(result_path.read_text()))

    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    started = time.monotonic()
    try:
        outcome = _train_and_evaluate(spec)
    except DivergedError as error:
        logger.warning("%s diverged: %s", spec.name, error)
        outcome = {"status": "failed", "error": f"diverged: {error}", "valid_error": None}

    record = {
        "kind": spec.kind,
        "batch": spec.batch,
        "evaluation": spec.evaluation,
        "config": spec.config,
        "base_version": spec.base_version,
        "start_epoch": spec.start_epoch,
        "end_epoch": spec.end_epoch,
        "epochs_trained": spec.end_epoch - spec.start_epoch,
        "seed": spec.seed,
        "host": socket.gethostname(),
        "device": spec.train.device,
        "task_seconds": time.monotonic() - started,
        **outcome,
    }
    _write_result(result_path, record)
    return record


def _train_and_evaluate(spec: TaskSpec) -> dict[str, Any]:
    import torch

    from dehbws.data import load_dataset
    from dehbws.model import build_subnet, count_parameters, inherit, used_tensor_names
    from dehbws.train import evaluate, recalibrate_batchnorm, train_epochs

    if spec.train.num_threads > 0:
        torch.set_num_threads(spec.train.num_threads)
    torch.manual_seed(spec.seed)

    # Data: prepared once by the coordinator; the task only reads the cached file.
    dataset = load_dataset(
        spec.data, resolution=spec.network.resolution, cache_dir=spec.data_cache_dir
    )

    # Network: a real discrete subnet; with weight sharing it starts from the supernet.
    model = build_subnet(spec.config, spec.network)
    if spec.base_supernet is not None:
        names = list(model.state_dict().keys())
        state = read_tensors(Path(spec.base_supernet), names)
        inherit(model, {name: torch.as_tensor(np.asarray(value)) for name, value in state.items()})
        # Averaged BatchNorm statistics do not match any subnet: measure them again.
        recalibrate_batchnorm(model, dataset.train, settings=spec.train, seed=spec.seed)
    model.to(spec.train.device)

    # Train the increment of the cumulative budget.
    trained = train_epochs(
        model,
        dataset.train,
        learning_rate=spec.config["LearningRate"],
        weight_decay=spec.config["WeightDecay"],
        trivial_augment=spec.config["TrivialAugment"],
        start_epoch=spec.start_epoch,
        end_epoch=spec.end_epoch,
        settings=spec.train,
        seed=spec.seed,
    )

    # Evaluate with statistics measured on clean training images.
    recalibrate_batchnorm(model, dataset.train, settings=spec.train, seed=spec.seed)
    valid = evaluate(model, dataset.valid, settings=spec.train)
    outcome: dict[str, Any] = {
        "status": "ok",
        "valid_error": valid.error,
        "valid_loss": valid.loss,
        "train_seconds": trained.seconds,
        "images_seen": trained.images_seen,
        "parameters": count_parameters(model),
    }
    if spec.evaluate_test:
        test = evaluate(model, dataset.test, settings=spec.train)
        outcome["test_error"] = test.error
        outcome["test_accuracy"] = 1.0 - test.error

    # Shard: only the tensors this subnet really used, under the supernet's names.
    if spec.shard is not None:
        used = set(used_tensor_names(spec.config, spec.network))
        tensors = {
            name: value.detach().cpu().numpy()
            for name, value in model.state_dict().items()
            if name in used
        }
        write_tensors(Path(spec.shard), tensors, _shard_meta(spec, outcome))
        outcome["shard_tensors"] = len(tensors)
    return outcome


def _shard_meta(spec: TaskSpec, outcome: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": spec.kind,
        "evaluation": spec.evaluation,
        "config": spec.config,
        "fidelity_epochs": spec.end_epoch,
        "epochs_trained": spec.end_epoch - spec.start_epoch,
        "base_version": spec.base_version,
        "valid_error": outcome["valid_error"],
        "status": outcome["status"],
        "network": dataclasses.asdict(spec.network),
    }


def _write_result(path: Path, record: dict[str, Any]) -> None:
    from dehbws.run_folder import write_json_atomic

    write_json_atomic(path, record)
