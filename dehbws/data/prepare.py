"""Preparing Fashion-MNIST once per (split, seed, subset, resolution) and caching it in HDF5.

Each prepared file is immutable: written under a temporary name in the cache folder, synced,
then renamed. Its name carries a fingerprint of the IDX files, so a changed source gets a new
file instead of a stale one. Files are opened without HDF5 file locking, which fails on NFS.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from dehbws.data.dataset import FashionMNIST, ImageSplit
from dehbws.data.idx import RawFashionMNIST, fingerprint_idx_folder, read_idx_folder
from dehbws.data.locate import locate_idx_dir
from dehbws.data.splits import SplitIndices, make_split, subset_split
from dehbws.errors import DatasetError, UserError
from dehbws.settings import RESOLUTIONS, DataSettings

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_DIR_ENV = "DEHBWS_CACHE_DIR"
FULL_SIDE_PX = 32
PAD_PX = 2  # 28 px + 2 px of zeros on each side = 32 px, as JAHS-Bench-201 did
SPLIT_NAMES = ("train", "valid", "test")
CHUNK_IMAGES = 2048
RESIZE_BATCH_IMAGES = 8192


def default_cache_dir() -> Path:
    """$DEHBWS_CACHE_DIR if set, else ~/.cache/dehbws."""
    from_env = os.environ.get(CACHE_DIR_ENV)
    return Path(from_env).expanduser() if from_env else Path.home() / ".cache" / "dehbws"


def side_px_for(resolution: float) -> int:
    """Image side in pixels at a JAHS resolution (32, 16 or 8)."""
    if resolution not in RESOLUTIONS:
        raise UserError(
            f"resolution is {resolution!r}, but must be one of {RESOLUTIONS} (side 32, 16, 8 px)."
        )
    return round(FULL_SIDE_PX * resolution)


def load_dataset(
    settings: DataSettings, *, resolution: float, cache_dir: str | Path | None = None
) -> FashionMNIST:
    """The prepared dataset, preparing it first if its cache file is missing or corrupt."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = prepare_dataset(settings, resolution=resolution, cache_dir=folder)
    try:
        return read_prepared(path)
    except DatasetError as error:
        logger.warning("rebuilding the prepared dataset %s: %s", path, error)
        _build(settings, resolution=resolution, path=path)
        return read_prepared(path)


def prepare_dataset(settings: DataSettings, *, resolution: float, cache_dir: str | Path) -> Path:
    """Write the prepared file unless an intact one exists; return its exact path."""
    side_px_for(resolution)  # reject a bad resolution before any work

    idx_dir = locate_idx_dir(settings.data_dir)
    path = Path(cache_dir) / prepared_file_name(
        settings, resolution=resolution, fingerprint=fingerprint_idx_folder(idx_dir)
    )

    if path.is_file() and _header_matches(path, _expected_attrs(settings, resolution)):
        logger.debug("using the prepared dataset %s", path)
        return path

    _build(settings, resolution=resolution, path=path, idx_dir=idx_dir)
    return path


def prepared_file_name(settings: DataSettings, *, resolution: float, fingerprint: str) -> str:
    """The cache file name; the seed appears only for the seeded 'official' split."""
    seed = f"-seed{settings.split_seed}" if settings.split == "official" else ""
    return (
        f"fashion-mnist-v{FORMAT_VERSION}-{settings.split}{seed}"
        f"-frac{settings.subset_fraction:.6g}-res{resolution:g}-{fingerprint}.h5"
    )


def read_prepared(path: str | Path) -> FashionMNIST:
    """Read a prepared file (an exact path from `prepare_dataset`); DatasetError if corrupt."""
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as file:
            side_px = int(file.attrs["side_px"])
            splits = {name: _read_split(file[name], side_px) for name in SPLIT_NAMES}
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise DatasetError(
            f"the prepared dataset {path} is unreadable or corrupt ({error}). Delete it to have "
            "it rebuilt from the IDX files."
        ) from error

    logger.debug("read the prepared dataset %s (%d px)", path, side_px)
    return FashionMNIST(side_px=side_px, **splits)


def prepare_images(images_28px: np.ndarray, *, side_px: int) -> torch.Tensor:
    """uint8 [n, 28, 28] -> uint8 [n, 1, side_px, side_px]: zero-pad to 32, then resize."""
    padded = F.pad(torch.from_numpy(np.ascontiguousarray(images_28px)), (PAD_PX,) * 4)
    padded = padded.unsqueeze(1)  # [n, 1, 32, 32]
    if side_px == FULL_SIDE_PX:
        return padded.contiguous()

    resized = []
    for chunk in padded.split(RESIZE_BATCH_IMAGES):
        smaller = F.interpolate(
            chunk.float(), size=(side_px, side_px), mode="bilinear", antialias=True
        )
        resized.append(smaller.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(resized).contiguous()


def _build(
    settings: DataSettings, *, resolution: float, path: Path, idx_dir: Path | None = None
) -> None:
    """Read the IDX files, split, prepare the images and publish them atomically at `path`."""
    started_s = time.perf_counter()
    raw = read_idx_folder(idx_dir if idx_dir is not None else locate_idx_dir(settings.data_dir))

    labels = raw.all_labels()
    split = make_split(labels, split=settings.split, split_seed=settings.split_seed)
    split = subset_split(split, labels, fraction=settings.subset_fraction)

    attrs = _expected_attrs(settings, resolution)
    _write_atomically(path, raw, split, attrs)
    logger.info(
        "prepared Fashion-MNIST (%s split, %d/%d/%d images, %d px) in %.1f s: %s",
        settings.split,
        len(split.train),
        len(split.valid),
        len(split.test),
        attrs["side_px"],
        time.perf_counter() - started_s,
        path,
    )


def _write_atomically(
    path: Path, raw: RawFashionMNIST, split: SplitIndices, attrs: dict[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)

    try:
        with h5py.File(temp_name, "w", locking=False) as file:
            file.attrs.update(attrs)
            all_images = raw.all_images()
            all_labels = raw.all_labels()
            for name in SPLIT_NAMES:
                indices = getattr(split, name)
                images = prepare_images(all_images[indices], side_px=attrs["side_px"])
                _write_split(file.create_group(name), images.numpy(), all_labels[indices], indices)
            file.flush()
        _fsync(temp_name)
        os.chmod(temp_name, 0o644)  # mkstemp makes it private; others on the cluster may read it
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync(str(path.parent))


def _write_split(
    group: h5py.Group, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
) -> None:
    """Chunked datasets with Fletcher-32 checksums, so HDF5 itself detects corrupt bytes."""
    chunk = min(CHUNK_IMAGES, max(1, len(labels)))
    group.create_dataset("images", data=images, chunks=(chunk, *images.shape[1:]), fletcher32=True)
    group.create_dataset("labels", data=labels.astype(np.int64), chunks=(chunk,), fletcher32=True)
    # Positions in the 70k images (official train 0..59,999, then official test), for provenance.
    group.create_dataset(
        "indices", data=indices.astype(np.int64), chunks=(chunk,), fletcher32=True
    )


def _read_split(group: h5py.Group, side_px: int) -> ImageSplit:
    images = torch.from_numpy(group["images"][()])
    labels = torch.from_numpy(group["labels"][()])
    if images.shape[1:] != (1, side_px, side_px):
        raise ValueError(f"images have shape {tuple(images.shape)}, expected side {side_px}")
    return ImageSplit(images=images.contiguous(), labels=labels)


def _expected_attrs(settings: DataSettings, resolution: float) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "split": settings.split,
        "split_seed": settings.split_seed if settings.split == "official" else 0,
        "subset_fraction": float(settings.subset_fraction),
        "resolution": float(resolution),
        "side_px": side_px_for(resolution),
    }


def _header_matches(path: Path, expected: dict[str, Any]) -> bool:
    """Whether the file opens and its attributes describe what we want (no data read)."""
    try:
        with h5py.File(path, "r", locking=False) as file:
            found = {key: file.attrs[key] for key in expected}
            has_splits = all(name in file for name in SPLIT_NAMES)
    except (OSError, KeyError, ValueError) as error:
        logger.warning("the prepared dataset %s is unreadable (%s); rebuilding it", path, error)
        return False

    matches = has_splits and all(_plain(found[key]) == value for key, value in expected.items())
    if not matches:
        logger.warning("the prepared dataset %s does not match its name; rebuilding it", path)
    return matches


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (str, int or float)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
