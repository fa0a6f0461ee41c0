"""Lint, format and type checks run with the tests, so they cannot drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_FOLDERS = [name for name in ("dehbws", "tests", "benchmarks") if (ROOT / name).is_dir()]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(
    shutil.which("ruff") is None, reason="ruff is not installed: pip install -e '.[test]'"
)
def test_ruff_lint_is_clean() -> None:
    result = _run("ruff", "check", *PYTHON_FOLDERS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("ruff") is None, reason="ruff is not installed: pip install -e '.[test]'"
)
def test_ruff_format_is_clean() -> None:
    result = _run("ruff", "format", "--check", *PYTHON_FOLDERS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = _run(sys.executable, "-m", "mypy", "dehbws")
    assert result.returncode == 0, result.stdout + result.stderr
