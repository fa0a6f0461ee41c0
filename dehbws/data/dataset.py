"""The prepared dataset as tensors, and mini-batches over one split."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dehbws.errors import UserError


@dataclass(frozen=True)
class ImageSplit:
    """One split: uint8 images [n, 1, side_px, side_px] (contiguous), int64 labels [n]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images are {self.images.dtype} of shape {tuple(self.images.shape)}, but must "
                "be uint8 of shape [n, 1, side_px, side_px]"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels are {self.labels.dtype} of shape {tuple(self.labels.shape)}, but must "
                f"be int64 of shape [{self.images.shape[0]}]"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ImageSplit:
        """This split on `device` (itself if it is there already).

        A split held on the GPU keeps every batch there: shuffling, augmentation and the
        forward pass then never wait for a host-to-device copy.
        """
        target, here = torch.device(device), self.images.device
        if here.type == target.type and target.index in (None, here.index):
            return self
        if target.type == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"device is {str(device)!r}, but CUDA is not available on this machine; use "
                "device 'cpu' or run the task on a GPU node."
            )
        return ImageSplit(images=self.images.to(target), labels=self.labels.to(target))


@dataclass(frozen=True)
class FashionMNIST:
    """Fashion-MNIST split into train/valid/test, every image `side_px` pixels square."""

    train: ImageSplit
    valid: ImageSplit
    test: ImageSplit
    side_px: int

    def to(self, device: torch.device | str) -> FashionMNIST:
        """Every split on `device` (see `ImageSplit.to`)."""
        return FashionMNIST(
            train=self.train.to(device),
            valid=self.valid.to(device),
            test=self.test.to(device),
            side_px=self.side_px,
        )


def iterate_batches(
    split: ImageSplit,
    *,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches (uint8 images, int64 labels) of one split; a generator makes order repeatable.

    Unshuffled batches are views of the split; shuffled ones copy only the batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size is {batch_size!r}, but must be an integer >= 1")

    num_images = len(split)
    stop = num_images - num_images % batch_size if drop_last else num_images
    order = None
    if shuffle:
        # Drawn on the generator's device (the CPU, so every device sees the same order), then
        # moved to the split's device once per pass rather than once per batch.
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(num_images, generator=generator, device=device).to(split.device)

    for start in range(0, stop, batch_size):
        if order is None:
            yield (
                split.images[start : start + batch_size],
                split.labels[start : start + batch_size],
            )
        else:
            batch_indices = order[start : start + batch_size]
            yield split.images[batch_indices], split.labels[batch_indices]
