"""Scaling with rung size: the coordinator's time per evaluation for rungs of 1 to 81 tasks.

Each size is a new DEHB-WS search on the tiny network whose first rung (81 jobs at 1 epoch on
the 1..81 grid) is cut to that many jobs. Per evaluation, the coordinator's time (wall time
outside the executor's batch) must stay flat as rungs grow: a scan over all jobs per finished
job would make it grow linearly, and show up at 81.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import Row
from searches import one_rung_settings, quiet_logging, timed_search

from dehbws.settings import NetworkSettings

TARGET_GROWTH = 1.5  # per-evaluation time at the largest rung / at the 9-task rung
TINY = NetworkSettings(width=2, cells_per_stage=1, resolution=0.25)


def measure(cache_dir: Path, *, sizes: list[int], executor: str, threads: int) -> list[Row]:
    """Rows for item 4: coordinator seconds per evaluation for each rung size."""
    quiet_logging()
    if threads > 0:
        torch.set_num_threads(threads)
    per_evaluation: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="dehbws-scaling-") as scratch:
        for size in sizes:
            settings = one_rung_settings(
                evaluations=size,
                max_epochs=81,
                network=TINY,
                subset_fraction=0.02,
                batch_size=128,
                threads=threads,
                executor=executor,
            )
            timing = timed_search(Path(scratch) / f"rung-{size}", settings, cache_dir)
            per_evaluation[size] = timing.coordinator / timing.evaluations

    reference = min((size for size in sizes if size >= 9), default=min(sizes))
    largest = max(sizes)
    growth = per_evaluation[largest] / per_evaluation[reference]
    listing = ", ".join(f"{size}: {1000 * per_evaluation[size]:.0f}" for size in sizes)
    return [
        Row(
            "4 scaling",
            f"coordinator s/evaluation, {largest} vs {reference} tasks",
            growth,
            f"<= {TARGET_GROWTH}",
            growth <= TARGET_GROWTH,
            f"ms per evaluation by rung size {{{listing}}}, {executor} executor",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 9, 27, 81])
    parser.add_argument("--executor", choices=["debug", "local"], default="debug")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dehbws-data-") as scratch:
        rows = measure(
            args.cache_dir or Path(scratch),
            sizes=args.sizes,
            executor=args.executor,
            threads=args.threads,
        )
    for row in rows:
        print(json.dumps(row.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
