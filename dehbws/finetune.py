"""Final evaluations of the incumbent: inherit + finetune, or train from scratch.

Finetuning follows DEHB-WS: the max-fidelity incumbent inherits the final supernet and trains
with its own hyperparameters for a few epochs, on a cosine schedule over those epochs so that it
ends annealed. Training from scratch follows JAHS-Bench-201: epochs [0, E) of the 200-epoch
schedule, so its result is comparable to the benchmark's epoch-E numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from dehbws.errors import UserError
from dehbws.executors.base import Executor, TaskOutcome
from dehbws.run_folder import RunFolder, read_json, write_json_atomic
from dehbws.task import TaskSpec, evaluation_seed

logger = logging.getLogger(__name__)


def final_evaluation(
    folder: RunFolder,
    executor: Executor,
    *,
    epochs: int,
    from_scratch: bool = False,
    data_cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Finetune (or retrain) the run's incumbent; records and returns the result."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"epochs is {epochs!r}, but must be an integer >= 1.")
    if not folder.result_file.exists():
        raise UserError(
            f"{folder.root} has no finished search yet (no result.json); finish it with "
            f"`dehbws run --resume {folder.root}` first."
        )
    result = read_json(folder.result_file)
    incumbent = result.get("incumbent")
    if incumbent is None:
        raise UserError(f"the search in {folder.root} has no incumbent: every evaluation failed.")

    settings = folder.load_settings()
    if not from_scratch and not settings.search.weight_sharing:
        raise UserError(
            f"the run in {folder.root} used method {settings.search.method!r}, which has no "
            "supernet to inherit from; evaluate its incumbent with --from-scratch."
        )
    state = folder.load_state()
    kind = "scratch" if from_scratch else "finetune"
    name = f"{kind}-{epochs}"
    final_dir = folder.root / "final"
    train = settings.train
    if not from_scratch:
        train = dataclasses.replace(train, schedule_epochs=epochs)

    spec = TaskSpec(
        kind=kind,
        batch=state.batches_done,
        evaluation=0,
        config=incumbent["config"],
        base_version=None if from_scratch else state.supernet_version,
        base_supernet=None if from_scratch else str(folder.supernet_path(state.supernet_version)),
        start_epoch=0,
        end_epoch=epochs,
        seed=evaluation_seed(settings.search.seed, kind, epochs),
        shard=str(final_dir / f"{name}.h5"),
        result=str(final_dir / f"{name}.json"),
        network=settings.network,
        data=settings.data,
        train=train,
        data_cache_dir=str(data_cache_dir or folder.root / "data"),
        evaluate_test=True,
    )

    outcomes: list[TaskOutcome] = []
    executor.run([spec], outcomes.append)
    outcome = outcomes[0]
    if outcome.record is None:
        raise RuntimeError(f"{name} of the incumbent failed: {outcome.error}")
    record = {
        **outcome.record,
        "incumbent_evaluation": incumbent["evaluation"],
        "weights": (
            folder.relative(final_dir / f"{name}.h5") if outcome.record["status"] == "ok" else None
        ),
    }

    result.setdefault("finetune", {})[name] = record
    write_json_atomic(folder.result_file, result)
    if record["status"] == "ok":
        logger.info(
            "%s of incumbent e%05d: test accuracy %.4f, valid error %.4f",
            name,
            incumbent["evaluation"],
            record["test_accuracy"],
            record["valid_error"],
        )
    else:
        logger.warning("%s of the incumbent failed: %s", name, record.get("error"))
    return record
