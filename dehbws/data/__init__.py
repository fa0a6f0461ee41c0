"""Fashion-MNIST for dehbws: IDX reading, JAHS-Bench-201 splits, cached preparation, batches."""

from dehbws.data.dataset import FashionMNIST, ImageSplit, iterate_batches
from dehbws.data.locate import locate_idx_dir
from dehbws.data.prepare import (
    default_cache_dir,
    load_dataset,
    prepare_dataset,
    read_prepared,
    side_px_for,
)

__all__ = [
    "FashionMNIST",
    "ImageSplit",
    "default_cache_dir",
    "iterate_batches",
    "load_dataset",
    "locate_idx_dir",
    "prepare_dataset",
    "read_prepared",
    "side_px_for",
]
