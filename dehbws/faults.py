"""Fault injection for the reliability tests: kill the coordinator at a named point.

Set `DEHBWS_TEST_KILL_AT=POINT:N` and the process sends itself SIGKILL the N-th time it reaches
POINT (a name passed to `checkpoint`). Nothing happens unless that variable is set, and its
name says what it is for; it exists so that tests can stop a real coordinator at exact moments
(between writing a manifest and submitting, between telling and merging, halfway through a
supernet write) instead of at random times that mostly land in training.
"""

from __future__ import annotations

import os
import signal

KILL_VARIABLE = "DEHBWS_TEST_KILL_AT"
_reached: dict[str, int] = {}


def checkpoint(point: str) -> None:
    """Mark that the coordinator reached `point`; may kill the process in a fault test."""
    target = os.environ.get(KILL_VARIABLE)
    if not target:
        return
    name, _, count = target.partition(":")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
