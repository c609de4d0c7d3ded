"""Canary module of tests/test_security.py: importing it leaves a mark in Redis (the key named by
CORETASK_CANARY_KEY, default below), so a test can prove that a worker refused a task naming it
without importing it. Nothing but a positive-control subprocess ever imports it on purpose."""
from __future__ import annotations

import os

from tests.tasks import R

DEFAULT_KEY = "coretask-test-canary:imported"

R().incr(os.environ.get("CORETASK_CANARY_KEY", DEFAULT_KEY))


def ping(key: str) -> None:
    R().rpush(key, "canary ran")
