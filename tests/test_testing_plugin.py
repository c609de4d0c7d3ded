"""The pytest plugin coretask.testing, as a user's project meets it: pytester writes a small
test file that uses the fixtures and drain(), and runs pytest on it (in this process, or in a
subprocess where the entry point alone must load the plugin)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

pytest_plugins = ["pytester"]

# A user's test file: tasks defined beside the tests (the embedded worker imports them by
# reference, as a real worker would), a conftest-free use of the fixtures, drain() and eager mode.
USER_TESTS = '''
import pytest
from coretask import TaskContext
from coretask.testing import drain

SENT = []
SEEN_URLS = []


def send_receipt(order_id: int) -> str:
    SENT.append(order_id)
    return f"receipt {order_id}"


def place_order(processor, order_id: int) -> str:
    """The code under test: it enqueues a receipt and a batch with a continuation."""
    processor.enqueue_batch("default", "shop", lambda b: (
        [b.enqueue(send_receipt, order_id * 100 + i) for i in range(3)], b.continue_with(report)))
    return processor.enqueue_task("default", "shop", send_receipt, order_id, keep_result=60)


def report(ctx: TaskContext) -> None:
    SENT.append(f"report of {ctx.batch_id}")


def explode(order_id: int) -> None:
    raise ValueError(f"no order {order_id}")


def test_drain_runs_every_task_and_continuation(coretask_processor, coretask_server):
    SEEN_URLS.append(coretask_server.url)
    tid = place_order(coretask_processor, 7)
    assert SENT == []                              # nothing runs until drained
    drain(coretask_processor, timeout=30)
    assert sorted(x for x in SENT if isinstance(x, int)) == [7, 700, 701, 702]
    assert len([x for x in SENT if isinstance(x, str)]) == 1
    assert coretask_processor.get_result(tid) == "receipt 7"
    assert coretask_processor.get_queue("default").queued == 0


def test_drain_reraises_the_first_task_error(coretask_processor, coretask_server):
    SEEN_URLS.append(coretask_server.url)
    coretask_processor.enqueue_task("default", "shop", explode, 8, retries=2)
    with pytest.raises(ValueError, match="no order 8"):
        drain(coretask_processor, timeout=30)
    (dead,) = coretask_processor.get_dead_tasks("default")
    assert dead.attempt == 2


def test_each_processor_has_a_prefix_of_its_own(coretask_make_processor, coretask_server):
    a, b = coretask_make_processor(), coretask_make_processor(retries=5)
    assert a.options.prefix != b.options.prefix and b.options.retries == 5
    assert a.options.redis == coretask_server.url
    assert SEEN_URLS == [coretask_server.url] * 2  # one server for the whole session


def test_eager_processor_runs_at_enqueue(coretask_eager_processor):
    coretask_eager_processor.enqueue_task("default", "shop", send_receipt, 9)
    assert SENT[-1] == 9
    with pytest.raises(ValueError, match="no order 10"):
        coretask_eager_processor.enqueue_task("default", "shop", explode, 10)
'''


def test_a_user_test_file_uses_the_fixtures_drain_and_eager_mode(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_shop=USER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_a_drain_that_cannot_empty_the_queues_times_out_naming_what_is_left(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_paused='''
        import pytest
        from coretask.testing import drain

        def noop() -> None:
            pass

        def test_paused_queue(coretask_processor):
            coretask_processor.pause_queue("default")
            coretask_processor.enqueue_task("default", "t", noop)
            with pytest.raises(TimeoutError, match="1 queued"):
                drain(coretask_processor, timeout=0.5)
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_coretask_options_in_a_conftest_configure_every_processor(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('''
        import pytest

        @pytest.fixture
        def coretask_options():
            return {"queues": ["high", "default"], "retries": 1}

        @pytest.fixture
        def processor():            # a project's own fixture names do not collide with the plugin's
            return "the project's own"
    ''')
    pytester.makepyfile(test_conf='''
        def test_options(coretask_processor, coretask_eager_processor, processor):
            assert coretask_processor.options.queues == ["high", "default"]
            assert coretask_eager_processor.options.retries == 1 and coretask_eager_processor.eager
            assert processor == "the project's own"
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_entry_point_registers_the_plugin_in_a_plain_pytest_run(pytester: pytest.Pytester) -> None:
    # Given a project with no conftest.py and a test that uses no coretask fixture
    pytester.makepyfile(test_plain='''
        import sys

        def test_plugin_loaded_but_idle():
            assert "coretask.testing" in sys.modules
            assert not any(m in sys.modules for m in
                           ("coretask.processor", "coretask.embedded.servers", "coretask.gateway"))
    ''')
    # When pytest runs in a fresh interpreter, the plugin loaded by its entry point alone
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    fixtures = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    for name in ("coretask_server", "coretask_processor", "coretask_make_processor", "coretask_options",
                 "coretask_eager_processor"):
        assert name in fixtures.stdout.str()
    # and -p no:coretask turns it off
    off = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider", "-p", "no:coretask")
    assert "coretask_processor" not in off.stdout.str() and "tmp_path" in off.stdout.str()


def test_importing_the_plugin_imports_neither_redis_nor_the_library() -> None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, coretask.testing
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("coretask", "redis")))
    """)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["['coretask',", "'coretask.testing']"]
