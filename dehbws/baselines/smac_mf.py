"""SMAC4MF: SMAC's multi-fidelity facade (random forest + Hyperband) as a search method.

It searches the same space with the same rung budgets (min/max epochs, eta) and the same number
of function evaluations as DEHB; `n_trials` counts every (configuration, budget) run, like
DEHB's evaluations. Every trial trains from scratch for its whole budget, exactly like vanilla
DEHB, as one task through the same executors, and the run folder has the same layout: manifests,
result files, history.jsonl (bracket, kept and merged_into are null) and result.json.

A batch is `max_parallel_tasks` trials asked one after another (one at a time by default);
SMAC hands out further Hyperband trials while earlier ones are still running. Results are told
in ask order. SMAC's own files (runhistory, intensifier state) go to RUN_DIR/smac/.

Resume replays the run: a fresh SMAC with the same seed is asked for each committed batch again,
each trial is checked against the recorded one and told its recorded result; then the search
goes on. SMAC's decisions depend only on its seed and on what it was told, so with the same
`smac` release this rebuilds its exact state; a different release that asks for other trials
stops with a message instead of mixing two searches. SMAC's own output folder is rewritten by
the replay (SMAC's built-in continuation is not used, because it does not restore its random
state).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from dehbws.coordinator import (
    Coordinator,
    ResumeMismatchError,
    _check_same_jobs,
    _fitness,
    _history_record,
)
from dehbws.errors import UserError
from dehbws.run_folder import read_json, write_json_atomic
from dehbws.schedule import Job, rung_budgets
from dehbws.space import build_space, to_plain

logger = logging.getLogger(__name__)

SMAC_DIR = "smac"


class SmacSchedule:
    """SMAC4MF asked and told one trial at a time, with budgets rounded to whole epochs."""

    def __init__(
        self,
        *,
        min_epochs: int,
        max_epochs: int,
        eta: int,
        seed: int,
        fevals: int,
        output_dir: Path,
    ) -> None:
        self.budgets = rung_budgets(min_epochs, max_epochs, eta)
        self._smac = _make_smac(self.budgets, eta, seed, fevals, output_dir)
        self._pending: dict[int, Any] = {}
        self._asked = 0

    @property
    def asked(self) -> int:
        """How many trials have been asked for so far."""
        return self._asked

    def ask(self, count: int) -> list[Job]:
        """The next `count` trials, as jobs that train from scratch for their whole budget."""
        return [self._ask_one() for _ in range(count)]

    def tell(self, job: Job, *, fitness: float, train_seconds: float) -> None:
        """Report one finished trial; failed trials get the worst fitness, like DEHB's."""
        from smac.runhistory.dataclasses import TrialValue

        trial = self._pending.pop(job.index)
        self._smac.tell(trial, TrialValue(cost=float(fitness), time=float(train_seconds)))

    def _ask_one(self) -> Job:
        trial = self._smac.ask()
        index = self._asked
        self._asked += 1
        self._pending[index] = trial

        epochs = round(float(trial.budget))
        if epochs not in self.budgets:
            raise RuntimeError(
                f"SMAC asked for budget {trial.budget}, which is not on the grid {self.budgets}."
            )
        return Job(
            index=index,
            config=to_plain(trial.config),
            config_id=int(self._smac.runhistory.get_config_id(trial.config)),
            bracket=-1,  # SMAC does not report the Hyperband bracket of a trial
            rung=self.budgets.index(epochs),
            start_epoch=0,
            fidelity_epochs=epochs,
            parent_id=-1,
        )


class SmacSearch(Coordinator):
    """A SMAC4MF search in a run folder, with the coordinator's tasks and bookkeeping."""

    def run(self) -> dict[str, Any]:
        """Search until `fevals` trials are done; returns the final result record."""
        search = self.settings.search
        if search.method != "smac":
            raise UserError(
                f"the run in {self.folder.root} uses method {search.method!r}; SMAC4MF runs "
                "only folders created with method 'smac'."
            )
        self._clock = time.monotonic()
        self._prepare_data()
        schedule = SmacSchedule(
            min_epochs=search.min_epochs,
            max_epochs=search.max_epochs,
            eta=search.eta,
            seed=search.seed,
            fevals=search.fevals,
            output_dir=self.folder.root / SMAC_DIR,
        )

        # Rebuild SMAC's state from the committed batches, then go on.
        for batch in range(self.state.batches_done):
            self._replay_batch(schedule, batch)
        batch = self.state.batches_done
        while schedule.asked < search.fevals:
            self._run_batch(schedule, batch)
            batch += 1
        return self._finish_search(schedule)

    def _run_batch(self, schedule: SmacSchedule, batch: int) -> None:
        # Ask for a batch of trials (or repeat the asks of an interrupted batch).
        manifest_path = self.folder.manifest_path(batch)
        if manifest_path.exists():
            recorded = read_json(manifest_path)["jobs"]
            jobs = schedule.ask(len(recorded))
            _check_same_jobs(batch, recorded, jobs)
            logger.info("batch %d: resuming an interrupted batch", batch)
        else:
            count = min(
                self.settings.max_parallel_tasks, self.settings.search.fevals - schedule.asked
            )
            jobs = schedule.ask(count)
            write_json_atomic(
                manifest_path,
                {
                    "kind": "smac",
                    "batch": batch,
                    "base_version": None,
                    "jobs": [dataclasses.asdict(job) for job in jobs],
                },
            )

        # Train every trial from scratch, as one batch of tasks; tell SMAC in ask order.
        specs = [self._search_spec(batch, 0, job) for job in jobs]
        records = self._execute(specs)
        for job in jobs:
            record = records[job.index]
            schedule.tell(
                job, fitness=_fitness(record), train_seconds=record.get("train_seconds") or 0.0
            )

        history = [_smac_history_record(job, records[job.index]) for job in jobs]
        self._commit(batch, 0, history, evaluations=len(jobs))
        errors = [line["valid_error"] for line in history if line["status"] == "ok"]
        logger.info(
            "smac batch %d: %d trials at %s epochs, best %s, %d/%d evaluations",
            batch,
            len(jobs),
            ",".join(str(job.fidelity_epochs) for job in jobs),
            f"{min(errors):.4f}" if errors else "none",
            schedule.asked,
            self.settings.search.fevals,
        )

    def _replay_batch(self, schedule: SmacSchedule, batch: int) -> None:
        recorded = read_json(self.folder.manifest_path(batch))["jobs"]
        jobs = schedule.ask(len(recorded))
        try:
            _check_same_jobs(batch, recorded, jobs)
        except ResumeMismatchError as error:
            raise ResumeMismatchError(
                f"{error} (SMAC replay; the smac release differs?)"
            ) from None
        for job in jobs:
            record = read_json(self.folder.result_path(batch, job.index))
            schedule.tell(
                job, fitness=_fitness(record), train_seconds=record.get("train_seconds") or 0.0
            )
            if record["status"] == "ok":
                self._note_best(record["valid_error"])
        logger.debug("replayed SMAC batch %d (%d trials)", batch, len(jobs))

    def _finish_search(self, schedule: SmacSchedule) -> dict[str, Any]:
        """Write result.json like the coordinator: the best trial at the highest budget."""
        state = self.state
        self._add_wall_time()
        history = [line for line in self.folder.read_history() if line["status"] == "ok"]
        incumbent = None
        if history:
            top = max(line["fidelity"] for line in history)
            if top < schedule.budgets[-1]:
                logger.warning(
                    "no trial reached the maximum budget of %d epochs; the incumbent is the "
                    "best at %d epochs",
                    schedule.budgets[-1],
                    top,
                )
            candidates = [line for line in history if line["fidelity"] == top]
            incumbent = min(candidates, key=lambda line: (line["valid_error"], line["evaluation"]))
        previous = read_json(self.folder.result_file) if self.folder.result_file.exists() else {}
        result = {
            "incumbent": incumbent,
            "fevals": state.evaluations_done,
            "epochs_spent": state.epochs_spent,
            "wall_seconds": state.extra["wall_seconds"],
            "supernet_version": 0,
            "supernet": None,
            "finetune": previous.get("finetune", {}),
        }
        write_json_atomic(self.folder.result_file, result)
        state.finished = True
        self.folder.save_state(state)
        if incumbent is not None:
            logger.info(
                "SMAC4MF done: %d trials, %d epochs; incumbent e%05d valid error %.4f at %d "
                "epochs",
                state.evaluations_done,
                state.epochs_spent,
                incumbent["evaluation"],
                incumbent["valid_error"],
                incumbent["fidelity"],
            )
        return result


def _smac_history_record(job: Job, record: dict[str, Any]) -> dict[str, Any]:
    """A history line with the search history's fields; DEHB-only ones are null."""
    line = _history_record(job, record, False, 0, [])
    line.update(bracket=None, kept=None, merged_into=None)
    return line


def _make_smac(
    budgets: tuple[int, ...], eta: int, seed: int, fevals: int, output_dir: Path
) -> Any:
    # Imported here: smac is an optional extra (pip install 'dehbws[baselines]').
    try:
        from smac import MultiFidelityFacade, Scenario
    except ImportError:
        raise UserError(
            "method 'smac' needs the optional package smac; install it with "
            "`python3 -m pip install -e '.[baselines]'` (or `pip install 'smac==2.4.*'`)."
        ) from None

    scenario = Scenario(
        build_space(),
        name="smac4mf",
        output_directory=output_dir,
        deterministic=True,
        n_trials=fevals,
        min_budget=budgets[0],
        max_budget=budgets[-1],
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return MultiFidelityFacade(
            scenario,
            None,  # ask/tell only: dehbws runs the trials
            intensifier=MultiFidelityFacade.get_intensifier(scenario, eta=eta),
            overwrite=True,  # the replay rebuilds SMAC's files
            logging_level=False,  # leave the process's logging alone
        )
