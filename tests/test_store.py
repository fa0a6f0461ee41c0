"""HDF5 round trips, atomic publishing and the masked merge, with exact numbers."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from dehbws.store import (
    ShardInput,
    StoreError,
    check_shard,
    merge_shards,
    read_meta,
    read_tensors,
    supernet_filename,
    tensor_names,
    write_tensors,
)


def _write(path: Path, tensors: dict[str, np.ndarray], **meta: object) -> Path:
    write_tensors(path, tensors, meta)
    return path


def test_round_trip_keeps_values_dtypes_and_meta(tmp_path: Path) -> None:
    tensors = {
        "cells.0.edges.1.conv3x3.conv.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "stem.1.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    path = _write(tmp_path / "v0000.h5", tensors, config={"Op1": 2}, valid_error=0.25)

    loaded = read_tensors(path)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)
    assert read_meta(path) == {"config": {"Op1": 2}, "valid_error": 0.25}
    assert sorted(tensor_names(path)) == sorted(tensors)


def test_write_leaves_no_temporary_files_and_replaces_atomically(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.h5", {"x": np.zeros(2)})
    _write(path, {"x": np.ones(2)})

    assert os.listdir(tmp_path) == ["a.h5"]
    np.testing.assert_array_equal(read_tensors(path)["x"], np.ones(2))


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.h5", {"x": np.zeros(2)})

    def broken() -> object:
        yield "y", np.ones(3)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        write_tensors(path, broken(), {})  # type: ignore[arg-type]
    np.testing.assert_array_equal(read_tensors(path)["x"], np.zeros(2))
    assert os.listdir(tmp_path) == ["a.h5"]


def test_reading_a_truncated_or_foreign_file_is_a_store_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.h5", {"x": np.zeros(1000)})
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:500])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["x"] = np.zeros(2)

    with pytest.raises(StoreError, match="truncated.h5"):
        read_tensors(truncated)
    with pytest.raises(StoreError, match="not a dehbws weight file"):
        read_tensors(foreign)
    with pytest.raises(StoreError, match="does not exist"):
        read_tensors(tmp_path / "missing.h5")


def test_check_shard_finds_nan(tmp_path: Path) -> None:
    supernet = _write(tmp_path / "supernet.h5", {"x": np.zeros(2, dtype=np.float32)})
    good = _write(tmp_path / "good.h5", {"x": np.ones(2, dtype=np.float32)})
    bad = _write(tmp_path / "bad.h5", {"x": np.array([1.0, np.nan], dtype=np.float32)})

    check_shard(good, supernet)
    with pytest.raises(StoreError, match="'x' holds non-finite"):
        check_shard(bad, supernet)


def test_supernet_filename() -> None:
    assert supernet_filename(7) == "v0007.h5"
    assert supernet_filename(1234) == "v1234.h5"


def test_masked_merge_averages_each_tensor_over_its_users(tmp_path: Path) -> None:
    base = _write(
        tmp_path / "v0000.h5",
        {
            "a": np.array([1.0, 1.0], dtype=np.float32),
            "b": np.array([10.0], dtype=np.float32),
            "c": np.array([5.0], dtype=np.float32),
            "n": np.array(4, dtype=np.int64),
        },
    )
    # Subnet 1 used a and b, subnet 2 used a and n, nobody used c.
    shard1 = _write(
        tmp_path / "s1.h5",
        {"a": np.array([3.0, 5.0], np.float32), "b": np.array([20.0], np.float32)},
    )
    shard2 = _write(
        tmp_path / "s2.h5",
        {"a": np.array([5.0, 9.0], np.float32), "n": np.array(9, dtype=np.int64)},
    )
    out = tmp_path / "v0001.h5"

    stats = merge_shards(
        base, [ShardInput(shard1, base), ShardInput(shard2, base)], out, {"version": 1}
    )

    merged = read_tensors(out)
    np.testing.assert_array_equal(merged["a"], [4.0, 7.0])
    np.testing.assert_array_equal(merged["b"], [20.0])
    np.testing.assert_array_equal(merged["c"], [5.0])
    assert merged["n"] == 9 and merged["n"].dtype == np.int64
    assert merged["a"].dtype == np.float32
    assert (stats.shards, stats.updated_tensors, stats.kept_tensors) == (2, 3, 1)
    assert read_meta(out) == {"version": 1}


def test_merge_of_subnets_from_an_older_base_adds_their_deltas(tmp_path: Path) -> None:
    old = _write(tmp_path / "v0000.h5", {"a": np.array([0.0], np.float32)})
    current = _write(tmp_path / "v0001.h5", {"a": np.array([10.0], np.float32)})
    # Started from v0000 (0 -> 2) and from v0001 (10 -> 14): mean delta (2 + 4) / 2 = 3.
    from_old = _write(tmp_path / "s1.h5", {"a": np.array([2.0], np.float32)})
    from_current = _write(tmp_path / "s2.h5", {"a": np.array([14.0], np.float32)})

    merge_shards(
        current,
        [ShardInput(from_old, old), ShardInput(from_current, current)],
        tmp_path / "v0002.h5",
        {},
    )
    np.testing.assert_array_equal(read_tensors(tmp_path / "v0002.h5")["a"], [13.0])


def test_merge_without_shards_copies_the_supernet(tmp_path: Path) -> None:
    base = _write(tmp_path / "v0000.h5", {"a": np.arange(4.0)})
    merge_shards(base, [], tmp_path / "v0001.h5", {})
    np.testing.assert_array_equal(read_tensors(tmp_path / "v0001.h5")["a"], np.arange(4.0))


def test_merge_rejects_shards_of_another_network(tmp_path: Path) -> None:
    base = _write(tmp_path / "v0000.h5", {"a": np.zeros(2)})
    wrong_shape = _write(tmp_path / "s1.h5", {"a": np.zeros(3)})
    unknown = _write(tmp_path / "s2.h5", {"zzz": np.zeros(2)})

    with pytest.raises(StoreError, match="shape"):
        merge_shards(base, [ShardInput(wrong_shape, base)], tmp_path / "o1.h5", {})
    with pytest.raises(StoreError, match="zzz"):
        merge_shards(base, [ShardInput(unknown, base)], tmp_path / "o2.h5", {})
    assert not (tmp_path / "o1.h5").exists() and not (tmp_path / "o2.h5").exists()
