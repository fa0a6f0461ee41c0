"""The DEHB-WS paper's fixed CNN baseline, trained with the JAHS-Bench-201 recipe.

Three convolution blocks (conv 3x3 -> ReLU -> BatchNorm -> max-pool 2x2) and one linear layer.
The paper names the layers but not their widths or hyperparameters; dehbws uses 32, 64 and 128
channels and the defaults of the JAHS-Bench-201 space (learning rate 0.1, weight decay 5e-4, no
TrivialAugment), which train this network stably with SGD, Nesterov momentum and BatchNorm. It
is trained from scratch on epochs [0, E) of the 200-epoch cosine schedule, like every "retrain
for E epochs" final evaluation, and tested on the run's test set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dehbws.errors import UserError
from dehbws.executors.base import Executor, TaskOutcome
from dehbws.run_folder import RunFolder, read_json, write_json_atomic
from dehbws.settings import NetworkSettings
from dehbws.task import TaskSpec, evaluation_seed

logger = logging.getLogger(__name__)

TASK_KIND = "fixed-cnn"
CHANNELS: tuple[int, int, int] = (32, 64, 128)
# JAHS-Bench-201's default hyperparameters; "Activation" documents the fixed ReLU.
HYPERPARAMETERS: dict[str, Any] = {
    "Activation": "ReLU",
    "LearningRate": 0.1,
    "WeightDecay": 5e-4,
    "TrivialAugment": False,
}
CLASSES = 10


class FixedCNN(nn.Module):
    """Conv 3x3 -> ReLU -> BatchNorm -> max-pool, three times, then a linear classifier."""

    def __init__(
        self,
        *,
        side_px: int = 32,
        channels: tuple[int, ...] = CHANNELS,
        in_channels: int = 1,
        classes: int = CLASSES,
    ) -> None:
        super().__init__()
        pooled_px = side_px // 2 ** len(channels)
        if pooled_px < 1:
            raise ValueError(
                f"side_px is {side_px}, but {len(channels)} max-pools need at least "
                f"{2 ** len(channels)} pixels."
            )
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            blocks += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.BatchNorm2d(width),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(previous * pooled_px * pooled_px, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [n, 1, side, side] -> [n, C, side / 8, side / 8] -> [n, C * (side / 8)^2] -> [n, 10]
        return self.classifier(torch.flatten(self.features(x), start_dim=1))


def build_fixed_cnn(network: NetworkSettings) -> FixedCNN:
    """The fixed CNN for the run's image resolution (width and depth settings do not apply)."""
    return FixedCNN(side_px=round(32 * network.resolution))


def result_name(epochs: int) -> str:
    """The key of the fixed CNN's result in result.json, like a from-scratch final evaluation."""
    return f"scratch-{epochs}"


def evaluate_fixed_cnn(
    folder: RunFolder,
    executor: Executor,
    *,
    epochs: int,
    data_cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train the fixed CNN for `epochs` epochs as one task; records and returns its result."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs is {epochs!r}, but must be an integer >= 1.")
    settings = folder.load_settings()
    if epochs > settings.train.schedule_epochs:
        raise UserError(
            f"epochs is {epochs}, but the schedule has {settings.train.schedule_epochs} epochs."
        )
    name = result_name(epochs)
    spec = TaskSpec(
        kind=TASK_KIND,
        batch=0,
        evaluation=0,
        config=dict(HYPERPARAMETERS),
        base_version=None,
        base_supernet=None,
        start_epoch=0,
        end_epoch=epochs,
        seed=evaluation_seed(settings.search.seed, TASK_KIND, epochs),
        shard=None,
        result=str(folder.root / "final" / f"{name}.json"),
        network=settings.network,
        data=settings.data,
        train=settings.train,
        data_cache_dir=str(data_cache_dir or folder.root / "data"),
        evaluate_test=True,
    )

    outcomes: list[TaskOutcome] = []
    executor.run([spec], outcomes.append)
    record = outcomes[0].record
    if record is None:
        raise RuntimeError(f"the fixed CNN ({name}) failed: {outcomes[0].error}")

    result = read_json(folder.result_file) if folder.result_file.exists() else {}
    result.setdefault("incumbent", None)
    result.setdefault("fevals", 0)
    result.setdefault("epochs_spent", 0)
    result.setdefault("finetune", {})[name] = {**record, "weights": None}
    write_json_atomic(folder.result_file, result)
    state = folder.load_state()
    state.finished = True
    folder.save_state(state)
    if record["status"] == "ok":
        logger.info("fixed CNN, %d epochs: test accuracy %.4f", epochs, record["test_accuracy"])
    else:
        logger.warning("the fixed CNN (%s) failed: %s", name, record.get("error"))
    return dict(record)
