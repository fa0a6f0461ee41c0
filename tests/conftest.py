"""Shared fixtures: tiny run settings on the real Fashion-MNIST files."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dehbws.executors import DebugExecutor
from dehbws.executors.base import Executor, OnDone, TaskOutcome
from dehbws.presets import RunSettings, preset
from dehbws.run_folder import RunFolder
from dehbws.task import TaskSpec


def tiny_settings(**search_changes: int | str) -> RunSettings:
    """The `tiny` preset, with search settings changed as given."""
    base = preset("tiny")
    return dataclasses.replace(base, search=dataclasses.replace(base.search, **search_changes))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared-data folder for the whole test session (preparing takes about a second)."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def new_run(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A factory for fresh run folders holding the given settings."""

    def make(settings: RunSettings, name: str = "run") -> RunFolder:
        folder = RunFolder(tmp_path / name)
        folder.create(settings)
        return folder

    return make


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """Put the root logger back as it was: the commands install their own handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def run_main(args: list[str]) -> int:
    """`dehbws ARGS` in this process; its exit code (0 when it returns normally)."""
    from dehbws.cli import main

    with kept_logging():
        try:
            main(args)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 1
    return 0


class Crash(Exception):
    """Stands in for the coordinator being killed."""


class CrashAfter(Executor):
    """Runs tasks in process and 'kills the coordinator' after `tasks` finished tasks."""

    def __init__(self, tasks: int) -> None:
        self.remaining = tasks
        self.inner = DebugExecutor()

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        def counting(outcome: TaskOutcome) -> None:
            if self.remaining == 0:
                raise Crash()
            self.remaining -= 1
            on_done(outcome)

        self.inner.run(specs, counting)
