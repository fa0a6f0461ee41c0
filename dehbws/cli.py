"""The `dehbws` command line: run, status, finetune and data."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import click

from dehbws.errors import UserError
from dehbws.presets import PRESETS, RunSettings, preset
from dehbws.run_folder import RunFolder, read_json, storage_error

logger = logging.getLogger("dehbws")


def main(args: list[str] | None = None) -> None:
    """Entry point: user mistakes become one message and exit code 2, never a traceback."""
    try:
        exit_code = cli(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("dehbws: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as error:
        error.show()
        sys.exit(2)
    except click.UsageError as error:
        # The same one-line form as every other user mistake, plus where to find the options.
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        click.echo(f"dehbws: error: {error.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except UserError as error:
        click.echo(f"dehbws: error: {error}", err=True)
        sys.exit(2)
    except (OSError, RuntimeError) as error:
        # A full or read-only disk is the user's to fix; every finished evaluation is on disk.
        storage = storage_error(error)
        if storage is None:
            raise
        click.echo(f"dehbws: error: {storage}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(
            "dehbws: interrupted; finished evaluations are kept, continue with "
            "`dehbws run --resume DIR`.",
            err=True,
        )
        sys.exit(130)
    if isinstance(exit_code, int):
        sys.exit(exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log DEBUG messages to the terminal.")
@click.version_option(package_name="dehbws")
@click.pass_context
def cli(context: click.Context, verbose: bool) -> None:
    """Joint architecture and hyperparameter search with DEHB and weight sharing."""
    context.obj = {"verbose": verbose}


def _search_options(function: Any) -> Any:
    options = [
        click.option(
            "--executor",
            type=click.Choice(["debug", "local"]),
            default=None,
            help="debug: in this process; local: subprocesses. Default: the preset's.",
        ),
        click.option(
            "--max-parallel",
            type=click.IntRange(min=1),
            default=None,
            help="Local executor: tasks run at the same time.",
        ),
        click.option("--fevals", type=int, default=None, help="Function evaluations to run."),
        click.option("--min-epochs", type=int, default=None, help="Lowest rung budget."),
        click.option("--max-epochs", type=int, default=None, help="Highest rung budget."),
        click.option("--eta", type=int, default=None, help="Successive-halving rate."),
        click.option("--seed", type=int, default=None, help="Seed of the whole run."),
        click.option(
            "--method",
            type=click.Choice(["dehb-ws", "dehb", "smac"]),
            default=None,
            help="dehb-ws: weight sharing (default); dehb: every subnet from scratch; smac: "
            "SMAC4MF (needs the [baselines] extra).",
        ),
        click.option(
            "--warmup-epochs",
            type=int,
            default=None,
            help="Supernet warm-up epochs before the first rung (0: none).",
        ),
        click.option(
            "--finetune-epochs",
            type=int,
            default=None,
            help="Epochs to finetune the incumbent after the search (0: skip).",
        ),
        click.option(
            "--max-retries",
            type=int,
            default=None,
            help="Retries of a failed task before it counts as a failed evaluation.",
        ),
        click.option(
            "--task-timeout-min",
            type=float,
            default=None,
            help="Local executor: stop (and retry) a task running longer than this.",
        ),
        click.option(
            "--data-dir",
            type=str,
            default=None,
            help="Folder with the four Fashion-MNIST IDX files.",
        ),
        click.option(
            "--split",
            type=click.Choice(["jahs", "official"]),
            default=None,
            help="jahs: JAHS-Bench-201's split (default); official: the 10k test set.",
        ),
        click.option(
            "--subset-fraction",
            type=float,
            default=None,
            help="Use this fraction of every split (per class).",
        ),
        click.option("--device", type=str, default=None, help="Training device: cpu or cuda."),
        click.option(
            "--channels-last/--no-channels-last",
            default=None,
            help="Store activations NHWC (faster convolutions on a GPU).",
        ),
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16"]),
            default=None,
            help="fp32, or bf16 autocast for the forward pass (GPUs since Ampere).",
        ),
        click.option(
            "--compile/--no-compile",
            "compile_model",
            default=None,
            help="Wrap the network in torch.compile (minutes of compiling per task).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Where the prepared dataset is kept (default: RUN_DIR/data).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@cli.command()
@click.option(
    "--preset",
    "preset_name",
    default="smoke",
    show_default=True,
    help=f"Starting settings: {', '.join(sorted(PRESETS))}.",
)
@click.option(
    "--run-dir", type=click.Path(path_type=Path), default=None, help="New folder for this run."
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Continue the run in this folder.",
)
@_search_options
@click.pass_context
def run(
    context: click.Context,
    preset_name: str,
    run_dir: Path | None,
    resume_dir: Path | None,
    **options: Any,
) -> None:
    """Run a DEHB-WS search on this machine (or continue one with --resume)."""
    folder, executor_name, max_parallel = _open_run(preset_name, run_dir, resume_dir, options)
    _configure_logging(folder, verbose=context.obj["verbose"])
    _search_and_finetune(folder, executor_name, max_parallel, options.get("cache_dir"))


def _open_run(
    preset_name: str, run_dir: Path | None, resume_dir: Path | None, options: dict[str, Any]
) -> tuple[RunFolder, str, int]:
    if (run_dir is None) == (resume_dir is None):
        raise UserError("give exactly one of --run-dir DIR (a new run) or --resume DIR.")

    if resume_dir is not None:
        folder = RunFolder(resume_dir)
        settings = folder.load_settings()
        folder.check_resumable()
        changed = [
            key
            for key, value in options.items()
            if value is not None and key not in ("executor", "max_parallel", "cache_dir")
        ]
        if changed:
            raise UserError(
                f"options {changed} would change the settings of the run in {resume_dir}; a "
                "resumed run keeps its settings (only --executor, --max-parallel and "
                "--cache-dir may change). Start a new run with --run-dir to change them."
            )
    else:
        assert run_dir is not None
        settings = _settings_from_options(preset(preset_name), options)
        folder = RunFolder(run_dir)
        folder.create(settings)

    executor_name = options.get("executor") or settings.executor
    max_parallel = options.get("max_parallel") or settings.max_parallel_tasks
    return folder, executor_name, max_parallel


def _settings_from_options(base: RunSettings, options: dict[str, Any]) -> RunSettings:
    def pick(section: Any, names: dict[str, str]) -> Any:
        changes = {
            field: options[option]
            for option, field in names.items()
            if options.get(option) is not None
        }
        return dataclasses.replace(section, **changes)

    search = pick(
        base.search,
        {
            "fevals": "fevals",
            "min_epochs": "min_epochs",
            "max_epochs": "max_epochs",
            "eta": "eta",
            "seed": "seed",
            "warmup_epochs": "warmup_epochs",
            "finetune_epochs": "finetune_epochs",
            "max_retries": "max_retries",
            "method": "method",
        },
    )
    data = pick(
        base.data, {"data_dir": "data_dir", "split": "split", "subset_fraction": "subset_fraction"}
    )
    train = pick(
        base.train,
        {
            "device": "device",
            "channels_last": "channels_last",
            "precision": "precision",
            "compile_model": "compile",
        },
    )
    top = {
        key: options[key]
        for key in ("executor", "task_timeout_min")
        if options.get(key) is not None
    }
    if options.get("max_parallel") is not None:
        top["max_parallel_tasks"] = options["max_parallel"]
    return dataclasses.replace(base, search=search, data=data, train=train, **top)


def _search_and_finetune(
    folder: RunFolder,
    executor_name: str,
    max_parallel: int,
    cache_dir: Path | None,
    executor: Any = None,
) -> None:
    """Search and finetune with the named executor, or with `executor` when one is given."""
    from dehbws.executors import make_executor
    from dehbws.finetune import final_evaluation
    from dehbws.methods import run_search

    if executor is None:
        executor = make_executor(
            executor_name,
            log_dir=folder.task_log_dir,
            max_parallel=max_parallel,
            timeout_min=folder.load_settings().task_timeout_min,
        )
    with folder.lock():
        result = run_search(folder, executor, data_cache_dir=cache_dir)

        search = folder.load_settings().search
        if search.finetune_epochs > 0 and result["incumbent"] is not None:
            final_evaluation(
                folder,
                executor,
                epochs=search.finetune_epochs,
                from_scratch=not search.weight_sharing,
                data_cache_dir=cache_dir,
            )
    _print_status(folder)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def status(run_dir: Path) -> None:
    """Progress, incumbent and epochs spent of a run."""
    _print_status(RunFolder(run_dir))


def _print_status(folder: RunFolder) -> None:
    settings = folder.load_settings()
    state = folder.load_state()
    history = folder.read_history()
    ok = [line for line in history if line["status"] == "ok"]
    top = max((line["fidelity"] for line in ok), default=None)
    best = min(
        (line for line in ok if line["fidelity"] == top),
        key=lambda line: line["valid_error"],
        default=None,
    )

    lines = [
        f"run:          {folder.root} (preset {settings.preset})",
        f"state:        {'finished' if state.finished else 'in progress'}, "
        f"{state.batches_done} batches, supernet v{state.supernet_version:04d}",
        f"evaluations:  {len(history)} of {settings.search.fevals} "
        f"({len(history) - len(ok)} failed)",
        f"epochs spent: {state.epochs_spent}",
        f"wall time:    {float(state.extra.get('wall_seconds', 0.0)):.0f} s",
    ]
    if best is not None:
        lines.append(
            f"incumbent:    e{best['evaluation']:05d} at {best['fidelity']} epochs, "
            f"valid error {best['valid_error']:.4f}"
        )
        lines.append(f"              {best['config']}")
    if folder.result_file.exists():
        for name, record in read_json(folder.result_file).get("finetune", {}).items():
            if record.get("status") == "ok":
                lines.append(f"{name + ':':14}test accuracy {record['test_accuracy']:.4f}")
    click.echo("\n".join(lines))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    required=True,
    help="Epochs to finetune (or to train from scratch).",
)
@click.option(
    "--from-scratch",
    is_flag=True,
    help="Train the incumbent from scratch instead of inheriting the supernet.",
)
@click.option(
    "--executor", type=click.Choice(["debug", "local"]), default="local", show_default=True
)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None)
@click.pass_context
def finetune(
    context: click.Context,
    run_dir: Path,
    epochs: int,
    from_scratch: bool,
    executor: str,
    cache_dir: Path | None,
) -> None:
    """Finetune the incumbent (or train it from scratch) and report its test accuracy."""
    from dehbws.executors import make_executor
    from dehbws.finetune import final_evaluation

    folder = RunFolder(run_dir)
    folder.load_settings()
    _configure_logging(folder, verbose=context.obj["verbose"])
    with folder.lock():
        record = final_evaluation(
            folder,
            make_executor(executor, log_dir=folder.task_log_dir),
            epochs=epochs,
            from_scratch=from_scratch,
            data_cache_dir=cache_dir,
        )
    if record["status"] == "ok":
        click.echo(f"test accuracy {record['test_accuracy']:.4f}")
    else:
        click.echo(f"failed: {record.get('error')}")


@cli.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for the prepared dataset (use it as --cache-dir later).",
)
@click.option("--data-dir", type=str, default=None)
@click.option("--split", type=click.Choice(["jahs", "official"]), default="jahs")
@click.option("--subset-fraction", type=float, default=1.0)
@click.option("--resolution", type=click.Choice(["0.25", "0.5", "1.0"]), default="1.0")
def data(
    out: Path, data_dir: str | None, split: str, subset_fraction: float, resolution: str
) -> None:
    """Prepare Fashion-MNIST once (for example on a cluster's shared filesystem)."""
    from dehbws.data import prepare_dataset
    from dehbws.settings import DataSettings

    settings = DataSettings(data_dir=data_dir, split=split, subset_fraction=subset_fraction)
    path = prepare_dataset(settings, resolution=float(resolution), cache_dir=out)
    click.echo(str(path))


def _configure_logging(folder: RunFolder, *, verbose: bool) -> None:
    """INFO (or DEBUG) to the terminal; DEBUG to RUN_DIR/logs/coordinator.log."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    # A log line that cannot be written (full disk) must not print a traceback mid-run.
    logging.raiseExceptions = False

    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)

    log_path = folder.root / "logs" / "coordinator.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_path)
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(file_handler)
    # Third-party chatter stays out of the terminal.
    for name in ("matplotlib", "PIL", "distributed", "asyncio", "smac"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _add_study_commands() -> None:
    """`dehbws compare` and `dehbws report` live in their own module."""
    from dehbws.study_cli import compare, report

    cli.add_command(compare)
    cli.add_command(report)


def _add_submit_command() -> None:
    """`dehbws submit` (the SLURM executor) lives in its own module."""
    from dehbws.submit_cli import submit_command

    cli.add_command(submit_command(_search_options))


_add_study_commands()
_add_submit_command()

if __name__ == "__main__":
    main()
