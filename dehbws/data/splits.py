"""Train/validation/test splits of the 70k Fashion-MNIST images, as index arrays.

Indices point into the 70k images in `RawFashionMNIST.all_images()` order: the official 60k
train images are 0..59,999, the official 10k test images 60,000..69,999.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from dehbws.data.idx import NUM_CLASSES, NUM_OFFICIAL_TEST, NUM_OFFICIAL_TRAIN
from dehbws.errors import DatasetError

logger = logging.getLogger(__name__)

# JAHS-Bench-201's split, per class: 700 test and 1,890 validation images, the rest training.
JAHS_TEST_PER_CLASS = 700
JAHS_VALID_PER_CLASS = 1_890
JAHS_TRAIN_PER_CLASS = 4_410

OFFICIAL_VALID_FRACTION = 0.3


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the 70k images (int64 arrays) of the three splits."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def make_split(labels: np.ndarray, *, split: str, split_seed: int) -> SplitIndices:
    """The named split ('jahs' or 'official') of the 70k images with these labels."""
    if split == "jahs":
        return jahs_split(labels)
    if split == "official":
        return official_split(labels, split_seed=split_seed)
    raise ValueError(f"split is {split!r}, but must be 'jahs' or 'official'")


def tfds_order(split_name: str, count: int) -> np.ndarray:
    """The order in which TensorFlow Datasets lists an original split: by MD5 of name+index."""
    keys = [hashlib.md5(f"{split_name}{i}".encode()).hexdigest() for i in range(count)]
    return np.array(sorted(range(count), key=keys.__getitem__), dtype=np.int64)


def jahs_split(labels: np.ndarray) -> SplitIndices:
    """JAHS-Bench-201's 44,100 / 18,900 / 7,000 split, rebuilt from the original files.

    The stream is the official test split then the official train split, each in TFDS order.
    The first 700 images per class of the stream are the test set; of the rest (in stream order),
    the first 1,890 per class are the validation set and the remainder the training set.
    """
    _check_label_count(labels)
    stream = np.concatenate(
        [
            NUM_OFFICIAL_TRAIN + tfds_order("test", NUM_OFFICIAL_TEST),
            tfds_order("train", NUM_OFFICIAL_TRAIN),
        ]
    )

    is_test = _first_per_class(labels[stream], JAHS_TEST_PER_CLASS)
    development = stream[~is_test]

    is_valid = _first_per_class(labels[development], JAHS_VALID_PER_CLASS)
    result = SplitIndices(
        train=development[~is_valid], valid=development[is_valid], test=stream[is_test]
    )

    _check_class_counts(labels, result.test, JAHS_TEST_PER_CLASS, "test")
    _check_class_counts(labels, result.valid, JAHS_VALID_PER_CLASS, "validation")
    _check_class_counts(labels, result.train, JAHS_TRAIN_PER_CLASS, "training")
    return result


def official_split(labels: np.ndarray, *, split_seed: int) -> SplitIndices:
    """The official 10k test set; the 60k train images split 70/30, stratified, seeded."""
    _check_label_count(labels)
    train_labels = labels[:NUM_OFFICIAL_TRAIN]
    rng = np.random.default_rng(split_seed)

    valid_parts = []
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(train_labels == label)
        num_valid = round(OFFICIAL_VALID_FRACTION * len(members))
        valid_parts.append(rng.permutation(members)[:num_valid])
    valid = np.sort(np.concatenate(valid_parts))

    is_valid = np.zeros(NUM_OFFICIAL_TRAIN, dtype=bool)
    is_valid[valid] = True
    return SplitIndices(
        train=np.flatnonzero(~is_valid).astype(np.int64),
        valid=valid.astype(np.int64),
        test=np.arange(NUM_OFFICIAL_TRAIN, NUM_OFFICIAL_TRAIN + NUM_OFFICIAL_TEST, dtype=np.int64),
    )


def subset_split(split: SplitIndices, labels: np.ndarray, *, fraction: float) -> SplitIndices:
    """Keep `fraction` of each split per class (the first ones in split order, at least one)."""
    if fraction >= 1.0:
        return split
    return SplitIndices(
        train=subset_indices(split.train, labels, fraction=fraction),
        valid=subset_indices(split.valid, labels, fraction=fraction),
        test=subset_indices(split.test, labels, fraction=fraction),
    )


def subset_indices(indices: np.ndarray, labels: np.ndarray, *, fraction: float) -> np.ndarray:
    """The first round(fraction * class count) indices of each class, at least one, in order."""
    split_labels = labels[indices]
    keep = np.zeros(len(indices), dtype=bool)
    for label in np.unique(split_labels):
        members = np.flatnonzero(split_labels == label)
        keep[members[: max(1, round(fraction * len(members)))]] = True
    return indices[keep]


def _first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """A mask of the first `count` positions of each class in `labels`."""
    mask = np.zeros(len(labels), dtype=bool)
    for label in range(NUM_CLASSES):
        mask[np.flatnonzero(labels == label)[:count]] = True
    return mask


def _check_label_count(labels: np.ndarray) -> None:
    expected = NUM_OFFICIAL_TRAIN + NUM_OFFICIAL_TEST
    if labels.shape != (expected,):
        raise DatasetError(
            f"Fashion-MNIST has {labels.shape[0]} labels, but the splits need the original "
            f"{expected} (60k train + 10k test)."
        )


def _check_class_counts(
    labels: np.ndarray, indices: np.ndarray, per_class: int, name: str
) -> None:
    counts = np.bincount(labels[indices], minlength=NUM_CLASSES)
    if not np.all(counts == per_class):
        raise DatasetError(
            f"the JAHS {name} split has class counts {counts.tolist()}, but needs {per_class} "
            "per class; the IDX files are not the original Fashion-MNIST release."
        )
    logger.debug("JAHS %s split: %d images, %d per class", name, len(indices), per_class)
