"""The study commands on real data: a tiny `dehbws compare` over methods and seeds, its resume,
and `dehbws report` checked against numbers recomputed from the run folders."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import run_main

from dehbws.report import RunData, _band, default_reference, summarize
from dehbws.run_folder import RunFolder

HAS_SMAC = importlib.util.find_spec("smac") is not None
METHODS = ["dehb-ws", "dehb", *(["smac"] if HAS_SMAC else []), "fixed-cnn"]
SEARCH_METHODS = [method for method in METHODS if method != "fixed-cnn"]
SEEDS = 2
FEVALS = 3
MAX_EPOCHS = 2
# What a reader sees in the report's tables.
LABELS = {"DEHB-WS": "dehb-ws", "DEHB": "dehb", "SMAC4MF": "smac", "fixed CNN": "fixed-cnn"}
COLUMNS = {"retrain-1": "scratch-1", "inherit+finetune-1": "finetune-1"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("regret_vs_epochs.png", "regret_vs_wall_time.png")
Snapshot = dict[str, tuple[int, int]]


def compare_args(out: Path, cache: Path, *, seeds: int = SEEDS, fevals: int = FEVALS) -> list[str]:
    """One tiny comparison: budgets 1..2 epochs, 3 evaluations, 1-epoch final evaluations."""
    return [
        "compare",
        "--preset",
        "tiny",
        "--executor",
        "debug",
        "--seeds",
        str(seeds),
        "--methods",
        ",".join(METHODS),
        "--fevals",
        str(fevals),
        "--min-epochs",
        "1",
        "--max-epochs",
        str(MAX_EPOCHS),
        "--eta",
        "2",
        "--retrain-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]


def snapshot(out: Path) -> Snapshot:
    """Modification time and size of every file of every run under a comparison folder."""
    return {
        str(path.relative_to(out)): (path.stat().st_mtime_ns, path.stat().st_size)
        for method in METHODS
        if (out / method).exists()
        for path in sorted((out / method).rglob("*"))
        if path.is_file()
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Study:
    """One comparison, run in three steps, and what each step left behind."""

    out: Path
    cache: Path
    first_seed_only: Snapshot  # after `--seeds 1`
    after_second_seed: Snapshot  # after `--seeds 2` on the same folder
    after_repeat: Snapshot  # after the same `--seeds 2` command once more
    exit_codes: list[int]
    repeat_s: float


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Train on one thread: these networks are too small to gain from more, and on a busy
    machine torch's waiting threads slow every step down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Study:
    out = tmp_path_factory.mktemp("study") / "cmp"
    with one_torch_thread():
        codes = [run_main(compare_args(out, data_cache, seeds=1))]
        first = snapshot(out)
        codes.append(run_main(compare_args(out, data_cache)))
        second = snapshot(out)
        started = time.monotonic()
        codes.append(run_main(compare_args(out, data_cache)))
        repeat_s = time.monotonic() - started
    return Study(out, data_cache, first, second, snapshot(out), codes, repeat_s)


@dataclass
class RunFiles:
    """One run's files, read directly."""

    method: str
    seed: int
    result: dict[str, Any]
    history: list[dict[str, Any]]
    warmup: list[dict[str, Any]]


def run_files(out: Path) -> list[RunFiles]:
    runs = []
    for method in METHODS:
        for seed in range(SEEDS):
            root = out / method / f"seed-{seed}"
            runs.append(
                RunFiles(
                    method=method,
                    seed=seed,
                    result=json.loads((root / "result.json").read_text()),
                    history=read_lines(root / "history.jsonl"),
                    warmup=read_lines(root / "warmup.jsonl"),
                )
            )
    return runs


def best_top_budget_error(runs: list[RunFiles]) -> float:
    """The best validation error of any successful evaluation at the maximum budget."""
    return min(
        line["valid_error"]
        for run in runs
        for line in run.history
        if line["status"] == "ok" and line["fidelity"] == MAX_EPOCHS
    )


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the Markdown table under `heading`: first cell -> the other cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + heading))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, _separator, *body = rows
    return {"header": header[1:], **{row[0]: row[1:] for row in body}}


def cell(text: str) -> tuple[float, float | None] | None:
    """'12.34 +- 5.67' -> (12.34, 5.67); '12.34' -> (12.34, None); '-' -> None."""
    if text == "-":
        return None
    mean, _, std = text.partition(" +- ")
    return float(mean), (float(std) if std else None)


def assert_cell(text: str, values: list[float], *, digits: int, scale: float = 1.0) -> None:
    parsed = cell(text)
    assert parsed is not None, text
    tolerance = 0.51 * 10.0**-digits
    assert parsed[0] == pytest.approx(statistics.fmean(values) * scale, abs=tolerance), text
    if len(values) > 1:
        assert parsed[1] is not None, text
        expected_std = float(np.std(values, ddof=1)) * scale
        assert parsed[1] == pytest.approx(expected_std, abs=tolerance), text
    else:
        assert parsed[1] is None, text


def history_line(fidelity: int, error: float | None, seconds: float = 1.0) -> dict[str, Any]:
    """A history line as the searches write it (only the fields the report reads)."""
    return {
        "fidelity": fidelity,
        "epochs_trained": fidelity,
        "train_seconds": seconds,
        "status": "ok" if error is not None else "failed",
        "valid_error": error,
    }


def run_data(seed: int, history: list[dict[str, Any]], **changes: Any) -> RunData:
    top = [
        item["valid_error"] for item in history if item["fidelity"] == 3 and item["status"] == "ok"
    ]
    incumbent = min(top) if top else None
    fields: dict[str, Any] = {"incumbent_valid_error": incumbent, **changes}
    return RunData(Path(f"/runs/{seed}"), "dehb", seed, 3, history, **fields)


# -- regret, on hand-made histories ----------------------------------------------------------


def test_the_reference_is_the_best_error_at_the_top_budget() -> None:
    runs = [
        run_data(0, [history_line(1, 0.20), history_line(1, 0.90), history_line(3, 0.50)]),
        run_data(1, [history_line(1, 0.60), history_line(3, 0.40), history_line(3, None)]),
    ]

    assert default_reference(runs) == 0.40  # not 0.20: no incumbent is judged at 1 epoch
    regret = summarize(runs, default_reference(runs))["methods"]["dehb"]["regret"]
    assert regret["mean"] == pytest.approx((0.10 + 0.0) / 2)
    assert regret["std"] == pytest.approx(0.10 / 2**0.5)
    assert regret["valid_error_mean"] == pytest.approx(0.45)


def test_without_a_top_budget_evaluation_the_incumbent_is_the_reference() -> None:
    runs = [
        run_data(0, [history_line(1, 0.30), history_line(1, 0.25)], incumbent_valid_error=0.25)
    ]

    assert default_reference(runs) == 0.25


def test_the_regret_curve_starts_at_the_first_top_budget_result() -> None:
    history = [
        history_line(1, 0.2, 1.0),
        history_line(3, 0.5, 2.0),
        history_line(1, 0.1, 0.5),
        history_line(3, None, 3.0),
        history_line(3, 0.4, 4.0),
    ]
    run = run_data(0, history, warmup_epochs=2, warmup_seconds=0.5)

    epochs, seconds, regret = run.curve(reference=0.4)

    assert epochs.tolist() == [6, 7, 10, 13]  # warm-up 2, then 1, 3, 1, 3, 3
    assert seconds.tolist() == pytest.approx([3.5, 4.0, 7.0, 11.0])
    assert regret.tolist() == pytest.approx([0.1, 0.1, 0.1, 0.0])


def test_the_band_holds_mean_min_and_max_of_the_step_curves() -> None:
    first = (np.array([1.0, 3.0]), np.array([0.5, 0.2]))
    second = (np.array([2.0]), np.array([0.4]))

    grid, mean, low, high = _band([first, second])

    # From the point where both curves have begun: a mean over every seed, never over some.
    assert grid.tolist() == [2.0, 3.0]
    assert mean.tolist() == pytest.approx([0.45, 0.3])
    assert low.tolist() == pytest.approx([0.4, 0.2])
    assert high.tolist() == pytest.approx([0.5, 0.4])


# -- the comparison --------------------------------------------------------------------------


def test_every_method_and_seed_has_its_own_finished_run(study: Study) -> None:
    assert study.exit_codes == [0, 0, 0]
    record = json.loads((study.out / "comparison.json").read_text())

    assert record["finished"] is True
    assert record["methods"] == METHODS and record["seeds"] == SEEDS
    listed = {(entry["method"], entry["seed"]): entry for entry in record["runs"]}
    assert set(listed) == {(method, seed) for method in METHODS for seed in range(SEEDS)}
    assert sorted(path.name for path in study.out.iterdir()) == sorted(
        [*METHODS, "comparison.json", "logs"]
    )
    for (method, seed), entry in listed.items():
        root = study.out / method / f"seed-{seed}"
        assert entry["folder"] == f"{method}/seed-{seed}" and entry["finished"]
        settings = RunFolder(root).load_settings()
        assert (settings.search.method, settings.search.seed) == (method, seed)
        assert settings.search.fevals == FEVALS and settings.search.max_epochs == MAX_EPOCHS
        result = json.loads((root / "result.json").read_text())
        finals = {"scratch-1", "finetune-1"} if method == "dehb-ws" else {"scratch-1"}
        assert set(result["finetune"]) == finals == set(entry["final"])
        for name in finals:
            assert (
                entry["final"][name]["test_accuracy"] == result["finetune"][name]["test_accuracy"]
            )
            assert result["finetune"][name]["status"] == "ok"
            assert 0.0 <= result["finetune"][name]["test_accuracy"] <= 1.0
            assert (root / "final" / f"{name}.json").exists()


def test_search_runs_retrain_their_best_top_budget_evaluation(study: Study) -> None:
    for run in run_files(study.out):
        if run.method == "fixed-cnn":
            assert run.history == [] and run.result["incumbent"] is None
            assert run.result["finetune"]["scratch-1"]["kind"] == "fixed-cnn"
            continue
        assert [line["evaluation"] for line in run.history] == list(range(FEVALS))
        top = [
            line
            for line in run.history
            if line["status"] == "ok" and line["fidelity"] == MAX_EPOCHS
        ]
        best = min(top, key=lambda line: line["valid_error"])
        incumbent = run.result["incumbent"]
        assert incumbent["valid_error"] == best["valid_error"]
        assert incumbent["config"] == best["config"]
        for name, final in run.result["finetune"].items():
            assert final["config"] == best["config"], name
            assert final["epochs_trained"] == 1
        assert bool(run.warmup) == (run.method == "dehb-ws")


def test_seeds_give_different_searches(study: Study) -> None:
    runs = {(run.method, run.seed): run for run in run_files(study.out)}
    for method in SEARCH_METHODS:
        configs = [[line["config"] for line in runs[method, seed].history] for seed in (0, 1)]
        assert configs[0] != configs[1], method


def test_adding_a_seed_leaves_the_finished_runs_alone(study: Study) -> None:
    assert {name.split("/")[1] for name in study.first_seed_only} == {"seed-0"}
    unchanged = {name: study.after_second_seed.get(name) for name in study.first_seed_only}
    assert unchanged == study.first_seed_only
    assert any("/seed-1/" in name for name in study.after_second_seed)


def test_repeating_the_command_retrains_nothing(study: Study) -> None:
    assert study.after_repeat == study.after_second_seed
    assert study.repeat_s < 30.0


def test_other_settings_in_the_same_folder_are_refused(
    study: Study, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_main(compare_args(study.out, study.cache, fevals=FEVALS + 1))

    error = capsys.readouterr().err
    assert code == 2, error
    assert "other settings" in error and "Traceback" not in error
    assert snapshot(study.out) == study.after_repeat


def test_smac_runs_search_on_the_budget_grid(study: Study) -> None:
    pytest.importorskip("smac", reason="smac is an optional extra: pip install -e '.[baselines]'")
    for seed in range(SEEDS):
        root = study.out / "smac" / f"seed-{seed}"
        assert (root / "smac").is_dir()
        for line in read_lines(root / "history.jsonl"):
            assert line["fidelity"] in (1, MAX_EPOCHS) and line["start_epoch"] == 0


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--methods", "dehb,bogus"], ["'bogus'", "dehb-ws"]),
        (["--methods", "dehb,dehb"], ["distinct"]),
        (["--seeds", "0"], ["seeds is 0", ">= 1"]),
        (["--seeds", "-2"], ["seeds is -2"]),
        (["--retrain-epochs", "0"], ["retrain epochs is 0"]),
        (["--finetune-epochs", "ten"], ["--finetune-epochs is 'ten'"]),
        (["--preset", "huge"], ["'huge'"]),
    ],
)
def test_bad_comparisons_exit_2_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "cmp"

    code = run_main(["compare", "--preset", "tiny", "--out", str(out), *extra])

    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, error
    assert not out.exists()


def test_a_folder_with_other_files_is_no_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_cache: Path
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    code = run_main(compare_args(out, data_cache))

    error = capsys.readouterr().err
    assert code == 2, error
    assert "not empty" in error and "Traceback" not in error
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


# -- the report ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(study: Study, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "default"
    assert run_main(["report", str(study.out), "--out", str(out)]) == 0
    return out


def test_accuracy_table_is_mean_and_std_over_seeds(study: Study, report: Path) -> None:
    runs = run_files(study.out)
    rows = table((report / "report.md").read_text(), "Test accuracy")

    assert [COLUMNS[name] for name in rows.pop("header")[1:]] == ["scratch-1", "finetune-1"]
    assert {LABELS[label] for label in rows} == set(METHODS)
    for label, cells in rows.items():
        method = LABELS[label]
        group = [run for run in runs if run.method == method]
        assert cells[0] == str(SEEDS)
        for name, text in zip(["scratch-1", "finetune-1"], cells[1:], strict=True):
            values = [
                run.result["finetune"][name]["test_accuracy"]
                for run in group
                if name in run.result["finetune"]
            ]
            if values:
                assert_cell(text, values, digits=2, scale=100.0)
            else:
                assert text == "-" and method != "dehb-ws"


def test_regret_is_measured_from_the_best_top_budget_error(study: Study, report: Path) -> None:
    runs = run_files(study.out)
    text = (report / "report.md").read_text()
    reference = best_top_budget_error(runs)

    assert f"Reference validation error: {reference:.4f}." in text
    assert json.loads((report / "report.json").read_text())["reference"] == pytest.approx(
        reference, abs=1e-12
    )
    rows = table(text, "Final validation regret")
    rows.pop("header")
    assert rows[next(k for k, v in LABELS.items() if v == "fixed-cnn")] == ["-", "-", "-"]
    best_regret = min(
        run.result["incumbent"]["valid_error"] - reference
        for run in runs
        if run.method != "fixed-cnn"
    )
    assert best_regret == pytest.approx(0.0, abs=1e-12)  # the best run ends at regret 0
    for label, (error_text, regret_text, epochs_text) in rows.items():
        method = LABELS[label]
        if method == "fixed-cnn":
            continue
        group = [run for run in runs if run.method == method]
        errors = [run.result["incumbent"]["valid_error"] for run in group]
        assert_cell(error_text, errors, digits=4)
        assert_cell(regret_text, [error - reference for error in errors], digits=4)
        spent = [sum(line["epochs_trained"] for line in run.history + run.warmup) for run in group]
        assert float(epochs_text) == pytest.approx(statistics.fmean(spent), abs=0.5)


def test_a_given_reference_replaces_the_best_error(
    study: Study, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = 0.0485
    args = ["report", str(study.out), "--out", str(tmp_path), "--reference", str(reference)]
    assert run_main(args) == 0
    capsys.readouterr()
    rows = table((tmp_path / "report.md").read_text(), "Final validation regret")

    assert f"Reference validation error: {reference:.4f}." in (tmp_path / "report.md").read_text()
    runs = run_files(study.out)
    for label, (_, regret_text, _) in rows.items():
        if label == "header" or LABELS[label] == "fixed-cnn":
            continue
        errors = [
            run.result["incumbent"]["valid_error"] for run in runs if run.method == LABELS[label]
        ]
        assert_cell(regret_text, [error - reference for error in errors], digits=4)


def test_plots_are_png_images_with_content(report: Path) -> None:
    text = (report / "report.md").read_text()
    for name in PLOTS:
        path = report / name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        assert f"]({name})" in text
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
        assert float(pixels[..., :3].std()) > 0.01  # not a blank canvas


def test_a_single_run_folder_is_a_report_of_one_seed(
    study: Study, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = study.out / "dehb" / "seed-1"

    assert run_main(["report", str(run), "--out", str(tmp_path)]) == 0

    capsys.readouterr()
    rows = table((tmp_path / "report.md").read_text(), "Test accuracy")
    accuracy = json.loads((run / "result.json").read_text())["finetune"]["scratch-1"]
    assert set(rows) == {"header", "DEHB"}
    assert rows["DEHB"][0] == "1"
    assert_cell(rows["DEHB"][1], [accuracy["test_accuracy"]], digits=2, scale=100.0)


@pytest.mark.parametrize(
    ("make", "extra", "fragment"),
    [
        ("plain", [], "is neither a run folder"),
        ("missing", [], "is neither a run folder"),
        ("study", ["--reference", "1.5"], "reference is 1.5"),
    ],
)
def test_bad_reports_exit_2_without_traceback(
    study: Study,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: str,
    extra: list[str],
    fragment: str,
) -> None:
    source = {"plain": tmp_path / "plain", "missing": tmp_path / "missing", "study": study.out}
    if make == "plain":
        source["plain"].mkdir()
        (source["plain"] / "notes.txt").write_text("not a run")
    out = tmp_path / "report"

    code = run_main(["report", str(source[make]), "--out", str(out), *extra])

    error = capsys.readouterr().err
    assert code == 2, error
    assert fragment in error and "Traceback" not in error
    assert not out.exists()
