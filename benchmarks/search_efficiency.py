"""Search efficiency: what DEHB-WS spends to reach vanilla DEHB's final incumbent, per seed.

    python benchmarks/search_efficiency.py COMPARISON_DIR [--any-fidelity] [--json FILE]

COMPARISON_DIR is a folder made by `dehbws compare` (or by hand): run folders
COMPARISON_DIR/METHOD/seed-K, each with the documented settings.json, history.jsonl,
warmup.jsonl, result.json and batches/*/results/*.json. For every seed that both methods ran, the
target is the validation error of vanilla DEHB's final incumbent (result.json). The script walks
each run's history in evaluation order, adding up epochs (warm-up epochs first, for DEHB-WS) and
training seconds, and reports when the target was first reached: by DEHB at its incumbent, by
DEHB-WS at its first evaluation with an error at or below the target (at the run's maximum
budget, unless --any-fidelity). Wall seconds come from the result files' times and the time the
run folder was created, so they include any pause of a resumed run. Epochs count evaluations one
after another, as a single worker would run them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Reached:
    """When a run first reached a validation error (None fields: never)."""

    evaluation: int | None
    valid_error: float | None
    epochs: float | None
    train_seconds: float | None
    wall_seconds: float | None
    total_epochs: float
    total_wall_seconds: float | None


@dataclass(frozen=True)
class SeedResult:
    seed: str
    target_error: float
    baseline: Reached
    method: Reached

    @property
    def epoch_speedup(self) -> float | None:
        """Baseline epochs to its incumbent / method epochs to the same error."""
        if self.baseline.epochs is None or not self.method.epochs:
            return None
        return self.baseline.epochs / self.method.epochs


class LayoutError(ValueError):
    """The folder does not hold the documented run-folder files."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LayoutError(f"{path} is missing; is this a finished dehbws run folder?") from None
    except json.JSONDecodeError as error:
        raise LayoutError(f"{path} is not valid JSON ({error}).") from None


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of history.jsonl or warmup.jsonl ([] when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_reaching(
    run: Path, target: float | None, *, max_fidelity_only: bool, incumbent: int | None = None
) -> Reached:
    """Walk the run's history; stop at `incumbent`, or at the first error <= `target`."""
    history = read_lines(run / "history.jsonl")
    warmup = read_lines(run / "warmup.jsonl")
    result = read_json(run / "result.json")
    top = read_json(run / "settings.json")["search"]["max_epochs"]
    created_s = (run / "settings.json").stat().st_mtime

    epochs = float(sum(line.get("epochs_trained") or 0 for line in warmup))
    train_s = float(sum(line.get("train_seconds") or 0.0 for line in warmup))
    total_epochs = epochs + sum(line.get("epochs_trained") or 0 for line in history)
    total_wall_s = result.get("wall_seconds")
    for line in history:
        epochs += line.get("epochs_trained") or 0
        train_s += line.get("train_seconds") or 0.0
        if line.get("status") != "ok" or line.get("valid_error") is None:
            continue
        if incumbent is not None:
            hit = line["evaluation"] == incumbent
        else:
            at_top = line["fidelity"] == top or not max_fidelity_only
            hit = at_top and target is not None and line["valid_error"] <= target
        if hit:
            path = run / "batches" / f"{line['batch']:04d}" / "results"
            result_file = path / f"e{line['evaluation']:05d}.json"
            wall_s = result_file.stat().st_mtime - created_s if result_file.exists() else None
            return Reached(
                line["evaluation"], line["valid_error"], epochs, train_s, wall_s,
                total_epochs, total_wall_s,
            )  # fmt: skip
    return Reached(None, None, None, None, None, total_epochs, total_wall_s)


def compare_seed(
    baseline_run: Path, method_run: Path, *, max_fidelity_only: bool
) -> SeedResult | None:
    """Both runs of one seed; None when the baseline has no incumbent."""
    incumbent = read_json(baseline_run / "result.json").get("incumbent")
    if not incumbent:
        return None
    target = float(incumbent["valid_error"])
    baseline = first_reaching(
        baseline_run, target, max_fidelity_only=True, incumbent=incumbent["evaluation"]
    )
    method = first_reaching(method_run, target, max_fidelity_only=max_fidelity_only)
    return SeedResult(baseline_run.name, target, baseline, method)


def analyse(
    folder: Path, *, baseline: str, method: str, max_fidelity_only: bool
) -> tuple[list[SeedResult], list[str]]:
    """Every seed both methods ran; also notes on seeds left out and why."""
    if not (folder / baseline).is_dir() or not (folder / method).is_dir():
        raise LayoutError(
            f"{folder} must hold the run folders {baseline}/seed-K and {method}/seed-K "
            "(as `dehbws compare` writes them)."
        )
    results, notes = [], []
    for baseline_run in sorted((folder / baseline).glob("seed-*")):
        method_run = folder / method / baseline_run.name
        if not method_run.is_dir():
            notes.append(f"{baseline_run.name}: no {method} run")
            continue
        try:
            result = compare_seed(baseline_run, method_run, max_fidelity_only=max_fidelity_only)
        except LayoutError as error:
            notes.append(f"{baseline_run.name}: {error}")
            continue
        if result is None:
            notes.append(f"{baseline_run.name}: {baseline} has no incumbent")
        else:
            results.append(result)
    return results, notes


def format_report(results: list[SeedResult], baseline: str, method: str) -> str:
    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = (
        f"seed     target   {baseline}: epochs/total  wall s   "
        f"{method}: epochs/total  train s  wall s   epoch speed-up"
    )
    lines = [header]
    for result in results:
        base, ours = result.baseline, result.method
        reached = "" if ours.epochs is not None else "  (not reached)"
        lines.append(
            f"{result.seed:<8} {result.target_error:.4f}   "
            f"{number(base.epochs):>6}/{number(base.total_epochs):<6}  "
            f"{number(base.wall_seconds):>7}   "
            f"{number(ours.epochs):>6}/{number(ours.total_epochs):<6}  "
            f"{number(ours.train_seconds):>7}  {number(ours.wall_seconds):>6}   "
            f"{number(result.epoch_speedup, 2):>6}{reached}"
        )
    speedups = [r.epoch_speedup for r in results if r.epoch_speedup is not None]
    reached_count = sum(r.method.epochs is not None for r in results)
    summary = f"{method} reached {baseline}'s final incumbent error in {reached_count} of "
    summary += f"{len(results)} seeds"
    if speedups:
        summary += f"; median epoch speed-up {statistics.median(speedups):.2f}"
    return "\n".join([*lines, "", summary])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison_dir", type=Path)
    parser.add_argument("--baseline", default="dehb", help="method whose incumbent is the target")
    parser.add_argument("--method", default="dehb-ws", help="method that should reach it")
    parser.add_argument(
        "--any-fidelity", action="store_true", help="count evaluations below the top budget too"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        results, notes = analyse(
            args.comparison_dir,
            baseline=args.baseline,
            method=args.method,
            max_fidelity_only=not args.any_fidelity,
        )
    except LayoutError as error:
        print(f"search_efficiency: error: {error}", file=sys.stderr)
        return 2

    print(format_report(results, args.baseline, args.method))
    for note in notes:
        print(f"left out: {note}")
    if args.json is not None:
        rows = [{**asdict(result), "epoch_speedup": result.epoch_speedup} for result in results]
        args.json.write_text(json.dumps({"seeds": rows, "left_out": notes}, indent=1) + "\n")
    return 0 if results else 2


if __name__ == "__main__":
    sys.exit(main())
