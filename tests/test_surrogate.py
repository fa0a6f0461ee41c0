"""The JAHS-Bench-201 surrogate backend against a small stand-in benchmark package.

The stand-in is a module named `jahs_bench` written to a temporary folder and put on the server's
PYTHONPATH; the server runs under this interpreter. It answers deterministically from the
configuration and reads a small file from its model folder, so a missing folder is an error, as
with the real 1.6 GB model files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import run_main, tiny_settings

from dehbws.baselines.fixed_cnn import evaluate_fixed_cnn
from dehbws.baselines.surrogate import (
    MODELS_ENV,
    PYTHON_ENV,
    TASK,
    SurrogateClient,
    SurrogateExecutor,
    SurrogateQueryError,
    SurrogateSettings,
    check_network,
    jahs_config,
)
from dehbws.compare import Comparison, run_comparison
from dehbws.errors import UserError
from dehbws.executors.base import TaskOutcome
from dehbws.methods import run_search
from dehbws.presets import RunSettings
from dehbws.run_folder import RunFolder
from dehbws.settings import NetworkSettings
from dehbws.space import build_space, to_plain
from dehbws.task import TaskSpec

FAKE_SOURCE = '''
"""A stand-in for jahs_bench: answers computed from the configuration, no model files."""
import os
import sys
import time
from pathlib import Path

MODE = os.environ.get("FAKE_JAHS_MODE", "")
if MODE == "exit-on-import":
    print("fake benchmark: cannot load the models", file=sys.stderr, flush=True)
    os._exit(3)
KEYS = {"Op1", "Op2", "Op3", "Op4", "Op5", "Op6", "Activation", "LearningRate", "WeightDecay",
        "TrivialAugment", "Optimizer", "N", "W", "Resolution"}


def metrics(config, nepochs, scale):
    """valid-acc and test-acc in percent (they can overshoot 100), runtime in seconds."""
    ops = sum(int(config[f"Op{i}"]) for i in range(1, 7))
    valid = scale * (20.0 + 4.0 * ops + 1.5 * nepochs + 10.0 * float(config["LearningRate"]))
    if config["TrivialAugment"]:
        valid += 2.5
    return {
        "valid-acc": valid,
        "test-acc": valid - 1.25 * config["N"],
        "runtime": 3.0 * nepochs * config["W"] + ops,
        "train-acc": 99.0,
    }


class Benchmark:
    def __init__(self, task, download, save_dir, metrics):
        if MODE == "hang":
            time.sleep(600)
        if download:
            raise ValueError("the fake benchmark cannot download")
        self.scale = float((Path(save_dir) / "assembled_surrogates" / task / "scale.txt")
                           .read_text())
        self.metrics = list(metrics)
        print("fake benchmark loaded")  # chatter on stdout, as real packages do
        os.write(1, b"raw chatter on file descriptor 1\\n")

    def __call__(self, config, nepochs):
        if set(config) != KEYS or config["Optimizer"] != "SGD":
            raise KeyError(f"unexpected configuration keys {sorted(config)}")
        if config["N"] not in (1, 3, 5):
            raise ValueError(f"N={config['N']} is not in the benchmark")
        values = metrics(config, nepochs, self.scale)
        return {nepochs: {name: values[name] for name in self.metrics}}
'''
SCALE = 0.98
# A network JAHS-Bench-201 knows: W=4, N=1, resolution 0.25 (the tiny preset's 8 px images).
NETWORK = NetworkSettings(width=4, cells_per_stage=1, resolution=0.25)


@dataclasses.dataclass
class Fake:
    """The stand-in package and its model folder."""

    package_dir: Path
    models_dir: Path
    module: ModuleType

    def settings(self, **changes: Any) -> SurrogateSettings:
        return dataclasses.replace(
            SurrogateSettings(python=sys.executable, models_dir=str(self.models_dir)), **changes
        )

    def env(self, mode: str = "") -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(self.package_dir), os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": path, "FAKE_JAHS_MODE": mode}

    def client(self, mode: str = "", **changes: Any) -> SurrogateClient:
        return SurrogateClient(self.settings(**changes), extra_env=self.env(mode))

    def expected(self, config: dict[str, Any], nepochs: int) -> dict[str, float]:
        """The stand-in's numbers for a dehbws configuration on NETWORK."""
        return dict(self.module.metrics(jahs_config(config, NETWORK), nepochs, SCALE))


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    package_dir = tmp_path / "fake-package"
    package_dir.mkdir()
    (package_dir / "jahs_bench.py").write_text(FAKE_SOURCE)
    models_dir = tmp_path / "models"
    (models_dir / "assembled_surrogates" / TASK).mkdir(parents=True)
    (models_dir / "assembled_surrogates" / TASK / "scale.txt").write_text(str(SCALE))
    spec = importlib.util.spec_from_file_location("fake_jahs_bench", package_dir / "jahs_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Fake(package_dir, models_dir, module)


def jahs_tiny(**search_changes: Any) -> RunSettings:
    """The tiny preset on a network the surrogate knows."""
    return dataclasses.replace(tiny_settings(**search_changes), network=NETWORK)


def sample_configs(count: int, seed: int = 3) -> list[dict[str, Any]]:
    space = build_space(seed=seed)
    return [to_plain(space.sample_configuration()) for _ in range(count)]


def accuracy(percent: float) -> float:
    return min(max(percent / 100.0, 0.0), 1.0)


def spec_for(tmp_path: Path, config: dict[str, Any], **changes: Any) -> TaskSpec:
    fields: dict[str, Any] = {
        "kind": "scratch",
        "batch": 0,
        "evaluation": 0,
        "config": config,
        "base_version": None,
        "base_supernet": None,
        "start_epoch": 0,
        "end_epoch": 12,
        "seed": 1,
        "shard": None,
        "result": str(tmp_path / "result.json"),
        "network": NETWORK,
        "data": tiny_settings().data,
        "train": tiny_settings().train,
        "data_cache_dir": str(tmp_path / "cache"),
        "evaluate_test": True,
    }
    return TaskSpec(**{**fields, **changes})


# -- queries ---------------------------------------------------------------------------------


def test_queries_return_the_benchmarks_numbers_at_the_asked_epoch(fake: Fake) -> None:
    configs = sample_configs(3)
    with fake.client() as client:
        for config, nepochs in zip(configs, (1, 7, 200), strict=True):
            metrics = client.query(jahs_config(config, NETWORK), nepochs)
            assert metrics == pytest.approx(
                {k: v for k, v in fake.expected(config, nepochs).items() if k != "train-acc"}
            )


def test_a_query_the_benchmark_rejects_fails_alone(fake: Fake) -> None:
    config = sample_configs(1)[0]
    with fake.client() as client:
        with pytest.raises(SurrogateQueryError, match="N=2 is not in the benchmark"):
            client.query({**jahs_config(config, NETWORK), "N": 2}, 3)
        # The process survives a bad query and answers the next one.
        assert client.query(jahs_config(config, NETWORK), 3)["runtime"] == pytest.approx(
            fake.expected(config, 3)["runtime"]
        )


def test_the_executor_maps_accuracies_to_errors_and_clips_overshoot(
    fake: Fake, tmp_path: Path
) -> None:
    modest = {**sample_configs(1)[0], **{f"Op{i}": 1 for i in range(1, 7)}}
    overshooting = {**modest, **{f"Op{i}": 4 for i in range(1, 7)}, "LearningRate": 1.0}
    outcomes: list[TaskOutcome] = []
    specs = [
        spec_for(tmp_path, modest, result=str(tmp_path / "modest.json")),
        spec_for(tmp_path, overshooting, result=str(tmp_path / "over.json"), evaluation=1),
    ]
    assert fake.expected(overshooting, 12)["valid-acc"] > 100.0  # the case is what it claims

    with fake.client() as client:
        SurrogateExecutor(client).run(specs, outcomes.append)

    assert [outcome.spec.evaluation for outcome in outcomes] == [0, 1]
    for outcome, config in zip(outcomes, (modest, overshooting), strict=True):
        expected = fake.expected(config, 12)
        record = outcome.record
        assert record is not None and record["status"] == "ok"
        assert record["valid_error"] == pytest.approx(1.0 - accuracy(expected["valid-acc"]))
        assert record["test_accuracy"] == pytest.approx(accuracy(expected["test-acc"]))
        assert record["test_error"] == pytest.approx(1.0 - record["test_accuracy"])
        assert record["train_seconds"] == pytest.approx(expected["runtime"])
        assert record["epochs_trained"] == 12 and record["device"] == "surrogate"
        assert json.loads(Path(outcome.spec.result).read_text()) == record
    assert outcomes[1].record is not None and outcomes[1].record["valid_error"] == 0.0


# -- a search answered by the surrogate ------------------------------------------------------


def test_a_vanilla_dehb_comparison_is_answered_end_to_end(
    fake: Fake, tmp_path: Path, data_cache: Path
) -> None:
    comparison = Comparison(
        base=jahs_tiny(fevals=4),
        methods=("dehb",),
        seeds=1,
        retrain_epochs=7,
        finetune_epochs=(),
        backend="surrogate",
    )
    out = tmp_path / "cmp"

    with fake.client() as client:
        record = run_comparison(
            out,
            comparison,
            executor_name="debug",
            cache_dir=data_cache,
            surrogate_executor=SurrogateExecutor(client),
        )

    assert record["finished"]
    folder = RunFolder(out / "dehb" / "seed-0")
    history = folder.read_history()
    assert len(history) == 4 and {line["fidelity"] for line in history} == {1, 3}
    for line in history:
        expected = fake.expected(line["config"], line["fidelity"])
        assert line["status"] == "ok"
        assert line["valid_error"] == pytest.approx(1.0 - accuracy(expected["valid-acc"]))
        assert line["train_seconds"] == pytest.approx(expected["runtime"])
    result = json.loads(folder.result_file.read_text())
    top = [line for line in history if line["fidelity"] == 3]
    best = min(top, key=lambda line: line["valid_error"])
    assert result["incumbent"]["config"] == best["config"]
    retrain = result["finetune"]["scratch-7"]
    expected = fake.expected(best["config"], 7)
    assert retrain["backend"] == "jahs-surrogate"
    assert retrain["test_accuracy"] == pytest.approx(accuracy(expected["test-acc"]))
    assert retrain["valid_error"] == pytest.approx(1.0 - accuracy(expected["valid-acc"]))
    # Nothing was trained: no weights anywhere in the run.
    assert list(folder.root.rglob("*.h5")) == []


def test_the_command_line_finds_the_backend_through_the_environment(
    fake: Fake, tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        **fake.env(),
        PYTHON_ENV: sys.executable,
        MODELS_ENV: str(fake.models_dir),
    }.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "cmp"
    args = ["compare", "--backend", "surrogate", "--preset", "smoke", "--subset-fraction", "0.02"]
    args += ["--executor", "debug", "--methods", "dehb", "--seeds", "1", "--fevals", "4"]
    args += ["--min-epochs", "1", "--max-epochs", "3", "--retrain-epochs", "5", "--out", str(out)]

    assert run_main([*args, "--cache-dir", str(data_cache)]) == 0

    result = json.loads((out / "dehb" / "seed-0" / "result.json").read_text())
    network = RunFolder(out / "dehb" / "seed-0").load_settings().network
    config = result["incumbent"]["config"]
    expected = fake.module.metrics(jahs_config(config, network), 5, SCALE)
    assert result["finetune"]["scratch-5"]["test_accuracy"] == pytest.approx(
        accuracy(expected["test-acc"])
    )


# -- what the surrogate cannot answer --------------------------------------------------------


def test_weight_sharing_tasks_are_refused_before_anything_runs(
    fake: Fake, new_run: Any, data_cache: Path
) -> None:
    with_warmup = new_run(jahs_tiny(method="dehb-ws", fevals=4), "warmup")
    without_warmup = new_run(jahs_tiny(method="dehb-ws", fevals=4, warmup_epochs=0), "search")

    with fake.client() as client:
        executor = SurrogateExecutor(client)
        for folder, task in ((with_warmup, "warmup"), (without_warmup, "search")):
            with pytest.raises(UserError, match=f"{task} e00000 cannot be answered"):
                run_search(folder, executor, data_cache_dir=data_cache)
            assert folder.read_history() == []
            assert not folder.warmup_path.exists()
            assert list(folder.root.rglob("batch-*/*.json")) == []


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"start_epoch": 3}, "finetuning"),
        ({"base_supernet": "/supernet/v0003.h5", "base_version": 3}, "weight sharing"),
        ({"kind": "fixed-cnn"}, "fixed CNN"),
        ({"end_epoch": 201}, "1..200"),
        ({"network": NetworkSettings(width=2, cells_per_stage=1, resolution=0.25)}, "W=2"),
    ],
)
def test_tasks_outside_the_benchmark_are_refused(
    fake: Fake, tmp_path: Path, changes: dict[str, Any], fragment: str
) -> None:
    spec = spec_for(tmp_path, sample_configs(1)[0], **changes)
    outcomes: list[TaskOutcome] = []

    with fake.client() as client, pytest.raises(UserError, match=fragment):
        SurrogateExecutor(client).run([spec], outcomes.append)

    assert outcomes == [] and not Path(spec.result).exists()


def test_the_fixed_cnn_is_refused(fake: Fake, new_run: Any, data_cache: Path) -> None:
    folder = new_run(jahs_tiny(method="fixed-cnn"))

    with fake.client() as client, pytest.raises(UserError, match="cannot be answered"):
        evaluate_fixed_cnn(folder, SurrogateExecutor(client), epochs=2, data_cache_dir=data_cache)
    assert not folder.result_file.exists()


def test_networks_the_benchmark_never_sampled_are_refused() -> None:
    check_network(NETWORK)
    for network, fragment in [
        (NetworkSettings(width=2, cells_per_stage=1, resolution=0.25), "W=2"),
        (NetworkSettings(width=4, cells_per_stage=2, resolution=0.25), "N=2"),
    ]:
        with pytest.raises(UserError, match=fragment):
            check_network(network)


# -- setting it up ---------------------------------------------------------------------------


def test_an_unconfigured_backend_says_how_to_set_it_up(
    monkeypatch: pytest.MonkeyPatch, fake: Fake, tmp_path: Path
) -> None:
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    monkeypatch.delenv(MODELS_ENV, raising=False)

    with pytest.raises(UserError) as nothing:
        SurrogateSettings.resolve(None, None)
    with pytest.raises(UserError) as no_models:
        SurrogateSettings.resolve(sys.executable, None)
    not_python = tmp_path / "python"
    not_python.write_text("not an interpreter")
    with pytest.raises(UserError) as not_executable:
        SurrogateSettings.resolve(str(not_python), str(fake.models_dir))
    with pytest.raises(UserError) as empty_models:
        SurrogateSettings.resolve(sys.executable, str(tmp_path))

    for error in (nothing, no_models):
        assert "pip install jahs-bench" in str(error.value)
    assert PYTHON_ENV in str(nothing.value) and "--surrogate-python" in str(nothing.value)
    missing = str(no_models.value).split(";")[0]  # what the message says is missing
    assert "--surrogate-models" in missing and MODELS_ENV in missing
    assert "--surrogate-python" not in missing
    assert "no executable file" in str(not_executable.value)
    assert f"assembled_surrogates/{TASK}" in str(empty_models.value)
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    monkeypatch.setenv(MODELS_ENV, str(fake.models_dir))
    assert SurrogateSettings.resolve(None, None) == fake.settings()


@pytest.mark.parametrize(
    ("configured", "fragments"),
    [
        (False, [PYTHON_ENV, "--surrogate-python", "jahs-bench"]),
        (True, ["W=2", "'tiny' network"]),
    ],
)
def test_the_command_line_refuses_a_backend_it_cannot_use(
    fake: Fake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    configured: bool,
    fragments: list[str],
) -> None:
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    monkeypatch.delenv(MODELS_ENV, raising=False)
    if configured:
        monkeypatch.setenv(PYTHON_ENV, sys.executable)
        monkeypatch.setenv(MODELS_ENV, str(fake.models_dir))
    out = tmp_path / "cmp"

    code = run_main(["compare", "--backend", "surrogate", "--preset", "tiny", "--out", str(out)])

    error = capsys.readouterr().err
    assert code == 2, error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, error
    assert not (out / "comparison.json").exists()


@pytest.mark.parametrize(
    ("mode", "break_models", "fragments"),
    [
        ("", True, ["FileNotFoundError", "scale.txt"]),
        ("no-package", False, ["no JAHS-Bench-201 package importable", "jahs_bench"]),
        ("exit-on-import", False, ["exit code 3", "cannot load the models"]),
    ],
)
def test_a_server_that_fails_to_load_reports_why(
    fake: Fake, mode: str, break_models: bool, fragments: list[str]
) -> None:
    if break_models:
        (fake.models_dir / "assembled_surrogates" / TASK / "scale.txt").unlink()
    client = fake.client(mode)
    if mode == "no-package":
        client.extra_env["PYTHONPATH"] = str(fake.models_dir)  # no benchmark package there
    started = time.monotonic()

    with client, pytest.raises(UserError) as error:
        client.query(jahs_config(sample_configs(1)[0], NETWORK), 3)

    assert time.monotonic() - started < 60.0
    for fragment in fragments:
        assert fragment in str(error.value)
    assert "--surrogate-python" in str(error.value)


def test_a_server_that_hangs_while_loading_is_given_up_on(fake: Fake) -> None:
    client = fake.client("hang", start_timeout_s=2.0)
    started = time.monotonic()

    with client, pytest.raises(UserError, match="no answer to the start within 2 s"):
        client.query(jahs_config(sample_configs(1)[0], NETWORK), 3)

    assert time.monotonic() - started < 30.0


def test_an_interpreter_that_is_no_server_is_a_clear_error(fake: Fake) -> None:
    client = SurrogateClient(fake.settings(python="/bin/echo"))

    with client, pytest.raises(UserError, match="no protocol line"):
        client.query(jahs_config(sample_configs(1)[0], NETWORK), 3)
