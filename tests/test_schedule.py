"""Rung bookkeeping against the real `dehb` package."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ConfigSpace
import pytest

from dehbws.errors import UserError
from dehbws.schedule import WORST_FITNESS, Schedule, rung_budgets
from dehbws.space import build_space


def _schedule(tmp_path: Path, seed: int = 0, **budgets: int) -> Schedule:
    values = {"min_epochs": 1, "max_epochs": 9, "eta": 3, **budgets}
    return Schedule(seed=seed, output_dir=tmp_path / "dehb", **values)


def _fake_error(config: dict[str, object]) -> float:
    # A deterministic stand-in for a validation error, from the configuration itself.
    return round(sum(int(config[f"Op{i}"]) for i in range(1, 7)) / 30 + 0.1, 6)


def test_rung_budgets_follow_dehb_grid() -> None:
    assert rung_budgets(3, 27, 3) == (3, 9, 27)
    assert rung_budgets(1, 9, 3) == (1, 3, 9)
    assert rung_budgets(1, 20, 3) == (2, 7, 20)
    assert rung_budgets(1, 3, 3) == (1, 3)


@pytest.mark.parametrize(
    ("min_epochs", "max_epochs", "eta", "message"),
    [
        (3, 3, 3, "below the maximum"),
        (9, 3, 3, "below the maximum"),
        (1, 9, 1, "eta is 1"),
        (0, 9, 3, "min_epochs is 0"),
        (2, 5, 3, "single rung"),
    ],
)
def test_bad_budgets_are_user_errors(
    min_epochs: int, max_epochs: int, eta: int, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        rung_budgets(min_epochs, max_epochs, eta)


def test_whole_rungs_have_hyperband_sizes_and_cumulative_epochs(tmp_path: Path) -> None:
    schedule = _schedule(tmp_path)
    shapes = []
    for _ in range(7):
        jobs = schedule.ask_rung(100)
        first = jobs[0]
        assert {(job.bracket, job.rung) for job in jobs} == {(first.bracket, first.rung)}
        shapes.append((first.bracket, first.fidelity_epochs, first.start_epoch, len(jobs)))
        for job in jobs:
            schedule.tell(job, fitness=_fake_error(job.config), cost=job.epochs)

    # One DEHB iteration for 1..9 epochs, eta 3: brackets of 9-3-1, 3-1 and 3 jobs.
    assert shapes == [
        (0, 1, 0, 9),
        (0, 3, 1, 3),
        (0, 9, 3, 1),
        (1, 3, 1, 3),
        (1, 9, 3, 1),
        (2, 9, 3, 3),
        (3, 1, 0, 9),
    ]
    assert schedule.asked == 29


def test_ask_rung_respects_max_jobs(tmp_path: Path) -> None:
    schedule = _schedule(tmp_path)
    jobs = schedule.ask_rung(4)
    assert len(jobs) == 4
    assert [job.index for job in jobs] == [0, 1, 2, 3]


def test_first_rung_jobs_are_kept_and_worse_children_are_not(tmp_path: Path) -> None:
    schedule = _schedule(tmp_path)
    for _ in range(6):  # the first DEHB iteration fills every population slot
        for job in schedule.ask_rung(100):
            schedule.tell(job, fitness=0.5, cost=job.epochs)

    children = schedule.ask_rung(100)  # bracket 3: DE children competing with their parents
    schedule.tell(children[0], fitness=0.9, cost=1)
    schedule.tell(children[1], fitness=0.1, cost=1)
    assert not schedule.is_kept(children[0])
    assert schedule.is_kept(children[1])


def test_failures_count_as_worst_fitness(tmp_path: Path) -> None:
    schedule = _schedule(tmp_path)
    jobs = schedule.ask_rung(100)
    for job in jobs:
        schedule.tell(job, fitness=float("nan"), cost=job.epochs)
    optimizer = schedule._optimizer
    assert all(entry[2] == WORST_FITNESS for entry in optimizer.history)


def test_same_seed_and_results_reproduce_the_same_jobs(tmp_path: Path) -> None:
    def trace(folder: Path) -> list[dict[str, object]]:
        schedule = _schedule(folder, seed=7)
        seen = []
        for _ in range(8):
            jobs = schedule.ask_rung(100)
            seen.extend(dataclasses.asdict(job) for job in jobs)
            for job in jobs:
                schedule.tell(job, fitness=_fake_error(job.config), cost=job.epochs)
        return seen

    first, second = trace(tmp_path / "a"), trace(tmp_path / "b")
    assert first == second
    other = _schedule(tmp_path / "c", seed=8).ask_rung(100)
    assert [job.config for job in other] != [job["config"] for job in first[:9]]


def test_configs_are_plain_and_inside_the_space(tmp_path: Path) -> None:
    space = build_space()
    for job in _schedule(tmp_path).ask_rung(100):
        for value in job.config.values():
            assert type(value) in (int, float, str, bool)
        ConfigSpace.Configuration(space, values=job.config).check_valid_configuration()


def test_max_fidelity_incumbent_ignores_lower_rungs(tmp_path: Path) -> None:
    schedule = _schedule(tmp_path)
    low = schedule.ask_rung(100)
    for job in low:
        schedule.tell(job, fitness=0.01, cost=1)
    assert schedule.max_fidelity_incumbent is None

    for _ in range(2):
        for job in schedule.ask_rung(100):
            schedule.tell(job, fitness=0.3, cost=job.epochs)
    incumbent = schedule.max_fidelity_incumbent
    assert incumbent is not None
    assert incumbent[0].fidelity_epochs == 9 and incumbent[1] == 0.3


def test_dehb_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    schedule = _schedule(tmp_path)
    for job in schedule.ask_rung(100):
        schedule.tell(job, fitness=0.5, cost=1)
    captured = capfd.readouterr()
    assert captured.out == ""
