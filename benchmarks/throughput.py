"""Training throughput: dehbws's worker training code against a minimal hand-written loop.

Both train the same subnet (same weights at the start, same batch size, threads and device) on
the same real images held in memory, one epoch per measurement, alternating dehbws and the
reference so that load from other processes hits both alike. The reference is the least a
PyTorch user would write: images normalised once up front, a random permutation per epoch, and
forward, loss, backward and an SGD step per batch, with no augmentation at all (and, when the
fast path is on, the same memory format, autocast and compilation, written out by hand).
dehbws's figure therefore includes everything its recipe adds per batch: the random flip and
crop, TrivialAugment when on, and its bookkeeping.

On the CPU the clock is the process's CPU time, not the wall clock: on a machine shared with
other jobs the wall clock mostly measures how often the scheduler ran us, while CPU time measures
the work (with one thread there is no spinning to inflate it). On a GPU it is the wall clock,
with the device synchronised at the end of every epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import HEAVY_CONFIG, Row, alternate, load_data, median_ratio
from torch import nn

from dehbws.augment import normalize
from dehbws.data import ImageSplit
from dehbws.model import build_subnet
from dehbws.settings import NetworkSettings, TrainSettings
from dehbws.train import train_epochs

TARGETS = {False: 0.95, True: 0.90}  # ratio without / with TrivialAugment
JAHS_TRAIN_IMAGES = 44_100


@dataclass(frozen=True)
class ThroughputSetup:
    """What both loops train: the network, the data, and how."""

    network: NetworkSettings
    subset_fraction: float
    batch_size: int
    threads: int
    device: str
    rounds: int
    channels_last: bool = False
    precision: str = "fp32"
    compile: bool = False


def clock_for(device: str) -> Callable[[], float]:
    """CPU time of this process on the CPU, the wall clock on a GPU (see the module doc)."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


def fresh_model(setup: ThroughputSetup) -> nn.Module:
    torch.manual_seed(0)
    return build_subnet(HEAVY_CONFIG, setup.network)


def make_dehbws_epoch(
    setup: ThroughputSetup, split: ImageSplit, trivial_augment: bool
) -> Callable[[], float]:
    """One epoch of `train_epochs` per call; returns images per second."""
    model = fresh_model(setup)
    settings = TrainSettings(
        batch_size=setup.batch_size,
        device=setup.device,
        num_threads=setup.threads,
        channels_last=setup.channels_last,
        precision=setup.precision,
        compile=setup.compile,
    )
    state: dict[str, object] = {"epoch": 0, "optimizer": None}

    clock = clock_for(setup.device)

    def one_epoch() -> float:
        epoch = int(state["epoch"])  # type: ignore[call-overload]
        started = clock()
        result = train_epochs(
            model,
            split,
            learning_rate=0.05,
            weight_decay=5e-4,
            trivial_augment=trivial_augment,
            start_epoch=epoch,
            end_epoch=epoch + 1,
            settings=settings,
            seed=0,
            optimizer_state=state["optimizer"],  # type: ignore[arg-type]
        )
        seconds = clock() - started  # train_epochs reads the loss back: the device is idle
        state.update(epoch=epoch + 1, optimizer=result.optimizer_state)
        return result.images_seen / seconds

    return one_epoch


def make_reference_epoch(setup: ThroughputSetup, split: ImageSplit) -> Callable[[], float]:
    """One epoch of the hand-written loop per call; returns images per second."""
    device = torch.device(setup.device)
    model = fresh_model(setup).to(device)
    images = normalize(split.images).to(device)  # once, outside the timed loop
    labels = split.labels.to(device)
    if setup.channels_last:  # the same fast-path options as dehbws, written out by hand
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if setup.compile else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    model.train()
    bf16 = setup.precision == "bf16"

    clock = clock_for(setup.device)

    def one_epoch() -> float:
        started = clock()
        order = torch.randperm(len(labels), device=device)
        for start in range(0, len(labels), setup.batch_size):
            batch = order[start : start + setup.batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(forward(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(labels) / (clock() - started)

    return one_epoch


def measure(setup: ThroughputSetup, cache_dir: Path) -> list[Row]:
    """Rows for item 1: the dehbws / reference throughput ratio without and with TA."""
    if setup.threads > 0:
        torch.set_num_threads(setup.threads)
    data = load_data(
        cache_dir, subset_fraction=setup.subset_fraction, resolution=setup.network.resolution
    )
    split = data.train

    options = [
        "channels_last" if setup.channels_last else "",
        "bf16" if setup.precision == "bf16" else "",
        "compile" if setup.compile else "",
    ]
    fast_path = "".join(f" {option}" for option in options if option)
    rows = []
    for trivial_augment in (False, True):
        dehbws_epoch = make_dehbws_epoch(setup, split, trivial_augment)
        reference_epoch = make_reference_epoch(setup, split)
        dehbws_epoch(), reference_epoch()  # warm-up: allocator, thread pool, caches
        ours, theirs = alternate(dehbws_epoch, reference_epoch, rounds=setup.rounds)
        ratio = median_ratio(ours, theirs)
        target = TARGETS[trivial_augment]
        rows.append(
            Row(
                item="1 throughput",
                figure=f"dehbws / hand-written, TA {'on' if trivial_augment else 'off'}",
                value=ratio,
                target=f">= {target}",
                passed=ratio >= target,
                detail=(
                    f"{sum(ours) / len(ours):.0f} vs {sum(theirs) / len(theirs):.0f} images per "
                    f"{'CPU-' if clock_for(setup.device) is time.process_time else ''}second, "
                    f"{len(split)} images x {setup.rounds} alternating epochs, "
                    f"W={setup.network.width} N={setup.network.cells_per_stage} "
                    f"R={setup.network.resolution}, batch {setup.batch_size}, "
                    f"{setup.threads or torch.get_num_threads()} threads, {setup.device}"
                    f"{fast_path}; a {JAHS_TRAIN_IMAGES}-image epoch: "
                    f"{JAHS_TRAIN_IMAGES * len(ours) / sum(ours):.0f} s"
                ),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--cells", type=int, default=1)
    parser.add_argument("--resolution", type=float, default=0.5)
    parser.add_argument("--subset-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    setup = ThroughputSetup(
        network=NetworkSettings(args.width, args.cells, args.resolution),
        subset_fraction=args.subset_fraction,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
        rounds=args.rounds,
    )
    for row in measure(setup, args.cache_dir):
        print(json.dumps(row.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
