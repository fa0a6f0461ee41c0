"""The DEHB-WS study as one command: every method over several seeds, side by side.

`run_comparison` runs each (method, seed) pair in its own run folder under the comparison folder
(OUT/METHOD/seed-K), all with the same settings except method and seed, then the final
evaluations of each method's max-fidelity incumbent: retrain from scratch for E epochs for
every search method, and inherit + finetune for F epochs for DEHB-WS; the fixed CNN trains for E
epochs. OUT/comparison.json records what was asked and what ran. Running the same command again
skips finished runs and resumes unfinished ones (each run folder resumes like `dehbws run
--resume`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dehbws.errors import UserError
from dehbws.executors import make_executor
from dehbws.executors.base import Executor
from dehbws.presets import METHODS, RunSettings
from dehbws.run_folder import RunFolder, read_json, write_json_atomic

logger = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"
LAYOUT_VERSION = 1
BACKENDS: tuple[str, ...] = ("train", "surrogate")
# Methods whose from-scratch evaluations the surrogate may answer.
SURROGATE_METHODS: tuple[str, ...] = ("dehb", "smac")


@dataclass(frozen=True)
class Comparison:
    """What a comparison runs: methods x seeds on one base setting, and the final evaluations."""

    base: RunSettings
    methods: tuple[str, ...]
    seeds: int
    retrain_epochs: int
    finetune_epochs: tuple[int, ...]
    backend: str = "train"

    def __post_init__(self) -> None:
        unknown = [method for method in self.methods if method not in METHODS]
        if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
            raise UserError(
                f"methods are {list(self.methods)}, but must be distinct names out of "
                f"{list(METHODS)}, e.g. --methods dehb-ws,dehb."
            )
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise UserError(f"seeds is {self.seeds!r}, but must be an integer >= 1.")
        schedule = self.base.train.schedule_epochs
        for name, epochs in [("retrain epochs", self.retrain_epochs)] + [
            ("finetune epochs", value) for value in self.finetune_epochs
        ]:
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise UserError(f"{name} is {epochs!r}, but must be an integer >= 1.")
            if epochs > schedule:
                raise UserError(
                    f"{name} is {epochs}, but the schedule has only {schedule} epochs."
                )
        if self.backend not in BACKENDS:
            raise UserError(f"backend is {self.backend!r}, but must be one of {list(BACKENDS)}.")

    def run_settings(self, method: str, seed: int) -> RunSettings:
        """The settings of one run: the base with this method and seed."""
        search = dataclasses.replace(self.base.search, method=method, seed=seed)
        return dataclasses.replace(self.base, search=search)

    def final_names(self, method: str) -> list[str]:
        """The final evaluations of a method, as named in result.json."""
        names = [f"scratch-{self.retrain_epochs}"]
        if method == "dehb-ws":
            names += [f"finetune-{epochs}" for epochs in self.finetune_epochs]
        return names

    def run_dir(self, out: Path, method: str, seed: int) -> Path:
        return out / method / f"seed-{seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "seeds": self.seeds,
            "retrain_epochs": self.retrain_epochs,
            "finetune_epochs": list(self.finetune_epochs),
            "backend": self.backend,
            "settings": self.base.to_dict(),
        }


def run_comparison(
    out: Path,
    comparison: Comparison,
    *,
    executor_name: str,
    max_parallel: int = 1,
    cache_dir: Path | None = None,
    surrogate_executor: Executor | None = None,
) -> dict[str, Any]:
    """Run (or continue) every method for every seed; returns the comparison record."""
    if comparison.backend == "surrogate" and surrogate_executor is None:
        raise ValueError("backend 'surrogate' needs a surrogate_executor.")
    out = Path(out).resolve()
    record = _open_record(out, comparison)
    cache = Path(cache_dir or out / "data").resolve()
    _prepare_data(comparison.base, cache)

    for seed in range(comparison.seeds):
        for method in comparison.methods:
            folder = _open_run(comparison, out, method, seed)
            runner = _Run(folder, comparison, method, seed, cache, executor_name, max_parallel)
            runner.surrogate = surrogate_executor if comparison.backend == "surrogate" else None
            runner.run()
            _update_entry(record, out, folder, comparison, method, seed)
            write_json_atomic(out / COMPARISON_FILE, record)

    record["finished"] = all(entry["finished"] for entry in record["runs"])
    write_json_atomic(out / COMPARISON_FILE, record)
    return record


class _Run:
    """One (method, seed) run of a comparison: search, then its final evaluations."""

    def __init__(
        self,
        folder: RunFolder,
        comparison: Comparison,
        method: str,
        seed: int,
        cache: Path,
        executor_name: str,
        max_parallel: int,
    ) -> None:
        self.folder = folder
        self.comparison = comparison
        self.method = method
        self.seed = seed
        self.cache = cache
        self.executor_name = executor_name
        self.max_parallel = max_parallel
        self.surrogate: Executor | None = None

    def run(self) -> None:
        names = self.comparison.final_names(self.method)
        if _is_done(self.folder, names, self.method):
            logger.info("%s: finished, skipped", self._label())
            return
        with self.folder.lock(), _run_log(self.folder):
            logger.info("%s: running in %s", self._label(), self.folder.root)
            trainer = make_executor(
                self.executor_name,
                log_dir=self.folder.task_log_dir,
                max_parallel=self.max_parallel,
            )
            if self.method == "fixed-cnn":
                from dehbws.baselines.fixed_cnn import evaluate_fixed_cnn

                evaluate_fixed_cnn(
                    self.folder,
                    trainer,
                    epochs=self.comparison.retrain_epochs,
                    data_cache_dir=self.cache,
                )
                return
            self._search(trainer)
            self._final_evaluations(trainer, names)

    def _search(self, trainer: Executor) -> None:
        from dehbws.methods import run_search

        if self.folder.load_state().finished:
            return
        use_surrogate = self.surrogate is not None and self.method in SURROGATE_METHODS
        executor = self.surrogate if use_surrogate and self.surrogate else trainer
        run_search(self.folder, executor, data_cache_dir=self.cache)

    def _final_evaluations(self, trainer: Executor, names: list[str]) -> None:
        from dehbws.finetune import final_evaluation

        result = read_json(self.folder.result_file)
        if result.get("incumbent") is None:
            logger.warning("%s has no incumbent; no final evaluations", self._label())
            return
        for name in names:
            if name in result.get("finetune", {}):
                continue
            kind, epochs = name.split("-")
            from_scratch = kind == "scratch"
            executor = self.surrogate if from_scratch and self.surrogate else trainer
            final_evaluation(
                self.folder,
                executor,
                epochs=int(epochs),
                from_scratch=from_scratch,
                data_cache_dir=self.cache,
            )

    def _label(self) -> str:
        return f"{self.method} seed {self.seed}"


def check_out(out: Path, comparison: Comparison) -> None:
    """Raise UserError unless `out` is new, empty, or holds a comparison with these settings."""
    out = Path(out)
    path = out / COMPARISON_FILE
    if path.exists():
        stored = read_json(path)
        if stored.get("settings") != comparison.to_dict()["settings"]:
            raise UserError(
                f"{out} holds a comparison with other settings (preset "
                f"{stored.get('settings', {}).get('preset')!r}); repeat its command to continue "
                "it, or choose a new --out."
            )
    elif out.exists() and any(path.name != "logs" for path in out.iterdir()):
        raise UserError(
            f"{out} is not empty and holds no comparison; choose a new or empty --out."
        )


def _open_record(out: Path, comparison: Comparison) -> dict[str, Any]:
    """The comparison record: a new one, or the stored one if the settings are the same."""
    check_out(out, comparison)
    path = out / COMPARISON_FILE
    wanted = comparison.to_dict()
    runs = read_json(path).get("runs", []) if path.exists() else []
    out.mkdir(parents=True, exist_ok=True)
    record = {"layout_version": LAYOUT_VERSION, **wanted, "runs": runs, "finished": False}
    write_json_atomic(path, record)
    return record


def _open_run(comparison: Comparison, out: Path, method: str, seed: int) -> RunFolder:
    folder = RunFolder(comparison.run_dir(out, method, seed))
    settings = comparison.run_settings(method, seed)
    if not folder.exists():
        folder.create(settings)
    elif folder.load_settings() != settings:
        raise UserError(
            f"{folder.root} holds a run with other settings than this comparison; repeat the "
            "comparison's own command, or choose a new --out."
        )
    return folder


def _is_done(folder: RunFolder, names: list[str], method: str) -> bool:
    if not folder.result_file.exists():
        return False
    result = read_json(folder.result_file)
    if method != "fixed-cnn":
        if not folder.load_state().finished:
            return False
        if result.get("incumbent") is None:
            return True  # every evaluation failed: nothing to evaluate
    done = result.get("finetune", {})
    return all(name in done for name in names)


def _update_entry(
    record: dict[str, Any],
    out: Path,
    folder: RunFolder,
    comparison: Comparison,
    method: str,
    seed: int,
) -> None:
    result = read_json(folder.result_file) if folder.result_file.exists() else {}
    incumbent = result.get("incumbent") or {}
    finals = result.get("finetune", {})
    entry = {
        "method": method,
        "seed": seed,
        "folder": str(folder.root.relative_to(out)),
        "finished": _is_done(folder, comparison.final_names(method), method),
        "incumbent_valid_error": incumbent.get("valid_error"),
        "fevals": result.get("fevals"),
        "epochs_spent": result.get("epochs_spent"),
        "final": {
            name: {
                "status": value.get("status"),
                "test_accuracy": value.get("test_accuracy"),
                "valid_error": value.get("valid_error"),
            }
            for name, value in finals.items()
        },
    }
    runs = [run for run in record["runs"] if (run["method"], run["seed"]) != (method, seed)]
    record["runs"] = sorted([*runs, entry], key=lambda run: (run["seed"], run["method"]))


def _prepare_data(settings: RunSettings, cache: Path) -> None:
    from dehbws.data import prepare_dataset

    prepare_dataset(settings.data, resolution=settings.network.resolution, cache_dir=cache)


@contextlib.contextmanager
def _run_log(folder: RunFolder) -> Iterator[None]:
    """Also log to the run's own RUN_DIR/logs/coordinator.log while it runs."""
    path = folder.root / "logs" / "coordinator.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
