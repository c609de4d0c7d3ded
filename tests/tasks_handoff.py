"""Task functions for tests/test_handoff.py, run by embedded workers in the test's own process
(module state is shared with the test)."""
from __future__ import annotations

import threading

gate = threading.Event()
ran: list[str] = []


def hold(name: str) -> None:
    """Wait for the test to open the gate (at most 20 s), then note the run."""
    gate.wait(20)
    ran.append(name)


def note(name: str) -> None:
    ran.append(name)
