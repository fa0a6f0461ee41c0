"""DEHB driven rung by rung through its ask/tell interface, with whole-epoch rung budgets.

The `dehb` package is used unmodified. This wrapper adds what DEHB-WS needs around it: asking
for every job of one successive-halving rung at once, integer epoch budgets, whether DE kept a
result in its population, and the incumbent at the highest fidelity. DEHB's own checkpointing
is not used: a run is restored by replaying the recorded asks and tells (see `replay`), which is
exact because DEHB draws random numbers only from its seed, in ask order.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dehbws.errors import UserError
from dehbws.space import build_space, to_plain

logger = logging.getLogger(__name__)

# Fitness given to DEHB for failed evaluations: the largest possible validation error.
WORST_FITNESS = 1.0


@dataclass(frozen=True)
class Job:
    """One evaluation DEHB asked for: a configuration at one rung of one bracket."""

    index: int
    config: dict[str, Any]
    config_id: int
    bracket: int
    rung: int
    start_epoch: int
    fidelity_epochs: int
    parent_id: int

    @property
    def epochs(self) -> int:
        """Epochs this job trains on top of the supernet (cumulative budgets)."""
        return self.fidelity_epochs - self.start_epoch


def rung_budgets(min_epochs: int, max_epochs: int, eta: int) -> tuple[int, ...]:
    """DEHB's fidelity grid rounded to whole epochs, lowest first.

    DEHB anchors its grid at the maximum (min 1, max 20, eta 3 gives 2.22, 6.67, 20); rounding
    must not merge two rungs.
    """
    validate_budgets(min_epochs, max_epochs, eta)
    try:
        rung_count = int(math.floor(math.log(max_epochs / min_epochs) / math.log(eta) + 1e-9)) + 1
        raw = [max_epochs * eta ** -(rung_count - 1 - i) for i in range(rung_count)]
    except OverflowError:
        raise UserError(
            f"max_epochs is {max_epochs}, more epochs than any schedule has; lower --max-epochs."
        ) from None
    budgets = tuple(max(1, round(value)) for value in raw)
    if len(set(budgets)) != len(budgets):
        raise UserError(
            f"epoch budgets {min_epochs}..{max_epochs} with eta {eta} round to repeated rungs "
            f"{budgets}; widen the range or lower eta."
        )
    return budgets


def validate_budgets(min_epochs: Any, max_epochs: Any, eta: Any) -> None:
    """Raise UserError unless the budgets make a Hyperband schedule."""
    for name, value in (("min_epochs", min_epochs), ("max_epochs", max_epochs), ("eta", eta)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} is {value!r}, but must be an integer.")
    if min_epochs < 1:
        raise UserError(f"min_epochs is {min_epochs}, but must be >= 1.")
    if eta < 2:
        raise UserError(f"eta is {eta}, but must be an integer >= 2 (3 is usual).")
    if max_epochs <= min_epochs:
        raise UserError(
            f"min_epochs is {min_epochs} and max_epochs {max_epochs}, but the minimum budget must "
            "be below the maximum; lower --min-epochs or raise --max-epochs."
        )
    if max_epochs < min_epochs * eta:
        raise UserError(
            f"max_epochs {max_epochs} is below min_epochs * eta = {min_epochs * eta}, so there "
            "would be a single rung; raise --max-epochs or lower --eta."
        )


class Schedule:
    """DEHB on the joint space, asked for one whole rung at a time."""

    def __init__(
        self,
        *,
        min_epochs: int,
        max_epochs: int,
        eta: int,
        seed: int,
        output_dir: Path,
        cumulative: bool = True,
    ) -> None:
        self.budgets = rung_budgets(min_epochs, max_epochs, eta)
        # Cumulative budgets (weight sharing): a job trains only the increment over the rung
        # below; otherwise every job trains its whole budget from scratch.
        self.cumulative = cumulative
        self._optimizer = _make_dehb(self.budgets, eta, seed, output_dir)
        self._pending: dict[int, dict[str, Any]] = {}
        self._asked = 0
        self.max_fidelity_incumbent: tuple[Job, float] | None = None

    @property
    def asked(self) -> int:
        """How many jobs have been asked for so far."""
        return self._asked

    def ask_rung(self, max_jobs: int) -> list[Job]:
        """All jobs of the next rung DEHB schedules (at most `max_jobs` of them)."""
        if max_jobs < 1:
            raise ValueError(f"max_jobs is {max_jobs}, but must be >= 1.")

        first = self._ask_one()
        bracket = self._bracket(first.bracket)
        fidelity = bracket.get_fidelity(first.rung_in_bracket)
        remaining = int(bracket.sh_bracket[fidelity])

        jobs = [first]
        while remaining > 0 and len(jobs) < max_jobs:
            job = self._ask_one()
            if (job.bracket, job.rung) != (first.bracket, first.rung):
                raise RuntimeError(
                    f"DEHB switched from bracket {first.bracket} rung {first.rung} to bracket "
                    f"{job.bracket} rung {job.rung} within one rung."
                )
            jobs.append(job)
            remaining -= 1
        logger.debug("asked bracket %d rung %d: %d jobs", first.bracket, first.rung, len(jobs))
        return [job.job for job in jobs]

    def tell(self, job: Job, *, fitness: float, cost: float) -> None:
        """Report one finished job to DEHB; DE's greedy selection happens here."""
        raw = self._pending.pop(job.index)
        if not math.isfinite(fitness):
            fitness = WORST_FITNESS
        self._optimizer.tell(raw, {"fitness": float(fitness), "cost": float(cost)})

        if job.fidelity_epochs == self.budgets[-1] and fitness < WORST_FITNESS:
            best = self.max_fidelity_incumbent
            if best is None or fitness < best[1]:
                self.max_fidelity_incumbent = (job, float(fitness))

    def is_kept(self, job: Job) -> bool:
        """Whether `job`'s configuration currently sits in DE's population at its fidelity."""
        fidelity = self._optimizer.fidelities[job.rung]
        population_ids = self._optimizer.de[fidelity].population_ids
        return bool(int(population_ids[job.parent_id]) == job.config_id)

    def _ask_one(self) -> _AskedJob:
        raw = self._optimizer.ask()
        index = self._asked
        self._asked += 1
        self._pending[index] = raw

        rung = _rung_index(self._optimizer.fidelities, raw["fidelity"])
        bracket = self._bracket(int(raw["bracket_id"]))
        job = Job(
            index=index,
            config=to_plain(raw["config"]),
            config_id=int(raw["config_id"]),
            bracket=int(raw["bracket_id"]),
            rung=rung,
            start_epoch=self.budgets[rung - 1] if self.cumulative and rung > 0 else 0,
            fidelity_epochs=self.budgets[rung],
            parent_id=int(raw["parent_id"]),
        )
        rung_in_bracket = list(bracket.fidelities).index(raw["fidelity"])
        return _AskedJob(job, rung_in_bracket)

    def _bracket(self, bracket_id: int) -> Any:
        for bracket in self._optimizer.active_brackets:
            if bracket.bracket_id == bracket_id:
                return bracket
        raise RuntimeError(f"DEHB has no active bracket {bracket_id}.")


@dataclass(frozen=True)
class _AskedJob:
    job: Job
    rung_in_bracket: int

    @property
    def bracket(self) -> int:
        return self.job.bracket

    @property
    def rung(self) -> int:
        return self.job.rung


def _rung_index(fidelities: Any, fidelity: float) -> int:
    for index, value in enumerate(fidelities):
        if math.isclose(float(value), float(fidelity), rel_tol=1e-9):
            return index
    raise RuntimeError(f"fidelity {fidelity} is not on DEHB's grid {list(fidelities)}.")


def _make_dehb(budgets: tuple[int, ...], eta: int, seed: int, output_dir: Path) -> Any:
    # Imported here: dehb pulls in dask and loguru, which the tasks never need.
    from dehb import DEHB
    from loguru import logger as loguru_logger

    output_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # ConfigSpace 1.2 deprecates calls that dehb 0.1.2 still makes.
        warnings.simplefilter("ignore", DeprecationWarning)
        optimizer = DEHB(
            cs=build_space(),
            f=None,
            dimensions=len(build_space()),
            min_fidelity=budgets[0],
            max_fidelity=budgets[-1],
            eta=eta,
            n_workers=1,
            seed=seed,
            output_path=str(output_dir),
            save_freq="end",
            log_level="WARNING",
        )

    # DEHB's constructor replaces every loguru handler of the process with its own stdout and
    # file sinks. Take them back out and route its warnings into stdlib logging instead.
    loguru_logger.remove()
    loguru_logger.add(_forward_to_logging, level="WARNING", format="{message}")
    _check_grid(optimizer.fidelities, budgets)
    return optimizer


def _forward_to_logging(message: Any) -> None:
    record = message.record
    logging.getLogger("dehb").log(record["level"].no, "%s", record["message"])


def _check_grid(fidelities: Any, budgets: tuple[int, ...]) -> None:
    rounded = tuple(max(1, round(float(value))) for value in fidelities)
    if rounded != budgets:
        raise RuntimeError(f"DEHB's fidelity grid {list(fidelities)} does not round to {budgets}.")
