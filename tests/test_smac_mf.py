"""SMAC4MF as a search method: a real tiny search through the debug executor, and its resume."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Crash, CrashAfter, tiny_settings

pytest.importorskip("smac", reason="smac is an optional extra: pip install -e '.[baselines]'")

from dehbws.errors import UserError  # noqa: E402
from dehbws.executors import DebugExecutor  # noqa: E402
from dehbws.methods import run_search  # noqa: E402
from dehbws.run_folder import RunFolder, read_json  # noqa: E402

FEVALS = 5


@pytest.fixture(scope="module")
def smac_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunFolder, Path]:
    """One uninterrupted tiny SMAC4MF search, shared by the tests below."""
    root = tmp_path_factory.mktemp("smac")
    folder = RunFolder(root / "run")
    folder.create(tiny_settings(method="smac", fevals=FEVALS))
    run_search(folder, DebugExecutor(), data_cache_dir=root / "cache")
    return folder, root / "cache"


def test_every_trial_trains_from_scratch_on_the_budget_grid(
    smac_run: tuple[RunFolder, Path],
) -> None:
    folder, _ = smac_run

    history = folder.read_history()

    assert [line["evaluation"] for line in history] == list(range(FEVALS))
    for line in history:
        assert line["fidelity"] in (1, 3)
        assert line["start_epoch"] == 0 and line["epochs_trained"] == line["fidelity"]
        assert line["base_version"] is None and line["shard"] is None
        assert line["bracket"] is None and line["kept"] is None and line["merged_into"] is None
        assert set(line["config"]) >= {"Op1", "Op6", "Activation", "LearningRate"}
    # Successive halving inside SMAC4MF: some trials run at the low budget, some at the top.
    assert {line["fidelity"] for line in history} == {1, 3}
    assert (folder.root / "smac").is_dir()


def test_result_names_the_best_trial_at_the_top_budget(smac_run: tuple[RunFolder, Path]) -> None:
    folder, _ = smac_run
    history = folder.read_history()
    top = [line for line in history if line["status"] == "ok" and line["fidelity"] == 3]

    result = read_json(folder.result_file)

    best = min(top, key=lambda line: line["valid_error"])
    assert result["incumbent"]["evaluation"] == best["evaluation"]
    assert result["incumbent"]["valid_error"] == best["valid_error"]
    assert result["fevals"] == FEVALS
    assert result["epochs_spent"] == sum(line["fidelity"] for line in history)
    assert folder.load_state().finished


def test_an_interrupted_search_resumes_to_the_same_history(
    smac_run: tuple[RunFolder, Path], new_run: Any
) -> None:
    uninterrupted, cache = smac_run
    folder = new_run(tiny_settings(method="smac", fevals=FEVALS))

    with pytest.raises(Crash):
        run_search(folder, CrashAfter(2), data_cache_dir=cache)
    assert len(folder.read_history()) == 2
    run_search(folder, DebugExecutor(), data_cache_dir=cache)

    def key(line: dict[str, Any]) -> tuple[Any, ...]:
        return (line["evaluation"], line["config"], line["fidelity"], line["valid_error"])

    assert [key(line) for line in folder.read_history()] == [
        key(line) for line in uninterrupted.read_history()
    ]


def test_missing_smac_is_a_user_error_with_the_install_line(
    new_run: Any, monkeypatch: pytest.MonkeyPatch, data_cache: Path
) -> None:
    folder = new_run(tiny_settings(method="smac", fevals=FEVALS))
    monkeypatch.setitem(sys.modules, "smac", None)  # makes `import smac` fail

    with pytest.raises(UserError, match=r"\[baselines\]"):
        run_search(folder, DebugExecutor(), data_cache_dir=data_cache)
    assert folder.read_history() == []
