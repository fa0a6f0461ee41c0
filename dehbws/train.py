"""The JAHS-Bench-201 training recipe: train epochs [start, end) of a 200-epoch cosine schedule.

SGD with Nesterov momentum 0.9, weight decay on all parameters, batch 256, plain cross-entropy,
no gradient clipping and no warm-up. The learning rate is constant within an epoch, so an
"epoch-e" result means epoch e of a full-length run and cumulative budgets continue one schedule.
Every epoch draws its batches and augmentations from a generator seeded by (seed, epoch), so a run
resumed at epoch e sees the same data as an uninterrupted one.

The fast path (`TrainSettings.channels_last`, `precision`, `compile`) is one code path for every
device: the split is moved to the device once and stays there, batches are gathered and augmented
where the data is, and the loss is read back once per epoch. On a GPU nothing in the step loop
waits for the host except a few hundred random numbers per batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dehbws.augment import augment_batch, normalize
from dehbws.data import ImageSplit, iterate_batches
from dehbws.errors import DivergedError, UserError
from dehbws.settings import TrainSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    """One finished training epoch: mean loss and accuracy on the (augmented) training batches."""

    epoch: int
    loss: float
    accuracy: float
    learning_rate: float
    seconds: float
    images: int


@dataclass(frozen=True)
class TrainResult:
    """What `train_epochs` did; `optimizer_state` (on the CPU) resumes momentum exactly."""

    epochs: tuple[EpochStats, ...]
    optimizer_state: dict[str, Any]
    seconds: float
    images_seen: int

    @property
    def losses(self) -> list[float]:
        return [stats.loss for stats in self.epochs]

    @property
    def accuracies(self) -> list[float]:
        return [stats.accuracy for stats in self.epochs]


@dataclass(frozen=True)
class EvalResult:
    """Error (1 - accuracy) and mean cross-entropy on a split."""

    error: float
    loss: float


def learning_rate_at(epoch: int, *, learning_rate: float, schedule_epochs: int) -> float:
    """Cosine annealing without restarts, constant within an epoch: lr0 at 0, lr0 / 2 halfway."""
    return 0.5 * learning_rate * (1.0 + math.cos(math.pi * epoch / schedule_epochs))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shuffling and augmentation generator, from (run seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def train_epochs(
    model: nn.Module,
    split: ImageSplit,
    *,
    learning_rate: float,
    weight_decay: float,
    trivial_augment: bool,
    start_epoch: int,
    end_epoch: int,
    settings: TrainSettings,
    seed: int,
    on_epoch_end: Callable[[int, EpochStats], None] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train epochs [start_epoch, end_epoch) of the schedule in place.

    Only `model`'s own parameters are optimised (a subnet is a real discrete network). Pass the
    previous result's `optimizer_state` to continue where a call stopped. Raises DivergedError on
    a non-finite loss or non-finite weights after an epoch.
    """
    _check_training_arguments(learning_rate, weight_decay, start_epoch, end_epoch, settings)
    if len(split) == 0:
        raise ValueError("the training split is empty, but must hold at least one image.")

    device = _configure_torch(settings)
    split = split.to(device)
    started_s = time.perf_counter()
    history = []
    with _fast_model(model, settings, device) as forward:
        # Created after the model reached its device and memory format, so that momentum
        # buffers share both.
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=learning_rate,
            momentum=settings.momentum,
            nesterov=True,
            weight_decay=weight_decay,
        )
        if optimizer_state is not None:
            _load_optimizer_state(optimizer, optimizer_state, weight_decay, settings)

        for epoch in range(start_epoch, end_epoch):
            epoch_lr = learning_rate_at(
                epoch, learning_rate=learning_rate, schedule_epochs=settings.schedule_epochs
            )
            stats = _train_one_epoch(
                model,
                forward,
                split,
                optimizer,
                epoch=epoch,
                epoch_lr=epoch_lr,
                trivial_augment=trivial_augment,
                settings=settings,
                seed=seed,
            )
            history.append(stats)
            logger.debug(
                "epoch %d: loss %.4f, accuracy %.4f, lr %.5g, %.1f s, %.0f images/s",
                epoch,
                stats.loss,
                stats.accuracy,
                stats.learning_rate,
                stats.seconds,
                stats.images / max(stats.seconds, 1e-9),
            )
            if on_epoch_end is not None:
                on_epoch_end(epoch, stats)

    return TrainResult(
        epochs=tuple(history),
        optimizer_state=_to_cpu(optimizer.state_dict()),
        seconds=time.perf_counter() - started_s,
        images_seen=sum(stats.images for stats in history),
    )


def _train_one_epoch(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    split: ImageSplit,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    epoch_lr: float,
    trivial_augment: bool,
    settings: TrainSettings,
    seed: int,
) -> EpochStats:
    """One pass over the shuffled, augmented training split at a fixed learning rate."""
    device = split.device
    started_s = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = epoch_lr
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    model.train()

    # Loss and hits are summed on the device and read once per epoch: reading the loss every
    # step would stall a GPU on each batch, and a diverged epoch wastes at most one epoch.
    # A NaN or inf in any step carries through the sum (cross-entropy is never negative).
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    images_seen = 0
    batches = iterate_batches(
        split, batch_size=settings.batch_size, shuffle=True, generator=generator
    )
    for images, targets in batches:
        inputs = augment_batch(images, trivial_augment=trivial_augment, generator=generator)
        inputs = _input_format(inputs, settings)

        # forward (under autocast when asked), backward, update
        with _autocast(settings, device):
            logits = forward(inputs)
            loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # bookkeeping, still on the device
        loss_sum += loss.detach() * len(targets)
        hits += (logits.detach().argmax(dim=1) == targets).sum()
        images_seen += len(targets)

    mean_loss = loss_sum.item() / images_seen  # the epoch's one host sync
    if not math.isfinite(mean_loss):
        raise DivergedError(
            f"training diverged in epoch {epoch}: mean loss {mean_loss} "
            f"(learning rate {epoch_lr:.5g})."
        )
    _check_finite_tensors(model, epoch)
    return EpochStats(
        epoch=epoch,
        loss=mean_loss,
        accuracy=hits.item() / images_seen,
        learning_rate=epoch_lr,
        seconds=time.perf_counter() - started_s,
        images=images_seen,
    )


def evaluate(model: nn.Module, split: ImageSplit, *, settings: TrainSettings) -> EvalResult:
    """Error and mean loss on a split, in eval mode on normalised (not augmented) images."""
    if len(split) == 0:
        raise ValueError("the evaluation split is empty, but must hold at least one image.")

    device = _configure_torch(settings)
    split = split.to(device)
    was_training = model.training
    model.eval()

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    batches = iterate_batches(split, batch_size=settings.batch_size, shuffle=False)
    with _fast_model(model, settings, device) as forward, torch.no_grad():
        for images, targets in batches:
            with _autocast(settings, device):
                logits = forward(_input_format(normalize(images), settings)).float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
            hits += (logits.argmax(dim=1) == targets).sum()
    model.train(was_training)

    return EvalResult(error=1.0 - hits.item() / len(split), loss=loss_sum.item() / len(split))


def recalibrate_batchnorm(
    model: nn.Module, split: ImageSplit, *, settings: TrainSettings, seed: int
) -> None:
    """Recompute BatchNorm running statistics over a few unaugmented training batches.

    Inherited or averaged weights do not match inherited running statistics, so these are reset
    and replaced by the cumulative average over `settings.bn_recalibration_batches` batches.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or settings.bn_recalibration_batches == 0:
        return

    device = _configure_torch(settings)
    split = split.to(device)
    was_training = model.training
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # None: a cumulative average instead of an exponential one

    generator = torch.Generator().manual_seed(seed)
    batches = iterate_batches(
        split, batch_size=settings.batch_size, shuffle=True, generator=generator
    )
    try:
        model.train()
        with _fast_model(model, settings, device) as forward, torch.no_grad():
            for index, (images, _) in enumerate(batches):
                if index == settings.bn_recalibration_batches:
                    break
                with _autocast(settings, device):
                    forward(_input_format(normalize(images), settings))
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)


def _check_training_arguments(
    learning_rate: float,
    weight_decay: float,
    start_epoch: int,
    end_epoch: int,
    settings: TrainSettings,
) -> None:
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate is {learning_rate!r}, but must be a finite number > 0.")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay is {weight_decay!r}, but must be a finite number >= 0.")
    if not 0 <= start_epoch <= end_epoch <= settings.schedule_epochs:
        raise ValueError(
            f"epochs [{start_epoch}, {end_epoch}) do not fit the schedule: they must satisfy "
            f"0 <= start_epoch <= end_epoch <= schedule_epochs ({settings.schedule_epochs})."
        )


def _configure_torch(settings: TrainSettings) -> torch.device:
    """The device to run on; also applies `num_threads` (0 keeps torch's default)."""
    if settings.num_threads > 0 and torch.get_num_threads() != settings.num_threads:
        torch.set_num_threads(settings.num_threads)

    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device is {settings.device!r}, but CUDA is not available on this machine; "
            "use device 'cpu' or run the task on a GPU node."
        )
    bf16_on_gpu = device.type == "cuda" and settings.precision == "bf16"
    if bf16_on_gpu and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"precision is 'bf16', but the GPU {torch.cuda.get_device_name(device)} has no "
            "bfloat16 support; use --precision fp32."
        )
    return device


# Compiled wrappers, one per model object: torch.compile traces once per model and shape, and
# task code calls the training functions once per epoch.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable[..., Any]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _fast_model(
    model: nn.Module, settings: TrainSettings, device: torch.device
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The model on `device` in the settings' memory format; yields the forward to call.

    On exit the weights are back in the standard layout, so state dicts, checkpoints and shards
    look the same whatever the fast-path options were.
    """
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if settings.compile:
        if model not in _COMPILED:
            _COMPILED[model] = torch.compile(model)
        forward = _COMPILED[model]
    try:
        yield forward
    finally:
        if settings.channels_last:
            model.to(memory_format=torch.contiguous_format)


def _autocast(settings: TrainSettings, device: torch.device) -> torch.autocast:
    """bfloat16 autocast for the forward pass when `precision` is 'bf16', else a no-op."""
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"
    )


def _input_format(inputs: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    if settings.channels_last:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    weight_decay: float,
    settings: TrainSettings,
) -> None:
    """Restore momentum buffers; the recipe's hyperparameters stay those of this call."""
    # load_state_dict may keep the given tensors, and the next steps would then change the
    # caller's saved state in place.
    optimizer.load_state_dict(copy.deepcopy(state))
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay
        group["momentum"] = settings.momentum
        group["nesterov"] = True


def _check_finite_tensors(model: nn.Module, epoch: int) -> None:
    """Raise DivergedError if a parameter or BatchNorm statistic holds a NaN or inf."""
    named = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    if not named:
        return

    finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named])
    if bool(finite.all()):
        return

    bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
    raise DivergedError(
        f"training diverged in epoch {epoch}: {len(bad)} tensors hold NaN or inf values, "
        f"first {bad[:3]}."
    )


def _to_cpu(value: Any) -> Any:
    """A deep copy of a nested state dict with every tensor moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return copy.deepcopy(value)
