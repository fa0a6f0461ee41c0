"""Training-time augmentation of uint8 image batches, as in JAHS-Bench-201's recipe.

Train: [TrivialAugment] -> random horizontal flip -> random crop with zero padding -> normalise.
Eval: normalise only. Everything works on whole batches of tensors (no PIL per image), on
whatever device the images are on, and draws its randomness from a torch.Generator on the CPU, so
a seed reproduces a batch exactly on every device.

TrivialAugment draws one op and one level per image. Every op takes a tensor of per-image
magnitudes, so all images that drew the same op go through it together: a batch costs at most 13
op calls, whatever the levels (grouping by op *and* level would cost hundreds of small calls per
batch and starve the network of data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

logger = logging.getLogger(__name__)

# Mean and standard deviation of the 28x28 Fashion-MNIST training images, scaled to [0, 1].
MEAN: float = 0.286
STD: float = 0.353

NUM_LEVELS = 31  # magnitude levels 0..30, each equally likely
REFERENCE_SIDE_PX = 32  # the side the magnitudes in pixels (translate, crop padding) refer to
CROP_PADDING_PX_AT_32 = 4

# An op maps uint8 images [B, C, H, W] and magnitudes (one float, or a tensor of B) to images.
Magnitude = float | torch.Tensor
OpFunction = Callable[[torch.Tensor, Magnitude], torch.Tensor]


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


def identity(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """The images unchanged."""
    return images


def shear_x(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Shear along x by factor `magnitude` about the top-left corner (as PIL's affine does)."""
    shear = _per_image(magnitude, images)
    zero, one = torch.zeros_like(shear), torch.ones_like(shear)
    # About the image's top-left corner, which is half a pixel before the first pixel's centre.
    return _affine_nearest(images, (one, shear, shear / 2, zero, one, zero), about_centre=False)


def shear_y(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Shear along y by factor `magnitude` about the top-left corner."""
    shear = _per_image(magnitude, images)
    zero, one = torch.zeros_like(shear), torch.ones_like(shear)
    return _affine_nearest(images, (one, zero, zero, shear, one, shear / 2), about_centre=False)


def translate_x(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Shift right by `magnitude` pixels (left if negative), filling with zeros."""
    shift = _per_image(magnitude, images).trunc()
    zero, one = torch.zeros_like(shift), torch.ones_like(shift)
    return _affine_nearest(images, (one, zero, -shift, zero, one, zero), about_centre=False)


def translate_y(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Shift down by `magnitude` pixels (up if negative), filling with zeros."""
    shift = _per_image(magnitude, images).trunc()
    zero, one = torch.zeros_like(shift), torch.ones_like(shift)
    return _affine_nearest(images, (one, zero, zero, zero, one, -shift), about_centre=False)


def rotate(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Rotate counter-clockwise by `magnitude` degrees about the centre, filling with zeros."""
    radians = torch.deg2rad(_per_image(magnitude, images))
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    # The output pixel at (u, v) from the centre shows the input at (u, v) turned back.
    return _affine_nearest(images, (cos, -sin, zero, sin, cos, zero), about_centre=True)


def brightness(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Blend with black by factor `magnitude` (1 keeps the image)."""
    factors = _per_image(magnitude, images)[:, None, None, None]
    return (images.float() * factors).clamp_(0, 255).to(torch.uint8)


def color(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Saturation by factor `magnitude`: a single-channel image has none, so it is unchanged.

    Kept so the op list, and hence how often each op is drawn, matches JAHS-Bench-201.
    """
    if images.shape[-3] == 1:
        return images
    factors = _per_image(magnitude, images)
    saturated = [
        TF.adjust_saturation(image[None], float(factor))
        for image, factor in zip(images, factors, strict=True)
    ]
    return torch.cat(saturated)


def contrast(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Blend with each image's mean grey level by factor `magnitude`."""
    grey = TF.rgb_to_grayscale(images) if images.shape[-3] == 3 else images
    mean = grey.float().mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, _per_image(magnitude, images))


def sharpness(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Blend with a smoothed copy by factor `magnitude` (above 1 sharpens); borders stay."""
    channels = images.shape[-3]
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(channels, 1, 3, 3)
    smoothed = F.conv2d(images.float(), kernel, groups=channels).round_()

    degenerate = images.float()
    degenerate[..., 1:-1, 1:-1] = smoothed
    return _blend(images, degenerate, _per_image(magnitude, images))


def posterize(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Keep only the `magnitude` most significant bits (4..8) of every pixel."""
    bits = _per_image(magnitude, images).long()
    masks = (256 - (1 << (8 - bits))).to(torch.uint8)
    return images & masks[:, None, None, None]


def solarize(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Invert every pixel at or above threshold `magnitude` (256 changes nothing)."""
    thresholds = _per_image(magnitude, images)[:, None, None, None]
    return torch.where(images.float() >= thresholds, 255 - images, images)


def autocontrast(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    """Stretch each image's grey levels to the full 0..255 range."""
    return TF.autocontrast(images)


def equalize(images: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
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

    Images that drew the same op go through it together, each with its own magnitude.
    """
    _check_images(images)
    batch = images.shape[0]
    cpu = torch.device("cpu")
    op_ids = _randint(len(TRIVIAL_AUGMENT_OPS), batch, generator, cpu).tolist()
    levels = _randint(NUM_LEVELS, batch, generator, cpu).tolist()
    signs = (_randint(2, batch, generator, cpu) * 2 - 1).tolist()

    augmented = images.clone()
    for op_id, op in enumerate(TRIVIAL_AUGMENT_OPS):
        positions = [position for position, drawn in enumerate(op_ids) if drawn == op_id]
        if not positions or op.function is identity:
            continue
        magnitudes = [
            op.magnitude(levels[p], sign=signs[p], side_px=images.shape[-1]) for p in positions
        ]
        # one host-to-device copy per op: the positions and their magnitudes
        index = torch.tensor(positions, device=images.device)
        magnitude = torch.tensor(magnitudes, dtype=torch.float32).to(images.device)
        augmented[index] = op.function(images[index], magnitude)
    return augmented


def _per_image(magnitude: Magnitude, images: torch.Tensor) -> torch.Tensor:
    """Magnitudes as a float32 tensor [B] on the images' device (one float serves all)."""
    if isinstance(magnitude, torch.Tensor):
        if magnitude.shape != images.shape[:1]:
            raise ValueError(
                f"magnitudes have shape {tuple(magnitude.shape)}, but must be one float or one "
                f"per image ({images.shape[0]})"
            )
        return magnitude.to(device=images.device, dtype=torch.float32)
    return torch.full((images.shape[0],), float(magnitude), device=images.device)


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other per image, clamped and truncated to uint8."""
    factor = factors[:, None, None, None]
    start = images.float()
    blended = start + (1.0 - factor) * (other - start)
    return blended.clamp_(0, 255).to(torch.uint8)


def _affine_nearest(
    images: torch.Tensor,
    inverse: tuple[torch.Tensor, ...],
    *,
    about_centre: bool,
) -> torch.Tensor:
    """Resample every image through its own inverse affine map, nearest pixel, zero fill.

    `inverse` is (a, b, c, d, e, f), each a tensor [B]: the output pixel at (x, y) shows the
    input pixel at (a x + b y + c, d x + e y + f), with coordinates measured from the top-left
    pixel, or from the image centre when `about_centre`.
    """
    batch, channels, height_px, width_px = images.shape
    a, b, c, d, e, f = (value[:, None, None] for value in inverse)  # each [B, 1, 1]
    y = torch.arange(height_px, device=images.device, dtype=torch.float32)[None, :, None]
    x = torch.arange(width_px, device=images.device, dtype=torch.float32)[None, None, :]
    centre_y, centre_x = ((height_px - 1) / 2, (width_px - 1) / 2) if about_centre else (0, 0)
    x, y = x - centre_x, y - centre_y

    source_x = torch.round(a * x + b * y + c + centre_x).long()  # [B, H, W]
    source_y = torch.round(d * x + e * y + f + centre_y).long()
    inside = (source_x >= 0) & (source_x < width_px) & (source_y >= 0) & (source_y < height_px)
    flat = torch.where(inside, source_y * width_px + source_x, 0)  # outside: any valid index

    pixels = images.reshape(batch, channels, height_px * width_px)
    index = flat.reshape(batch, 1, -1).expand(-1, channels, -1)
    sampled = pixels.gather(2, index).reshape(images.shape)
    return torch.where(inside[:, None], sampled, torch.zeros((), dtype=images.dtype))


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
