"""Smoke tests of the benchmark scripts, so that they cannot rot: tiny settings, real runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner

from dehbws.cli import cli

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str) -> ModuleType:
    """A benchmark script as a module (they import each other as top-level modules)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_run_quick_measures_every_item_and_prints_the_table(
    tmp_path: Path, data_cache: Path
) -> None:
    rows_file = tmp_path / "rows.json"
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--quick"]
    command += ["--cache-dir", str(data_cache), "--json", str(rows_file)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(rows_file.read_text())
    assert {row["item"] for row in rows} == {
        "1 throughput",
        "2 overhead",
        "3 averaging",
        "4 scaling",
    }
    assert len(rows) == 8
    for row in rows:
        assert math.isfinite(row["value"]), row
        if "growth" not in row["figure"]:  # a memory growth may come out below zero
            assert row["value"] > 0, row
        assert row["passed"] is None  # tiny settings are not judged against the targets
        assert row["figure"] in done.stdout
    throughput = [row["value"] for row in rows if row["item"] == "1 throughput"]
    assert all(0.2 < ratio < 5 for ratio in throughput)  # same network, same data: same order


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT/dehb/seed-0 and OUT/dehb-ws/seed-0: two real tiny searches, as compare lays out."""
    out = tmp_path_factory.mktemp("comparison")
    cache = tmp_path_factory.mktemp("comparison-data")
    for method in ("dehb", "dehb-ws"):
        arguments = ["run", "--preset", "tiny", "--method", method, "--finetune-epochs", "0"]
        arguments += ["--run-dir", str(out / method / "seed-0"), "--cache-dir", str(cache)]
        result = CliRunner().invoke(cli, arguments)
        assert result.exit_code == 0, result.output
    return out


def test_search_efficiency_reports_the_cost_of_reaching_dehbs_incumbent(
    comparison: Path, tmp_path: Path
) -> None:
    report_file = tmp_path / "efficiency.json"
    command = [sys.executable, str(BENCHMARKS / "search_efficiency.py"), str(comparison)]

    done = subprocess.run(
        [*command, "--any-fidelity", "--json", str(report_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    (seed,) = report["seeds"]
    incumbent = json.loads((comparison / "dehb" / "seed-0" / "result.json").read_text())
    assert seed["target_error"] == incumbent["incumbent"]["valid_error"]
    assert seed["baseline"]["evaluation"] == incumbent["incumbent"]["evaluation"]
    assert 0 < seed["baseline"]["epochs"] <= seed["baseline"]["total_epochs"]
    method = seed["method"]
    if method["epochs"] is not None:
        assert method["valid_error"] <= seed["target_error"]
        assert 0 < method["epochs"] <= method["total_epochs"]
        assert seed["epoch_speedup"] == pytest.approx(
            seed["baseline"]["epochs"] / method["epochs"]
        )
    assert "seed-0" in done.stdout


def test_search_efficiency_counts_warmup_and_reports_an_unreached_target(
    comparison: Path,
) -> None:
    efficiency = load_script("search_efficiency")
    run = comparison / "dehb-ws" / "seed-0"
    settings = json.loads((run / "settings.json").read_text())["search"]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]

    never = efficiency.first_reaching(run, -1.0, max_fidelity_only=False)

    warmup_epochs = settings["warmup_epochs"] * settings["warmup_subnets"]
    assert never.epochs is None and never.evaluation is None
    assert never.total_epochs == warmup_epochs + sum(line["epochs_trained"] for line in history)


def test_search_efficiency_names_the_expected_layout_when_it_is_missing(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCHMARKS / "search_efficiency.py"), str(tmp_path)]

    done = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert "dehb/seed-K" in done.stderr and "dehbws compare" in done.stderr
