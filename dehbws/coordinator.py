"""The DEHB-WS loop: rung -> executor -> tell -> merge -> persist, one batch at a time.

Every batch (the warm-up, then one successive-halving rung each) is written down before it
runs and committed to state.json only after its supernet version and history lines are on disk.
A coordinator that was killed therefore resumes by replaying the committed batches into a fresh
DEHB (same seed, same asks, same tells) and re-running only the tasks of the interrupted batch
that have no result file yet.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dehbws import faults
from dehbws.errors import UserError
from dehbws.executors.base import Executor, TaskOutcome
from dehbws.presets import RunSettings
from dehbws.run_folder import (
    RunFolder,
    RunState,
    StorageError,
    read_json,
    storage_message,
    storage_problem,
    storage_problem_at,
    write_json_atomic,
)
from dehbws.schedule import WORST_FITNESS, Job, Schedule
from dehbws.settings import NetworkSettings
from dehbws.space import build_space, to_plain
from dehbws.store import ShardInput, StoreError, check_shard, merge_shards, write_tensors
from dehbws.task import TaskSpec, evaluation_seed

logger = logging.getLogger(__name__)


class BatchFailedError(UserError, RuntimeError):
    """Every task of a batch failed: the run stops instead of recording them all as failed."""


class ResumeMismatchError(UserError, RuntimeError):
    """Replaying the recorded batches did not reproduce what DEHB asked for before."""


class Coordinator:
    """Runs (or resumes) one search in one run folder with one executor."""

    def __init__(
        self,
        folder: RunFolder,
        executor: Executor,
        *,
        data_cache_dir: Path | None = None,
    ) -> None:
        self.folder = folder
        self.settings: RunSettings = folder.load_settings()
        self.executor = executor
        self.data_cache_dir = Path(data_cache_dir or folder.root / "data").resolve()
        self.state: RunState = folder.load_state()
        self.best_error: float | None = None

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Search until the evaluation budget is spent; returns the final result record."""
        search = self.settings.search
        self._clock = time.monotonic()
        removed = self.folder.remove_stale_temp_files()
        if removed:
            logger.info("removed %d temporary files left by an interrupted run", removed)

        self._prepare_data()
        if search.weight_sharing:
            self._write_initial_supernet()
        schedule = Schedule(
            min_epochs=search.min_epochs,
            max_epochs=search.max_epochs,
            eta=search.eta,
            seed=search.seed,
            output_dir=self.folder.root / "dehb",
            cumulative=search.weight_sharing,
        )

        first_search_batch = 1 if search.weight_sharing and search.warmup_epochs > 0 else 0
        if first_search_batch == 1 and self.state.batches_done == 0:
            self._run_warmup()

        # Rebuild DEHB's state from the committed batches, then go on.
        for batch in range(first_search_batch, self.state.batches_done):
            self._replay(schedule, batch)
        batch = max(self.state.batches_done, first_search_batch)

        while schedule.asked < search.fevals:
            self._run_search_batch(schedule, batch)
            batch += 1

        return self._finish(schedule)

    def _run_search_batch(self, schedule: Schedule, batch: int) -> None:
        # Ask DEHB for one whole rung (or repeat the ask of an interrupted batch).
        manifest_path = self.folder.manifest_path(batch)
        if manifest_path.exists():
            recorded = read_json(manifest_path)["jobs"]
            jobs = schedule.ask_rung(len(recorded))
            _check_same_jobs(batch, recorded, jobs)
            logger.info("batch %d: resuming an interrupted rung", batch)
        else:
            jobs = schedule.ask_rung(self.settings.search.fevals - schedule.asked)
            faults.checkpoint("asked")
            write_json_atomic(
                manifest_path,
                {
                    "kind": "search",
                    "batch": batch,
                    "base_version": self.state.supernet_version,
                    "jobs": [dataclasses.asdict(job) for job in jobs],
                },
            )

        # Train every subnet of the rung as one batch of tasks.
        faults.checkpoint("manifest")
        base_version = read_json(manifest_path)["base_version"]
        specs = [self._search_spec(batch, base_version, job) for job in jobs]
        records = self._execute(specs)

        # Tell DEHB in ask order, whatever order the tasks ended in: resume stays exact.
        for job in jobs:
            record = records[job.index]
            schedule.tell(job, fitness=_fitness(record), cost=job.epochs)
            faults.checkpoint("told")
        kept = {job.index: schedule.is_kept(job) for job in jobs}

        # Average the subnets DE kept into the next supernet version.
        merged = [
            job
            for job in jobs
            if kept[job.index]
            and records[job.index]["status"] == "ok"
            and records[job.index].get("shard") is not None
        ]
        faults.checkpoint("merge")
        if self.settings.search.weight_sharing:
            new_version = self._merge(batch, base_version, [records[job.index] for job in merged])
        else:
            new_version, merged = base_version, []

        history = [
            _history_record(job, records[job.index], kept[job.index], new_version, merged)
            for job in jobs
        ]
        self._commit(batch, new_version, history, evaluations=len(jobs))
        self._log_rung(batch, jobs, records, kept, new_version, schedule)

    def _run_warmup(self) -> None:
        """Train random subnets on the fresh supernet and average them all (batch 0)."""
        search = self.settings.search
        space = build_space(seed=search.seed)
        configs = [
            to_plain(config) for config in space.sample_configuration(search.warmup_subnets)
        ]

        specs = [
            self._spec(
                "warmup",
                0,
                index,
                config,
                base_version=0,
                start_epoch=0,
                end_epoch=search.warmup_epochs,
            )
            for index, config in enumerate(configs)
        ]
        write_json_atomic(
            self.folder.manifest_path(0),
            {"kind": "warmup", "batch": 0, "base_version": 0, "configs": configs},
        )
        records = self._execute(specs)
        ok = [record for record in records.values() if record["status"] == "ok"]
        new_version = self._merge(0, 0, ok)
        lines = [
            {**record, "merged_into": new_version if record in ok else None}
            for record in records.values()
        ]

        self.state.warmup_bytes = self.folder.append_lines(
            self.folder.warmup_path, lines, self.state.warmup_bytes
        )
        self._commit(0, new_version, [], evaluations=0, epochs=len(specs) * search.warmup_epochs)
        logger.info(
            "warm-up: %d subnets x %d epochs, %d ok, supernet v%04d",
            len(specs),
            search.warmup_epochs,
            len(ok),
            new_version,
        )

    def _replay(self, schedule: Schedule, batch: int) -> None:
        manifest = read_json(self.folder.manifest_path(batch))
        recorded = manifest["jobs"]
        jobs = schedule.ask_rung(len(recorded))
        _check_same_jobs(batch, recorded, jobs)
        for job in jobs:
            record = read_json(self.folder.result_path(batch, job.index))
            schedule.tell(job, fitness=_fitness(record), cost=job.epochs)
            if record["status"] == "ok":
                self._note_best(record["valid_error"])
        logger.debug("replayed batch %d (%d jobs)", batch, len(jobs))

    # -- tasks ------------------------------------------------------------------------------

    def _execute(self, specs: Sequence[TaskSpec]) -> dict[int, dict[str, Any]]:
        """Run the specs that have no result yet, retrying failures; returns every record."""
        records: dict[int, dict[str, Any]] = {}
        pending = []
        for spec in specs:
            # A result left by an earlier coordinator is checked like a fresh one.
            stored = read_json(Path(spec.result)) if Path(spec.result).exists() else None
            record = self._accept(TaskOutcome(spec, stored)) if stored is not None else None
            if not isinstance(record, dict):
                pending.append(spec)
            else:
                records[spec.evaluation] = record
        if len(pending) < len(specs):
            logger.info("reusing %d finished tasks", len(specs) - len(pending))

        last_error: dict[int, TaskOutcome] = {}
        for attempt in range(self.settings.search.max_retries + 1):
            if not pending:
                break
            if attempt > 0:
                logger.warning("retrying %d failed tasks (attempt %d)", len(pending), attempt + 1)
            failed: list[TaskSpec] = []

            def on_done(outcome: TaskOutcome, failed: list[TaskSpec] = failed) -> None:
                self._stop_if_storage_failed(outcome)
                record = self._accept(outcome)
                if not isinstance(record, dict):
                    failed.append(outcome.spec)
                    last_error[outcome.spec.evaluation] = (
                        outcome if record is None else dataclasses.replace(outcome, error=record)
                    )
                else:
                    records[outcome.spec.evaluation] = record
                    self._log_evaluation(outcome.spec, record)
                faults.checkpoint("task-done")

            # The batch folder keeps what an executor needs to find its tasks again after a
            # restart (the SLURM job ids).
            batch_dir = self.folder.batch_dir(pending[0].batch)
            self.executor.run_batch(pending, on_done, state_dir=batch_dir)
            pending = failed

        if len(pending) > 1 and len(pending) == len(specs):
            # Every task crashing points at the setup (data, environment, a bug), not at the
            # configurations: stop before the whole budget is burnt on failures.
            outcome = last_error[pending[0].evaluation]
            raise BatchFailedError(
                f"all {len(specs)} tasks of batch {specs[0].batch} failed, the first with: "
                f"{_first_line(outcome.error)} (log: {outcome.log_path}). Nothing was recorded "
                "for this batch; fix the cause and continue with `dehbws run --resume`."
            )
        for spec in pending:
            outcome = last_error[spec.evaluation]
            records[spec.evaluation] = self._record_failure(spec, outcome)
        return records

    def _stop_if_storage_failed(self, outcome: TaskOutcome) -> None:
        """Stop the run when a task failed because the run folder cannot be written.

        Such a failure says nothing about the configuration: retrying would fail the same way
        and recording it would lose the evaluation. The task is simply run again on resume.
        """
        if outcome.record is not None:
            return
        problem = storage_problem(outcome.error) or storage_problem_at(
            self.folder.batch_dir(outcome.spec.batch)
        )
        if problem is not None:
            raise StorageError(
                storage_message(problem, self.folder.root, f"{outcome.spec.name} could not write")
            )

    def _accept(self, outcome: TaskOutcome) -> dict[str, Any] | str | None:
        """The task's record if it is sound; None if it has none; why not if it is unusable.

        An unusable result (a damaged or incomplete shard, a malformed record) has its files
        removed, so the task is run again as if it had crashed.
        """
        spec = outcome.spec
        if outcome.record is None:
            logger.warning(
                "%s failed: %s (log: %s)", spec.name, _first_line(outcome.error), outcome.log_path
            )
            return None

        record = dict(outcome.record)
        problem = _record_problem(spec, record)
        if problem is None and record["status"] == "ok" and spec.shard is not None:
            problem = _shard_problem(spec, self.settings.network)
        if problem is not None:
            # Whatever the task left is untrusted: remove it so that a retry starts clean.
            logger.warning("%s returned an unusable result: %s", spec.name, problem)
            for output in (spec.shard, spec.result):
                if output is not None:
                    Path(output).unlink(missing_ok=True)
            return f"unusable result: {problem}"

        shard = spec.shard if record["status"] == "ok" else None
        record["shard"] = self.folder.relative(Path(shard)) if shard is not None else None
        write_json_atomic(Path(spec.result), record)
        return record

    def _record_failure(self, spec: TaskSpec, outcome: TaskOutcome) -> dict[str, Any]:
        record = {
            "kind": spec.kind,
            "batch": spec.batch,
            "evaluation": spec.evaluation,
            "config": spec.config,
            "base_version": spec.base_version,
            "start_epoch": spec.start_epoch,
            "end_epoch": spec.end_epoch,
            "epochs_trained": spec.end_epoch - spec.start_epoch,
            "seed": spec.seed,
            "status": "failed",
            "valid_error": None,
            "shard": None,
            "error": outcome.error,
            "log_path": outcome.log_path,
        }
        write_json_atomic(Path(spec.result), record)
        logger.error(
            "%s failed after %d attempts; recorded with the worst fitness. Log: %s",
            spec.name,
            self.settings.search.max_retries + 1,
            outcome.log_path,
        )
        return record

    def _search_spec(self, batch: int, base_version: int, job: Job) -> TaskSpec:
        spec = self._spec(
            "search",
            batch,
            job.index,
            job.config,
            base_version=base_version,
            start_epoch=job.start_epoch,
            end_epoch=job.fidelity_epochs,
        )
        if not self.settings.search.weight_sharing:
            # Vanilla DEHB: a fresh network for every evaluation, nothing to merge.
            spec = dataclasses.replace(spec, base_version=None, base_supernet=None, shard=None)
        return spec

    def _spec(
        self,
        kind: str,
        batch: int,
        evaluation: int,
        config: dict[str, Any],
        *,
        base_version: int,
        start_epoch: int,
        end_epoch: int,
    ) -> TaskSpec:
        return TaskSpec(
            kind=kind,
            batch=batch,
            evaluation=evaluation,
            config=config,
            base_version=base_version,
            base_supernet=str(self.folder.supernet_path(base_version)),
            start_epoch=start_epoch,
            end_epoch=end_epoch,
            seed=evaluation_seed(self.settings.search.seed, kind, evaluation),
            shard=str(self.folder.shard_path(batch, evaluation)),
            result=str(self.folder.result_path(batch, evaluation)),
            network=self.settings.network,
            data=self.settings.data,
            train=self.settings.train,
            data_cache_dir=str(self.data_cache_dir),
        )

    # -- supernet ---------------------------------------------------------------------------

    def _write_initial_supernet(self) -> None:
        path = self.folder.supernet_path(0)
        if path.exists():
            return
        from dehbws.model import supernet_state

        state = supernet_state(self.settings.network, seed=self.settings.search.seed)
        tensors = {name: value.detach().cpu().numpy() for name, value in state.items()}
        write_tensors(path, tensors, {"version": 0, "parents": []})
        logger.debug("wrote the initial supernet %s (%d tensors)", path, len(tensors))

    def _merge(self, batch: int, base_version: int, records: list[dict[str, Any]]) -> int:
        new_version = batch + 1
        inputs = [
            ShardInput(
                self.folder.root / record["shard"],
                self.folder.supernet_path(record["base_version"]),
            )
            for record in records
        ]
        merge_shards(
            self.folder.supernet_path(base_version),
            inputs,
            self.folder.supernet_path(new_version),
            {
                "version": new_version,
                "base_version": base_version,
                "batch": batch,
                "parents": [record["evaluation"] for record in records],
            },
        )
        return new_version

    # -- bookkeeping ------------------------------------------------------------------------

    def _commit(
        self,
        batch: int,
        new_version: int,
        history: list[dict[str, Any]],
        *,
        evaluations: int,
        epochs: int | None = None,
    ) -> None:
        state = self.state
        if history:
            state.history_bytes = self.folder.append_lines(
                self.folder.history_path, history, state.history_bytes
            )
        faults.checkpoint("history")
        state.batches_done = batch + 1
        state.supernet_version = new_version
        state.evaluations_done += evaluations
        state.epochs_spent += (
            epochs if epochs is not None else sum(line["epochs_trained"] for line in history)
        )
        self._add_wall_time()
        self.folder.save_state(state)
        faults.checkpoint("committed")

    def _add_wall_time(self) -> None:
        """Add the time since the last mark to the run's wall time (it spans resumes)."""
        now = time.monotonic()
        wall_s = float(self.state.extra.get("wall_seconds", 0.0)) + now - self._clock
        self.state.extra["wall_seconds"] = wall_s
        self._clock = now

    def _finish(self, schedule: Schedule) -> dict[str, Any]:
        state = self.state
        self._add_wall_time()
        incumbent = self._incumbent(schedule)
        result = {
            "incumbent": incumbent,
            "fevals": state.evaluations_done,
            "epochs_spent": state.epochs_spent,
            "wall_seconds": state.extra["wall_seconds"],
            "supernet_version": state.supernet_version,
            "supernet": (
                self.folder.relative(self.folder.supernet_path(state.supernet_version))
                if self.settings.search.weight_sharing
                else None
            ),
        }
        previous = read_json(self.folder.result_file) if self.folder.result_file.exists() else {}
        result["finetune"] = previous.get("finetune", {})
        write_json_atomic(self.folder.result_file, result)
        state.finished = True
        self.folder.save_state(state)

        if incumbent is not None:
            logger.info(
                "search done: %d evaluations, %d epochs, %.0f s; incumbent e%05d valid error "
                "%.4f at %d epochs",
                state.evaluations_done,
                state.epochs_spent,
                state.extra["wall_seconds"],
                incumbent["evaluation"],
                incumbent["valid_error"],
                incumbent["fidelity"],
            )
        return result

    def _incumbent(self, schedule: Schedule) -> dict[str, Any] | None:
        """The best evaluation at the highest fidelity reached (normally the maximum)."""
        history = [line for line in self.folder.read_history() if line["status"] == "ok"]
        if not history:
            logger.warning("no evaluation finished successfully; there is no incumbent")
            return None
        top = max(line["fidelity"] for line in history)
        if top < schedule.budgets[-1]:
            logger.warning(
                "no evaluation reached the maximum budget of %d epochs; the incumbent is the "
                "best at %d epochs",
                schedule.budgets[-1],
                top,
            )
        candidates = [line for line in history if line["fidelity"] == top]
        return min(candidates, key=lambda line: (line["valid_error"], line["evaluation"]))

    def _prepare_data(self) -> None:
        from dehbws.data import prepare_dataset

        path = prepare_dataset(
            self.settings.data,
            resolution=self.settings.network.resolution,
            cache_dir=self.data_cache_dir,
        )
        logger.debug("dataset ready at %s", path)

    def _note_best(self, error: float) -> None:
        if self.best_error is None or error < self.best_error:
            self.best_error = error

    def _log_evaluation(self, spec: TaskSpec, record: dict[str, Any]) -> None:
        if record["status"] == "ok":
            self._note_best(record["valid_error"])
            outcome = f"valid error {record['valid_error']:.4f}"
        else:
            outcome = f"FAILED ({_first_line(record.get('error'))})"
        logger.info(
            "%s batch %d: epochs %d..%d, %s, %.1f s | best so far %s",
            spec.name,
            spec.batch,
            spec.start_epoch,
            spec.end_epoch,
            outcome,
            record.get("train_seconds") or 0.0,
            "none" if self.best_error is None else f"{self.best_error:.4f}",
        )

    def _log_rung(
        self,
        batch: int,
        jobs: list[Job],
        records: dict[int, dict[str, Any]],
        kept: dict[int, bool],
        new_version: int,
        schedule: Schedule,
    ) -> None:
        errors = [
            records[j.index]["valid_error"] for j in jobs if records[j.index]["status"] == "ok"
        ]
        # Vanilla DEHB trains from scratch: it has no supernet to name.
        supernet = f"supernet v{new_version:04d}, " if self.settings.search.weight_sharing else ""
        logger.info(
            "rung done: batch %d bracket %d rung %d (%d epochs): %d jobs, %d kept, best %s, "
            "%s%d/%d evaluations",
            batch,
            jobs[0].bracket,
            jobs[0].rung,
            jobs[0].fidelity_epochs,
            len(jobs),
            sum(kept.values()),
            f"{min(errors):.4f}" if errors else "none",
            supernet,
            schedule.asked,
            self.settings.search.fevals,
        )


def _record_problem(spec: TaskSpec, record: dict[str, Any]) -> str | None:
    """Why a task's result record cannot be used, or None when it can."""
    if record.get("evaluation") != spec.evaluation or record.get("kind") != spec.kind:
        return (
            f"the record is of {record.get('kind')} e{record.get('evaluation')}, not of "
            f"{spec.name}"
        )
    status = record.get("status")
    if status == "failed":
        return None
    if status != "ok":
        return f"status is {status!r}, but must be 'ok' or 'failed'"
    error = record.get("valid_error")
    if isinstance(error, bool) or not isinstance(error, (int, float)):
        return f"valid_error is {error!r}, but must be a number"
    if not (math.isfinite(error) and 0.0 <= error <= 1.0):
        return f"valid_error is {error!r}, but must lie in [0, 1]"
    return None


def _shard_problem(spec: TaskSpec, network: NetworkSettings) -> str | None:
    """Why a task's shard must not reach the supernet, or None when it may."""
    from dehbws.model import used_tensor_names

    assert spec.shard is not None and spec.base_supernet is not None
    try:
        check_shard(
            Path(spec.shard),
            Path(spec.base_supernet),
            expected_names=used_tensor_names(spec.config, network),
        )
    except StoreError as error:
        return str(error)
    return None


def _fitness(record: dict[str, Any]) -> float:
    if record["status"] != "ok" or record.get("valid_error") is None:
        return WORST_FITNESS
    return float(record["valid_error"])


def _history_record(
    job: Job, record: dict[str, Any], kept: bool, new_version: int, merged: list[Job]
) -> dict[str, Any]:
    return {
        "evaluation": job.index,
        "batch": record["batch"],
        "config": job.config,
        "config_id": job.config_id,
        "bracket": job.bracket,
        "rung": job.rung,
        "fidelity": job.fidelity_epochs,
        "start_epoch": job.start_epoch,
        "epochs_trained": job.epochs,
        "valid_error": record.get("valid_error"),
        "fitness": _fitness(record),
        "cost": job.epochs,
        "train_seconds": record.get("train_seconds"),
        "status": record["status"],
        "error": record.get("error"),
        "base_version": record["base_version"],
        "shard": record.get("shard"),
        "seed": record["seed"],
        "kept": kept,
        "merged_into": new_version if job in merged else None,
    }


def _check_same_jobs(batch: int, recorded: list[dict[str, Any]], jobs: list[Job]) -> None:
    asked = [dataclasses.asdict(job) for job in jobs]
    if asked != recorded:
        raise ResumeMismatchError(
            f"replaying batch {batch} gave other jobs than the run recorded; the run folder was "
            "written by another dehbws or dehb version, or its files were changed."
        )


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else "unknown error"
