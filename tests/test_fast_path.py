"""The fast training path on the CPU: channels_last, bf16 autocast, data held on the device.

A GPU runs exactly this code with device 'cuda'; the CPU supports both memory formats and
bfloat16 autocast, so the path is tested here for real. torch.compile is not: compiling even the
tiny network takes minutes on two CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from dehbws.cli import cli
from dehbws.data import FashionMNIST, ImageSplit, iterate_batches
from dehbws.errors import UserError
from dehbws.model import build_subnet, inherit, supernet_state
from dehbws.presets import RunSettings, preset
from dehbws.settings import NetworkSettings, TrainSettings
from dehbws.train import evaluate, recalibrate_batchnorm, train_epochs

NETWORK = NetworkSettings(width=4, cells_per_stage=1, resolution=0.25)
CONFIG: dict[str, Any] = {
    "Op1": 2, "Op2": 3, "Op3": 0, "Op4": 4, "Op5": 2, "Op6": 3,
    "Activation": "ReLU", "LearningRate": 0.1, "WeightDecay": 5e-4, "TrivialAugment": False,
}  # fmt: skip
FAST = TrainSettings(
    batch_size=32, bn_recalibration_batches=2, channels_last=True, precision="bf16"
)
PLAIN = TrainSettings(batch_size=32, bn_recalibration_batches=2)


def brightness_split(count: int, *, seed: int) -> ImageSplit:
    """A learnable toy task: class 1 images are bright, class 0 images dark (8x8 px)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (count,), generator=generator)
    noise = torch.randint(0, 100, (count, 1, 8, 8), generator=generator)
    images = (noise + 150 * labels[:, None, None, None]).to(torch.uint8)
    return ImageSplit(images=images, labels=labels)


def fresh_subnet() -> torch.nn.Module:
    subnet = build_subnet(CONFIG, NETWORK)
    inherit(subnet, supernet_state(NETWORK, seed=0))
    return subnet


def train(model: torch.nn.Module, settings: TrainSettings, epochs: int, **changes: Any) -> Any:
    options: dict[str, Any] = {
        "learning_rate": 0.1,
        "weight_decay": 5e-4,
        "trivial_augment": True,
        "seed": 0,
        **changes,
    }
    split = brightness_split(256, seed=1)
    return train_epochs(
        model, split, start_epoch=0, end_epoch=epochs, settings=settings, **options
    )


def record_convolutions(model: torch.nn.Module) -> list[tuple[torch.dtype, bool]]:
    """(output dtype, input is channels_last) of every inner convolution call, as it happens."""
    seen: list[tuple[torch.dtype, bool]] = []

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        if inputs[0].shape[1] > 1:  # a 1-channel tensor is both layouts at once
            nhwc = inputs[0].is_contiguous(memory_format=torch.channels_last)
            seen.append((output.dtype, nhwc))

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(hook)
    return seen


def test_channels_last_and_bf16_train_a_model_with_finite_falling_loss() -> None:
    model = fresh_subnet()
    seen = record_convolutions(model)

    result = train(model, FAST, epochs=4)

    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[-1] < result.losses[0]
    assert seen and all(dtype == torch.bfloat16 and nhwc for dtype, nhwc in seen)
    # The weights come back in the standard layout and precision, for checkpoints and shards.
    for name, tensor in model.state_dict().items():
        assert tensor.is_contiguous(), name
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name

    split = brightness_split(128, seed=2)
    recalibrate_batchnorm(model, split, settings=FAST, seed=0)
    evaluation = evaluate(model, split, settings=FAST)
    assert evaluation.error < 0.3 and math.isfinite(evaluation.loss)


def test_the_plain_path_stays_float32_and_contiguous() -> None:
    model = fresh_subnet()
    seen = record_convolutions(model)

    train(model, PLAIN, epochs=1)

    assert seen and all(dtype == torch.float32 and not nhwc for dtype, nhwc in seen)


def test_channels_last_alone_changes_the_layout_not_the_result() -> None:
    plain, nhwc = fresh_subnet(), fresh_subnet()
    channels_last = TrainSettings(batch_size=32, bn_recalibration_batches=2, channels_last=True)

    first = train(plain, PLAIN, epochs=2)
    second = train(nhwc, channels_last, epochs=2)

    assert second.losses == pytest.approx(first.losses, rel=1e-3)
    for name, tensor in plain.state_dict().items():
        other = nhwc.state_dict()[name]
        if tensor.is_floating_point():
            torch.testing.assert_close(other, tensor, rtol=1e-3, atol=1e-4)


def test_resuming_the_fast_path_from_its_optimizer_state_matches_one_run() -> None:
    whole, halves = fresh_subnet(), fresh_subnet()

    train(whole, FAST, epochs=2)
    first = train(halves, FAST, epochs=1)
    split = brightness_split(256, seed=1)
    train_epochs(
        halves,
        split,
        learning_rate=0.1,
        weight_decay=5e-4,
        trivial_augment=True,
        seed=0,
        start_epoch=1,
        end_epoch=2,
        settings=FAST,
        optimizer_state=first.optimizer_state,
    )

    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, halves.state_dict()[name]), name


def test_a_split_on_its_device_is_not_copied_and_batches_stay_there() -> None:
    split = brightness_split(100, seed=3)

    assert split.to("cpu") is split
    assert split.to(torch.device("cpu")) is split
    generator = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(split, batch_size=32, shuffle=True, generator=generator))
    assert [len(labels) for _, labels in batches] == [32, 32, 32, 4]
    assert all(images.device == split.device for images, _ in batches)
    seen = torch.cat([labels for _, labels in batches])
    assert sorted(seen.tolist()) == sorted(split.labels.tolist())

    dataset = FashionMNIST(train=split, valid=split, test=split, side_px=8)
    assert dataset.to("cpu").train is split


def test_a_split_for_an_absent_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(UserError, match="CUDA is not available"):
        brightness_split(8, seed=0).to("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_split_and_every_batch_live_there() -> None:
    split = brightness_split(100, seed=3).to("cuda")
    generator = torch.Generator().manual_seed(0)

    for images, labels in iterate_batches(split, batch_size=32, shuffle=True, generator=generator):
        assert images.is_cuda and labels.is_cuda
    model = fresh_subnet()
    result = train_epochs(
        model,
        split,
        learning_rate=0.1,
        weight_decay=5e-4,
        trivial_augment=True,
        start_epoch=0,
        end_epoch=1,
        settings=TrainSettings(batch_size=32, device="cuda", channels_last=True, precision="bf16"),
        seed=0,
    )
    assert math.isfinite(result.losses[0])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"precision": "fp16"}, "precision is 'fp16', but must be one of \\['fp32', 'bf16'\\]"),
        ({"channels_last": "yes"}, "channels_last is 'yes', but must be true or false"),
        ({"compile": 1}, "compile is 1, but must be true or false"),
        ({"device": "tpu"}, "device is 'tpu', but must be 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_bad_fast_path_options_are_user_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        TrainSettings(**changes)


def test_settings_written_before_the_fast_path_still_load() -> None:
    stored = preset("tiny").to_dict()
    for key in ("channels_last", "precision", "compile"):
        del stored["train"][key]

    settings = RunSettings.from_dict(json.loads(json.dumps(stored)))

    assert settings.train.channels_last is False
    assert settings.train.precision == "fp32"
    assert settings.train.compile is False


def test_the_cli_options_reach_the_run_settings_and_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    arguments = ["run", "--preset", "tiny", "--run-dir", str(run_dir), "--fevals", "1"]
    arguments += ["--finetune-epochs", "0", "--cache-dir", str(tmp_path / "data")]

    result = CliRunner().invoke(cli, [*arguments, "--channels-last", "--precision", "bf16"])

    assert result.exit_code == 0, result.output
    train_settings = json.loads((run_dir / "settings.json").read_text())["train"]
    assert train_settings["channels_last"] is True
    assert train_settings["precision"] == "bf16"
    assert train_settings["compile"] is False
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [line["status"] for line in history] == ["ok"]


def test_an_unknown_precision_on_the_command_line_exits_with_code_2(tmp_path: Path) -> None:
    arguments = ["run", "--preset", "tiny", "--run-dir", str(tmp_path / "run")]

    result = CliRunner().invoke(cli, [*arguments, "--precision", "fp16"])

    assert result.exit_code == 2
    assert "fp16" in result.output and "bf16" in result.output
    assert not (tmp_path / "run").exists()
