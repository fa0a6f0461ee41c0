"""Finding the four Fashion-MNIST IDX files: a named folder, the Debian package, or a download."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dehbws.data.idx import DATA_HINT, IDX_FILES, find_idx_file, idx_paths
from dehbws.errors import DatasetError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "DEHBWS_DATA_DIR"
# Where Debian's package dataset-fashion-mnist installs the gzipped IDX files.
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where torchvision downloads to when nothing else is found; it adds FashionMNIST/raw.
DOWNLOAD_DIR = Path.home() / ".cache" / "dehbws" / "fashion-mnist"
TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"


def locate_idx_dir(data_dir: str | None) -> Path:
    """The folder holding the four IDX files.

    A folder the user names (argument, else $DEHBWS_DATA_DIR) must hold them, directly or in
    torchvision's FashionMNIST/raw layout: a wrong name is an error, never a silent fallback.
    Otherwise the Debian package's folder, then an earlier download, then a new download.
    """
    if data_dir is not None:
        return _named_folder(Path(data_dir).expanduser(), source="the data folder given")
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return _named_folder(Path(from_env).expanduser(), source=f"${DATA_DIR_ENV}")

    downloaded = DOWNLOAD_DIR / TORCHVISION_SUBDIR
    for folder in (DEBIAN_DATA_DIR, downloaded):
        if has_idx_files(folder):
            logger.debug("found Fashion-MNIST IDX files in %s", folder)
            return folder

    return _download(looked_in=[DEBIAN_DATA_DIR, downloaded])


def has_idx_files(folder: Path) -> bool:
    """Whether `folder` holds all four IDX files (raw or .gz)."""
    return all(find_idx_file(folder, name) is not None for name in IDX_FILES.values())


def _named_folder(folder: Path, *, source: str) -> Path:
    if not folder.is_dir():
        raise DatasetError(
            f"Fashion-MNIST folder {folder} ({source}) does not exist or is not a folder. "
            f"{DATA_HINT}"
        )
    nested = folder / TORCHVISION_SUBDIR
    if not has_idx_files(folder) and has_idx_files(nested):
        return nested

    idx_paths(folder)  # raises DatasetError naming the folder and the missing files
    return folder


def _download(*, looked_in: list[Path]) -> Path:
    """Download with torchvision into DOWNLOAD_DIR; DatasetError listing every place tried."""
    target = DOWNLOAD_DIR / TORCHVISION_SUBDIR
    logger.info("Fashion-MNIST not found locally; downloading it into %s", DOWNLOAD_DIR)
    try:
        download_with_torchvision(DOWNLOAD_DIR)
    except (OSError, RuntimeError, ValueError) as error:
        places = ", ".join(str(folder) for folder in looked_in)
        raise DatasetError(
            f"Fashion-MNIST IDX files not found (looked in {places}, and ${DATA_DIR_ENV} is "
            f"not set), and downloading them into {DOWNLOAD_DIR} failed: {error}. {DATA_HINT}"
        ) from error

    idx_paths(target)  # raises DatasetError if the download left files missing
    return target


def download_with_torchvision(root: Path) -> None:
    """Let torchvision fetch the four files into root/FashionMNIST/raw (needs internet)."""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    root.mkdir(parents=True, exist_ok=True)
    TorchvisionFashionMNIST(root=str(root), train=True, download=True)
