"""The JAHS-Bench-201 surrogate as an evaluation backend: query instead of training.

The surrogate package needs Python 3.10 and old pins (scikit-learn 1.0, xgboost 1.5), so it runs
in its own environment: dehbws starts `jahs_server.py` under that environment's interpreter and
talks to it in JSON lines over stdin and stdout. `SurrogateExecutor` answers the tasks of
vanilla DEHB, SMAC4MF and "retrain from scratch for E epochs" with the surrogate's prediction at
epoch E: validation error = 1 - valid-acc / 100, test accuracy = test-acc / 100, training seconds
= the predicted runtime. It cannot answer inherit-and-finetune, warm-up or weight-sharing tasks,
nor the fixed CNN (not in the space); those need real training.

Set up once (on a machine with internet access; the model files are about 1.6 GB):

    python3.10 -m venv ~/jahs-env
    ~/jahs-env/bin/python -m pip install jahs-bench==1.1.0
    ~/jahs-env/bin/python -m jahs_bench.download --target surrogates --save_dir ~/jahs-data

then pass `--surrogate-python ~/jahs-env/bin/python --surrogate-models ~/jahs-data`, or set
DEHBWS_SURROGATE_PYTHON and DEHBWS_SURROGATE_MODELS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dehbws.errors import UserError
from dehbws.executors.base import Executor, OnDone, TaskOutcome
from dehbws.run_folder import read_json, write_json_atomic
from dehbws.settings import NetworkSettings
from dehbws.space import OP_KEYS
from dehbws.task import TaskSpec

logger = logging.getLogger(__name__)

PYTHON_ENV = "DEHBWS_SURROGATE_PYTHON"
MODELS_ENV = "DEHBWS_SURROGATE_MODELS"
TASK = "fashion_mnist"
SERVER_SCRIPT = Path(__file__).with_name("jahs_server.py")
# The values of N, W and Resolution that JAHS-Bench-201 sampled (and its surrogate knows).
JAHS_CELLS_PER_STAGE = (1, 3, 5)
JAHS_WIDTHS = (4, 8, 16)
JAHS_MAX_EPOCHS = 200
SETUP_HINT = (
    "set it up once: `python3.10 -m venv ~/jahs-env && ~/jahs-env/bin/python -m pip install "
    "jahs-bench==1.1.0 && ~/jahs-env/bin/python -m jahs_bench.download --target surrogates "
    "--save_dir ~/jahs-data`, then pass --surrogate-python ~/jahs-env/bin/python "
    f"--surrogate-models ~/jahs-data (or set {PYTHON_ENV} and {MODELS_ENV})"
)


@dataclass(frozen=True)
class SurrogateSettings:
    """Where the surrogate's interpreter and model files are."""

    python: str
    models_dir: str
    task: str = TASK
    start_timeout_s: float = 900.0
    query_timeout_s: float = 300.0

    @classmethod
    def resolve(cls, python: str | None, models_dir: str | None) -> SurrogateSettings:
        """Settings from the options, else the environment; a UserError that says how to set
        them up when either is missing or wrong."""
        python = python or os.environ.get(PYTHON_ENV)
        models_dir = models_dir or os.environ.get(MODELS_ENV)
        if not python or not models_dir:
            missing = [
                name
                for name, value in (
                    (f"--surrogate-python ({PYTHON_ENV})", python),
                    (f"--surrogate-models ({MODELS_ENV})", models_dir),
                )
                if not value
            ]
            raise UserError(
                f"the JAHS-Bench-201 surrogate is not configured: {' and '.join(missing)} "
                f"not given; {SETUP_HINT}."
            )
        if not (Path(python).is_file() and os.access(python, os.X_OK)):
            raise UserError(
                f"--surrogate-python is {python!r}, but that is no executable file; point it at "
                f"the Python 3.10 interpreter of the surrogate's environment ({SETUP_HINT})."
            )
        task_dir = Path(models_dir) / "assembled_surrogates" / TASK
        if not task_dir.is_dir():
            raise UserError(
                f"--surrogate-models is {models_dir!r}, but {task_dir} does not exist; point it "
                "at the folder that jahs_bench.download filled (it holds "
                f"assembled_surrogates/{TASK}/), {SETUP_HINT}."
            )
        return cls(python=str(python), models_dir=str(Path(models_dir).resolve()))


def check_network(network: NetworkSettings) -> None:
    """Raise UserError unless the surrogate knows this width, depth and resolution."""
    if network.cells_per_stage not in JAHS_CELLS_PER_STAGE or network.width not in JAHS_WIDTHS:
        raise UserError(
            f"the surrogate knows N in {JAHS_CELLS_PER_STAGE} and W in {JAHS_WIDTHS}, but the run "
            f"has N={network.cells_per_stage}, W={network.width}; use a preset such as 'smoke' "
            "or 'paper' (the 'tiny' network is not in JAHS-Bench-201)."
        )


def jahs_config(config: Mapping[str, Any], network: NetworkSettings) -> dict[str, Any]:
    """A dehbws configuration as JAHS-Bench-201 expects it (same op coding, plus N, W, R)."""
    query: dict[str, Any] = {key: int(config[key]) for key in OP_KEYS}
    query.update(
        Activation=str(config["Activation"]),
        LearningRate=float(config["LearningRate"]),
        WeightDecay=float(config["WeightDecay"]),
        TrivialAugment=bool(config["TrivialAugment"]),
        Optimizer="SGD",
        N=network.cells_per_stage,
        W=network.width,
        Resolution=float(network.resolution),
    )
    return query


class SurrogateClient:
    """The surrogate process: started on the first query, asked one query at a time."""

    def __init__(
        self, settings: SurrogateSettings, *, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.extra_env = dict(extra_env or {})
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[str] | None = None
        self._next_id = 0

    def __enter__(self) -> SurrogateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, config: Mapping[str, Any], nepochs: int) -> dict[str, float]:
        """The surrogate's metrics for `config` (JAHS keys) trained for `nepochs` epochs."""
        process = self._start()
        request_id = self._next_id
        self._next_id += 1
        assert process.stdin is not None
        try:
            process.stdin.write(
                json.dumps({"id": request_id, "config": dict(config), "nepochs": nepochs}) + "\n"
            )
            process.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(self._died("while receiving a query")) from None
        reply = self._read(self.settings.query_timeout_s, "a query")
        if not reply.get("ok"):
            raise SurrogateQueryError(str(reply.get("error")))
        return {str(name): float(value) for name, value in reply["metrics"].items()}

    def close(self) -> None:
        """End the surrogate process (it exits when its stdin closes)."""
        if self._process is not None:
            if self._process.stdin is not None:
                self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _start(self) -> subprocess.Popen[str]:
        if self._process is not None:
            return self._process
        command = [
            self.settings.python,
            str(SERVER_SCRIPT),
            "--save-dir",
            self.settings.models_dir,
            "--task",
            self.settings.task,
        ]
        env = {**os.environ, **self.extra_env}
        # Kept open for the process's lifetime (closed in `close`): its tail explains a crash.
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        logger.info("starting the JAHS-Bench-201 surrogate: %s", " ".join(command))
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        try:
            hello = self._read(self.settings.start_timeout_s, "the start")
        except RuntimeError as error:  # it died or hung before saying whether it is ready
            hello = {"ready": False, "error": str(error).rstrip()}
        if not hello.get("ready"):
            message = hello.get("error")
            self.close()
            raise UserError(
                f"the JAHS-Bench-201 surrogate did not start under {self.settings.python}: "
                f"{message}; install jahs-bench in that environment and check the model files "
                f"in {self.settings.models_dir} ({SETUP_HINT})."
            )
        logger.debug("surrogate ready (module %s)", hello.get("module"))
        return self._process

    def _read(self, timeout_s: float, what: str) -> dict[str, Any]:
        process = self._process
        assert process is not None and process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        if not ready:
            process.kill()
            raise RuntimeError(f"the surrogate gave no answer to {what} within {timeout_s:.0f} s")
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(self._died(f"during {what}"))
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            process.kill()
            raise RuntimeError(
                f"the surrogate answered {what} with {line.strip()[:200]!r}, which is no "
                "protocol line (is it jahs_server.py under a Python interpreter?)"
            )
        return message

    def _died(self, when: str) -> str:
        assert self._process is not None
        code = self._process.wait()
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:]
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._process = None
        return f"the surrogate process ended {when} with exit code {code}:\n{tail}"


class SurrogateQueryError(RuntimeError):
    """The surrogate could not answer one query (the process is still usable)."""


class SurrogateExecutor(Executor):
    """Answers from-scratch tasks from the surrogate instead of training them."""

    name = "surrogate"

    def __init__(self, client: SurrogateClient) -> None:
        self.client = client

    def run(self, specs: Sequence[TaskSpec], on_done: OnDone) -> None:
        for spec in specs:
            _check_answerable(spec)
        for spec in specs:
            result_path = Path(spec.result)
            if result_path.exists():
                on_done(TaskOutcome(spec, read_json(result_path)))
                continue
            started = time.monotonic()
            try:
                metrics = self.client.query(jahs_config(spec.config, spec.network), spec.end_epoch)
                record = _record(spec, metrics, time.monotonic() - started)
            except SurrogateQueryError as error:
                on_done(TaskOutcome(spec, None, error=f"surrogate query failed: {error}"))
                continue
            write_json_atomic(result_path, record)
            on_done(TaskOutcome(spec, record))


def _check_answerable(spec: TaskSpec) -> None:
    if spec.base_supernet is not None or spec.start_epoch != 0 or spec.kind == "fixed-cnn":
        raise UserError(
            f"{spec.name} cannot be answered by the surrogate: it predicts training from scratch "
            "for E epochs of the JAHS space only (not weight sharing, finetuning or the fixed "
            "CNN); run it with real training."
        )
    if not 1 <= spec.end_epoch <= JAHS_MAX_EPOCHS:
        raise UserError(
            f"{spec.name} asks for {spec.end_epoch} epochs, but the surrogate knows 1.."
            f"{JAHS_MAX_EPOCHS}."
        )
    check_network(spec.network)


def _accuracy(metrics: Mapping[str, float], name: str) -> float:
    """An accuracy in [0, 1] from the surrogate's percentage (predictions can overshoot)."""
    if name not in metrics:
        raise SurrogateQueryError(f"the surrogate returned no {name!r}, only {sorted(metrics)}")
    return min(max(metrics[name] / 100.0, 0.0), 1.0)


def _record(spec: TaskSpec, metrics: Mapping[str, float], query_s: float) -> dict[str, Any]:
    """A result record with the fields of a trained task's, from the surrogate's answer."""
    record: dict[str, Any] = {
        "kind": spec.kind,
        "batch": spec.batch,
        "evaluation": spec.evaluation,
        "config": spec.config,
        "base_version": spec.base_version,
        "start_epoch": spec.start_epoch,
        "end_epoch": spec.end_epoch,
        "epochs_trained": spec.end_epoch - spec.start_epoch,
        "seed": spec.seed,
        "host": socket.gethostname(),
        "device": "surrogate",
        "backend": "jahs-surrogate",
        "task_seconds": query_s,
        "status": "ok",
        "valid_error": 1.0 - _accuracy(metrics, "valid-acc"),
        "valid_loss": None,
        "train_seconds": float(metrics.get("runtime", 0.0)),
        "images_seen": None,
        "parameters": None,
        "surrogate_metrics": dict(metrics),
    }
    if spec.evaluate_test:
        record["test_accuracy"] = _accuracy(metrics, "test-acc")
        record["test_error"] = 1.0 - record["test_accuracy"]
    return record
