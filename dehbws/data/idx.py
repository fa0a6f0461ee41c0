"""Reading the four original Fashion-MNIST IDX files, gzipped or raw, with every check.

The IDX format is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values. Fashion-MNIST uses unsigned
bytes: images are [n, 28, 28] (magic 2051), labels are [n] (magic 2049).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from dehbws.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_SIDE_PX = 28
NUM_CLASSES = 10
NUM_OFFICIAL_TRAIN = 60_000
NUM_OFFICIAL_TEST = 10_000

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# Base names of the four files, as the original release and torchvision's raw/ folder name them.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

DATA_HINT = (
    "To get Fashion-MNIST: `apt-get install dataset-fashion-mnist` (installs the four IDX files "
    "under /usr/share/datasets/fashion-mnist), or pass --data-dir (or set DEHBWS_DATA_DIR) to a "
    "folder holding the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each raw or .gz), or run once on a machine "
    "with internet so torchvision can download them."
)


@dataclass(frozen=True)
class RawFashionMNIST:
    """The original 60k/10k release as numpy arrays: uint8 images [n, 28, 28], int64 labels [n]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def all_images(self) -> np.ndarray:
        """All 70k images, the official train split first, then the official test split."""
        return np.concatenate([self.train_images, self.test_images])

    def all_labels(self) -> np.ndarray:
        """All 70k labels, in the order of `all_images`."""
        return np.concatenate([self.train_labels, self.test_labels])


def find_idx_file(folder: Path, base_name: str) -> Path | None:
    """The raw file if present (no decompression needed), else the .gz one, else None."""
    for candidate in (folder / base_name, folder / f"{base_name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_paths(folder: Path) -> dict[str, Path]:
    """The four IDX files in `folder`; DatasetError naming the missing ones otherwise."""
    found = {key: find_idx_file(folder, name) for key, name in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST IDX files missing in {folder}: {', '.join(missing)} "
            f"(raw or .gz). {DATA_HINT}"
        )
    return {key: path for key, path in found.items() if path is not None}


def read_idx_folder(folder: Path) -> RawFashionMNIST:
    """Read and check the four IDX files in `folder`."""
    paths = idx_paths(folder)

    train_images = read_idx_file(
        paths["train_images"], magic=IMAGES_MAGIC, expected_count=NUM_OFFICIAL_TRAIN
    )
    train_labels = read_idx_file(
        paths["train_labels"], magic=LABELS_MAGIC, expected_count=NUM_OFFICIAL_TRAIN
    )
    test_images = read_idx_file(
        paths["test_images"], magic=IMAGES_MAGIC, expected_count=NUM_OFFICIAL_TEST
    )
    test_labels = read_idx_file(
        paths["test_labels"], magic=LABELS_MAGIC, expected_count=NUM_OFFICIAL_TEST
    )

    logger.debug("read Fashion-MNIST IDX files from %s", folder)
    return RawFashionMNIST(
        train_images=train_images,
        train_labels=train_labels.astype(np.int64),
        test_images=test_images,
        test_labels=test_labels.astype(np.int64),
    )


def read_idx_file(path: Path, *, magic: int, expected_count: int) -> np.ndarray:
    """One IDX file as a uint8 array: images [n, 28, 28] (magic 2051) or labels [n] (2049)."""
    data = _read_bytes(path)

    if len(data) < 4:
        _fail(path, f"is {len(data)} bytes long, too short for an IDX header")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        _fail(path, f"has magic number {found_magic}, but must have {magic}")

    num_dims = data[3]
    header_bytes = 4 + 4 * num_dims
    if len(data) < header_bytes:
        _fail(path, f"is {len(data)} bytes long, shorter than its {header_bytes}-byte header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims)]

    expected_dims = [expected_count] + ([IMAGE_SIDE_PX] * 2 if magic == IMAGES_MAGIC else [])
    if dims != expected_dims:
        _fail(path, f"has dimensions {dims}, but Fashion-MNIST needs {expected_dims}")
    expected_bytes = header_bytes + int(np.prod(dims))
    if len(data) != expected_bytes:
        _fail(path, f"holds {len(data)} bytes, but its header promises {expected_bytes}")

    values = np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()
    if magic == LABELS_MAGIC and values.max(initial=0) >= NUM_CLASSES:
        _fail(path, f"has label {int(values.max())}, but labels must be 0..{NUM_CLASSES - 1}")
    return values


def fingerprint_idx_folder(folder: Path) -> str:
    """A short content hash of the four stored IDX files, so a changed source is noticed."""
    digest = hashlib.blake2b(digest_size=8)
    for key, path in sorted(idx_paths(folder).items()):
        digest.update(key.encode())
        digest.update(_read_stored_bytes(path))
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    """The decompressed content of an IDX file (gzip if its name ends in .gz)."""
    stored = _read_stored_bytes(path)
    if path.suffix != ".gz":
        return stored
    try:
        return gzip.decompress(stored)
    except (OSError, EOFError, zlib.error) as error:
        _fail(path, f"is not a complete gzip file ({error}); it may be truncated")


def _read_stored_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        _fail(path, f"cannot be read ({error.strerror or error})")


def _fail(path: Path, problem: str) -> NoReturn:
    raise DatasetError(
        f"Fashion-MNIST file {path.name} in {path.parent} {problem}. Replace it with an intact "
        f"copy. {DATA_HINT}"
    )
