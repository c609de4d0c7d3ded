"""Task functions of tests/test_security.py (importable by reference, like every task target).
Each records what it did in Redis under a key the test passes."""
from __future__ import annotations

from os import system  # noqa: F401  a denied function re-exported by an allowed module
from shutil import rmtree  # noqa: F401  a function of a module outside an allow-list, re-exported

from tests.tasks_extra import record_json as reexported_record  # noqa: F401  a re-export of a harmless task

from coretask import TaskContext
from tests.tasks import R

SETTINGS = {"webhook": "https://example.invalid/hook"}   # a module global whose methods are no task


def note(key: str, value: str, ctx: TaskContext) -> None:
    """Appends ``value|tenant|queue`` to ``key``: which task ran, and as whom."""
    R().rpush(key, f"{value}|{ctx.tenant}|{ctx.queue}")


def fail_first(key: str, value: str, ctx: TaskContext) -> None:
    """Fails its first attempt, then notes ``value`` like :func:`note`."""
    if ctx.attempt == 1:
        raise RuntimeError("planned failure of the first attempt")
    R().rpush(key, f"{value}|{ctx.tenant}|{ctx.queue}")


def fail_while(flag: str, key: str, value: str, ctx: TaskContext) -> None:
    """Fails while the key ``flag`` exists; otherwise notes ``value`` like :func:`note`."""
    if R().exists(flag):
        raise ValueError(f"{flag} is set")
    R().rpush(key, f"{value}|{ctx.tenant}|{ctx.queue}")


class Pwn:
    """A pickle that runs a shell command when it is loaded (what an attacker would write)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        import os
        return (os.system, (self.command,))
