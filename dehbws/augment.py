"""Training-time augmentation of uint8 image batches, as in JAHS-Bench-201's recipe.

Train: [TrivialAugment] -> random horizontal flip -> random crop with zero padding -> normalise.
Eval: normalise only. Everything works on whole batches of tensors (no PIL per image) and draws
its randomness from a torch.Generator, so a seed reproduces a batch exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

# Mean and standard deviation of the 28x28 Fashion-MNIST training images, scaled to [0, 1].
MEAN: float = 0.286
STD: float = 0.353

NUM_LEVELS = 31  # magnitude levels 0..30, each equally likely
REFERENCE_SIDE_PX = 32  # the side the magnitudes in pixels (translate, crop padding) refer to
CROP_PADDING_PX_AT_32 = 4

OpFunction = Callable[[torch.Tensor, float], torch.Tensor]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1, H, W] -> float32, scaled to [0, 1] then standardised with MEAN and STD."""
    _check_images(images)
    return images.float().div_(255.0).sub_(MEAN).div_(STD)


def augment_batch(
    images: torch.Tensor, *, trivial_augment: bool, generator: torch.Generator
) -> torch.Tensor:
    """uint8 [B, 1, H, W] -> float32 normalised, with the JAHS-Bench-201 train transforms."""
    _check_images(images)

    if trivial_augment:
        images = trivial_augment_batch(images, generator=generator)
    images = random_horizontal_flip(images, generator=generator)

    padding_px = round(CROP_PADDING_PX_AT_32 * images.shape[-2] / REFERENCE_SIDE_PX)
    images = random_crop(images, padding_px=padding_px, generator=generator)

    return normalize(images)


def random_horizontal_flip(
    images: torch.Tensor, *, generator: torch.Generator, probability: float = 0.5
) -> torch.Tensor:
    """Mirror each image left-right with `probability`, independently per image."""
    flip = _uniform(images.shape[0], generator, images.device) < probability
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_crop(
    images: torch.Tensor, *, padding_px: int, generator: torch.Generator
) -> torch.Tensor:
    """Zero-pad every side by `padding_px`, then cut an H x W window at a random offset each."""
    if padding_px == 0:
        return images
    batch, channels, height_px, width_px = images.shape
    padded = F.pad(images, (padding_px,) * 4)

    top = _randint(2 * padding_px + 1, batch, generator, images.device)
    left = _randint(2 * padding_px + 1, batch, generator, images.device)
    rows = top[:, None] + torch.arange(height_px, device=images.device)  # [B, H]
    cols = left[:, None] + torch.arange(width_px, device=images.device)  # [B, W]

    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


# --- TrivialAugment (Müller & Hutter, 2021), "standard" augmentation space -------------------


@dataclass(frozen=True)
class AugmentOp:
    """One TrivialAugment operation and how a level 0..30 maps to its magnitude.

    magnitude = at_level_0 + (at_level_30 - at_level_0) * level / 30, truncated towards zero
    for integer ops; signed ops then flip the sign with probability 1/2.
    """

    name: str
    function: OpFunction
    at_level_0: float = 0.0
    at_level_30: float = 0.0
    integer: bool = False
    signed: bool = False
    uses_level: bool = True
    scales_with_side: bool = False  # magnitudes in pixels at 32 px, scaled to the image side

    def magnitude(self, level: int, *, sign: int, side_px: int) -> float:
        """The op's parameter at this level (0..30) and sign (+1 or -1) for this image side."""
        span = self.at_level_30 - self.at_level_0
        if self.scales_with_side:
            span *= side_px / REFERENCE_SIDE_PX
        step = span * level / (NUM_LEVELS - 1)
        value = self.at_level_0 + (int(step) if self.integer else step)
        return sign * value if self.signed else value


def identity(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """The image unchanged."""
    return images


def shear_x(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Shear along x by factor `magnitude` about the top-left corner (as PIL's affine does)."""
    return _affine(images, shear_deg=(math.degrees(math.atan(magnitude)), 0.0))


def shear_y(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Shear along y by factor `magnitude` about the top-left corner."""
    return _affine(images, shear_deg=(0.0, math.degrees(math.atan(magnitude))))


def translate_x(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Shift right by `magnitude` pixels (left if negative), filling with zeros."""
    return _affine(images, translate_px=(int(magnitude), 0))


def translate_y(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Shift down by `magnitude` pixels (up if negative), filling with zeros."""
    return _affine(images, translate_px=(0, int(magnitude)))


def rotate(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Rotate counter-clockwise by `magnitude` degrees about the centre, filling with zeros."""
    return TF.rotate(images, magnitude, interpolation=InterpolationMode.NEAREST, fill=0)


def brightness(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Blend with black by factor `magnitude` (1 keeps the image)."""
    return TF.adjust_brightness(images, magnitude)


def color(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Saturation by factor `magnitude`: a single-channel image has none, so it is unchanged.

    Kept so the op list, and hence how often each op is drawn, matches JAHS-Bench-201.
    """
    return TF.adjust_saturation(images, magnitude)


def contrast(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Blend with the image's mean grey level by factor `magnitude`."""
    return TF.adjust_contrast(images, magnitude)


def sharpness(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Blend with a smoothed copy by factor `magnitude` (above 1 sharpens)."""
    return TF.adjust_sharpness(images, magnitude)


def posterize(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Keep only the `magnitude` most significant bits (4..8) of every pixel."""
    return TF.posterize(images, int(magnitude))


def solarize(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Invert every pixel at or above threshold `magnitude` (256 changes nothing)."""
    if magnitude > 255:
        return images
    return TF.solarize(images, float(magnitude))


def autocontrast(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Stretch each image's grey levels to the full 0..255 range."""
    return TF.autocontrast(images)


def equalize(images: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Equalise each image's grey-level histogram."""
    return TF.equalize(images)


# JAHS-Bench-201's "standard" ranges (narrower than torchvision's TrivialAugmentWide).
TRIVIAL_AUGMENT_OPS: tuple[AugmentOp, ...] = (
    AugmentOp("identity", identity, uses_level=False),
    AugmentOp("autocontrast", autocontrast, uses_level=False),
    AugmentOp("equalize", equalize, uses_level=False),
    AugmentOp("rotate", rotate, 0, 30, integer=True, signed=True),
    AugmentOp("solarize", solarize, 256, 0, integer=True),
    AugmentOp("color", color, 0.1, 1.9),
    AugmentOp("posterize", posterize, 8, 4, integer=True),
    AugmentOp("contrast", contrast, 0.1, 1.9),
    AugmentOp("brightness", brightness, 0.1, 1.9),
    AugmentOp("sharpness", sharpness, 0.1, 1.9),
    AugmentOp("shear_x", shear_x, 0, 0.3, signed=True),
    AugmentOp("shear_y", shear_y, 0, 0.3, signed=True),
    AugmentOp("translate_x", translate_x, 0, 10, integer=True, signed=True, scales_with_side=True),
    AugmentOp("translate_y", translate_y, 0, 10, integer=True, signed=True, scales_with_side=True),
)


def trivial_augment_batch(images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Apply one uniformly drawn op at one uniformly drawn level to each image (uint8 in/out).

    Images that drew the same op, level and sign go through the op together as one batch.
    """
    _check_images(images)
    batch = images.shape[0]
    op_ids = _randint(len(TRIVIAL_AUGMENT_OPS), batch, generator, torch.device("cpu"))
    levels = _randint(NUM_LEVELS, batch, generator, torch.device("cpu"))
    signs = _randint(2, batch, generator, torch.device("cpu")) * 2 - 1

    groups: dict[tuple[int, int, int], list[int]] = {}
    for position, (op_id, level, sign) in enumerate(
        zip(op_ids.tolist(), levels.tolist(), signs.tolist(), strict=True)
    ):
        op = TRIVIAL_AUGMENT_OPS[op_id]
        key = (op_id, level if op.uses_level else 0, sign if op.signed else 1)
        groups.setdefault(key, []).append(position)

    augmented = images.clone()
    for (op_id, level, sign), positions in groups.items():
        op = TRIVIAL_AUGMENT_OPS[op_id]
        if op.function is identity:
            continue
        index = torch.tensor(positions, device=images.device)
        magnitude = op.magnitude(level, sign=sign, side_px=images.shape[-1])
        augmented[index] = op.function(images[index], magnitude)
    logger.debug("TrivialAugment: %d images in %d groups", batch, len(groups))
    return augmented


def _affine(
    images: torch.Tensor,
    *,
    shear_deg: tuple[float, float] = (0.0, 0.0),
    translate_px: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    return TF.affine(
        images,
        angle=0.0,
        translate=list(translate_px),
        scale=1.0,
        shear=list(shear_deg),
        interpolation=InterpolationMode.NEAREST,
        fill=0,
        center=[0.0, 0.0],
    )


def _randint(
    high: int, count: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """`count` integers in [0, high), drawn on the generator's device, returned on `device`."""
    values = torch.randint(high, (count,), generator=generator, device=generator.device)
    return values.to(device)


def _uniform(count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(count, generator=generator, device=generator.device).to(device)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"images are {images.dtype} of shape {tuple(images.shape)}, but must be uint8 of "
            "shape [batch, channels, height, width]"
        )
