"""The `dehbws compare` and `dehbws report` commands (the DEHB-WS study)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import click

from dehbws.errors import UserError

DEFAULT_METHODS = "dehb-ws,dehb,smac,fixed-cnn"


def _study_options(function: Any) -> Any:
    """The search options of `dehbws run` that a comparison shares across its runs."""
    options = [
        click.option("--executor", type=click.Choice(["debug", "local"]), default=None),
        click.option("--max-parallel", type=click.IntRange(min=1), default=None),
        click.option("--fevals", type=int, default=None, help="Function evaluations per run."),
        click.option("--min-epochs", type=int, default=None, help="Lowest rung budget."),
        click.option("--max-epochs", type=int, default=None, help="Highest rung budget."),
        click.option("--eta", type=int, default=None, help="Successive-halving rate."),
        click.option("--warmup-epochs", type=int, default=None, help="DEHB-WS warm-up epochs."),
        click.option("--max-retries", type=int, default=None),
        click.option("--data-dir", type=str, default=None),
        click.option("--split", type=click.Choice(["jahs", "official"]), default=None),
        click.option("--subset-fraction", type=float, default=None),
        click.option("--device", type=str, default=None),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Where the prepared dataset is kept (default: OUT/data).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command()
@click.option("--preset", "preset_name", default="smoke", show_default=True)
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds 0..N-1.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Comparison folder.")
@click.option("--methods", default=DEFAULT_METHODS, show_default=True, help="Comma-separated.")
@click.option(
    "--retrain-epochs",
    type=int,
    default=50,
    show_default=True,
    help="E: every incumbent (and the fixed CNN) retrained from scratch for E epochs.",
)
@click.option(
    "--finetune-epochs",
    default="10,15",
    show_default=True,
    help="F[,F2]: DEHB-WS incumbents inherit the supernet and finetune F epochs.",
)
@click.option(
    "--backend",
    type=click.Choice(["train", "surrogate"]),
    default="train",
    show_default=True,
    help="surrogate: DEHB, SMAC4MF and every retrain query JAHS-Bench-201's surrogate.",
)
@click.option("--surrogate-python", default=None, help="Python 3.10 with jahs-bench installed.")
@click.option(
    "--surrogate-models", default=None, help="Folder holding assembled_surrogates/ (download)."
)
@_study_options
@click.pass_context
def compare(
    context: click.Context,
    preset_name: str,
    seeds: int,
    out: Path,
    methods: str,
    retrain_epochs: int,
    finetune_epochs: str,
    backend: str,
    surrogate_python: str | None,
    surrogate_models: str | None,
    **options: Any,
) -> None:
    """Run DEHB-WS and its baselines over seeds 0..N-1 with the same settings (resumable)."""
    from dehbws.cli import _settings_from_options
    from dehbws.compare import Comparison, check_out, run_comparison
    from dehbws.presets import preset

    base = _settings_from_options(preset(preset_name), options)
    comparison = Comparison(
        base=base,
        methods=tuple(name.strip() for name in methods.split(",") if name.strip()),
        seeds=seeds,
        retrain_epochs=retrain_epochs,
        finetune_epochs=_epochs_list(finetune_epochs),
        backend=backend,
    )
    check_out(out, comparison)  # before the log file goes into a folder that is not ours
    _configure_logging(out, verbose=context.obj["verbose"])
    with contextlib.ExitStack() as stack:
        surrogate = None
        if backend == "surrogate":
            surrogate = stack.enter_context(
                _surrogate(comparison, surrogate_python, surrogate_models)
            )
        record = run_comparison(
            out,
            comparison,
            executor_name=options.get("executor") or base.executor,
            max_parallel=options.get("max_parallel") or base.max_parallel_tasks,
            cache_dir=options.get("cache_dir"),
            surrogate_executor=surrogate,
        )
    done = sum(entry["finished"] for entry in record["runs"])
    click.echo(f"{done} of {len(record['runs'])} runs finished; report with `dehbws report {out}`")


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report folder.")
@click.option(
    "--reference",
    type=float,
    default=None,
    help="Validation error that regret is measured from (default: best seen in any run).",
)
def report(folders: tuple[Path, ...], out: Path, reference: float | None) -> None:
    """Tables of test accuracy and validation regret, and regret plots, from run folders."""
    from dehbws.report import markdown, write_report

    summary = write_report(list(folders), out, reference=reference)
    click.echo(markdown(summary, list(folders)).split("## Incumbent")[0].rstrip())
    click.echo(f"\nwritten to {out}/report.md")


def _epochs_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--finetune-epochs is {text!r}, but must be comma-separated integers, e.g. 10,15."
        ) from None
    return values


@contextlib.contextmanager
def _surrogate(comparison: Any, python: str | None, models: str | None) -> Any:
    from dehbws.baselines.surrogate import (
        SurrogateClient,
        SurrogateExecutor,
        SurrogateSettings,
        check_network,
    )

    settings = SurrogateSettings.resolve(python, models)
    check_network(comparison.base.network)
    with SurrogateClient(settings) as client:
        yield SurrogateExecutor(client)


def _configure_logging(out: Path, *, verbose: bool) -> None:
    """INFO (or DEBUG) to the terminal, DEBUG to OUT/logs/compare.log; runs add their own."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)

    log_path = Path(out) / "logs" / "compare.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_path)
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    for name in ("matplotlib", "PIL", "distributed", "asyncio", "smac"):
        logging.getLogger(name).setLevel(logging.WARNING)
