"""Coordinator overhead: the share of a rung's wall time not spent training or validating.

One DEHB-WS rung at a setting where every evaluation trains for over a minute (the data subset
is sized from a short timing of the network with every edge a 3x3 convolution, which trains
about twice as slowly as the rung's random subnets, so `train_seconds` asks for twice a minute
and more), run by the debug executor in this process.
The figures cover the whole one-rung search, so they also carry the once-per-run costs (DEHB's
set-up, the initial supernet, the final result): an upper bound for a rung in a longer run.
Two figures: the coordinator's own share (ask/tell, manifest, accepting results, averaging,
history and state), and everything that is neither training nor validation (validation counts
its BN recalibration), which adds the tasks' side: reading the data and supernet, building the
subnet, the per-epoch checkpoints and writing the shard.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import HEAVY_CONFIG, Row, load_data
from searches import one_rung_settings, quiet_logging, timed_search

from dehbws.model import build_subnet
from dehbws.settings import NetworkSettings, TrainSettings
from dehbws.train import train_epochs

TARGET_SHARE = 0.02
JAHS_TRAIN_IMAGES = 44_100


def images_per_second(network: NetworkSettings, cache_dir: Path, *, threads: int) -> float:
    """Training speed of the network on this machine, from one short epoch (wall clock)."""
    data = load_data(cache_dir, subset_fraction=0.05, resolution=network.resolution)
    model = build_subnet(HEAVY_CONFIG, network)
    settings = TrainSettings(batch_size=256, num_threads=threads)
    train = {"learning_rate": 0.05, "weight_decay": 5e-4, "trivial_augment": False, "seed": 0}
    train_epochs(model, data.train, start_epoch=0, end_epoch=1, settings=settings, **train)
    started_s = time.perf_counter()
    train_epochs(model, data.train, start_epoch=1, end_epoch=2, settings=settings, **train)
    return len(data.train) / (time.perf_counter() - started_s)


def measure(
    cache_dir: Path,
    *,
    network: NetworkSettings,
    train_seconds: float,
    evaluations: int,
    threads: int,
    executor: str,
) -> list[Row]:
    """Rows for item 2, from one rung of `evaluations` jobs of about `train_seconds` each."""
    quiet_logging()
    if threads > 0:
        torch.set_num_threads(threads)
    speed = images_per_second(network, cache_dir, threads=threads)
    fraction = min(1.0, max(0.01, train_seconds * speed / JAHS_TRAIN_IMAGES))
    fraction = round(fraction, 3)

    settings = one_rung_settings(
        evaluations=evaluations,
        max_epochs=3,
        network=network,
        subset_fraction=fraction,
        batch_size=256,
        threads=threads,
        executor=executor,
    )
    with tempfile.TemporaryDirectory(prefix="dehbws-overhead-") as folder:
        timing = timed_search(Path(folder) / "run", settings, cache_dir)

    per_eval_train = timing.train / max(timing.evaluations, 1)
    under_a_minute = " (under a minute: not the target's setting)" if per_eval_train < 60 else ""
    setting = (
        f"{timing.evaluations} evaluations, {per_eval_train:.0f} s training each{under_a_minute}, "
        f"{timing.wall:.0f} s wall, {executor} executor, subset {fraction}"
    )
    coordinator_share = timing.coordinator / timing.wall
    not_training_share = timing.not_training / timing.wall
    return [
        Row(
            "2 overhead",
            "coordinator share of rung wall time",
            coordinator_share,
            f"<= {TARGET_SHARE}",
            coordinator_share <= TARGET_SHARE,
            f"{timing.coordinator:.2f} s; {setting}",
        ),
        Row(
            "2 overhead",
            "not training or validating, share",
            not_training_share,
            f"<= {TARGET_SHARE}",
            not_training_share <= TARGET_SHARE,
            f"{timing.not_training:.2f} s (validation {timing.evaluate:.1f} s excluded)",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--cells", type=int, default=1)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--train-seconds", type=float, default=150.0)
    parser.add_argument("--evaluations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--executor", choices=["debug", "local"], default="debug")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dehbws-data-") as scratch:
        rows = measure(
            args.cache_dir or Path(scratch),
            network=NetworkSettings(args.width, args.cells, args.resolution),
            train_seconds=args.train_seconds,
            evaluations=args.evaluations,
            threads=args.threads,
            executor=args.executor,
        )
    for row in rows:
        print(json.dumps(row.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
