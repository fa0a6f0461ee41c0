"""Runs the search a run folder holds: DEHB-WS, vanilla DEHB (the coordinator) or SMAC4MF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dehbws.errors import UserError
from dehbws.executors.base import Executor
from dehbws.run_folder import RunFolder

SEARCH_METHODS: tuple[str, ...] = ("dehb-ws", "dehb", "smac")


def run_search(
    folder: RunFolder, executor: Executor, *, data_cache_dir: Path | None = None
) -> dict[str, Any]:
    """Search (or continue searching) until the run's evaluation budget is spent."""
    method = folder.load_settings().search.method
    if method not in SEARCH_METHODS:
        raise UserError(
            f"the run in {folder.root} uses method {method!r}, which has no search; searches "
            f"are {list(SEARCH_METHODS)} (the fixed CNN is trained by `dehbws compare`)."
        )
    if method == "smac":
        from dehbws.baselines.smac_mf import SmacSearch

        return SmacSearch(folder, executor, data_cache_dir=data_cache_dir).run()

    from dehbws.coordinator import Coordinator

    return Coordinator(folder, executor, data_cache_dir=data_cache_dir).run()
