"""Batched train-time augmentation: TrivialAugment ops, flip, crop, normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dehbws.augment import (
    MEAN,
    STD,
    TRIVIAL_AUGMENT_OPS,
    augment_batch,
    normalize,
    posterize,
    random_crop,
    random_horizontal_flip,
    solarize,
    translate_x,
    trivial_augment_batch,
)
from dehbws.data.idx import IMAGES_MAGIC, read_idx_file
from dehbws.data.prepare import prepare_images

TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
OPS_BY_NAME = {op.name: op for op in TRIVIAL_AUGMENT_OPS}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """64 real Fashion-MNIST test images at 32 px, or random ones without the Debian package."""
    if TEST_IMAGES.is_file():
        originals = read_idx_file(TEST_IMAGES, magic=IMAGES_MAGIC, expected_count=10_000)
        return prepare_images(originals[:64], side_px=32)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=generator)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same_per_image(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """A bool per image: whether the two batches hold the same pixels there."""
    return (first == second).flatten(1).all(dim=1)


def test_normalize_scales_and_inverts(images: torch.Tensor) -> None:
    normalized = normalize(images)

    assert normalized.dtype == torch.float32
    assert normalized.shape == images.shape
    extremes = normalize(torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1))
    assert extremes.flatten().tolist() == pytest.approx([-MEAN / STD, (1 - MEAN) / STD])
    restored = (normalized * STD + MEAN) * 255
    assert torch.equal(restored.round().to(torch.uint8), images)

    with pytest.raises(ValueError, match="must be uint8"):
        normalize(images.float())


@pytest.mark.parametrize("side_px", [32, 16, 8])
@pytest.mark.parametrize("trivial_augment", [False, True])
def test_augment_batch_shapes_and_range(
    images: torch.Tensor, side_px: int, trivial_augment: bool
) -> None:
    batch = torch.nn.functional.interpolate(images.float(), size=(side_px, side_px))
    batch = batch.to(torch.uint8)

    out = augment_batch(batch, trivial_augment=trivial_augment, generator=_seeded(0))
    assert out.dtype == torch.float32
    assert out.shape == batch.shape
    assert out.min() >= -MEAN / STD - 1e-6
    assert out.max() <= (1 - MEAN) / STD + 1e-6


@pytest.mark.parametrize("trivial_augment", [False, True])
def test_augment_batch_follows_the_seed(images: torch.Tensor, trivial_augment: bool) -> None:
    def run(seed: int) -> torch.Tensor:
        return augment_batch(images, trivial_augment=trivial_augment, generator=_seeded(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not torch.equal(run(7), normalize(images))


def test_flip_mirrors_about_half_the_images(images: torch.Tensor) -> None:
    out = random_horizontal_flip(images, generator=_seeded(0))

    kept = _same_per_image(out, images)
    flipped = _same_per_image(out, images.flip(-1)) & ~kept
    assert torch.all(kept | flipped)
    assert 16 <= int(flipped.sum()) <= 48
    assert torch.equal(
        random_horizontal_flip(images, generator=_seeded(0), probability=1.0), images.flip(-1)
    )


def test_crop_takes_a_window_of_the_zero_padded_image(images: torch.Tensor) -> None:
    out = random_crop(images, padding_px=4, generator=_seeded(0))
    padded = torch.nn.functional.pad(images, [4] * 4)

    offsets = []
    for index in range(8):
        matches = [
            (top, left)
            for top in range(9)
            for left in range(9)
            if torch.equal(out[index], padded[index, :, top : top + 32, left : left + 32])
        ]
        assert matches, f"image {index} is not a window of its padded version"
        offsets.append(matches[0])
    assert len(set(offsets)) > 1
    assert int((~_same_per_image(out, images)).sum()) > 32
    assert torch.equal(random_crop(images, padding_px=0, generator=_seeded(0)), images)


def test_op_list_and_magnitudes_match_the_standard_space() -> None:
    assert len(TRIVIAL_AUGMENT_OPS) == 14
    assert len(OPS_BY_NAME) == 14

    def at(name: str, level: int, sign: int = 1, side_px: int = 32) -> float:
        return OPS_BY_NAME[name].magnitude(level, sign=sign, side_px=side_px)

    assert at("rotate", 30) == 30 and at("rotate", 30, sign=-1) == -30
    assert at("shear_x", 30) == pytest.approx(0.3) and at("shear_y", 15, -1) == pytest.approx(
        -0.15
    )
    assert at("translate_x", 30) == 10 and at("translate_y", 30, side_px=16) == 5
    assert at("brightness", 0) == pytest.approx(0.1) and at("contrast", 30) == pytest.approx(1.9)
    assert at("posterize", 0) == 8 and at("posterize", 30) == 4
    assert at("solarize", 0) == 256 and at("solarize", 30) == 0
    assert at("sharpness", 15, sign=-1) == pytest.approx(1.0)  # enhance ops have no sign


@pytest.mark.parametrize("name", list(OPS_BY_NAME))
def test_every_op_runs_on_a_batch(images: torch.Tensor, name: str) -> None:
    # Halved contrast so that autocontrast and equalize have something to do.
    batch = images[:16] // 2 + 40
    op = OPS_BY_NAME[name]

    out = op.function(batch, op.magnitude(30, sign=1, side_px=32))
    assert out.dtype == torch.uint8
    assert out.shape == batch.shape
    if name in ("identity", "color"):  # colour has nothing to change in a grey image
        assert torch.equal(out, batch)
    else:
        assert not torch.equal(out, batch)


def test_pixel_ops_do_what_they_say(images: torch.Tensor) -> None:
    shifted = translate_x(images, 3)
    assert torch.equal(shifted[..., 3:], images[..., :-3])
    assert shifted[..., :3].max() == 0

    assert torch.all(posterize(images, 4) % 16 == 0)
    solarized = solarize(images, 128)
    bright = images >= 128
    assert torch.equal(solarized[bright], 255 - images[bright])
    assert torch.equal(solarized[~bright], images[~bright])
    assert torch.equal(solarize(images, 256), images)


def test_trivial_augment_batch_is_seeded_per_image(images: torch.Tensor) -> None:
    first = trivial_augment_batch(images, generator=_seeded(3))

    assert first.dtype == torch.uint8
    assert torch.equal(first, trivial_augment_batch(images, generator=_seeded(3)))
    assert not torch.equal(first, trivial_augment_batch(images, generator=_seeded(4)))
    changed = int((~_same_per_image(first, images)).sum())
    # Identity and colour leave an image as it is (2 of 14 ops); most others change it.
    assert 32 <= changed < 64
