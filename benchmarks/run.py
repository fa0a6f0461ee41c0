"""Run the performance benchmarks (items 1-4) and print a table of ratios against targets.

    python benchmarks/run.py                  the full set on the CPU (under 15 minutes)
    python benchmarks/run.py --quick          tiny settings, seconds; checks the scripts work
    python benchmarks/run.py --device cuda    training throughput on a GPU (fast path on)

Every figure is a ratio against a reference measured in the same process or command, because
absolute times on a shared machine mean little. Exit code 0 when every target is met, 1 when one
is missed (the table says which), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import averaging
import overhead
import scaling
import throughput
from common import Row, format_table

from dehbws.settings import NetworkSettings

ITEMS = ("throughput", "overhead", "averaging", "scaling")


def throughput_rows(args: argparse.Namespace, cache_dir: Path) -> list[Row]:
    if args.quick:
        network, fraction, rounds = NetworkSettings(2, 1, 0.25), 0.02, 1
    elif args.device != "cpu":
        network, fraction, rounds = NetworkSettings(16, 5, 1.0), 1.0, 3  # a paper-scale epoch
    else:
        network, fraction, rounds = NetworkSettings(8, 1, 0.5), 0.05, 6
    gpu = args.device != "cpu"
    setup = throughput.ThroughputSetup(
        network=network,
        subset_fraction=fraction,
        batch_size=256,
        threads=args.threads,
        device=args.device,
        rounds=rounds,
        channels_last=gpu,
        precision="bf16" if gpu else "fp32",
        compile=args.compile,
    )
    return throughput.measure(setup, cache_dir)


def overhead_rows(args: argparse.Namespace, cache_dir: Path) -> list[Row]:
    network = NetworkSettings(2, 1, 0.25) if args.quick else NetworkSettings(16, 1, 1.0)
    return overhead.measure(
        cache_dir,
        network=network,
        train_seconds=2.0 if args.quick else 150.0,
        evaluations=2,
        threads=args.threads,
        executor="debug",
    )


def averaging_rows(args: argparse.Namespace, cache_dir: Path) -> list[Row]:
    if args.quick:
        return averaging.measure([1, 3], width=2, cells=1, repeats=1)
    return averaging.measure([3, 9, 27, 81], width=16, cells=5)


def scaling_rows(args: argparse.Namespace, cache_dir: Path) -> list[Row]:
    sizes = [1, 3] if args.quick else [1, 3, 9, 27, 81]
    return scaling.measure(cache_dir, sizes=sizes, executor="debug", threads=args.threads)


MEASURES: dict[str, Callable[[argparse.Namespace, Path], list[Row]]] = {
    "throughput": throughput_rows,
    "overhead": overhead_rows,
    "averaging": averaging_rows,
    "scaling": scaling_rows,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    parser.add_argument("--only", nargs="+", choices=ITEMS, default=list(ITEMS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (throughput only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (throughput)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="prepared data folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        args.only = [item for item in args.only if item == "throughput"]

    started_s = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dehbws-bench-") as scratch:
        cache_dir = args.cache_dir or Path(scratch) / "data"
        for item in args.only:
            item_started_s = time.perf_counter()
            rows += MEASURES[item](args, cache_dir)
            seconds = time.perf_counter() - item_started_s
            print(f"{item}: {seconds:.0f} s", file=sys.stderr, flush=True)

    if args.quick:  # tiny settings say nothing about the targets
        rows = [dataclasses.replace(row, passed=None, target=f"({row.target})") for row in rows]
    print(format_table(rows))
    total_s = time.perf_counter() - started_s
    print(f"\n{len(rows)} figures in {total_s:.0f} s on {os.cpu_count()} CPUs ({args.device})")
    if args.json is not None:
        args.json.write_text(json.dumps([row.to_dict() for row in rows], indent=1) + "\n")
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
