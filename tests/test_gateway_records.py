"""The gateway's typed records, without a server: fetch.lua's positional reply turned into
Leased records (parse_fetch_reply) and the Outcomes a worker sends with its next fetch.

The replies here are built by hand in the shape fetch.lua's header documents, with the Python
types redis-py hands back for it: Lua numbers arrive as ints, strings (HMGET values included,
such as retries left and enqueued ms) as bytes, a missing hash field as None, nested Lua
tables as lists."""
from __future__ import annotations

import pytest

from coretask.gateway import Ack, Failure, FetchReply, Leased, Outcomes, Release, Unreadable
from coretask.gateway.records import FETCH_FIELDS, parse_fetch_reply

NOW = 1_700_000_000_000
BATCH_A = [b"state", b"open", b"total", b"3", b"tn", b"acme"]
BATCH_B = [b"state", b"open", b"total", b"1", b"tn", b"beta"]


def run(tid: bytes, attempt: int, payload: bytes, ser: bytes, target: bytes, queue: bytes, tenant: bytes,
        batch: bytes, retries: int | bytes, enqueued: bytes | None, binfo: list[bytes],
        seal: list[bytes], controls: list[bytes] | None = None) -> list[object]:
    values = [tid, attempt, payload, ser, target, queue, tenant, batch, retries, enqueued, binfo, seal,
              controls if controls is not None else [b"", b""]]
    assert len(values) == FETCH_FIELDS
    return values


def sample_reply() -> list[object]:
    return [0, NOW + 2500, NOW,
            # first task of batch A: the batch's fields come with it
            *run(b"t1", 3, b'{"a":1}', b"json", b"tests.tasks:add", b"default", b"acme", b"A", b"2",
                 b"1699999999000", BATCH_A, [b"sig-1", b"acme"], [b"30000", b"60000"]),
            # second task of batch A: no fields in the reply (sent once per batch)
            *run(b"t2", 1, b"\x80\x04payload", b"dill", b"tests.tasks:mul", b"high", b"acme", b"A", 0,
                 b"1699999999500", [], [b"sig-2", b"acme"]),
            # no batch, an absent 'e' field (nil) and absent signature/tenant fields ("")
            *run(b"t3", 1, b"raw bytes", b"raw", b"topic:orders", b"default", b"other", b"", b"5",
                 None, [], [b"", b""]),
            # first task of another batch in the same reply: that batch's own fields
            *run(b"t4", 2, b"{}", b"json", b"tests.tasks:add", b"default", b"beta", b"B", 1,
                 b"1699999999900", BATCH_B, [b"sig-4", b"beta"]),
            ]


def test_every_leased_field_is_parsed() -> None:
    reply = parse_fetch_reply(sample_reply())
    assert isinstance(reply, FetchReply)
    assert [t.id for t in reply.tasks] == ["t1", "t2", "t3", "t4"]
    assert reply.tasks[0] == Leased(
        id="t1", token="3", attempt=3, payload=b'{"a":1}', serializer="json", target="tests.tasks:add",
        queue="default", tenant="acme", batch_id="A", retries_left=2, enqueued_ms=1699999999000,
        batch_fields=BATCH_A, signature="sig-1", stored_tenant="acme", timeout_ms=30000, keep_result_ms=60000)
    t1 = reply.tasks[0]
    assert isinstance(t1.token, str) and isinstance(t1.attempt, int)
    assert isinstance(t1.retries_left, int) and isinstance(t1.enqueued_ms, int)
    assert isinstance(t1.payload, bytes)     # the payload is never decoded here


def test_second_task_of_a_batch_gets_the_fields_sent_with_the_first() -> None:
    t1, t2, _, t4 = parse_fetch_reply(sample_reply()).tasks
    assert t2.batch_id == "A"
    assert t2.batch_fields == BATCH_A
    assert t2.token == "1" and t2.attempt == 1
    assert t2.retries_left == 0              # an int reply is accepted as well as bytes
    assert t2.payload == b"\x80\x04payload" and t2.serializer == "dill" and t2.queue == "high"
    assert t2.signature == "sig-2"
    # another batch in the same reply keeps its own fields
    assert t4.batch_id == "B" and t4.batch_fields == BATCH_B and t4.retries_left == 1


def test_task_without_batch_has_no_batch_and_defaults() -> None:
    t3 = parse_fetch_reply(sample_reply()).tasks[2]
    assert t3.batch_id is None               # "" in the reply
    assert t3.batch_fields is None
    assert t3.enqueued_ms == 0               # nil 'e' field
    assert t3.signature == "" and t3.stored_tenant == ""
    assert t3.serializer == "raw" and t3.target == "topic:orders" and t3.tenant == "other"
    assert t3.retries_left == 5
    assert (t3.timeout_ms, t3.keep_result_ms) == (0, 0)      # "" in the reply: no limit, nothing kept


def test_batch_task_whose_fields_were_not_sent_gets_none() -> None:
    # a batch whose hash is gone: HGETALL is empty, so no task of it carries fields
    reply = parse_fetch_reply([0, -1, NOW, *run(b"t9", 1, b"{}", b"json", b"m:f", b"default", b"acme", b"Z",
                                                b"0", b"1", [], [b"s", b"acme"])])
    assert reply.tasks[0].batch_id == "Z"
    assert reply.tasks[0].batch_fields is None


def test_header_paused_next_due_and_now() -> None:
    reply = parse_fetch_reply(sample_reply())
    assert reply.paused is False
    assert reply.next_due_ms == NOW + 2500
    assert reply.now_ms == NOW

    paused = parse_fetch_reply([1, -1, NOW])
    assert paused.paused is True
    assert paused.next_due_ms == -1
    assert paused.now_ms == NOW
    assert paused.tasks == []


def test_reply_without_tasks() -> None:
    reply = parse_fetch_reply([0, NOW + 10, NOW + 1])
    assert reply == FetchReply(paused=False, next_due_ms=NOW + 10, now_ms=NOW + 1, tasks=[])


@pytest.mark.parametrize("position, value, reason", [
    (4, b"\xfftarget", "field 'tg' (target) is not UTF-8 text"),
    (3, None, "field 's' (serializer) is not UTF-8 text"),
    (8, b"3.5", "field 'r' (retries left) is not a number"),
    (8, None, "field 'r' (retries left) is not a number"),
    (9, b"soon", "field 'e' (enqueued ms) is not a number"),
    (2, None, "field 'p' (payload) is missing"),
    (7, b"\xff", "field 'b' or 'cb' (batch) is not UTF-8 text"),
    (11, [b"sig"], "field 'sg' (signature and stored tenant) is not a pair"),
    (11, [b"\xfe", b"acme"], "field 'sg' (signature and stored tenant) is not UTF-8 text"),
    (11, [b"", b"\xfe"], "field 'tn' (stored tenant) is not UTF-8 text"),
    (6, b"\xffacme", "field 'tn' (tenant) is not UTF-8 text"),
])
def test_an_entry_that_does_not_read_is_reported_and_the_others_parse(position, value, reason) -> None:
    # Given a reply whose second task has one value that cannot be read
    reply = sample_reply()
    reply[3 + FETCH_FIELDS + position] = value
    # When it is parsed, nothing raises: the others are tasks, that one is reported with the field
    parsed = parse_fetch_reply(reply)
    assert [t.id for t in parsed.tasks] == ["t1", "t3", "t4"]
    (bad,) = parsed.unreadable
    assert bad.id == "t2" and bad.token == "1" and reason in bad.reason
    assert bad.queue == "high" and bad.tenant == ("" if position == 6 else "acme")
    # (a later task of batch A would still get the fields sent with the first)
    assert parsed.tasks[0].batch_fields == BATCH_A


def test_a_truncated_entry_is_reported_and_one_without_an_id_has_none() -> None:
    reply = sample_reply()[:3 + FETCH_FIELDS + 5]          # the second task cut after 5 values
    parsed = parse_fetch_reply(reply)
    assert [t.id for t in parsed.tasks] == ["t1"]
    assert parsed.unreadable == [Unreadable("t2", "1", "", "", "the reply holds 5 values for this task "
                                                               "instead of 13")]
    reply = sample_reply()
    reply[3] = None                                         # no id: nothing to answer for
    (bad,) = parse_fetch_reply(reply).unreadable
    assert bad.id is None and bad.token is None and "the id is not UTF-8 text" in bad.reason


# ------------------------------------------------------------------------------------ Outcomes

def ack(tid: str, token: str = "1") -> Ack:
    return Ack(tid, token, "ok", 5)


def failure(tid: str) -> Failure:
    return Failure(tid, "1", "ValueError", "boom", "tb", 7)


def test_outcomes_bool_and_len() -> None:
    empty = Outcomes()
    assert not empty
    assert len(empty) == 0
    for field, item in (("acks", ack("a")), ("failures", failure("f")), ("releases", Release("r", "1"))):
        one = Outcomes()
        getattr(one, field).append(item)
        assert one, field
        assert len(one) == 1
    full = Outcomes([ack("a"), ack("b")], [failure("f")], [Release("r", "2")])
    assert len(full) == 4


def test_outcomes_task_ids() -> None:
    out = Outcomes([ack("a"), ack("b")], [failure("f")], [Release("r", "2"), Release("a", "3")])
    assert out.task_ids() == {"a", "b", "f", "r"}
    assert Outcomes().task_ids() == set()


def test_outcomes_prepend_puts_older_in_front() -> None:
    newer = Outcomes([ack("n1")], [failure("nf")], [Release("nr", "1")])
    older = Outcomes([ack("o1"), ack("o2")], [failure("of")], [Release("or", "1")])
    newer.prepend(older)
    assert [a.task_id for a in newer.acks] == ["o1", "o2", "n1"]
    assert [f.task_id for f in newer.failures] == ["of", "nf"]
    assert [r.task_id for r in newer.releases] == ["or", "nr"]
    assert len(older) == 4                    # the older object is left as it was
    newer.prepend(Outcomes())
    assert len(newer) == 7
