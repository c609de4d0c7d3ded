"""The runner's abort discipline under a storm of aborts, without Redis: whatever moment an
abort lands at (before the body, inside it, just after it returns, while the runner settles),
the body's outcome is reported once, TaskCanceled never escapes ``_body``, and nothing is left
pending for the next task. Python 3.13 may unwind the frame an abort lands in past that frame's
own handlers (coretask.worker.runner); this exercises the runner's frames on every version."""
from __future__ import annotations

import random
import sys
import threading
import time
from types import SimpleNamespace

from coretask.worker.ledger import Ledger
from coretask.worker.runner import Runner, _checkpoint


runner_current = SimpleNamespace(task=None)     # the task the runner thread is on, for the aborter


def short_body(ctx: SimpleNamespace) -> None:
    """A few microseconds of pure Python in a ``while condition:`` loop (the shape 3.13 mishandles)."""
    n = 0
    while n < ctx.steps:
        n += 1


def run_tasks(runner: Runner, tasks: list[SimpleNamespace], outcomes: list[object], escaped: list[BaseException]) -> None:
    for task in tasks:
        runner_current.task = task
        try:
            outcomes.append(call_body(runner, task))
        except BaseException as exc:       # TaskCanceled escaping _body: the bug this file guards
            escaped.append(exc)
    runner_current.task = None
    try:
        _checkpoint()                       # anything still pending would land here
    except BaseException as exc:
        escaped.append(exc)


def call_body(runner: Runner, task: SimpleNamespace) -> object:
    error = runner._body(task, None)        # type: ignore[arg-type]
    return "ok" if error is None else type(error).__name__


def test_every_outcome_is_reported_once_whenever_aborts_land():
    # Given a runner whose tasks run a short pure-Python body, and a thread aborting whatever
    # task it finds running, thousands of times at random moments
    runner = Runner(Ledger(1), SimpleNamespace(execute=short_body))  # type: ignore[arg-type]
    rnd = random.Random(3)
    tasks = [SimpleNamespace(id=f"t{i}", ctx=SimpleNamespace(steps=rnd.randint(0, 400)), abort_reason=None,
                             runner=None) for i in range(50000)]
    outcomes: list[object] = []
    escaped: list[BaseException] = []
    thread = threading.Thread(target=lambda: (setattr(runner, "thread_id", threading.get_ident()),
                                              run_tasks(runner, tasks, outcomes, escaped)))
    aborts = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)             # hand the GIL back and forth as often as CPython will
    try:
        thread.start()
        while thread.is_alive():
            task = runner_current.task
            if task is not None and runner.abort(task.id):
                aborts += 1
            if rnd.random() < 0.5:
                time.sleep(0)
    finally:
        sys.setswitchinterval(interval)

    # Then every task reported exactly one outcome, none of the aborts escaped the runner or
    # stayed pending, and the storm really did land inside bodies (usually some 1,500 aborts
    # here, half of them inside a body; how many land depends on how the OS schedules the two
    # threads: 94 in one CI run on a loaded machine, so the bound only says the path was taken)
    assert not escaped, escaped[:3]
    assert len(outcomes) == len(tasks)
    assert set(outcomes) <= {"ok", "TaskCanceled"}
    assert outcomes.count("TaskCanceled") > 20, (aborts, outcomes.count("TaskCanceled"))
    assert runner.current is None and not runner.raising
