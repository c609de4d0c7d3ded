"""Security (issue 7): signed payloads, refused targets, the allow-list, pickle without a key,
forged control messages, passwords kept out of every output, and tenant isolation of the
scoped view.

Tasks that must never run are written straight into Redis (the enqueue script called with the
fields an attacker would choose, or a stored task's fields changed) and must end in the dead
letter list as TaskRefused after one attempt, with their target's module never imported
(``tests.canary_refused`` marks every import of itself in Redis) and no command run (the
commands they carry would create files that must not exist)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import traceback
from datetime import timedelta
from typing import Any

import pytest

from coretask import (ConfigurationError, Options, ResultUnavailable, ScheduleData, TargetError, TaskData,
                      TaskProcessor, TaskRefused)
from coretask import targets as targets_module
from coretask.embedded.servers import RedisServer, find_server_binary, free_port
from coretask.signing import Signer, check_signing_keys
from coretask.targets import refusal
from coretask.tenancy import TenantView
from coretask.worker.process import WorkerProcess
from tests import tasks, tasks_batch, tasks_extra
from tests import tasks_security as ts
from tests.conftest import FAST, ROOT, ManagerProcess, wait_until
from tests.test_tenancy import dump, fail, fetch_as

KEY = "test-signing-key-0123456789abcdef"
OLD, NEW = "old-signing-key-0000000000000000", "new-signing-key-1111111111111111"
YEARLY = "0 0 1 1 *"             # never ticks during a test unless its tick is moved into the past
PW, WRONG = "s3cret-pw", "wr0ng-pw-42"
CANARY_KEY = "coretask-test-canary:imported"   # tests/canary_refused.py's DEFAULT_KEY (not imported here)


# ------------------------------------------------------------------------------- helpers

def inject(p: TaskProcessor, tenant: str, target: str, args: list[Any], *, queue: str = "default",
           tg: str | None = None, sg: str = "", payload: bytes | None = None, serializer: str = "json",
           retries: int = 3) -> str:
    """Write a task straight into Redis with the enqueue script, bypassing every check that
    enqueue_task makes: what someone who can write the coretask keys can do."""
    tid = os.urandom(8).hex()
    if payload is None:
        payload = json.dumps({"t": target, "a": args, "k": {}}).encode()
    p.gateway.enqueue(tid, queue, tenant, payload, serializer, tg or target, retries, 0, sg)
    return tid


def move(r: Any, p: TaskProcessor, tid: str, tenant: str, queue: str = "default") -> None:
    """Move a queued task's id to another (queue, tenant) list, as someone with write access could."""
    k = p.gateway.keys
    q, tn = (v.decode() for v in r.hmget(k.task(tid), "q", "tn"))
    assert r.lrem(k.ready(q, tn), 0, tid) == 1
    r.rpush(k.ready(queue, tenant), tid)
    if r.sadd(f"{k.prefix}:ringset:{queue}", tenant):
        r.rpush(k.ring(queue), tenant)
    r.sadd(f"{k.prefix}:qt:{queue}", tenant)
    r.sadd(k.queues, queue)
    r.hincrby(k.qstats(q), "ready", -1)
    r.hincrby(k.qstats(queue), "ready", 1)


def dead_by_id(p: TaskProcessor, queue: str = "default") -> dict[str, Any]:
    return {t.id: t for t in p.get_dead_tasks(queue, 0, 1000)}


def assert_refused(r: Any, p: TaskProcessor, dead: dict[str, Any], tid: str, *snippets: str) -> None:
    """Dead-lettered as TaskRefused after one attempt, retries untouched, with the reason."""
    t = dead[tid]
    assert t.error_type == "TaskRefused", (tid, t.error_type, t.error_message)
    for s in snippets:
        assert s in t.error_message, (tid, s, t.error_message)
    assert r.hget(p.gateway.keys.task(tid), "a") == b"1"       # one attempt: buried, not retried


def values(r: Any, key: str) -> list[str]:
    return [v.decode() for v in r.lrange(key, 0, -1)]


def stats_of(s: Any) -> tuple[Any, ...]:
    return (s.tenant, sum(s.queued.values()), s.running, s.done, s.failed, s.dead, sum(s.batches.values()))


def canary_imported(r: Any) -> bool:
    return "tests.canary_refused" in sys.modules or bool(r.exists(CANARY_KEY))


# -------------------------------------------------------------------- options and refusals

def test_signing_options_are_checked_and_keys_never_shown():
    # A key given as str, bytes, or a rotation list is kept as a tuple of bytes (first signs)
    assert Options(signing_key=KEY).signing_key == (KEY.encode(),)
    assert Options(signing_key=[NEW.encode(), OLD]).signing_key == (NEW.encode(), OLD.encode())
    o = Options(signing_key=[NEW, OLD], allowed_modules=["tests."])
    assert o.replace(retries=1).signing_key == o.signing_key and o.allowed_modules == ("tests.",)
    # and never appears in the options' repr
    assert NEW not in repr(o) and OLD not in repr(o) and "signing_key='***'" in repr(o)
    # Short, empty or mistyped keys, a bare string as allow-list, a non-bool flag: refused by name
    for bad, words in [(dict(signing_key="short"), ["signing_key", "at least 16"]),
                       (dict(signing_key=[]), ["signing_key"]), (dict(signing_key=[KEY, 5]), ["key 1"]),
                       (dict(allowed_modules="tests"), ["allowed_modules", "list"]),
                       (dict(allowed_modules=["a:b"]), ["allowed_modules"]),
                       (dict(allow_unsigned_pickle="yes"), ["allow_unsigned_pickle"])]:
        with pytest.raises(ConfigurationError) as info:
            Options(**bad)
        assert all(w in str(info.value) for w in words), (bad, str(info.value))


def test_signature_binds_every_field_and_rotation_verifies_with_any_key():
    enc = type("Enc", (), dict(payload=b'{"t":"m:f","a":[1],"k":{}}', serializer="json", target="m:f"))()
    old, both, new = Signer(check_signing_keys(OLD)), Signer(check_signing_keys([NEW, OLD])), Signer(check_signing_keys(NEW))
    fields = ("tid", "acme", "default", "json", "m:f", enc.payload)
    sig_old, sig_new = old.sign_task("tid", "acme", "default", enc), both.sign_task("tid", "acme", "default", enc)
    assert sig_old.startswith("t1:") and sig_new == new.sign_task("tid", "acme", "default", enc)   # first key signs
    both.verify(sig_old, *fields)                   # an old key still verifies
    both.verify(sig_new, *fields)
    new.verify(sig_new, *fields)
    with pytest.raises(TaskRefused, match="does not match"):
        new.verify(sig_old, *fields)                # a retired key no longer does
    # Each field is bound: changing any one of them breaks the signature
    for i in range(len(fields)):
        changed = list(fields)
        changed[i] = b'{"t":"m:f","a":[2],"k":{}}' if i == 5 else changed[i] + "x"
        with pytest.raises(TaskRefused, match="does not match"):
            both.verify(sig_new, *changed)
    # A schedule's signature names the schedule and holds for any run id of it
    sig_s = both.sign_schedule("nightly:1", "acme", "default", enc)
    assert sig_s.startswith("s1:") and sig_s.endswith(":nightly:1")
    both.verify(sig_s, "any-run-id", *fields[1:])
    with pytest.raises(TaskRefused, match="does not match"):
        both.verify(sig_s[:-1] + "2", "any-run-id", *fields[1:])     # another schedule's name
    for bad in ("", "t1", "t1:zz", "t1:" + "0" * 64 + ":other-id", "x9:" + "0" * 64):
        with pytest.raises(TaskRefused, match="unsigned|malformed|does not match"):
            both.verify(bad, *fields)


@pytest.mark.parametrize("prefixes, module, ok", [
    (("tests.",), "tests.tasks", True), (("tests.",), "tests", False), (("tests.tasks",), "tests.tasks", True),
    (("tests.tasks",), "tests.tasks.sub", True), (("tests.tasks",), "tests.tasks_extra", False),
    (("myapp", "tests.tasks"), "myapp.jobs", True), ((), "tests.tasks", False),
])
def test_allowed_module_prefixes_match_whole_module_names(prefixes, module, ok):
    assert (refusal(f"{module}:f", prefixes) is None) is ok


REFUSED_CALLABLES = [os.system, os.popen, os.execv, subprocess.run, subprocess.Popen, subprocess.check_output,
                     eval, exec, compile, __import__, pickle.loads, __import__("marshal").loads,
                     __import__("importlib").import_module, __import__("runpy").run_path, __import__("posix").system,
                     __import__("timeit").timeit, __import__("pty").spawn, __import__("webbrowser").open,
                     __import__("logging.config").config.dictConfig]


def test_refused_targets_are_refused_at_enqueue_and_nothing_is_written(make_processor, r, prefix):
    json_p = make_processor()
    dill_p = make_processor(serializer="dill", signing_key=KEY)
    for p in (json_p, dill_p):
        for fn in REFUSED_CALLABLES:
            with pytest.raises(TargetError) as info:
                p.enqueue_task("default", "acme", fn, "touch /tmp/never")
            assert "refused" in str(info.value) or "not a function" in str(info.value), (fn, str(info.value))
        with pytest.raises(TargetError, match="refused"):
            p.enqueue_batch("default", "acme", lambda b: (b.enqueue(tasks.record, "k", 1), b.enqueue(os.system, "x")))
        with pytest.raises(TargetError, match="refused"):
            p.upsert_schedule(ScheduleData("s", "acme", "default", None, YEARLY), subprocess.run, ["true"])
    # A function of a denied module is refused under the JSON serializer by its real module
    with pytest.raises(TargetError, match="posix:system is refused"):
        json_p.enqueue_task("default", "acme", ts.system, "x")
    assert list(r.scan_iter(match=prefix + "*")) == []


def test_unsigned_pickle_refuses_workers_and_enqueues_unless_allowed(make_processor, r, prefix):
    p = make_processor(serializer="dill")
    # A producer: reads work, enqueuing a call is refused with the reason
    assert p.get_queues() == []
    for enqueue in (lambda: p.enqueue_task("default", "acme", tasks.record, "k", 1),
                    lambda: p.enqueue_batch("default", "acme", lambda b: b.enqueue(tasks.record, "k", 1)),
                    lambda: p.upsert_schedule(ScheduleData("s", "acme", "default", None, YEARLY), tasks.record, "k")):
        with pytest.raises(ConfigurationError, match="without Options.signing_key.*run any code"):
            enqueue()
    p.enqueue_task("default", "acme", TaskData("topic", b"opaque bytes"))   # never unpickled: allowed
    # A worker refuses to start: embedded, WorkerProcess, and a user serializer alike
    with pytest.raises(ConfigurationError, match="refuses to start.*signing_key"):
        p.run(threading.Event())
    with pytest.raises(ConfigurationError, match="refuses to start"):
        WorkerProcess(p)
    custom = type("Custom", (), dict(name="custom", dumps=lambda self, c: b"", loads=lambda self, b: None))()
    with pytest.raises(ConfigurationError, match="'custom' without Options.signing_key"):
        WorkerProcess(make_processor(serializer=custom))
    # The manager too, before it starts any worker process: exit 2 with the reason
    env = dict(os.environ, CORETASK_TEST_PREFIX=prefix, CORETASK_TEST_OPTIONS=json.dumps({"serializer": "dill"}),
               PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "coretask.worker", "--app", "tests.app:processor"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "refuses to start" in res.stderr and "signing_key" in res.stderr and "allow_unsigned_pickle" in res.stderr
    # With a key, or allow_unsigned_pickle=True, it starts
    WorkerProcess(make_processor(serializer="dill", signing_key=KEY))
    WorkerProcess(make_processor(serializer="dill", allow_unsigned_pickle=True))
    make_processor(serializer="dill", allow_unsigned_pickle=True).enqueue_task("default", "acme", tasks.record, "k", 1)


# ---------------------------------------------------------------------------- signed work

def test_signed_tasks_run_on_every_path(make_processor, embedded_worker, r, prefix):
    out, flag = prefix + ":out", prefix + ":flag"

    def execute(ctx: Any) -> None:
        tasks.R().rpush(out, f"raw|{ctx.tenant}|{ctx.queue}")

    p = make_processor(signing_key=[NEW, OLD], queues=["high", "default", "low"], execute=execute)
    k = p.gateway.keys
    # Given signed work of every kind: a task, a delayed one, one retried once, one that is
    # dead-lettered and then retried from the dead letters, a batch task and its continuation,
    # a schedule (triggered, and ticking), a TaskData, and a dill lambda (another queue)
    ids = [p.enqueue_task("default", "acme", ts.note, out, "plain"),
           p.enqueue_task("default", "acme", ts.note, out, "delayed", delay_until=timedelta(seconds=0.3)),
           p.enqueue_task("default", "acme", ts.fail_first, out, "retried", retries=2),
           p.enqueue_task("default", "acme", TaskData("topic", b"data"))]
    r.set(flag, 1)
    dead_then_retried = p.enqueue_task("low", "acme", ts.fail_while, flag, out, "dead-retried", retries=0)
    with p.batch("default", "acme") as b:
        ids.append(b.enqueue(ts.note, out, "batch"))
        ids.append(b.continue_with(ts.note, out, "continuation", queue="high"))
    p.upsert_schedule(ScheduleData("sig-sched", "acme", "default", None, YEARLY), ts.note, out, "scheduled")
    pickled = make_processor(serializer="dill", signing_key=KEY, queues=["pickled"])
    ids.append(pickled.enqueue_task("pickled", "acme", lambda key: tasks.R().rpush(key, "lambda|acme|pickled"), out))
    # Then every one carries a signature, the schedule's naming the schedule
    for tid in ids + [dead_then_retried]:
        assert r.hget(k.task(tid), "sg").startswith(b"t1:"), tid
    assert r.hget(f"{prefix}:s:sig-sched", "sg").decode().endswith(":sig-sched")
    assert p.trigger_schedule("sig-sched") is not None
    run = p.get_schedule("sig-sched").last_task_id
    assert r.hget(k.task(run), "sg") == r.hget(f"{prefix}:s:sig-sched", "sg")   # the run carries it
    # When workers that verify signatures run them (and the schedule ticks)
    embedded_worker(p)
    embedded_worker(pickled)
    assert r.zadd(f"{prefix}:sdue", {"sig-sched": 1000}, xx=True) == 0           # due long ago: ticks now
    wait_until(lambda: p.get_queue("low").dead == 1, 10, "the failing task dead-lettered")
    assert p.get_dead_tasks("low")[0].error_type == "ValueError"
    r.delete(flag)
    assert p.retry_dead_tasks("low") == 1
    expected = sorted(["plain|acme|default", "delayed|acme|default", "retried|acme|default", "raw|acme|default",
                       "dead-retried|acme|low", "batch|acme|default", "continuation|acme|high",
                       "scheduled|acme|default", "scheduled|acme|default", "lambda|acme|pickled"])
    wait_until(lambda: sorted(values(r, out)) == expected, 15, "every signed task", interval=0.05)
    # Then all ran, and nothing was refused
    assert all(q.dead == 0 for q in p.get_queues())


def test_tampered_unsigned_or_rehomed_tasks_are_dead_lettered_unread(make_processor, embedded_worker, r, prefix,
                                                                    tmp_path):
    out = prefix + ":out"
    p = make_processor(signing_key=KEY, queues=["default", "low"])
    k = p.gateway.keys

    def task(value: str, tenant: str = "a") -> str:
        return p.enqueue_task("default", tenant, ts.note, out, value)

    # Given signed tasks of tenant a, and then, with no worker running, each changed in Redis
    control = task("control")
    cases: dict[str, tuple[str, ...]] = {}
    t = task("payload")                                        # other arguments, same target
    r.hset(k.task(t), "p", json.dumps({"t": "tests.tasks_security:note", "a": [out, "evil"], "k": {}}))
    cases[t] = ("does not match",)
    t = task("signature")                                      # one hex digit of the MAC changed
    sg = r.hget(k.task(t), "sg").decode()
    r.hset(k.task(t), "sg", sg[:-1] + ("0" if sg[-1] != "0" else "1"))
    cases[t] = ("does not match",)
    t = task("target")                                         # the target field changed
    r.hset(k.task(t), "tg", "tests.tasks_security:fail_first")
    cases[t] = ("does not match",)
    t = task("unsigned")                                       # the signature removed
    r.hdel(k.task(t), "sg")
    cases[t] = ("unsigned",)
    t = task("tenant-field")                                   # the hash's tenant changed only
    r.hset(k.task(t), "tn", "b")
    cases[t] = ("of tenant b was found in tenant a's queue",)
    t = task("moved")                                          # id moved to b's list (hash says a)
    move(r, p, t, "b")
    cases[t] = ("of tenant a was found in tenant b's queue",)
    t = task("rehomed")                                        # moved to b's list and the hash made b's
    move(r, p, t, "b")
    r.hset(k.task(t), "tn", "b")
    cases[t] = ("does not match", "tenant b")
    src = task("copied")                                       # copied into b under a new id
    f = {key.decode(): v for key, v in r.hgetall(k.task(src)).items()}
    r.delete(k.task(src))
    assert r.lrem(k.ready("default", "a"), 0, src) == 1
    r.hincrby(k.qstats("default"), "ready", -1)
    t = inject(p, "b", f["tg"].decode(), [], payload=f["p"], sg=f["sg"].decode())
    cases[t] = ("does not match",)
    t = task("other-queue")                                    # moved to another queue of a
    move(r, p, t, "a", queue="low")
    r.hset(k.task(t), "q", "low")
    cases[t] = ("does not match", "queue low")
    foreign = make_processor(signing_key="someone-elses-key-0123456789")
    t = foreign.enqueue_task("default", "a", ts.note, out, "foreign-key")   # signed, with an unknown key
    cases[t] = ("does not match",)
    # And pickles that would run a shell command when loaded, unsigned and under a stolen signature
    pwned = tmp_path / "pwned"
    evil = pickle.dumps(ts.Pwn(f"touch {pwned}"))
    pickled = make_processor(serializer="dill", signing_key=KEY, queues=["pickled"])
    pickled.enqueue_task("pickled", "a", lambda key: tasks.R().rpush(key, "lambda ran"), out)
    stolen = pickled.enqueue_task("pickled", "a", tasks.record, out, "never")
    r.hset(k.task(stolen), "p", evil)
    pcases = {inject(pickled, "a", "tests.tasks:record", [], queue="pickled", payload=evil, serializer="dill"):
              ("unsigned",), stolen: ("does not match",)}

    # When workers that verify signatures run
    embedded_worker(p)
    embedded_worker(pickled)
    wait_until(lambda: len(dead_by_id(p)) + len(dead_by_id(p, "low")) == len(cases)
               and len(dead_by_id(pickled, "pickled")) == 2 and r.llen(out) == 2, 15, "every refusal")
    # Then each changed task is dead-lettered unread with its reason, after one attempt
    dead = {**dead_by_id(p), **dead_by_id(p, "low")}
    for tid, snippets in cases.items():
        assert_refused(r, p, dead, tid, *snippets)
    dead = dead_by_id(pickled, "pickled")
    for tid, snippets in pcases.items():
        assert_refused(r, pickled, dead, tid, *snippets)
    # And none ran: only the untouched tasks did, and no pickle was loaded
    assert sorted(values(r, out)) == ["control|a|default", "lambda ran"]
    assert not pwned.exists()
    wait_until(lambda: r.hget(k.task(control), "st") is None, 10, "control acknowledged")  # done, deleted: not dead


def test_key_rotation_old_key_verifies_new_key_signs(make_processor, embedded_worker, r, prefix):
    out = prefix + ":out"
    old = make_processor(signing_key=OLD, queues=["default", "rotated"])
    rotating = make_processor(signing_key=[NEW, OLD])
    rotated = make_processor(signing_key=NEW, queues=["rotated"])
    k = old.gateway.keys
    # Given tasks and a schedule signed with the old key, and a task signed during the rotation
    by_old = old.enqueue_task("default", "acme", ts.note, out, "by-old")
    old.upsert_schedule(ScheduleData("rot", "acme", "default", None, YEARLY), ts.note, out, "sched-by-old")
    by_new = rotating.enqueue_task("default", "acme", ts.note, out, "by-new")
    assert r.hget(k.task(by_old), "sg") != r.hget(k.task(by_new), "sg")
    # When a worker holding [new, old] runs them
    embedded_worker(rotating)
    assert rotating.trigger_schedule("rot") is not None
    wait_until(lambda: len(values(r, out)) == 3, 10, "three runs")
    assert sorted(values(r, out)) == ["by-new|acme|default", "by-old|acme|default", "sched-by-old|acme|default"]
    # And, once the old key is retired, a worker holding only the new key runs new signatures
    # and refuses old ones
    late_old = old.enqueue_task("rotated", "acme", ts.note, out, "late-old")
    late_new = make_processor(signing_key=[NEW, OLD], queues=["rotated"]).enqueue_task("rotated", "acme", ts.note, out,
                                                                                      "late-new")
    embedded_worker(rotated)
    wait_until(lambda: rotated.get_queue("rotated").dead == 1 and len(values(r, out)) == 4, 10, "late tasks")
    assert_refused(r, rotated, dead_by_id(rotated, "rotated"), late_old, "does not match")
    assert "late-new|acme|rotated" in values(r, out)
    # (a done task's record goes with its acknowledgement, which may follow the run by a turn)
    wait_until(lambda: r.hget(k.task(late_new), "st") is None, 10, "late-new acknowledged")


# ---------------------------------------------------------------- refused targets at run time

def test_refused_targets_in_redis_are_dead_lettered_without_importing(make_processor, embedded_worker, r, prefix,
                                                                       tmp_path, monkeypatch):
    out = prefix + ":out"
    assert not canary_imported(r)
    # The deny-list is checked on the target string before any import: shown with the canary
    # module added to it for this test (importing the canary would mark Redis)
    monkeypatch.setattr(targets_module, "DENIED_MODULES", targets_module.DENIED_MODULES | {"tests.canary_refused"})
    p = make_processor()
    f = [tmp_path / f"ran-{i}" for i in range(9)]
    # Given tasks naming code-running targets, written straight into Redis (no signing here:
    # the deny-list holds on its own)
    cases = {
        inject(p, "acme", "posix:system", [f"touch {f[0]}"]): "module posix",
        inject(p, "acme", "os:system", [f"touch {f[1]}"]): "module os",
        inject(p, "acme", "subprocess:run", [["touch", str(f[2])]]): "module subprocess",
        inject(p, "acme", "subprocess:Popen", [["touch", str(f[3])]]): "module subprocess",
        inject(p, "acme", "builtins:exec", [f"open({str(f[4])!r}, 'w').close()"]): "module builtins",
        inject(p, "acme", "builtins:eval", [f"open({str(f[5])!r}, 'w')"]): "module builtins",
        inject(p, "acme", "pickle:loads", ["x"]): "module pickle",
        # plain data that makes a call: dictConfig instantiates what "()" names
        inject(p, "acme", "logging.config:dictConfig", [{"version": 1, "handlers": {"h": {
            "()": "subprocess.call", "args": ["touch", str(f[8])]}}}]): "module logging.config",
        # an allowed module re-exporting os.system, reached by its real module
        inject(p, "acme", "tests.tasks_security:system", [f"touch {f[6]}"]): "in module posix",
        # reaching through a module attribute, or a dunder, of an allowed module
        inject(p, "acme", "tests.tasks:os.system", [f"touch {f[7]}"]): "os is a module",
        inject(p, "acme", "tests.tasks:record.__globals__", []): "dunder",
        # a built-in method of a module global (no module defines it: neither list can judge it)
        inject(p, "acme", "tests.tasks_security:SETTINGS.update", [{"webhook": "https://attacker.invalid/"}]):
            "built-in method of a dict object",
        # a harmless target field over a payload naming a refused one
        inject(p, "acme", "posix:system", [f"touch {f[0]}"], tg="tests.tasks:record"): "module posix",
        # the canary, on the deny-list for this test
        inject(p, "acme", "tests.canary_refused:ping", [out]): "module tests.canary_refused",
        inject(p, "acme", "tests.canary_refused:ping", [out], tg="tests.tasks:record"): "tests.canary_refused",
    }
    control = inject(p, "acme", "tests.tasks:record", [out, "control"])
    # When a worker runs them
    embedded_worker(p)
    wait_until(lambda: p.get_queue("default").dead == len(cases) and r.llen(out) == 1, 15, "every refusal")
    # Then each is dead-lettered as refused after one attempt, nothing ran, nothing was imported
    dead = dead_by_id(p)
    for tid, why in cases.items():
        assert_refused(r, p, dead, tid, "refused", why)
    assert values(r, out) == ["control"] and control not in dead
    assert not any(x.exists() for x in f)
    assert not canary_imported(r)
    assert ts.SETTINGS == {"webhook": "https://example.invalid/hook"}


def test_allowed_modules_bound_what_is_enqueued_and_imported(make_processor, embedded_worker, r, prefix):
    out = prefix + ":out"
    assert not canary_imported(r)
    p = make_processor(allowed_modules=["tests.tasks", "tests.tasks_security"])
    # Enqueue: a module on the list (or below it) goes in, any other is refused, nothing written
    ok = p.enqueue_task("default", "acme", ts.note, out, "allowed")
    for fn in (tasks_batch.record_ctx, tasks_extra.record_json, json.dumps):
        with pytest.raises(TargetError, match="not in Options.allowed_modules"):
            p.enqueue_task("default", "acme", fn, out)
    # Run time: tasks written straight into Redis naming a module outside the list are
    # dead-lettered without importing it (the canary would mark Redis), whatever the target field says
    cases = [inject(p, "acme", "tests.canary_refused:ping", [out]),
             inject(p, "acme", "tests.canary_refused:ping", [out], tg="tests.tasks:record"),
             inject(p, "acme", "tests.tasks_extra:record_json", [out])]
    embedded_worker(p)
    wait_until(lambda: p.get_queue("default").dead == 3 and r.llen(out) == 1, 10, "refusals and the allowed task")
    dead = dead_by_id(p)
    for tid in cases:
        assert_refused(r, p, dead, tid, "is refused", "not in Options.allowed_modules")
    assert values(r, out) == ["allowed|acme|default"] and ok not in dead
    assert not canary_imported(r)


@pytest.mark.parametrize("allow_list", [True, False])
def test_reexported_callables_are_refused_by_the_module_they_live_in(make_processor, embedded_worker, r, prefix,
                                                                     tmp_path, allow_list):
    # Given tasks written straight into Redis naming callables that an allowed module only
    # imported: shutil.rmtree (over a directory that must survive) and another module's task
    out = prefix + ":out"
    victim = tmp_path / "victim"
    victim.mkdir()
    p = make_processor(allowed_modules=["tests.tasks", "tests.tasks_security"] if allow_list else None)
    rm = inject(p, "acme", "tests.tasks_security:rmtree", [str(victim)])
    alias = inject(p, "acme", "tests.tasks_security:reexported_record", [out, "via alias"])
    control = inject(p, "acme", "tests.tasks:record", [out, "control"])
    # When a worker runs them
    embedded_worker(p)
    wait_until(lambda: p.get_queue("default").dead == 2 and r.llen(out) == 1, 10, "two refusals and the control")
    # Then both are dead-lettered as refused, naming the module the callable lives in, and
    # nothing of theirs ran
    dead = dead_by_id(p)
    why = "not in Options.allowed_modules" if allow_list else "only re-exported by tests.tasks_security"
    assert_refused(r, p, dead, rm, "is refused", "shutil")
    assert_refused(r, p, dead, rm, "is refused", why)
    assert_refused(r, p, dead, alias, "is refused", "tests.tasks_extra")
    assert victim.is_dir() and values(r, out) == ["control"] and control not in dead


def test_canary_marks_its_import(r, tmp_path):
    """Positive control for the tests above: importing the canary does mark Redis."""
    key = "coretask-test-canary:control:" + tmp_path.name
    env = dict(os.environ, CORETASK_CANARY_KEY=key, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", "import tests.canary_refused"], cwd=ROOT, env=env, check=True, timeout=60)
    assert r.get(key) == b"1"
    r.delete(key)


# ----------------------------------------------------------------------------- control plane

def test_forged_pause_and_resume_messages_change_nothing(make_processor, r, prefix):
    out = prefix + ":out"
    p = make_processor()
    w = WorkerProcess(p, renew_own_leases=True)
    handled: list[str] = []
    fetches: list[tuple[int, int]] = []    # (messages handled before the fetch, paused flag of its reply)
    handle, run_many = w.control.handle, p.gateway.transport.run_many

    def recording_handle(message: str, channel: str = "") -> None:
        handle(message, channel)
        handled.append(message)

    def recording_run_many(calls: Any) -> Any:
        before = len(handled)
        results = run_many(calls)
        if calls and calls[-1][0] == "fetch":
            fetches.append((before, int(results[-1][0])))
        return results

    w.control.handle = recording_handle           # type: ignore[method-assign]
    p.gateway.transport.run_many = recording_run_many         # type: ignore[method-assign]
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(w.control.subscribed.is_set, 10, "the worker subscribed")
        # When "p" is published without pausing: the worker keeps fetching and runs new work
        assert r.publish(f"{prefix}:ev", "p") >= 1
        wait_until(lambda: "p" in handled, 10, "the forged pause handled")
        p.enqueue_task("default", "acme", tasks.record, out, "after forged p")
        wait_until(lambda: values(r, out) == ["after forged p"], 10, "the task ran")
        assert all(paused == 0 for _, paused in fetches)
        # When the processor is paused and "r" is published without resuming
        p.pause()
        p.enqueue_task("default", "acme", tasks.record, out, "while paused")
        n = len(handled)
        assert r.publish(f"{prefix}:ev", "r") >= 1
        wait_until(lambda: "r" in handled[n:], 10, "the forged resume handled")
        mark = len(handled)
        # Then the worker, having looked again since, still sees the pause and takes nothing
        wait_until(lambda: sum(1 for before, _ in fetches if before >= mark) >= 2, 10, "two fetches after it")
        assert all(paused == 1 for before, paused in fetches if before >= mark)
        assert values(r, out) == ["after forged p"] and p.get_queue("default").queued == 1
        # And a real resume runs the task
        p.resume()
        wait_until(lambda: len(values(r, out)) == 2, 10, "the task ran after the real resume")
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive()


# ----------------------------------------------------------------------------- passwords

def test_redis_password_never_appears_in_logs_output_or_errors(r, prefix, tmp_path, caplog):
    srv = RedisServer(binary=find_server_binary("redis7"), extra_args=["--requirepass", PW]).start()
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    started: list[ManagerProcess] = []
    good = f"redis://:{PW}@127.0.0.1:{srv.port}/0"
    bad = f"redis://:{WRONG}@127.0.0.1:{srv.port}/0"
    unreachable = f"redis://:{PW}@127.0.0.1:{free_port()}/0"
    admin = srv.client()

    def env(url: str) -> dict[str, str]:
        return dict(os.environ, CORETASK_TEST_URL=url, CORETASK_TEST_CLUSTER="", CORETASK_TEST_PREFIX=prefix,
                    CORETASK_TEST_OPTIONS=json.dumps(FAST), PYTHONPATH=str(ROOT))

    def manager(url: str) -> ManagerProcess:
        log_path = tmp_path / f"manager-{len(started)}.log"
        with open(log_path, "wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "coretask.worker", "--app", "tests.app:processor",
                                     "--processes", "1", "--threads", "2", "--log-level", "DEBUG"], cwd=ROOT,
                                    env=env(url), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(ManagerProcess(proc, log_path))
        return started[-1]

    def cli(url: str, *args: str) -> None:
        res = subprocess.run([sys.executable, "-m", "coretask", "--app", "tests.app:processor", *args], cwd=ROOT,
                             env=env(url), capture_output=True, text=True, timeout=60, check=False)
        seen.extend([res.stdout, res.stderr])

    def failure(fn: Any) -> None:
        with pytest.raises(Exception) as info:
            fn()
        seen.extend([str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))])

    try:
        # A worker manager at DEBUG level, with the right password: runs a task, then stops
        out = prefix + ":out"
        m = manager(good)
        p = TaskProcessor(Options(redis=good, prefix=prefix, **FAST))
        seen += [repr(p.options), repr(p.gateway.transport.redis), p.gateway.url]
        p.enqueue_task("default", "acme", tasks.record, out, "ran")
        wait_until(lambda: admin.llen(out) == 1, 30, "the manager's worker ran the task")
        assert m.terminate() == 0
        # An embedded worker at DEBUG level, with the right and then a wrong password (its task
        # records on the suite's server, through tests.tasks' own client)
        p.enqueue_task("default", "acme", tasks.record, out, "embedded")
        for url, done in ((good, lambda: r.llen(out) == 1 and "done in" in caplog.text),
                          (bad, lambda: "Redis call failed" in caplog.text)):
            q = TaskProcessor(Options(redis=url, prefix=prefix, **FAST))
            stop = threading.Event()
            thread = threading.Thread(target=q.run, args=(stop,), daemon=True)
            thread.start()
            wait_until(done, 15, f"the embedded worker on {url.split('@')[1]}")
            stop.set()
            thread.join(15)
            q.close()
        # A manager with a wrong password ends at start with the reason (no retry mends it), exit 2
        m = manager(bad)
        assert m.proc.wait(30) == 2
        assert "refused this client's credentials" in m.log() and "user name or password" in m.log()
        # The admin CLI: right password, wrong password, unreachable server
        for url in (good, bad, unreachable):
            cli(url, "status")
            cli(url, "--json", "status")
        # Errors raised in the caller's process
        failure(lambda: TaskProcessor(Options(redis=bad, prefix=prefix)).enqueue_task("default", "acme", tasks.record, "k"))
        failure(lambda: TaskProcessor(Options(redis=unreachable, prefix=prefix)).get_queues())
        failure(lambda: Options(redis=good.replace("redis://", "http://")))
        p.close()
    finally:
        for m in started:
            m.kill_all()
        srv.stop()
    seen += [m.log() for m in started] + [caplog.text]
    # Then the workers, the CLI and the errors said something, and no password anywhere
    assert "task" in seen[-1] and all(m.log() for m in started)
    assert any("AuthenticationError" in s or "invalid username-password" in s for s in seen)
    for text in seen:
        assert PW not in text and WRONG not in text, text[:2000]


# ------------------------------------------------------------------------ tenant isolation

def test_tenant_view_reaches_nothing_of_another_tenant(make_processor, r, prefix):
    p = make_processor(queues=["default", "low"])
    out = prefix + ":out"
    a, b = p.tenant("a"), p.tenant("b")
    # Given tenant b's batch (a delayed task and a continuation), schedule, queued task and dead letter
    bb = b.enqueue_batch("default", lambda x: (x.enqueue(tasks.record, out, "b-batch", delay_until=timedelta(hours=1)),
                                              x.continue_with(tasks.record, out, "b-cont")))
    assert b.upsert_schedule(ScheduleData("b-sched", "", "default", None, YEARLY), tasks.record, out, "b-sched")
    b_task = b.enqueue_task("default", tasks.record, out, "b-queued")
    b.enqueue_task("low", tasks.always_fail, retries=0)
    (leased,) = fetch_as(p, "w", 1, queues=["low"])
    assert fail(p, "w", leased) == 2
    b_before = (b.get_stats(), b.get_batches(), b.get_schedules(), b.get_tasks_in_queue("default"),
                b.get_dead_tasks("low"))
    before = dump(r, prefix)

    def raises(fn: Any, match: str) -> bool:
        with pytest.raises(ConfigurationError, match=match):
            fn()
        return True

    def raises_unavailable(fn: Any) -> bool:
        with pytest.raises(ResultUnavailable, match="unknown"):
            fn()
        return True

    # When every public call of a's view is pointed at b's things
    probes: dict[str, Any] = {
        "get_batch": lambda: a.get_batch(bb) is None,
        "append_batch": lambda: a.append_batch("default", bb, lambda x: x.enqueue(tasks.record, out, "x")) is False,
        "cancel_batch": lambda: a.cancel_batch(bb) is False,
        "wait_for_batch": lambda: raises(lambda: a.wait_for_batch(bb, timeout=0.1), "not a batch of tenant 'a'"),
        "get_batches": lambda: a.get_batches() == [] and a.get_batches_count() == 0,
        "get_batches_count": lambda: a.get_batches_count() == 0,
        "get_schedule": lambda: a.get_schedule("b-sched") is None,
        "trigger_schedule": lambda: a.trigger_schedule("b-sched") is None,
        "cancel_schedule": lambda: a.cancel_schedule("b-sched") is False,
        "pause_schedule": lambda: a.pause_schedule("b-sched") is False,
        "resume_schedule": lambda: a.resume_schedule("b-sched") is False,
        "upsert_schedule": lambda: (
            raises(lambda: a.upsert_schedule(ScheduleData("b-sched", "", "default", None, YEARLY), tasks.record, out),
                   "another tenant")
            and raises(lambda: a.upsert_schedule(ScheduleData("new", "b", "default", None, YEARLY), tasks.record, out),
                       "names tenant 'b'")),
        "get_schedules": lambda: a.get_schedules() == [],
        "get_schedules_count": lambda: a.get_schedules_count() == 0,
        "get_tasks_in_queue": lambda: a.get_tasks_in_queue("default") == [] == a.get_tasks_in_queue("low"),
        "get_task": lambda: a.get_task(b_task) is None and a.get_task(leased["id"]) is None,
        "get_result": lambda: (raises_unavailable(lambda: a.get_result(b_task))
                               and raises_unavailable(lambda: a.get_result(leased["id"], wait=0.1))),
        "get_batch_results": lambda: raises_unavailable(lambda: a.get_batch_results(bb)),
        "get_batch_continuations": lambda: a.get_batch_continuations(bb) == [] != b.get_batch_continuations(bb),
        "get_batch_tasks": lambda: a.get_batch_tasks(bb) == [] != b.get_batch_tasks(bb),
        "get_delayed_tasks": lambda: a.get_delayed_tasks() == [] != b.get_delayed_tasks(),
        "get_running_tasks": lambda: a.get_running_tasks() == [] == a.get_running_tasks(queue="low"),
        "cancel_task": lambda: a.cancel_task(b_task) is False,
        "delete_task": lambda: a.delete_task(b_task) is False and a.delete_task(leased["id"]) is False,
        "retry_dead_task": lambda: a.retry_dead_task(leased["id"]) is False,
        "discard_dead_task": lambda: a.discard_dead_task(leased["id"]) is False,
        "retry_dead_tasks": lambda: a.retry_dead_tasks("low") == 0 == a.retry_dead_tasks("default"),
        "discard_dead_tasks": lambda: a.discard_dead_tasks("low") == 0 == a.discard_dead_tasks("default"),
        "get_dead_tasks": lambda: a.get_dead_tasks("low") == [] == a.get_dead_tasks("default"),
        "get_stats": lambda: stats_of(a.get_stats()) == ("a", 0, 0, 0, 0, 0, 0),
        "is_paused": lambda: a.is_paused is False,
        "pause": lambda: (a.pause(), b.is_paused is False and a.is_paused is True)[1],
        "resume": lambda: (a.resume(), b.is_paused is False and a.is_paused is False)[1],
    }
    creating = {"enqueue_task", "enqueue_batch", "batch"}    # they can only create a's own work
    public = {n for n in dir(TenantView) if not n.startswith("_")}
    assert public == set(probes) | creating, public ^ (set(probes) | creating)
    for name, probe in probes.items():
        assert probe() is True, name
    # Then nothing changed at all
    assert dump(r, prefix) == before
    # And what a's view creates is a's, and b's view of its own things is unchanged
    mine = [a.enqueue_task("default", tasks.record, out, "a-task"),
            a.enqueue_batch("default", lambda x: x.enqueue(tasks.record, out, "a-batch", delay_until=timedelta(hours=1)))]
    with a.batch("default") as x:
        x.enqueue(tasks.record, out, "a-batch2", delay_until=timedelta(hours=1))
    assert p.get_task(mine[0]).tenant == "a" and {y.tenant for y in a.get_batches()} == {"a"}
    assert [t.id for t in a.get_tasks_in_queue("default")] == [mine[0]] and a.get_batches_count() == 2
    assert (b.get_stats(), b.get_batches(), b.get_schedules(), b.get_tasks_in_queue("default"),
            b.get_dead_tasks("low")) == b_before
    assert [t.id for t in b.get_tasks_in_queue("default")] == [b_task]
