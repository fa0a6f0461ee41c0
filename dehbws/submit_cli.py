"""The `dehbws submit` command: the search of `dehbws run`, each rung one SLURM array job.

It shares the search options, the settings handling and the search itself with `dehbws run`
(dehbws.cli) and adds the request every array task makes of SLURM. The request is checked with
`sbatch --test-only` before anything is written, stored in RUN_DIR/executor.json, and reused by
`dehbws submit --resume`, where each option given replaces the stored value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dehbws.errors import UserError
from dehbws.executors.slurm_settings import (
    SlurmSettings,
    load_slurm_settings,
    parse_sbatch_args,
    save_slurm_settings,
)
from dehbws.presets import PRESETS

logger = logging.getLogger("dehbws")

# The options that make up SlurmSettings (the click parameter names).
SLURM_OPTIONS: tuple[str, ...] = (
    "partition",
    "gpus_per_task",
    "cpus_per_task",
    "mem_gb",
    "time_min",
    "account",
    "qos",
    "array_parallelism",
    "sbatch_args",
    "container",
    "signal_delay_s",
)
# `dehbws run`'s options that only make sense on this machine.
LOCAL_OPTIONS: tuple[str, ...] = ("executor", "max_parallel", "task_timeout_min")


def _slurm_options(function: Any) -> Any:
    options = [
        click.option("--partition", default=None, help="Partition of the tasks."),
        click.option(
            "--gpus-per-task",
            type=int,
            default=None,
            help="GPUs per task (default 1; 0 for CPU-only tasks).",
        ),
        click.option(
            "--cpus-per-task", type=int, default=None, help="CPUs (and torch threads) per task."
        ),
        click.option("--mem-gb", type=float, default=None, help="Memory per task in GB."),
        click.option(
            "--time-min",
            type=int,
            default=None,
            help="Time limit of one task (default 60); at the limit it is requeued and resumes.",
        ),
        click.option("--account", default=None, help="Account the tasks are billed to."),
        click.option("--qos", default=None, help="Quality of service of the tasks."),
        click.option(
            "--array-parallelism",
            type=int,
            default=None,
            help="Tasks of one array running at once (sbatch's %N; default: all).",
        ),
        click.option(
            "--sbatch-arg",
            "sbatch_args",
            multiple=True,
            metavar="KEY=VALUE",
            help="Any other sbatch option, repeatable: --sbatch-arg constraint=a100.",
        ),
        click.option(
            "--container",
            default=None,
            metavar="IMAGE",
            help="Run every task inside this Apptainer image.",
        ),
        click.option(
            "--signal-delay-s",
            type=int,
            default=None,
            help="Seconds before its time limit that a task is told to checkpoint (default 90).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def submit_command(search_options: Callable[[Any], Any]) -> click.Command:
    """The `submit` command, decorated with `dehbws run`'s search options."""

    @click.command("submit")
    @click.option(
        "--preset",
        "preset_name",
        default="smoke",
        show_default=True,
        help=f"Starting settings: {', '.join(sorted(PRESETS))}.",
    )
    @click.option(
        "--run-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="New folder for this run, on a filesystem the compute nodes share.",
    )
    @click.option(
        "--resume",
        "resume_dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Continue the run in this folder (reattaching to its running array jobs).",
    )
    @_slurm_options
    @search_options
    @click.pass_context
    def submit(
        context: click.Context,
        preset_name: str,
        run_dir: Path | None,
        resume_dir: Path | None,
        **options: Any,
    ) -> None:
        """Run a DEHB-WS search on SLURM, every rung one array job (or continue one)."""
        run_submitted(preset_name, run_dir, resume_dir, options, verbose=context.obj["verbose"])

    # `dehbws run`'s options for this machine are refused with a hint; they stay out of --help.
    for parameter in submit.params:
        if isinstance(parameter, click.Option) and parameter.name in LOCAL_OPTIONS:
            parameter.hidden = True
    return submit


def run_submitted(
    preset_name: str,
    run_dir: Path | None,
    resume_dir: Path | None,
    options: dict[str, Any],
    *,
    verbose: bool,
) -> None:
    """Check the request with sbatch, open (or create) the run folder, and search."""
    from dehbws import cli
    from dehbws.executors.slurm import SlurmExecutor
    from dehbws.presets import preset
    from dehbws.run_folder import RunFolder

    requested = {name: options.pop(name) for name in SLURM_OPTIONS}
    _reject_local_options(options)
    if (run_dir is None) == (resume_dir is None):
        raise UserError("give exactly one of --run-dir DIR (a new run) or --resume DIR.")
    options["executor"] = "slurm"
    root = RunFolder(run_dir or resume_dir).root  # type: ignore[arg-type]
    if run_dir is not None:
        settings = _new_slurm_settings(requested, options)
        cli._settings_from_options(preset(preset_name), options)
    else:
        settings = _resumed_slurm_settings(root, requested, options.pop("device"))

    cache_dir = options.get("cache_dir")
    executor = SlurmExecutor(
        settings,
        root / "logs" / "tasks",
        run_name=root.name,
        binds=[root] + ([Path(cache_dir).resolve()] if cache_dir else []),
    )
    # A new run's folder is made only once sbatch accepts the request.
    if run_dir is not None:
        executor.check()
        folder, _, _ = cli._open_run(preset_name, run_dir, None, options)
    else:
        folder, _, _ = cli._open_run(preset_name, None, resume_dir, options)
        executor.check()

    with folder.lock():  # a coordinator running on this folder keeps its request
        save_slurm_settings(folder.root, settings)
    cli._configure_logging(folder, verbose=verbose)
    logger.info("tasks run on SLURM: %s", executor.describe())
    cli._search_and_finetune(folder, "slurm", 1, cache_dir, executor=executor)


def _reject_local_options(options: dict[str, Any]) -> None:
    """`dehbws run`'s options for this machine have no meaning here: say what to use."""
    if options.pop("executor", None) is not None:
        raise UserError(
            "--executor is not an option of `dehbws submit`, whose tasks always run on SLURM; "
            "use `dehbws run --executor local` to run them on this machine."
        )
    if options.pop("max_parallel", None) is not None:
        raise UserError(
            "--max-parallel is not an option of `dehbws submit`; use --array-parallelism N to "
            "run at most N tasks of a rung at once."
        )
    if options.pop("task_timeout_min", None) is not None:
        raise UserError(
            "--task-timeout-min is not an option of `dehbws submit`; use --time-min N, the "
            "SLURM time limit of each task (a task at its limit is requeued and resumes)."
        )


def _new_slurm_settings(requested: dict[str, Any], options: dict[str, Any]) -> SlurmSettings:
    """The request of a new run; its training device goes into the run's settings too."""
    settings = _with_changes(SlurmSettings(), requested, options.get("device"))
    options["device"] = settings.task_device
    return settings


def _resumed_slurm_settings(
    root: Path, requested: dict[str, Any], device: str | None
) -> SlurmSettings:
    """The stored request (the defaults for a run started by `dehbws run`), with changes."""
    if not (root / "settings.json").exists():
        raise UserError(
            f"{root} holds no run (no settings.json); start one with `dehbws submit --run-dir "
            f"{root}`."
        )
    stored = load_slurm_settings(root) or SlurmSettings()
    return _with_changes(stored, requested, device)


def _with_changes(
    base: SlurmSettings, requested: dict[str, Any], device: str | None
) -> SlurmSettings:
    changes = dict(requested, device=device)
    pairs = changes.pop("sbatch_args")
    if pairs:
        changes["sbatch_args"] = parse_sbatch_args(pairs)
    if changes.get("container") is not None:
        changes["container"] = _image_path(changes["container"])
    return base.replace(**changes)


def _image_path(image: str) -> str:
    """An image file as an absolute path (the tasks may start elsewhere); URIs stay as given."""
    if "://" in image:
        return image
    path = Path(image).expanduser()
    if not path.is_file():
        raise UserError(
            f"--container is {image!r}, but no such image file exists; build it with "
            "`apptainer build dehbws.sif apptainer.def` and pass its path (on a filesystem the "
            "compute nodes see)."
        )
    return str(path.resolve())
