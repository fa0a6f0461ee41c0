"""Averaging: time and peak memory of merging K shards of the paper-size supernet (W=16, N=5).

The shards are real subnets' tensor sets (random configurations of the space, the supernet's
values plus noise), written with `dehbws.store.write_tensors` as tasks write them. For each K a
fresh subprocess reads the merge's inputs once (the current supernet and the K shards: the floor
any merge must pay) and another merges them with `merge_shards`. Each reports its wall time and
its peak resident memory (VmHWM, reset just before the work starts, so imports do not count), and
the figures of one K do not leak into the next. For small K, reading and writing the supernet
itself dominates, so reading the shards alone is much faster than any merge can be; that time is
printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Row

from dehbws.store import ShardInput, merge_shards, read_tensors, write_tensors

PAPER_WIDTH, PAPER_CELLS = 16, 5
TIME_TARGET = 2.0


def make_shards(folder: Path, count: int, *, width: int, cells: int, seed: int = 0) -> Path:
    """Write the supernet v0000.h5 and `count` shards e00000.h5 ... into `folder`."""
    from dehbws.model import supernet_state, used_tensor_names
    from dehbws.settings import NetworkSettings
    from dehbws.space import build_space, to_plain

    network = NetworkSettings(width=width, cells_per_stage=cells, resolution=1.0)
    state = {name: value.numpy() for name, value in supernet_state(network, seed=seed).items()}
    supernet = folder / "v0000.h5"
    write_tensors(supernet, state, {"version": 0})

    rng = np.random.default_rng(seed)
    configs = build_space(seed=seed).sample_configuration(count)
    for index, config in enumerate(configs):
        used = used_tensor_names(to_plain(config), network)
        tensors = {name: _perturbed(state[name], rng) for name in used}
        write_tensors(folder / f"e{index:05d}.h5", tensors, {"evaluation": index})
    return supernet


def _perturbed(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating):
        return value + 1
    return (value + rng.normal(0.0, 0.01, value.shape)).astype(value.dtype)


def worker(mode: str, folder: Path, count: int) -> dict[str, float]:
    """In a subprocess: read or merge the first `count` shards; seconds and peak memory."""
    shards = [folder / f"e{index:05d}.h5" for index in range(count)]
    supernet = folder / "v0000.h5"
    baseline_mib = reset_peak_memory()

    started_s = time.perf_counter()
    shards_s = 0.0
    if mode == "read":
        read_tensors(supernet)
        shards_started_s = time.perf_counter()
        for shard in shards:
            read_tensors(shard)
        shards_s = time.perf_counter() - shards_started_s
    else:
        out = folder / f"merged-{count}.h5"
        merge_shards(supernet, [ShardInput(shard, supernet) for shard in shards], out, {})
        out.unlink()
    seconds = time.perf_counter() - started_s

    peak_mib = memory_mib("VmHWM")
    return {
        "seconds": seconds,
        "shards_seconds": shards_s,
        "peak_mib": peak_mib,
        "baseline_mib": baseline_mib,
    }


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; this needs Linux")


def reset_peak_memory() -> float:
    """Reset VmHWM to the current resident size (Linux: 5 > clear_refs); returns that size."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory_mib("VmRSS")


def run_worker(mode: str, folder: Path, count: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", mode, "--folder", str(folder)]
    output = subprocess.run(
        [*command, "--shards", str(count)], check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


def measure(counts: list[int], *, width: int, cells: int, repeats: int = 3) -> list[Row]:
    """Rows for item 3: merge time against one read of the shards, and peak memory per K."""
    with tempfile.TemporaryDirectory(prefix="dehbws-averaging-") as scratch:
        folder = Path(scratch)
        make_shards(folder, max(counts), width=width, cells=cells)
        supernet_mib = (folder / "v0000.h5").stat().st_size / 2**20

        rows, peaks = [], {}
        for count in counts:
            # read, merge, read, merge, ...: the median ratio, and the highest peak
            pairs = [
                (run_worker("read", folder, count), run_worker("merge", folder, count))
                for _ in range(repeats)
            ]
            ratio = statistics.median(merge["seconds"] / read["seconds"] for read, merge in pairs)
            read, merge = pairs[-1]
            peaks[count] = max(merge["peak_mib"] for _, merge in pairs)
            rows.append(
                Row(
                    "3 averaging",
                    f"merge / read inputs once, K={count}",
                    ratio,
                    f"<= {TIME_TARGET}",
                    ratio <= TIME_TARGET,
                    f"last pair: merge {merge['seconds']:.2f} s, read {read['seconds']:.2f} s "
                    f"(shards alone {read['shards_seconds']:.2f} s), merge peak "
                    f"{peaks[count]:.0f} MiB (process start {merge['baseline_mib']:.0f}), "
                    f"median of {repeats}",
                )
            )

    # Independent of K: more shards may not cost even one more copy of the supernet (the float64
    # sums fill up as more distinct tensors are used, which is bounded by the supernet).
    growth = peaks[max(counts)] - peaks[min(counts)]
    rows.append(
        Row(
            "3 averaging",
            f"peak memory growth K={min(counts)}->{max(counts)}, MiB",
            growth,
            f"<= {supernet_mib:.1f} (one supernet)",
            growth <= supernet_mib,
            f"peaks {', '.join(f'{peaks[k]:.0f}' for k in counts)} MiB; supernet "
            f"{supernet_mib:.1f} MiB, W={width} N={cells}",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[3, 9, 27, 81])
    parser.add_argument("--width", type=int, default=PAPER_WIDTH)
    parser.add_argument("--cells", type=int, default=PAPER_CELLS)
    parser.add_argument("--worker", choices=["read", "merge"], default=None)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.folder, args.shards[0])))
        return 0
    for row in measure(args.shards, width=args.width, cells=args.cells):
        print(json.dumps(row.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
