"""The fixed CNN baseline: its shape, and a real (tiny) training through an executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_settings

from dehbws.baselines.fixed_cnn import CHANNELS, HYPERPARAMETERS, FixedCNN, evaluate_fixed_cnn
from dehbws.errors import UserError
from dehbws.executors import make_executor
from dehbws.run_folder import read_json


def expected_parameters(side_px: int, channels: tuple[int, ...]) -> int:
    """Conv weights and biases, BatchNorm scale and shift, and the linear layer, by hand."""
    total, previous = 0, 1
    for width in channels:
        total += previous * width * 9 + width + 2 * width
        previous = width
    pooled_px = side_px // 2 ** len(channels)
    return total + previous * pooled_px**2 * 10 + 10


@pytest.mark.parametrize("side_px", [8, 16, 32])
def test_fixed_cnn_maps_images_to_ten_logits(side_px: int) -> None:
    model = FixedCNN(side_px=side_px)

    logits = model(torch.zeros(3, 1, side_px, side_px))

    assert logits.shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(side_px, CHANNELS)


def test_fixed_cnn_refuses_images_smaller_than_its_pooling() -> None:
    with pytest.raises(ValueError, match="side_px is 4"):
        FixedCNN(side_px=4)


def test_fixed_cnn_trains_and_records_its_test_accuracy(new_run: Any, data_cache: Path) -> None:
    folder = new_run(tiny_settings(method="fixed-cnn"))
    executor = make_executor("debug", log_dir=folder.task_log_dir)

    record = evaluate_fixed_cnn(folder, executor, epochs=2, data_cache_dir=data_cache)

    assert record["status"] == "ok"
    assert record["kind"] == "fixed-cnn"
    assert record["epochs_trained"] == 2
    assert record["config"] == HYPERPARAMETERS
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert record["test_accuracy"] == pytest.approx(1.0 - record["test_error"])
    assert record["parameters"] == expected_parameters(8, CHANNELS)
    result = read_json(folder.result_file)
    assert result["finetune"]["scratch-2"]["test_accuracy"] == record["test_accuracy"]
    assert result["incumbent"] is None
    assert folder.load_state().finished

    # A second call finds the task's result file and reuses it instead of training again.
    again = evaluate_fixed_cnn(folder, executor, epochs=2, data_cache_dir=data_cache)
    assert again["task_seconds"] == record["task_seconds"]


@pytest.mark.parametrize(("epochs", "fragment"), [(0, "epochs is 0"), (201, "200 epochs")])
def test_bad_epochs_are_a_user_error(new_run: Any, epochs: int, fragment: str) -> None:
    folder = new_run(tiny_settings(method="fixed-cnn"))
    executor = make_executor("debug", log_dir=folder.task_log_dir)

    with pytest.raises(UserError, match=fragment):
        evaluate_fixed_cnn(folder, executor, epochs=epochs)
