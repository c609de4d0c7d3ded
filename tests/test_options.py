"""Options: validation when built (and when replaced), durations, construction forms of
TaskProcessor, and password redaction. No worker; only the processor tests touch the server."""
from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from coretask import ConfigurationError, CoreTaskError, Options, TaskProcessor, UnknownOption
from coretask.options import redact_url
from tests import tasks

# (option values, words the message must contain: the option's name and what is allowed)
BAD = [
    pytest.param(dict(processes=0), ["Options.processes", "integer >= 1", "0"], id="processes=0"),
    pytest.param(dict(max_workers=-1), ["Options.max_workers", "integer >= 1", "-1"], id="max_workers=-1"),
    pytest.param(dict(retries="3"), ["Options.retries", "integer >= 0", "'3'"], id="retries='3'"),
    pytest.param(dict(retries=True), ["Options.retries", "integer >= 0"], id="retries=True"),
    pytest.param(dict(retries=-1), ["Options.retries", "integer >= 0"], id="retries=-1"),
    pytest.param(dict(max_payload_bytes=10), ["Options.max_payload_bytes", "integer >= 64"], id="max_payload_bytes"),
    pytest.param(dict(tenant_concurrency=0), ["Options.tenant_concurrency", "integer >= 1"], id="tenant_concurrency"),
    pytest.param(dict(invisibility=-1), ["Options.invisibility", "positive timedelta or number of seconds", "got -1"],
                 id="invisibility=-1"),
    pytest.param(dict(invisibility=0), ["Options.invisibility", "positive"], id="invisibility=0"),
    pytest.param(dict(invisibility=timedelta(seconds=-5)), ["Options.invisibility", "positive"], id="invisibility=-5s"),
    pytest.param(dict(base_frequency="5"), ["Options.base_frequency", "timedelta or number of seconds"],
                 id="base_frequency='5'"),
    pytest.param(dict(retention=True), ["Options.retention", "timedelta or number of seconds"], id="retention=True"),
    pytest.param(dict(invisibility=float("nan")), ["Options.invisibility", "positive"], id="invisibility=nan"),
    pytest.param(dict(invisibility=float("inf")), ["Options.invisibility", "positive"], id="invisibility=inf"),
    pytest.param(dict(cleanup_frequency=1e30), ["Options.cleanup_frequency", "positive"], id="cleanup=1e30"),
    pytest.param(dict(queues=[]), ["Options.queues", "non-empty list of queue names"], id="queues=[]"),
    pytest.param(dict(queues="default"), ["Options.queues", "non-empty list of queue names"], id="queues=str"),
    pytest.param(dict(queues=["ok", "bad name"]), ["Options.queues", "'bad name'", "letters, digits"],
                 id="queues=bad-name"),
    pytest.param(dict(queues=["a:b"]), ["Options.queues", "'a:b'", "letters, digits"], id="queues=colon"),
    pytest.param(dict(queues=["x" * 101]), ["Options.queues", "1-100 characters"], id="queues=too-long"),
    pytest.param(dict(queues=["high", "low", "high"]), ["Options.queues", "twice", "'high'"], id="queues=duplicate"),
    pytest.param(dict(serializer="pickle"), ["Options.serializer", "json", "dill", "'pickle'"], id="serializer=pickle"),
    pytest.param(dict(strict_queues="yes"), ["Options.strict_queues", "True or False", "'yes'"], id="strict_queues"),
    # a truthy string must not switch an option on (cluster="false" would connect as a cluster)
    *[pytest.param({name: "false"}, [f"Options.{name}", "True or False", "'false'"], id=f"{name}='false'")
      for name in ("cluster", "deadletter", "deadletter_schedules", "use_cron_seconds", "sched_batch",
                   "allow_unsigned_pickle", "eager", "eager_propagate")],
    pytest.param(dict(serializer=object()), ["Options.serializer", "name", "dumps", "loads"], id="serializer=object"),
    pytest.param(dict(redis="http://x"), ["Options.redis", "redis://", "rediss://", "unix://", "http://x"],
                 id="redis=http"),
    pytest.param(dict(redis=None), ["Options.redis", "redis://"], id="redis=None"),
    pytest.param(dict(cluster=True, prefix="coretask"), ["Options.prefix", "hash tag", "cluster=True", "{coretask}"],
                 id="cluster-without-hash-tag"),
    pytest.param(dict(prefix=""), ["Options.prefix", "non-empty"], id="prefix=empty"),
    pytest.param(dict(prefix="a b"), ["Options.prefix", "without spaces"], id="prefix=space"),
    pytest.param(dict(on_task_error=42), ["Options.on_task_error", "callable"], id="on_task_error=42"),
    pytest.param(dict(on_task_failed_delay="later"), ["Options.on_task_failed_delay", "callable"],
                 id="on_task_failed_delay=str"),
    pytest.param(dict(on_batch_end=[]), ["Options.on_batch_end", "callable"], id="on_batch_end=list"),
    pytest.param(dict(execute=1), ["Options.execute", "callable"], id="execute=1"),
    pytest.param(dict(resolver="Service"), ["Options.resolver", "callable"], id="resolver=str"),
    pytest.param(dict(resolver=None), ["Options.resolver", "callable"], id="resolver=None"),
]


@pytest.mark.parametrize("kw,words", BAD)
def test_bad_option_raises_configuration_error_naming_option_and_allowed_values(kw, words):
    with pytest.raises(ConfigurationError) as info:
        Options(**kw)
    # one hierarchy, and the built-in type plain Python would raise
    assert isinstance(info.value, CoreTaskError)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


def test_cluster_accepts_a_prefix_with_a_hash_tag():
    assert Options(cluster=True, prefix="app:{jobs}").prefix == "app:{jobs}"
    with pytest.raises(ConfigurationError):
        Options(cluster=True, prefix="app:{}")     # an empty tag is no tag


def test_durations_accept_seconds_and_timedelta():
    o = Options(invisibility=2, base_frequency=0.25, retention=timedelta(hours=2),
                shutdown_timeout=timedelta(milliseconds=1500))
    assert o.invisibility == timedelta(seconds=2)
    assert o.base_frequency == timedelta(milliseconds=250)
    assert o.retention == timedelta(hours=2)
    assert o.shutdown_timeout == timedelta(seconds=1.5)
    for name in ("invisibility", "base_frequency", "pushback_frequency", "cleanup_frequency", "retention",
                 "shutdown_timeout", "cancel_grace"):
        assert isinstance(getattr(o, name), timedelta), name


def test_defaults_and_queue_list_copy():
    queues = ("high", "default")
    o = Options(queues=queues)              # any sequence of names; stored as a list of its own
    assert o.queues == ["high", "default"]
    assert isinstance(o.queues, list)
    d = Options()
    assert (d.queues, d.processes, d.max_workers, d.retries) == (["default"], 1, 4, 3)
    assert d.invisibility == timedelta(minutes=5)
    assert d.prefix == "{coretask}"
    assert d.serializer == "json"
    assert callable(d.resolver)


def test_custom_serializer_object_is_accepted():
    class Mine:
        name = "mine"

        def dumps(self, call):
            return b""

        def loads(self, payload):
            return None

    s = Mine()
    assert Options(serializer=s).serializer is s


def test_replace_validates_again_and_keeps_the_original():
    o = Options(processes=2, invisibility=10)
    r = o.replace(max_workers=8, invisibility=timedelta(seconds=3))
    assert (r.processes, r.max_workers, r.invisibility) == (2, 8, timedelta(seconds=3))
    assert (o.max_workers, o.invisibility) == (4, timedelta(seconds=10))   # the original is unchanged
    with pytest.raises(ConfigurationError, match="Options.processes"):
        o.replace(processes=0)
    with pytest.raises(ConfigurationError, match="Options.queues"):
        o.replace(queues=["a", "a"])
    with pytest.raises(ConfigurationError, match="Options.serializer"):
        o.replace(serializer="pickle")
    with pytest.raises(TypeError):
        o.replace(no_such_option=1)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="no_such_option"):
        Options(no_such_option=1)


def test_a_misspelt_option_names_the_option_meant():
    # When an option is misspelt, in Options, in replace() or in TaskProcessor's keywords
    for make in (lambda: Options(retrys=3), lambda: Options().replace(retrys=3),
                 lambda: TaskProcessor(redis="redis://127.0.0.1:1/0", retrys=3)):
        with pytest.raises(UnknownOption) as info:
            make()
        # Then the error says which one was meant, and is a ConfigurationError and a TypeError
        assert str(info.value) == "unknown option 'retrys'; did you mean 'retries'?"
        assert isinstance(info.value, ConfigurationError) and isinstance(info.value, TypeError)
    with pytest.raises(UnknownOption, match="unknown option 'queue'; did you mean 'queues'?"):
        Options(queue=["high"])
    # And a name like no option lists them all
    with pytest.raises(UnknownOption, match="unknown option 'flavour'; the options are: .*retries.*strict_queues"):
        Options(flavour="blue")
    with pytest.raises(UnknownOption, match="'retrys'; did you mean 'retries'.*'prefx'; did you mean 'prefix'"):
        Options(retrys=3, prefx="{x}")


def test_task_processor_from_options_or_keywords(server, prefix, r):
    # Given the same configuration as an Options object and as keywords
    a = TaskProcessor(Options(redis=server.url, cluster=server.cluster, prefix=prefix, queues=["q1", "q2"],
                              retries=7))
    b = TaskProcessor(redis=server.url, cluster=server.cluster, prefix=prefix, queues=["q1", "q2"], retries=7)
    try:
        # Then both carry the same validated options
        assert a.options == b.options
        assert b.options.queues == ["q1", "q2"] and b.options.retries == 7
        # And both talk to the server under the same prefix: one enqueues, the other sees it
        tid = a.enqueue_task("q1", "acme", tasks.record, prefix + ":out", 1)
        assert [t.id for t in b.get_tasks_in_queue("q1")] == [tid]
        assert b.get_task(tid).retries_left == 7
    finally:
        a.close()
        b.close()


def test_task_processor_keywords_are_validated():
    with pytest.raises(ConfigurationError, match="Options.processes"):
        TaskProcessor(processes=0)
    with pytest.raises(ConfigurationError, match="Options.redis"):
        TaskProcessor(redis="http://localhost")


def test_a_name_used_elsewhere_for_an_option_names_the_option():
    # the worker's --threads and Flask's CORETASK_THREADS are Options.max_workers here
    with pytest.raises(UnknownOption, match="unknown option 'threads'; the option is 'max_workers'"):
        Options(threads=8)
    with pytest.raises(UnknownOption, match="unknown option 'max_retries'; the option is 'retries'"):
        TaskProcessor(max_retries=3)


def test_task_processor_refuses_what_is_not_options():
    with pytest.raises(ConfigurationError, match=r"takes an Options object, got dict: use TaskProcessor\(\*\*options\)"):
        TaskProcessor({"redis": "redis://127.0.0.1:1/0"})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="takes an Options object, got str"):
        TaskProcessor("redis://127.0.0.1:1/0")  # type: ignore[arg-type]


def test_cluster_true_on_a_single_server_says_so(own_server):
    single = own_server()
    with pytest.raises(ConfigurationError, match=r"Options.cluster is True, but the server at .* is not a Redis "
                                                 r"Cluster node .*set cluster=False"):
        TaskProcessor(redis=single.url, cluster=True)


def test_task_processor_refuses_options_and_keywords_together():
    with pytest.raises(ConfigurationError, match="either an Options object or keyword options"):
        TaskProcessor(Options(), retries=2)


@pytest.mark.parametrize("url,secret,expected", [
    ("redis://user:s3cret@host:6379/0", "s3cret", "redis://user:***@host:6379/0"),
    ("redis://:s3cret@host:6379", "s3cret", "redis://:***@host:6379"),
    ("rediss://default:p%40ss%3Aw0rd@cache.example.com:6380/2", "p%40ss",
     "rediss://default:***@cache.example.com:6380/2"),
    ("unix://user:s3cret@/tmp/redis.sock?db=1", "s3cret", "unix://user:***@/tmp/redis.sock?db=1"),
    ("redis://host:6379/0?password=s3cret&db=1", "s3cret", "redis://host:6379/0?password=***&db=1"),
])
def test_redact_url_hides_passwords(url, secret, expected):
    assert redact_url(url) == expected
    assert secret not in redact_url(url)


def test_redact_url_keeps_urls_without_password():
    for url in ("redis://localhost:6379/0", "redis://user@host:1/0", "unix:///tmp/r.sock"):
        assert redact_url(url) == url


def test_passwords_never_appear_in_errors_or_reprs():
    with pytest.raises(ConfigurationError) as info:
        Options(redis="http://admin:hunter2@example.com")
    assert "hunter2" not in str(info.value)
    assert "admin:***@example.com" in str(info.value)
    o = Options(redis="redis://admin:hunter2@example.com:6379/0")
    assert o.redis == "redis://admin:hunter2@example.com:6379/0"   # the value itself is intact
    assert "hunter2" not in repr(o)
    assert "admin:***@example.com" in repr(o)


def test_options_is_a_keyword_only_dataclass():
    with pytest.raises(TypeError):
        Options("redis://localhost:6379/0")  # type: ignore[misc]
    names = {f.name for f in dataclasses.fields(Options)}
    assert {"redis", "queues", "processes", "max_workers", "retries", "invisibility", "serializer"} <= names


@pytest.mark.parametrize("tenant", ["", "a b", "a\x00b", "tab\there", "x" * 201, " lead"])
def test_a_tenant_name_with_whitespace_or_control_characters_is_refused_and_shown_short(tenant):
    from coretask.options import check_tenant
    with pytest.raises(ConfigurationError, match="use 1-200 printable characters without whitespace") as err:
        check_tenant(tenant)
    assert len(str(err.value)) < 160     # a 201-character name is not repeated whole


@pytest.mark.parametrize("tenant", ["acme", "a:b", "{x", "a/b", "*", "zürich"])
def test_a_tenant_name_of_printable_characters_is_accepted(tenant):
    from coretask.options import check_tenant
    assert check_tenant(tenant) == tenant


def test_ids_given_to_lookups_and_actions_must_be_strings(processor):
    for call in (processor.cancel_task, processor.get_task, processor.get_result, processor.delete_task,
                 processor.discard_dead_task, processor.retry_dead_task):
        with pytest.raises(ConfigurationError, match="a task id is the string enqueue_task returned, got NoneType"):
            call(None)
    for call in (processor.cancel_batch, processor.get_batch):
        with pytest.raises(ConfigurationError, match="a batch id is the string enqueue_batch returned, got int 7"):
            call(7)
    assert processor.cancel_task("not an id") is False and processor.get_task("not an id") is None
