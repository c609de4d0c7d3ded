"""The soak test of benchmarks/soak.py in its short form: ~5,000 tasks in well under a minute.

2 worker processes x 8 threads, random planned failures and retries (some delayed), random
batch cancellations, a worker process SIGKILLed every 2 s, a pause/resume in the middle; then an
exact reconciliation of every task, batch, tenant and queue counter (see benchmarks/soak.py).
The long form is run by hand: ``python -m benchmarks.soak --tasks 200000``.
"""
from __future__ import annotations

import pytest

from benchmarks.soak import SoakConfig, run_soak


def test_soak_5000_tasks_with_kills_failures_cancellations_and_a_pause(request: pytest.FixtureRequest, tmp_path):
    kind = request.config.getoption("--server")
    report = run_soak(SoakConfig(tasks=5000, seconds=15, processes=2, threads=8, kill_every=2.0, seed=7,
                                 server="redis7" if kind == "cluster" else kind, log_dir=str(tmp_path),
                                 quiet=True, drain_timeout=40))
    text = "\n".join(report.lines())
    assert report.ok, text
    assert report.paused_ok, text
    # every task is accounted for, and each kind of outcome and fault actually happened
    assert sum(report.outcomes.values()) == report.enqueued >= 5000, text
    assert set(report.outcomes) == {"succeeded", "dead", "canceled"}, text
    assert report.kills >= 4 and report.canceled_batches >= 1, text
    assert report.duration < 60, text
