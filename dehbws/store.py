"""HDF5 weight store: immutable supernet versions, per-evaluation shards and the masked merge.

Every file holds one dataset per tensor, named by its `state_dict` key, plus JSON metadata in
attributes. Files are written under a temporary name in the target folder and published with
`os.replace`, so a reader given an exact path never sees half a file. Locking is switched off
because HDF5's locks fail on NFS and Lustre; immutability makes it unnecessary.

This module needs only numpy and h5py, so the coordinator never has to import torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dehbws import faults
from dehbws.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_META_ATTR = "dehbws_meta"
_FORMAT_ATTR = "dehbws_format"


class StoreError(UserError, RuntimeError):
    """A weight file is missing, truncated, of another format or holds non-finite values.

    The coordinator rejects (and reruns) a task whose shard raises it; anywhere else it stops
    the run with its message, which names the file.
    """


def supernet_filename(version: int) -> str:
    """`v0007.h5` for version 7."""
    return f"v{version:04d}.h5"


def write_tensors(
    path: Path,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    meta: Mapping[str, Any],
) -> int:
    """Write tensors and metadata to `path` atomically (temp file, fsync, rename).

    `tensors` may be a generator of (name, array) pairs, so a caller can stream tensors one at
    a time. Returns the number of tensors written.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)

    try:
        with h5py.File(temp_name, "w", locking=False) as file:
            file.attrs[_FORMAT_ATTR] = FORMAT_VERSION
            file.attrs[_META_ATTR] = json.dumps(dict(meta), sort_keys=True)
            count = 0
            for name, array in items:
                _create_dataset(file, name, np.asarray(array))
                count += 1
        _fsync_file(temp_name)
        os.replace(temp_name, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        system_error = _system_error(error, path)
        if system_error is not None:
            raise system_error from error
        raise
    return count


def _system_error(error: BaseException, path: Path) -> OSError | None:
    """HDF5's report of a failed write (a RuntimeError with the C errno in its text) as OSError.

    Callers then see a full or read-only disk as the OSError it is, with its errno and the file
    that could not be written, whichever HDF5 call noticed it first.
    """
    if isinstance(error, OSError) and error.errno is not None:
        return None
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    found = re.search(r"errno = (\d+)", str(error))
    if found is None or int(found.group(1)) == 0:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number), str(path))


def _create_dataset(file: h5py.File, name: str, array: np.ndarray) -> None:
    # A Fletcher-32 checksum per chunk makes damaged bytes an error on reading instead of
    # silently different weights; HDF5 allows it only for chunked (non-scalar) datasets.
    if array.ndim > 0 and array.size > 0:
        file.create_dataset(name, data=array, fletcher32=True)
    else:
        file.create_dataset(name, data=array)


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata dict stored with a weight file."""
    with _open(path) as file:
        return dict(json.loads(file.attrs[_META_ATTR]))


def read_tensors(path: Path, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """All tensors of a file (or just `names`), as numpy arrays."""
    with _open(path) as file:
        wanted = list(file.keys()) if names is None else list(names)
        missing = [name for name in wanted if name not in file]
        if missing:
            raise StoreError(f"{path} lacks tensors {missing[:5]} (of {len(missing)} missing).")
        return {name: file[name][()] for name in wanted}


def tensor_names(path: Path) -> list[str]:
    """The names of the tensors stored in a file."""
    with _open(path) as file:
        return list(file.keys())


def check_shard(path: Path, supernet: Path, expected_names: Sequence[str] | None = None) -> None:
    """Raise StoreError unless the shard is fit to be averaged into `supernet`.

    Fit means: every entry is a plain numeric dataset (never an object or opaque blob, which
    could carry a pickle) that the supernet also holds, with the supernet's shape and dtype;
    every value reads back with a valid checksum and is finite; and when `expected_names` is
    given, the shard holds exactly those tensors, so a partial write is caught too.
    """
    with _open(path) as shard, _open(supernet) as reference:
        names = list(shard.keys())
        for name in names:
            _check_shard_tensor(path, name, shard.get(name, getlink=True), shard, reference)
        if expected_names is not None and set(names) != set(expected_names):
            missing = sorted(set(expected_names) - set(names))
            extra = sorted(set(names) - set(expected_names))
            raise StoreError(
                f"{path} does not hold the tensors its subnet used: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {extra[:5]} ({len(extra)} in all)."
            )


def _check_shard_tensor(
    path: Path, name: str, link: Any, shard: h5py.File, reference: h5py.File
) -> None:
    if not isinstance(link, h5py.HardLink) or not isinstance(shard[name], h5py.Dataset):
        raise StoreError(f"{path}: entry {name!r} is not a plain dataset.")
    if name not in reference:
        raise StoreError(
            f"{path}: tensor {name!r} is not part of the supernet {reference.filename}."
        )
    dataset, expected = shard[name], reference[name]
    if dataset.dtype.kind not in "fiub" or dataset.dtype != expected.dtype:
        raise StoreError(
            f"{path}: tensor {name!r} has dtype {dataset.dtype}, but the supernet stores "
            f"{expected.dtype}."
        )
    if dataset.shape != expected.shape:
        raise StoreError(
            f"{path}: tensor {name!r} has shape {dataset.shape}, but the supernet's is "
            f"{expected.shape}."
        )
    try:
        value = dataset[()]
    except OSError as error:  # a failed checksum or an unreadable chunk
        raise StoreError(f"{path}: tensor {name!r} cannot be read back ({error}).") from None
    if dataset.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise StoreError(f"{path}: tensor {name!r} holds non-finite values.")


@dataclass(frozen=True)
class ShardInput:
    """One subnet to merge: its shard and the supernet version it started from."""

    shard: Path
    base: Path


@dataclass(frozen=True)
class MergeStats:
    """What a merge did: how many shards, and how many tensors were updated or kept."""

    shards: int
    updated_tensors: int
    kept_tensors: int


def merge_shards(
    current: Path, inputs: Sequence[ShardInput], out: Path, meta: Mapping[str, Any]
) -> MergeStats:
    """Write the masked average of the subnets in `inputs` on top of `current` to `out`.

    Each tensor becomes current + mean over the subnets that used it of (subnet - its base).
    When every subnet started from `current` this is the plain mean of the subnets' tensors;
    the delta form also handles subnets that started from an older version. Tensors that no
    subnet used keep their value. Shards are read once each, one at a time, into float64 sums
    the size of the supernet, so peak memory does not grow with the number of shards.
    """
    with _open(current) as current_file:
        values = {name: current_file[name][()] for name in current_file}

    delta_sums: dict[str, np.ndarray] = {}
    users: dict[str, int] = {}
    for item in inputs:
        _add_shard_deltas(item, Path(current), values, delta_sums, users)

    def merged_tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name, value in values.items():
            faults.checkpoint("supernet-tensor")
            if name in users:
                yield name, _mean_update(value, delta_sums.pop(name), users[name])
            else:
                yield name, value

    total = write_tensors(out, merged_tensors(), meta)
    stats = MergeStats(len(inputs), len(users), total - len(users))
    logger.debug("merged %d shards into %s: %s", len(inputs), out, stats)
    return stats


def _add_shard_deltas(
    item: ShardInput,
    current: Path,
    values: Mapping[str, np.ndarray],
    delta_sums: dict[str, np.ndarray],
    users: dict[str, int],
) -> None:
    """Add one shard's (subnet - base) to the running sums; StoreError if it does not fit."""
    same_base = Path(item.base).resolve() == current.resolve()
    with contextlib.ExitStack() as stack:
        shard_file = stack.enter_context(_open(item.shard))
        base_file = None if same_base else stack.enter_context(_open(item.base))
        unknown = set(shard_file.keys()) - set(values)
        if unknown:
            raise StoreError(
                f"shard {item.shard} holds tensors the supernet {current} lacks: "
                f"{sorted(unknown)[:5]}; it was made for another network."
            )

        for name in shard_file:
            shard_value = shard_file[name][()]
            if shard_value.shape != values[name].shape:
                raise StoreError(
                    f"tensor {name!r} has shape {shard_value.shape} in {item.shard} but "
                    f"{values[name].shape} in the supernet."
                )
            base_value = values[name] if base_file is None else base_file[name][()]
            # float64 sums, so that the mean of many float32 tensors does not drift
            delta = shard_value.astype(np.float64) - base_value.astype(np.float64)
            if name in delta_sums:
                delta_sums[name] += delta
            else:
                delta_sums[name] = delta
            users[name] = users.get(name, 0) + 1


def _mean_update(value: np.ndarray, delta_sum: np.ndarray, count: int) -> np.ndarray:
    result = value.astype(np.float64) + delta_sum / count
    if np.issubdtype(value.dtype, np.integer):
        return np.rint(result).astype(value.dtype)
    return result.astype(value.dtype)


@contextlib.contextmanager
def _open(path: Path) -> Iterator[h5py.File]:
    try:
        file = h5py.File(path, "r", locking=False)
    except FileNotFoundError as error:
        raise StoreError(f"weight file {path} does not exist.") from error
    except OSError as error:
        raise StoreError(f"weight file {path} cannot be read as HDF5: {error}") from error

    with file:
        if file.attrs.get(_FORMAT_ATTR) != FORMAT_VERSION:
            raise StoreError(
                f"{path} is not a dehbws weight file of format {FORMAT_VERSION} "
                f"(found {file.attrs.get(_FORMAT_ATTR)!r})."
            )
        yield file


def _fsync_file(path: str) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the folder holding it is synced.
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
