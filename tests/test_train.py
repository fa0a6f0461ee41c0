"""The training recipe on tiny networks and random images: schedule, resume, divergence, BN."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dehbws.augment import normalize
from dehbws.data import ImageSplit
from dehbws.errors import DivergedError, UserError
from dehbws.model import build_subnet, inherit, supernet_state
from dehbws.settings import NetworkSettings, TrainSettings
from dehbws.train import (
    EpochStats,
    evaluate,
    learning_rate_at,
    recalibrate_batchnorm,
    train_epochs,
)

NETWORK = NetworkSettings(width=4, cells_per_stage=1, resolution=0.25)
SETTINGS = TrainSettings(batch_size=32, bn_recalibration_batches=2)
CUDA = TrainSettings(batch_size=32, bn_recalibration_batches=2, device="cuda")
CONFIG: dict[str, Any] = {
    "Op1": 2, "Op2": 3, "Op3": 0, "Op4": 4, "Op5": 2, "Op6": 3,
    "Activation": "ReLU", "LearningRate": 0.1, "WeightDecay": 5e-4, "TrivialAugment": False,
}  # fmt: skip


def brightness_split(count: int, *, seed: int) -> ImageSplit:
    """A learnable toy task: class 1 images are bright, class 0 images dark (8x8 px)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (count,), generator=generator)
    noise = torch.randint(0, 100, (count, 1, 8, 8), generator=generator)
    images = (noise + 150 * labels[:, None, None, None]).to(torch.uint8)
    return ImageSplit(images=images, labels=labels)


def fresh_subnet(config: dict[str, Any] = CONFIG) -> torch.nn.Module:
    subnet = build_subnet(config, NETWORK)
    inherit(subnet, supernet_state(NETWORK, seed=0))
    return subnet


def train(model: torch.nn.Module, split: ImageSplit, start: int, end: int, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        learning_rate=0.1, weight_decay=5e-4, trivial_augment=False, settings=SETTINGS, seed=0
    )
    options.update(kwargs)
    return train_epochs(model, split, start_epoch=start, end_epoch=end, **options)


def states_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    other = second.state_dict()
    return all(torch.equal(tensor, other[name]) for name, tensor in first.state_dict().items())


def test_loss_decreases_on_a_learnable_task() -> None:
    result = train(fresh_subnet(), brightness_split(256, seed=0), 0, 4)

    assert len(result.epochs) == 4
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.accuracies[-1] > 0.8
    assert result.images_seen == 4 * 256
    assert result.seconds > 0


def test_learning_rate_follows_the_cosine_schedule() -> None:
    assert learning_rate_at(0, learning_rate=0.4, schedule_epochs=200) == 0.4
    assert learning_rate_at(100, learning_rate=0.4, schedule_epochs=200) == pytest.approx(0.2)
    assert learning_rate_at(200, learning_rate=0.4, schedule_epochs=200) == pytest.approx(0.0)

    split = brightness_split(32, seed=0)
    seen: list[tuple[int, EpochStats]] = []
    first = train(fresh_subnet(), split, 0, 1, learning_rate=0.4)
    later = train(
        fresh_subnet(),
        split,
        100,
        102,
        learning_rate=0.4,
        on_epoch_end=lambda epoch, stats: seen.append((epoch, stats)),
    )

    assert first.epochs[0].learning_rate == 0.4
    assert [stats.epoch for stats in later.epochs] == [100, 101]
    assert later.epochs[0].learning_rate == pytest.approx(0.2)
    expected = 0.2 * (1 + math.cos(math.pi * 101 / 200))
    assert later.epochs[1].learning_rate == pytest.approx(expected)
    assert later.optimizer_state["param_groups"][0]["lr"] == pytest.approx(expected)
    assert [epoch for epoch, _ in seen] == [100, 101]
    assert seen[1][1] == later.epochs[1]


def test_resuming_with_the_optimizer_state_equals_one_uninterrupted_run() -> None:
    split = brightness_split(96, seed=1)
    whole, resumed, restarted = fresh_subnet(), fresh_subnet(), fresh_subnet()

    train(whole, split, 0, 4, trivial_augment=True)
    first_half = train(resumed, split, 0, 2, trivial_augment=True)
    train(resumed, split, 2, 4, trivial_augment=True, optimizer_state=first_half.optimizer_state)
    train(restarted, split, 0, 2, trivial_augment=True)
    train(restarted, split, 2, 4, trivial_augment=True)

    assert states_equal(whole, resumed)
    # Without the momentum buffers the continuation differs: the state really is used.
    assert not states_equal(whole, restarted)


def test_the_seed_decides_batches_and_augmentation() -> None:
    split = brightness_split(64, seed=2)
    first, same, other = fresh_subnet(), fresh_subnet(), fresh_subnet()

    train(first, split, 0, 1, seed=5)
    train(same, split, 0, 1, seed=5)
    train(other, split, 0, 1, seed=6)

    assert states_equal(first, same)
    assert not states_equal(first, other)


def test_only_the_subnets_own_parameters_are_trained() -> None:
    state = supernet_state(NETWORK, seed=0)
    saved = {name: tensor.clone() for name, tensor in state.items()}
    subnet = build_subnet(CONFIG, NETWORK)
    inherit(subnet, state)

    result = train(subnet, brightness_split(64, seed=3), 0, 1)

    parameters = list(subnet.parameters())
    assert len(result.optimizer_state["param_groups"][0]["params"]) == len(parameters)
    assert all(torch.equal(state[name], saved[name]) for name in state)
    trained = subnet.state_dict()
    for name, parameter in subnet.named_parameters():
        assert not torch.equal(parameter.detach(), saved[name]), f"{name} did not train"
    assert not any(".edges.0." in name and "conv1x1" in name for name in trained)


def test_a_huge_learning_rate_diverges() -> None:
    with pytest.raises(DivergedError, match="epoch 0"):
        train(fresh_subnet(), brightness_split(128, seed=4), 0, 3, learning_rate=1e6)


def test_an_injected_nan_weight_diverges() -> None:
    subnet = fresh_subnet()
    with torch.no_grad():
        subnet.get_parameter("cells.0.edges.0.conv3x3.conv.weight")[0, 0, 0, 0] = math.nan

    with pytest.raises(DivergedError, match=r"epoch 7: mean loss nan"):
        train(subnet, brightness_split(32, seed=5), 7, 8)


def test_a_non_finite_statistic_with_a_finite_loss_diverges() -> None:
    subnet = fresh_subnet()
    # In train mode BatchNorm uses batch statistics, so the loss stays finite.
    subnet.get_buffer("head.bn.running_mean")[0] = math.inf

    with pytest.raises(DivergedError, match=r"head\.bn\.running_mean"):
        train(subnet, brightness_split(32, seed=5), 0, 1)


def test_bad_epoch_ranges_are_refused() -> None:
    split = brightness_split(32, seed=0)
    with pytest.raises(ValueError, match=r"epochs \[3, 2\)"):
        train(fresh_subnet(), split, 3, 2)
    with pytest.raises(ValueError, match="schedule_epochs"):
        train(fresh_subnet(), split, 199, 201)


def test_recalibration_sets_running_stats_to_the_batch_statistics() -> None:
    split = brightness_split(64, seed=6)
    subnet = fresh_subnet()
    running_mean = subnet.get_buffer("stem.bn.running_mean")
    running_var = subnet.get_buffer("stem.bn.running_var")
    running_mean.fill_(5.0)
    running_var.fill_(100.0)
    subnet.eval()

    one_batch = TrainSettings(batch_size=64, bn_recalibration_batches=1)
    recalibrate_batchnorm(subnet, split, settings=one_batch, seed=0)

    with torch.no_grad():
        stem_out = subnet.get_submodule("stem.conv")(normalize(split.images))  # [64, 4, 8, 8]
    expected_mean = stem_out.mean(dim=(0, 2, 3))
    expected_var = stem_out.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    assert torch.allclose(running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(running_var, expected_var, rtol=1e-4)
    assert subnet.get_submodule("stem.bn").momentum == 0.1
    assert not subnet.training

    # Two half batches: the cumulative average of two equal-sized batch means is the mean.
    two_batches = TrainSettings(batch_size=32, bn_recalibration_batches=2)
    recalibrate_batchnorm(subnet, split, settings=two_batches, seed=1)
    assert torch.allclose(running_mean, expected_mean, atol=1e-5)
    assert int(subnet.get_buffer("stem.bn.num_batches_tracked")) == 2


def test_evaluate_reports_error_as_one_minus_accuracy(caplog: pytest.LogCaptureFixture) -> None:
    split = brightness_split(100, seed=7)
    subnet = fresh_subnet()
    with caplog.at_level(logging.DEBUG, logger="dehbws.train"):
        train(subnet, split, 0, 2)
    recalibrate_batchnorm(subnet, split, settings=SETTINGS, seed=0)
    subnet.train()

    result = evaluate(subnet, split, settings=TrainSettings(batch_size=33))

    assert subnet.training, "evaluate restores the mode it found"
    subnet.eval()
    with torch.no_grad():
        logits = subnet(normalize(split.images))
    accuracy = (logits.argmax(dim=1) == split.labels).float().mean().item()
    assert result.error == pytest.approx(1.0 - accuracy)
    assert result.loss == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    assert result.error < 0.5
    assert "epoch 1: loss" in caplog.text


def test_an_unavailable_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(UserError, match="CUDA is not available"):
        train(fresh_subnet(), brightness_split(32, seed=0), 0, 1, settings=CUDA)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_gpu_resumes_from_a_cpu_optimizer_state() -> None:
    split = brightness_split(128, seed=8)
    subnet = fresh_subnet()

    first = train(subnet, split, 0, 1, settings=CUDA)
    second = train(subnet, split, 1, 2, settings=CUDA, optimizer_state=first.optimizer_state)
    recalibrate_batchnorm(subnet, split, settings=CUDA, seed=0)
    result = evaluate(subnet, split, settings=CUDA)

    assert next(subnet.parameters()).device.type == "cuda"
    momentum = next(iter(second.optimizer_state["state"].values()))["momentum_buffer"]
    assert momentum.device.type == "cpu"
    assert 0.0 <= result.error <= 1.0 and math.isfinite(result.loss)
