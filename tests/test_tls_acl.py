"""TLS and ACL: a full workload over mutual TLS (rediss://, certificates made here with openssl),
and through an ACL user that holds exactly the permissions docs/operations.md lists.

Servers are the test's own: Redis 7 for TLS, the server under test's binary for the ACL user
(Redis 7 under --server cluster; tests/test_cluster.py runs the cluster variant of the ACL).
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.commands.core

from coretask import StoreUnavailable, TaskProcessor
from coretask.embedded.servers import RedisServer
from tests.conftest import FAST, ROOT
from tests.tasks_servers import (
    Manager,
    exercise,
    make_certificates,
    note,
    read_notes,
    wait_until,
)

OPERATIONS = ROOT / "docs" / "operations.md"
DOC_PREFIX, DOC_PASSWORD = "{coretask}", "CHANGE-ME"
CLUSTER_EXTRA = ["+cluster|slots", "+command"]     # documented beside the line


def acl_rules(prefix: str, password: str, cluster: bool = False) -> list[str]:
    """The ACL SETUSER line of docs/operations.md, for ``prefix`` and ``password``: the rules
    after the user name."""
    text = OPERATIONS.read_text()
    block = re.search(r"<!-- acl-line.*?-->\s*```\s*\n(ACL SETUSER .*?)\n```", text, re.DOTALL)
    assert block, "docs/operations.md lost its ACL line"
    words = block.group(1).split()
    assert words[:3] == ["ACL", "SETUSER", "coretask"]
    rules = [w.replace(DOC_PREFIX, prefix).replace(DOC_PASSWORD, password) for w in words[3:]]
    if cluster:
        assert all(f"`{extra}" in text or extra in text for extra in CLUSTER_EXTRA)
        rules += CLUSTER_EXTRA
    return rules


def allowed_commands(rules: list[str]) -> set[str]:
    return {r[1:].upper() for r in rules if r.startswith("+") and not r.startswith("+@")}


def commands_coretask_uses() -> set[str]:
    """Every command in lua/ and every redis-py command method called in coretask/ (on a
    client, a pipeline or pub/sub), as ACL names (``SCRIPT|LOAD``)."""
    used: set[str] = set()
    for path in (ROOT / "coretask" / "gateway" / "lua").glob("*.lua"):
        used |= {c.upper() for c in re.findall(r"redis\.p?call\(\s*['\"](\w+)['\"]", path.read_text())}
    methods = {n for n in dir(redis.commands.core.CoreCommands) if not n.startswith("_")}
    named = {"delete": "DEL"}      # redis-py methods not named as their command
    for path in (ROOT / "coretask").rglob("*.py"):
        if "embedded" in path.relative_to(ROOT / "coretask").parts:   # test/demo server launchers, not the library
            continue
        src = path.read_text()
        for name in re.findall(r"(?:redis|\br|pipe|client)\.(\w+)\(", src):
            if name in methods and name != "execute_command":
                used.add(named.get(name) or name.upper().replace("_", "|"))
        for cmd in re.findall(r"execute_command\(\s*['\"]([A-Za-z ]+)['\"]", src):
            used.add("|".join(cmd.upper().split()))
        if re.search(r"\.pubsub\(", src):
            used.add("SUBSCRIBE")
    return used


def test_acl_line_covers_every_command_coretask_uses() -> None:
    rules = acl_rules("{p}", "pw")
    documented = "ACL SETUSER coretask " + " ".join(acl_rules(DOC_PREFIX, DOC_PASSWORD))
    assert documented in (ROOT / "docs" / "security.md").read_text(), \
        "docs/security.md's ACL line differs from docs/operations.md"
    assert rules[:6] == ["on", ">pw", "resetkeys", "~{p}*", "resetchannels", "&{p}*"]
    assert "-@all" in rules and not [r for r in rules if r.startswith("+@")]   # no categories
    allowed = allowed_commands(rules)
    used = commands_coretask_uses()
    assert {"EVALSHA", "SCRIPT|LOAD", "PUBLISH", "SUBSCRIBE", "HSET", "LMOVE", "WAIT"} <= used
    assert used - allowed == set(), "commands coretask uses that the documented ACL user lacks"
    # nothing more than needed, besides PING (redis-py's health checks)
    assert allowed - used == {"PING"}, "ACL line allows commands coretask never uses"
    assert not allowed & {"KEYS", "SCAN", "CONFIG", "FLUSHALL", "FLUSHDB", "MONITOR", "EVAL", "FUNCTION"}


def new_prefix() -> str:
    return "{ct-" + uuid.uuid4().hex[:10] + "}"


# ------------------------------------------------------------------------------------- ACL

def test_acl_user_with_only_the_documented_permissions_runs_everything(
        own_server: Callable[..., RedisServer], processor_on: Callable[..., TaskProcessor],
        tmp_path: Path) -> None:
    server = own_server()
    prefix, password = new_prefix(), "s3cret-" + uuid.uuid4().hex[:8]
    with server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "coretask", *acl_rules(prefix, password))
        admin.set("outside", "untouched")
        admin.set("{other}:queues", "untouched")
    url = f"redis://coretask:{password}@{server.host}:{server.port}/0"
    p = processor_on(url, prefix, wait_replicas=0)
    manager = Manager(url, prefix, tmp_path / "manager.log", threads=4, **FAST)
    try:
        exercise(p, tmp_path / "notes")
    finally:
        manager.stop()
    assert "NOPERM" not in manager.log() and "NoPermission" not in manager.log(), manager.log()[-3000:]

    with redis.Redis.from_url(url) as user:
        assert user.exists(f"{prefix}:queues")
        for forbidden in (lambda: user.get("outside"), lambda: user.set("outside", "x"),
                          lambda: user.get("{other}:queues"), lambda: user.delete("{other}:queues"),
                          lambda: user.publish("{other}:ev", "f:default"),
                          lambda: user.keys("*"), lambda: user.config_get("maxmemory"),
                          lambda: user.flushall(), lambda: user.eval("return 1", 0),
                          lambda: user.evalsha("0" * 40, 1, "outside")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
    with server.client() as admin:
        assert admin.get("outside") == b"untouched" and admin.get("{other}:queues") == b"untouched"


# ------------------------------------------------------------------------------------- TLS

def test_tls_with_client_certificates_end_to_end(own_server: Callable[..., RedisServer],
                                                 processor_on: Callable[..., TaskProcessor],
                                                 tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    server = own_server("redis7", extra_args=[
        "--tls-cert-file", certs["server.crt"], "--tls-key-file", certs["server.key"],
        "--tls-ca-cert-file", certs["ca.crt"], "--tls-auth-clients", "yes"])
    assert server.url.startswith("rediss://")
    url = (f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs['ca.crt']}"
           f"&ssl_certfile={certs['client.crt']}&ssl_keyfile={certs['client.key']}")
    prefix = new_prefix()
    path = str(tmp_path / "notes")
    p = processor_on(url, prefix)
    manager = Manager(url, prefix, tmp_path / "manager.log", threads=4, **FAST)
    try:
        bid = p.enqueue_batch("default", "acme", lambda b: (
            [b.enqueue(note, path, f"t{i}") for i in range(20)], b.continue_with(note, path, "done")))
        info = p.wait_for_batch(bid, 30)
        assert info.done == 20
        wait_until(lambda: "done" in read_notes(path), 10, "the continuation")
        assert p.get_workers()
    finally:
        manager.stop()
    with p.gateway.transport.redis as conn:         # really TLS: the server sees a TLS connection on its only port
        assert conn.connection_pool.connection_class.__name__ == "SSLConnection"

    # a client that does not trust the CA is refused (and does not hang)
    untrusted = processor_on(f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required", new_prefix())
    with pytest.raises(StoreUnavailable, match="(?i)certificate verify failed"):
        untrusted.get_queue("default")
    # nor does plain TCP reach it
    plain = processor_on(f"redis://127.0.0.1:{server.port}/0", new_prefix(), wait_replicas=0)
    with pytest.raises(StoreUnavailable):
        plain.get_queue("default")
