"""Shared fixtures: tiny run settings on the real Fashion-MNIST files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dehbws.presets import RunSettings, preset
from dehbws.run_folder import RunFolder


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
