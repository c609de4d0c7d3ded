"""Damaging task records in Redis the ways the corrupt-record tests need (tests/test_corrupt_*.py),
and a task that damages its own record while it runs."""
from __future__ import annotations

import os
from typing import Any

from coretask import TaskContext
from tests.tasks import R

GARBAGE = b"\xffgarbage"    # not UTF-8, not a number, not a queue name (a tenant name it could be)
NOT_INT = b"3.5"            # a number, but not the integer an integer field must hold

# every field of a task hash (coretask/gateway/lua/_lib.lua's header), and the integer ones
FIELDS = ("q", "tn", "b", "p", "s", "tg", "r", "a", "e", "d", "st", "w", "ls", "on", "et", "em", "etb", "da",
          "sch", "sk", "sg", "cb")
INT_FIELDS = ("r", "a", "e", "d", "ls", "da", "sk")
FIELD_DAMAGE = ("delete", "garbage", "not-int")   # "not-int" only for the integer fields
KEY_DAMAGE = ("string", "list", "missing")        # the whole key: another Redis type, or gone


def damage(client: Any, key: str, field: str | None, how: str) -> None:
    """Damage one task record: a field deleted, or set to garbage or to a non-integer number; or
    the whole key replaced by a string or a list, or deleted."""
    if how == "delete":
        client.hdel(key, field)
    elif how == "garbage":
        client.hset(key, field, GARBAGE)
    elif how == "not-int":
        client.hset(key, field, NOT_INT)
    elif how == "string":
        client.delete(key)
        client.set(key, "not a hash")
    elif how == "list":
        client.delete(key)
        client.rpush(key, "not", "a", "hash")
    elif how == "missing":
        client.delete(key)
    else:
        raise ValueError(how)


def damage_self(runs: str, prefix: str, field: str | None, how: str, then: str, ctx: TaskContext) -> None:
    """Record a run, damage this task's own record on its first run only, then return (the
    acknowledgement meets the damage), raise (the failure does) or end the process (recovery)."""
    R().rpush(runs, "corrupt")
    if R().set(f"{runs}:damaged", 1, nx=True):
        damage(R(), f"{prefix}:t:{ctx.task_id}", field, how)
        if then == "raise":
            raise RuntimeError("planned failure after damaging the record")
        if then == "die":
            os._exit(17)
