"""What one array task runs: inherit from a supernet version, train, evaluate, write a shard.

A task receives a `TaskSpec` of plain values, reads exactly the files the spec names and
writes exactly one shard and one result file. Running it twice gives the same files, so a
requeued or retried task is harmless; a finished task returns its stored result at once.
Training saves a checkpoint after every epoch, and a task that finds one continues from it (on
SLURM, `TaskRunner` is requeued with it when the task is preempted or reaches its time limit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from submitit.helpers import Checkpointable, DelayedSubmission

from dehbws import task_faults
from dehbws.errors import DivergedError
from dehbws.settings import DataSettings, NetworkSettings, TrainSettings
from dehbws.store import read_tensors, write_tensors
from dehbws.task_checkpoint import (
    TrainingState,
    load_training_state,
    remove_training_state,
    save_training_state,
)

logger = logging.getLogger(__name__)

TASK_KINDS: tuple[str, ...] = ("search", "warmup", "finetune", "scratch", "fixed-cnn")


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


class TaskRunner(Checkpointable):
    """`run_task` as a submitit job that SLURM may preempt or stop at its time limit.

    On SLURM's warning signal submitit calls `checkpoint`, stores the returned submission and
    requeues the job; the requeued task finds the checkpoint of its last finished epoch (see
    `dehbws.task_checkpoint`) and continues from there.
    """

    def __call__(self, spec: TaskSpec) -> dict[str, Any]:
        _configure_task_logging()
        return run_task(spec)

    def checkpoint(self, spec: TaskSpec) -> DelayedSubmission:
        logger.warning(
            "%s: preempted or at its time limit (job %s); requeueing, it resumes from its "
            "checkpoint",
            spec.name,
            _slurm_job_id(),
        )
        return DelayedSubmission(self, spec)


def _configure_task_logging() -> None:
    """INFO lines to stderr (the task's log) when nothing in this process configured logging.

    The task process is started by submitit, not by the CLI, so this entry point is the one
    place that can; in a process that already logs (the debug executor) it changes nothing.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _slurm_job_id() -> str | None:
    """This task's SLURM id (`ARRAY_TASK` for array tasks), or None outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def run_task(spec: TaskSpec) -> dict[str, Any]:
    """Train and evaluate one subnet; returns (and stores) its result record."""
    result_path = Path(spec.result)
    if result_path.exists():
        logger.info("%s already finished; reusing %s", spec.name, result_path)
        remove_training_state(spec)
        return dict(json.loads(result_path.read_text()))

    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    _remove_stale_outputs(spec)
    started = time.monotonic()
    faults = task_faults.active_faults(spec)
    task_faults.inject_at_start(spec, faults)
    try:
        outcome = _train_and_evaluate(spec, epoch_delay_s=task_faults.epoch_delay_s(faults))
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
        "slurm_job": _slurm_job_id(),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **outcome,
    }
    _write_result(result_path, record)
    remove_training_state(spec)
    task_faults.inject_at_end(spec, faults)
    return record


def _build_model(spec: TaskSpec) -> Any:
    """The subnet of the spec's configuration, or the fixed CNN baseline for that task kind."""
    if spec.kind == "fixed-cnn":
        from dehbws.baselines.fixed_cnn import build_fixed_cnn

        return build_fixed_cnn(spec.network)
    from dehbws.model import build_subnet

    return build_subnet(spec.config, spec.network)


def _train_and_evaluate(spec: TaskSpec, *, epoch_delay_s: float = 0.0) -> dict[str, Any]:
    import torch

    from dehbws.data import load_dataset
    from dehbws.model import count_parameters, inherit, used_tensor_names
    from dehbws.train import evaluate, recalibrate_batchnorm, train_epochs

    # One thread per CPU that SLURM gave the task, unless the settings name a number.
    threads = spec.train.num_threads or int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(spec.seed)

    # Data: prepared once by the coordinator; the task only reads the cached file.
    dataset = load_dataset(
        spec.data, resolution=spec.network.resolution, cache_dir=spec.data_cache_dir
    ).to(spec.train.device)  # held on the training device for the whole task

    # Network: a real discrete subnet. It continues from its own checkpoint when an earlier
    # start of this task left one; otherwise, with weight sharing, it starts from the supernet.
    model = _build_model(spec)
    saved = load_training_state(spec)
    if saved is not None:
        model.load_state_dict(saved.model)
        logger.info(
            "%s resumes from its checkpoint after epoch %d (restart %s of job %s)",
            spec.name,
            saved.next_epoch - 1,
            os.environ.get("SLURM_RESTART_COUNT", "0"),
            _slurm_job_id(),
        )
    elif spec.base_supernet is not None:
        names = list(model.state_dict().keys())
        state = read_tensors(Path(spec.base_supernet), names)
        inherit(model, {name: torch.as_tensor(np.asarray(value)) for name, value in state.items()})
        # Averaged BatchNorm statistics do not match any subnet: measure them again.
        recalibrate_batchnorm(model, dataset.train, settings=spec.train, seed=spec.seed)
    model.to(spec.train.device)

    # Train the increment of the cumulative budget one epoch at a time (each epoch has its own
    # generator), saving the state after each so that a requeued task loses at most one.
    progress = saved or TrainingState(spec.start_epoch, {}, {}, 0.0, 0)
    for epoch in range(progress.next_epoch, spec.end_epoch):
        trained = train_epochs(
            model,
            dataset.train,
            learning_rate=spec.config["LearningRate"],
            weight_decay=spec.config["WeightDecay"],
            trivial_augment=spec.config["TrivialAugment"],
            start_epoch=epoch,
            end_epoch=epoch + 1,
            settings=spec.train,
            seed=spec.seed,
            optimizer_state=progress.optimizer or None,
        )
        progress = TrainingState(
            next_epoch=epoch + 1,
            model=model.state_dict(),
            optimizer=trained.optimizer_state,
            train_seconds=progress.train_seconds + trained.seconds,
            images_seen=progress.images_seen + trained.images_seen,
        )
        save_training_state(spec, progress)
        if epoch_delay_s > 0:  # only in fault-injection tests
            time.sleep(epoch_delay_s)

    # Evaluate with statistics measured on clean training images.
    evaluate_started = time.monotonic()
    recalibrate_batchnorm(model, dataset.train, settings=spec.train, seed=spec.seed)
    valid = evaluate(model, dataset.valid, settings=spec.train)
    outcome: dict[str, Any] = {
        "status": "ok",
        "valid_error": valid.error,
        "valid_loss": valid.loss,
        "train_seconds": progress.train_seconds,
        "evaluate_seconds": time.monotonic() - evaluate_started,
        "images_seen": progress.images_seen,
        "resumed_from_epoch": None if saved is None else saved.next_epoch,
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


def _remove_stale_outputs(spec: TaskSpec) -> None:
    # An earlier attempt of this task that was killed mid-write leaves its temporary file.
    for output in (spec.shard, spec.result):
        if output is not None:
            for path in Path(output).parent.glob(f".{Path(output).name}.*.tmp"):
                path.unlink(missing_ok=True)


def _write_result(path: Path, record: dict[str, Any]) -> None:
    from dehbws.run_folder import write_json_atomic

    write_json_atomic(path, record)
