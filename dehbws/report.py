"""Tables and plots that compare methods over seeds, from run and comparison folders.

Test accuracy is each final evaluation's accuracy on the run's test set. Validation regret is the
incumbent's validation error minus a reference: by default the best validation error of any
search evaluation at the maximum budget in any of the runs, so the best run ends at regret 0 (an
evaluation at a lower budget is no candidate for the incumbent); `reference` overrides it
(e.g. 1 - 0.9515, the best validation accuracy JAHS-Bench-201's surrogate knows). The incumbent
at a point of a run is the best evaluation at the run's maximum budget so far (the one the final
evaluations retrain), so a run's curve starts at its first maximum-budget result, and a
method's mean once every seed has one. Spreads are sample standard deviations over seeds (n - 1
in the denominator).

Curves are drawn against cumulative training epochs (warm-up included) and against wall time,
measured as the cumulative training seconds of the evaluations (the time one worker needs to
train them one after another; the surrogate's predicted runtime where it answered). That sum,
unlike the coordinator's clock, does not depend on how many tasks ran at once or on pauses.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dehbws.compare import COMPARISON_FILE
from dehbws.errors import UserError
from dehbws.run_folder import RunFolder, read_json, write_json_atomic
from dehbws.schedule import rung_budgets

logger = logging.getLogger(__name__)

METHOD_ORDER: tuple[str, ...] = ("dehb-ws", "dehb", "smac", "fixed-cnn")
METHOD_LABELS: dict[str, str] = {
    "dehb-ws": "DEHB-WS",
    "dehb": "DEHB",
    "smac": "SMAC4MF",
    "fixed-cnn": "fixed CNN",
}
PLOT_FILES: tuple[str, str] = ("regret_vs_epochs.png", "regret_vs_wall_time.png")


@dataclass
class RunData:
    """What the report needs from one run folder."""

    root: Path
    method: str
    seed: int
    max_fidelity: int
    history: list[dict[str, Any]]
    warmup_epochs: int = 0
    warmup_seconds: float = 0.0
    incumbent_valid_error: float | None = None
    final: dict[str, float] = field(default_factory=dict)

    def curve(self, reference: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cumulative epochs, cumulative training seconds, regret) after each evaluation."""
        epochs, seconds, regrets = [], [], []
        spent_epochs, spent_s = float(self.warmup_epochs), self.warmup_seconds
        best: float | None = None
        for line in self.history:
            spent_epochs += line["epochs_trained"]
            spent_s += float(line.get("train_seconds") or 0.0)
            ok = line["status"] == "ok" and line["valid_error"] is not None
            if ok and line["fidelity"] == self.max_fidelity:
                best = line["valid_error"] if best is None else min(best, line["valid_error"])
            if best is not None:
                epochs.append(spent_epochs)
                seconds.append(spent_s)
                regrets.append(best - reference)
        return np.array(epochs), np.array(seconds), np.array(regrets)


def load_runs(paths: Iterable[Path]) -> list[RunData]:
    """Every run in the given run or comparison folders (a comparison's runs as it lists them)."""
    runs: list[RunData] = []
    for path in paths:
        path = Path(path)
        if (path / COMPARISON_FILE).exists():
            listed = read_json(path / COMPARISON_FILE).get("runs", [])
            runs += [_load_run(path / entry["folder"]) for entry in listed]
        elif RunFolder(path).exists():
            runs.append(_load_run(path))
        else:
            raise UserError(
                f"{path} is neither a run folder (settings.json) nor a comparison folder "
                f"({COMPARISON_FILE}); pass folders made by `dehbws run` or `dehbws compare`."
            )
    if not runs:
        raise UserError("the given folders hold no runs yet; run `dehbws compare` first.")
    return runs


def _load_run(root: Path) -> RunData:
    folder = RunFolder(root)
    settings = folder.load_settings()
    search = settings.search
    run = RunData(
        root=folder.root,
        method=search.method,
        seed=search.seed,
        max_fidelity=rung_budgets(search.min_epochs, search.max_epochs, search.eta)[-1],
        history=folder.read_history() if search.method != "fixed-cnn" else [],
    )
    if folder.warmup_path.exists():
        warmup = [json.loads(line) for line in folder.warmup_path.read_text().splitlines() if line]
        run.warmup_epochs = sum(int(line.get("epochs_trained") or 0) for line in warmup)
        run.warmup_seconds = sum(float(line.get("train_seconds") or 0.0) for line in warmup)
    if folder.result_file.exists():
        result = read_json(folder.result_file)
        incumbent = result.get("incumbent") or {}
        run.incumbent_valid_error = incumbent.get("valid_error")
        run.final = {
            name: float(record["test_accuracy"])
            for name, record in result.get("finetune", {}).items()
            if record.get("status") == "ok" and record.get("test_accuracy") is not None
        }
    return run


def default_reference(runs: Sequence[RunData]) -> float:
    """The best validation error of any run's incumbent candidates: its successful evaluations
    at its maximum budget, and its incumbent (which is at a lower budget only when no evaluation
    reached the maximum). Errors at lower budgets measure less training than the incumbents do,
    so they are not a reference that the best run could reach."""
    errors = [
        line["valid_error"]
        for run in runs
        for line in run.history
        if line["status"] == "ok"
        and line["valid_error"] is not None
        and line["fidelity"] == run.max_fidelity
    ]
    errors += [run.incumbent_valid_error for run in runs if run.incumbent_valid_error is not None]
    if not errors:
        raise UserError(
            "no run has a successful search evaluation, so there is no reference for the "
            "regret; pass --reference ERROR (e.g. 0.0485 for 95.15% validation accuracy)."
        )
    return float(min(errors))


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: Sequence[RunData], reference: float) -> dict[str, Any]:
    """The report's numbers: test accuracy per final evaluation and regret, per method."""
    methods = _methods(runs)
    final_names = sorted({name for run in runs for name in run.final}, key=_final_order)
    summary: dict[str, Any] = {"reference": reference, "methods": {}}
    for method in methods:
        group = [run for run in runs if run.method == method]
        accuracy = {}
        for name in final_names:
            values = [run.final[name] for run in group if name in run.final]
            if values:
                mean, std = mean_std(values)
                accuracy[name] = {"mean": mean, "std": std, "n": len(values)}
        errors = [run.incumbent_valid_error for run in group]
        valid = [error for error in errors if error is not None]
        regret = None
        if valid:
            mean, std = mean_std([error - reference for error in valid])
            error_mean, error_std = mean_std(valid)
            regret = {
                "mean": mean,
                "std": std,
                "n": len(valid),
                "valid_error_mean": error_mean,
                "valid_error_std": error_std,
            }
        summary["methods"][method] = {
            "seeds": sorted(run.seed for run in group),
            "test_accuracy": accuracy,
            "regret": regret,
            "epochs_spent_mean": statistics.fmean(_epochs_spent(run) for run in group),
        }
    summary["final_names"] = final_names
    return summary


def write_report(
    paths: Sequence[Path], out: Path, *, reference: float | None = None
) -> dict[str, Any]:
    """Write report.md, report.json and the two regret plots to `out`; returns the numbers."""
    runs = load_runs(paths)
    if reference is None:
        reference = default_reference(runs)
    elif not (math.isfinite(reference) and 0.0 <= reference <= 1.0):
        raise UserError(f"reference is {reference!r}, but must be a validation error in [0, 1].")
    summary = summarize(runs, reference)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_regret(runs, reference, out)
    (out / "report.md").write_text(markdown(summary, [Path(path) for path in paths]))
    write_json_atomic(out / "report.json", summary)
    logger.info("wrote %s", out / "report.md")
    return summary


def markdown(summary: dict[str, Any], sources: Sequence[Path]) -> str:
    """The report as Markdown: the two tables and the plots."""
    names = summary["final_names"]
    lines = [
        "# DEHB-WS comparison",
        "",
        "Sources: " + ", ".join(f"`{path}`" for path in sources),
        "",
        "## Test accuracy (%), mean +- std over seeds",
        "",
        "| method | seeds | " + " | ".join(_final_label(name) for name in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for method, data in summary["methods"].items():
        cells = []
        for name in names:
            cell = data["test_accuracy"].get(name)
            cells.append("-" if cell is None else _format(cell, scale=100.0, digits=2))
        seeds = len(data["seeds"])
        lines.append(f"| {_label(method)} | {seeds} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## Final validation regret, mean +- std over seeds",
        "",
        f"Reference validation error: {summary['reference']:.4f}.",
        "",
        "| method | incumbent validation error | regret | epochs spent (mean) |",
        "|---|---|---|---|",
    ]
    for method, data in summary["methods"].items():
        regret = data["regret"]
        if regret is None:
            lines.append(f"| {_label(method)} | - | - | - |")
            continue
        error = {"mean": regret["valid_error_mean"], "std": regret["valid_error_std"]}
        lines.append(
            f"| {_label(method)} | {_format(error, digits=4)} | {_format(regret, digits=4)} | "
            f"{data['epochs_spent_mean']:.0f} |"
        )
    lines += [
        "",
        "## Incumbent validation regret",
        "",
        f"![regret against epochs]({PLOT_FILES[0]})",
        "",
        f"![regret against wall time]({PLOT_FILES[1]})",
        "",
    ]
    return "\n".join(lines)


def plot_regret(runs: Sequence[RunData], reference: float, out: Path) -> list[Path]:
    """Regret against cumulative epochs and against wall time: mean line, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    axes_names = (("cumulative training epochs", 0), ("wall time: cumulative training s", 1))
    for (xlabel, axis), filename in zip(axes_names, PLOT_FILES, strict=True):
        figure, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        for method in _methods(runs):
            curves = [
                (curve[axis], curve[2])
                for curve in (run.curve(reference) for run in runs if run.method == method)
                if len(curve[2])
            ]
            if not curves:
                continue
            grid, mean, low, high = _band(curves)
            (line,) = ax.step(grid, mean, where="post", label=_label(method))
            ax.fill_between(grid, low, high, step="post", alpha=0.2, color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"validation regret (reference {reference:.4f})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        figure.tight_layout()
        path = out / filename
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def _band(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step curves on one grid: mean, min and max over the curves.

    The grid starts where every curve has begun: a mean over the seeds that happen to have an
    incumbent already would jump up when a worse seed joins, which no single run does.
    """
    start = max(x[0] for x, _ in curves)
    grid = np.unique(np.concatenate([x[x >= start] for x, _ in curves]))
    values = np.empty((len(curves), len(grid)))
    for row, (x, y) in enumerate(curves):
        values[row] = y[np.searchsorted(x, grid, side="right") - 1]  # last point at or before
    return grid, values.mean(0), values.min(0), values.max(0)


def _methods(runs: Sequence[RunData]) -> list[str]:
    present = {run.method for run in runs}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _epochs_spent(run: RunData) -> float:
    return float(run.warmup_epochs + sum(line["epochs_trained"] for line in run.history))


def _final_order(name: str) -> tuple[int, int]:
    kind, _, epochs = name.partition("-")
    return (0 if kind == "scratch" else 1, int(epochs) if epochs.isdigit() else 0)


def _final_label(name: str) -> str:
    kind, _, epochs = name.partition("-")
    return {"scratch": "retrain", "finetune": "inherit+finetune"}.get(kind, kind) + f"-{epochs}"


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _format(cell: dict[str, Any], *, scale: float = 1.0, digits: int) -> str:
    text = f"{cell['mean'] * scale:.{digits}f}"
    if cell.get("std") is not None:
        text += f" +- {cell['std'] * scale:.{digits}f}"
    return text
