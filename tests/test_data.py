"""Fashion-MNIST reading, locating, splitting, preparing and batching, on the real IDX files."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dehbws.data import (
    ImageSplit,
    iterate_batches,
    load_dataset,
    locate_idx_dir,
    prepare_dataset,
    read_prepared,
)
from dehbws.data import locate as locate_module
from dehbws.data.idx import (
    IDX_FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    RawFashionMNIST,
    fingerprint_idx_folder,
    read_idx_file,
    read_idx_folder,
)
from dehbws.data.prepare import prepare_images
from dehbws.data.splits import (
    SplitIndices,
    jahs_split,
    make_split,
    official_split,
    subset_split,
)
from dehbws.errors import DatasetError
from dehbws.settings import DataSettings

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get install dataset-fashion-mnist"

pytestmark = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs the Debian package dataset-fashion-mnist (the real IDX files)",
)


@pytest.fixture(scope="module")
def raw() -> RawFashionMNIST:
    return read_idx_folder(DEBIAN_DIR)


@pytest.fixture(scope="module")
def labels(raw: RawFashionMNIST) -> np.ndarray:
    return raw.all_labels()


@pytest.fixture(scope="module")
def jahs(labels: np.ndarray) -> SplitIndices:
    return jahs_split(labels)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(locate_module.DATA_DIR_ENV, raising=False)


def _mirror_folder(source: Path, target: Path) -> Path:
    """`target` with links to the four real IDX files, to replace one of them cheaply."""
    target.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES.values():
        (target / f"{name}.gz").symlink_to(source / f"{name}.gz")
    return target


def _gunzip(name: str) -> bytes:
    return gzip.decompress((DEBIAN_DIR / f"{name}.gz").read_bytes())


# --- IDX reading ------------------------------------------------------------------------------


def test_real_idx_files_have_the_original_shapes(raw: RawFashionMNIST) -> None:
    assert raw.train_images.shape == (60_000, 28, 28)
    assert raw.test_images.shape == (10_000, 28, 28)
    assert raw.train_images.dtype == np.uint8
    assert raw.train_labels.dtype == np.int64
    assert np.bincount(raw.train_labels).tolist() == [6_000] * 10
    assert np.bincount(raw.test_labels).tolist() == [1_000] * 10
    assert raw.train_images.max() == 255


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    stored = (DEBIAN_DIR / "train-labels-idx1-ubyte.gz").read_bytes()
    broken = tmp_path / "train-labels-idx1-ubyte.gz"
    broken.write_bytes(stored[: len(stored) // 2])

    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz") as caught:
        read_idx_file(broken, magic=LABELS_MAGIC, expected_count=60_000)
    assert str(tmp_path) in str(caught.value)
    assert APT_HINT in str(caught.value)


def test_truncated_raw_file_is_caught_by_its_size(tmp_path: Path) -> None:
    broken = tmp_path / "t10k-labels-idx1-ubyte"
    broken.write_bytes(_gunzip("t10k-labels-idx1-ubyte")[:-10])

    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.*bytes"):
        read_idx_file(broken, magic=LABELS_MAGIC, expected_count=10_000)


def test_wrong_magic_names_the_file(tmp_path: Path) -> None:
    content = bytearray(_gunzip("t10k-labels-idx1-ubyte"))
    content[2] = 0x0C
    broken = tmp_path / "t10k-labels-idx1-ubyte"
    broken.write_bytes(bytes(content))

    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.*magic number"):
        read_idx_file(broken, magic=LABELS_MAGIC, expected_count=10_000)


def test_wrong_count_is_rejected(tmp_path: Path) -> None:
    folder = _mirror_folder(DEBIAN_DIR, tmp_path / "idx")
    swapped = folder / "train-labels-idx1-ubyte.gz"
    swapped.unlink()
    shutil.copy(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz", swapped)

    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.gz.*dimensions \[10000\]"):
        read_idx_folder(folder)


def test_images_file_read_as_labels_is_rejected() -> None:
    with pytest.raises(DatasetError, match="magic number 2051"):
        read_idx_file(
            DEBIAN_DIR / "t10k-images-idx3-ubyte.gz", magic=LABELS_MAGIC, expected_count=10_000
        )
    assert IMAGES_MAGIC == 2051


# --- locating ---------------------------------------------------------------------------------


def test_missing_named_folder_names_it_and_how_to_get_the_data(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(DatasetError) as caught:
        locate_idx_dir(str(missing))
    assert str(missing) in str(caught.value)
    assert APT_HINT in str(caught.value)


def test_named_folder_without_files_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing in .*t10k-labels-idx1-ubyte"):
        locate_idx_dir(str(tmp_path))


def test_named_folder_and_torchvision_layout_are_found(tmp_path: Path) -> None:
    assert locate_idx_dir(str(DEBIAN_DIR)) == DEBIAN_DIR

    nested = _mirror_folder(DEBIAN_DIR, tmp_path / "FashionMNIST" / "raw")
    assert locate_idx_dir(str(tmp_path)) == nested


def test_environment_variable_names_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _mirror_folder(DEBIAN_DIR, tmp_path / "env")
    monkeypatch.setenv(locate_module.DATA_DIR_ENV, str(folder))
    assert locate_idx_dir(None) == folder

    monkeypatch.setenv(locate_module.DATA_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="absent"):
        locate_idx_dir(None)


def test_default_order_debian_then_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert locate_idx_dir(None) == locate_module.DEBIAN_DATA_DIR

    monkeypatch.setattr(locate_module, "DEBIAN_DATA_DIR", tmp_path / "debian")
    monkeypatch.setattr(locate_module, "DOWNLOAD_DIR", tmp_path / "download")

    def offline(root: Path) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(locate_module, "download_with_torchvision", offline)
    with pytest.raises(DatasetError) as caught:
        locate_idx_dir(None)
    message = str(caught.value)
    assert str(tmp_path / "debian") in message
    assert str(tmp_path / "download") in message
    assert "Name or service not known" in message
    assert APT_HINT in message

    def fake_download(root: Path) -> None:
        _mirror_folder(DEBIAN_DIR, root / "FashionMNIST" / "raw")

    monkeypatch.setattr(locate_module, "download_with_torchvision", fake_download)
    assert locate_idx_dir(None) == tmp_path / "download" / "FashionMNIST" / "raw"


# --- splits -----------------------------------------------------------------------------------


def test_jahs_split_sizes_and_class_counts(jahs: SplitIndices, labels: np.ndarray) -> None:
    assert (len(jahs.train), len(jahs.valid), len(jahs.test)) == (44_100, 18_900, 7_000)
    assert np.bincount(labels[jahs.train]).tolist() == [4_410] * 10
    assert np.bincount(labels[jahs.valid]).tolist() == [1_890] * 10
    assert np.bincount(labels[jahs.test]).tolist() == [700] * 10


def test_jahs_split_partitions_all_images(jahs: SplitIndices, raw: RawFashionMNIST) -> None:
    everything = np.concatenate([jahs.train, jahs.valid, jahs.test])
    assert np.array_equal(np.sort(everything), np.arange(70_000))

    # The same by content: the three splits together hold every image exactly as often.
    def image_hashes(images: np.ndarray) -> list[str]:
        return sorted(hashlib.md5(image.tobytes()).hexdigest() for image in images)

    assert image_hashes(raw.all_images()[everything]) == image_hashes(raw.all_images())


def test_jahs_split_is_deterministic_and_mixes_both_originals(
    jahs: SplitIndices, labels: np.ndarray
) -> None:
    again = make_split(labels, split="jahs", split_seed=123)
    for name in ("train", "valid", "test"):
        assert np.array_equal(getattr(jahs, name), getattr(again, name))

    # The stream starts with the official test split, so the JAHS test set is drawn from it.
    assert np.all(jahs.test >= 60_000)
    assert np.any(jahs.valid >= 60_000) and np.any(jahs.valid < 60_000)


def test_official_split_is_stratified_and_seeded(labels: np.ndarray) -> None:
    split = official_split(labels, split_seed=0)

    assert (len(split.train), len(split.valid), len(split.test)) == (42_000, 18_000, 10_000)
    assert np.bincount(labels[split.valid]).tolist() == [1_800] * 10
    assert np.bincount(labels[split.train]).tolist() == [4_200] * 10
    assert np.array_equal(split.test, np.arange(60_000, 70_000))
    development = np.concatenate([split.train, split.valid])
    assert np.array_equal(np.sort(development), np.arange(60_000))

    assert np.array_equal(official_split(labels, split_seed=0).valid, split.valid)
    assert not np.array_equal(official_split(labels, split_seed=1).valid, split.valid)


def test_subset_is_balanced_and_keeps_the_split_order(
    jahs: SplitIndices, labels: np.ndarray
) -> None:
    subset = subset_split(jahs, labels, fraction=0.1)

    assert np.bincount(labels[subset.train]).tolist() == [441] * 10
    assert np.bincount(labels[subset.valid]).tolist() == [189] * 10
    assert np.bincount(labels[subset.test]).tolist() == [70] * 10
    first_shirts = jahs.train[labels[jahs.train] == 6][:441]
    assert np.array_equal(subset.train[labels[subset.train] == 6], first_shirts)
    assert np.all(np.isin(subset.valid, jahs.valid))

    tiny = subset_split(jahs, labels, fraction=1e-6)
    assert np.bincount(labels[tiny.test]).tolist() == [1] * 10


# --- preparation and caching ------------------------------------------------------------------


SMALL = DataSettings(subset_fraction=0.02)


def test_32px_images_are_the_28px_ones_zero_padded(
    raw: RawFashionMNIST, labels: np.ndarray, jahs: SplitIndices, cache_dir: Path
) -> None:
    dataset = load_dataset(SMALL, resolution=1.0, cache_dir=cache_dir)
    expected = subset_split(jahs, labels, fraction=SMALL.subset_fraction)

    assert dataset.side_px == 32
    images = dataset.valid.images.numpy()
    assert images.shape == (len(expected.valid), 1, 32, 32)
    assert np.array_equal(images[:, 0, 2:30, 2:30], raw.all_images()[expected.valid])
    assert images[:, :, :2].max() == 0 and images[:, :, :, 30:].max() == 0
    assert np.array_equal(dataset.valid.labels.numpy(), labels[expected.valid])
    assert dataset.train.images.is_contiguous()


def test_16px_images_are_the_padded_ones_resized(
    raw: RawFashionMNIST, labels: np.ndarray, jahs: SplitIndices, cache_dir: Path
) -> None:
    dataset = load_dataset(SMALL, resolution=0.5, cache_dir=cache_dir)
    expected = subset_split(jahs, labels, fraction=SMALL.subset_fraction)

    assert dataset.side_px == 16
    assert dataset.test.images.dtype == torch.uint8
    assert dataset.test.images.shape == (len(expected.test), 1, 16, 16)
    assert len(dataset.train) == len(expected.train)
    padded = torch.nn.functional.pad(
        torch.from_numpy(raw.all_images()[expected.test[:3]]), [2] * 4
    )
    resized = torch.nn.functional.interpolate(
        padded[:, None].float(), size=(16, 16), mode="bilinear", antialias=True
    )
    difference = (resized - dataset.test.images[:3].float()).abs()
    assert difference.max() <= 0.5
    assert prepare_images(raw.test_images[:2], side_px=8).shape == (2, 1, 8, 8)


def test_second_load_reads_the_cache(cache_dir: Path) -> None:
    path = prepare_dataset(SMALL, resolution=1.0, cache_dir=cache_dir)
    written_ns = path.stat().st_mtime_ns

    first = load_dataset(SMALL, resolution=1.0, cache_dir=cache_dir)
    assert prepare_dataset(SMALL, resolution=1.0, cache_dir=cache_dir) == path
    assert path.stat().st_mtime_ns == written_ns
    assert torch.equal(read_prepared(path).train.images, first.train.images)
    assert not list(cache_dir.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["garbage", "flipped_data_bytes"])
def test_corrupt_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    good = load_dataset(SMALL, resolution=0.25, cache_dir=tmp_path)
    path = prepare_dataset(SMALL, resolution=0.25, cache_dir=tmp_path)

    content = bytearray(path.read_bytes())
    if damage == "garbage":
        content = bytearray(b"not an HDF5 file" * 100)
    else:
        middle = len(content) // 2
        content[middle : middle + 64] = bytes(255 - b for b in content[middle : middle + 64])
    path.write_bytes(bytes(content))
    with pytest.raises(DatasetError, match="corrupt"):
        read_prepared(path)

    rebuilt = load_dataset(SMALL, resolution=0.25, cache_dir=tmp_path)
    assert torch.equal(rebuilt.train.images, good.train.images)
    assert torch.equal(read_prepared(path).test.labels, good.test.labels)


def test_cache_name_depends_on_settings_and_source(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jahs_path = prepare_dataset(SMALL, resolution=1.0, cache_dir=cache_dir)
    official = DataSettings(split="official", split_seed=3, subset_fraction=0.02)
    official_path = prepare_dataset(official, resolution=1.0, cache_dir=cache_dir)
    assert official_path != jahs_path and "seed3" in official_path.name

    # A changed source file changes the fingerprint, so nothing stale is served.
    folder = _mirror_folder(DEBIAN_DIR, tmp_path / "idx")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_gunzip("t10k-labels-idx1-ubyte"))
    assert fingerprint_idx_folder(folder) != fingerprint_idx_folder(DEBIAN_DIR)

    # Without a cache folder, $DEHBWS_CACHE_DIR decides where the file goes.
    monkeypatch.setenv("DEHBWS_CACHE_DIR", str(tmp_path / "env-cache"))
    load_dataset(DataSettings(data_dir=str(folder), subset_fraction=0.01), resolution=0.25)
    assert len(list((tmp_path / "env-cache").glob("fashion-mnist-*.h5"))) == 1


def test_prepared_file_records_provenance(cache_dir: Path, jahs: SplitIndices) -> None:
    path = prepare_dataset(DataSettings(subset_fraction=1.0), resolution=0.25, cache_dir=cache_dir)
    with h5py.File(path, "r", locking=False) as file:
        assert file.attrs["split"] == "jahs"
        assert np.array_equal(file["test/indices"][()], jahs.test)
        assert file["train/images"].shape == (44_100, 1, 8, 8)


# --- batching ---------------------------------------------------------------------------------


def _counting_split(count: int) -> ImageSplit:
    images = torch.arange(count, dtype=torch.uint8).reshape(count, 1, 1, 1).expand(count, 1, 2, 2)
    return ImageSplit(images=images.contiguous(), labels=torch.arange(count))


def test_batches_cover_the_split_once() -> None:
    split = _counting_split(10)

    batches = list(iterate_batches(split, batch_size=4, shuffle=False))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert batches[0][0].untyped_storage().data_ptr() == split.images.untyped_storage().data_ptr()

    shuffled = list(iterate_batches(split, batch_size=4, shuffle=True, drop_last=True))
    assert [len(labels) for _, labels in shuffled] == [4, 4]
    seen = torch.cat([labels for _, labels in shuffled])
    assert len(set(seen.tolist())) == 8
    assert all(torch.equal(images[:, 0, 0, 0].long(), labels) for images, labels in shuffled)


def test_shuffled_batches_follow_the_generator() -> None:
    split = _counting_split(50)

    def order(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        batches = iterate_batches(split, batch_size=8, shuffle=True, generator=generator)
        return torch.cat([labels for _, labels in batches]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50))

    with pytest.raises(ValueError, match="batch_size is 0"):
        next(iterate_batches(split, batch_size=0, shuffle=False))
