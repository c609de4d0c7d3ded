"""The server matrix: the suite really runs against the server it names, a full workload passes on
it, and the code uses only what every promised server allows (Redis 6.2 commands, nothing that
ElastiCache forbids). The static checks read coretask/ and lua/; they need no server.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from coretask import TaskProcessor
from tests.conftest import ROOT, Target
from tests.tasks_servers import exercise

LUA = sorted((ROOT / "coretask" / "gateway" / "lua").glob("*.lua"))
PYTHON = sorted((ROOT / "coretask").rglob("*.py"))
CALL = r"redis\.p?call\(\s*['\"]{}['\"]"
CLIENT = r"(?:redis|\br|pipe|client|conn)\.{}\("                    # a redis-py method call
EXECUTE = r"execute_command\(\s*['\"]{}\b"


def _hits(paths: list[Path], pattern: str) -> list[str]:
    found = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line, re.IGNORECASE):
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{where}:{n}: {line.strip()}")
    return found


# What managed services (ElastiCache, MemoryDB, ...) forbid or restrict, and what a keyspace-wide
# operation would be: none of it may appear in the library or its scripts.
FORBIDDEN = ["CONFIG", "KEYS", "SCAN", "MONITOR", "FUNCTION", "FCALL", "FCALL_RO", "FLUSHALL",
             "FLUSHDB", "DEBUG", "SHUTDOWN", "SLAVEOF", "REPLICAOF"]
FORBIDDEN_METHODS = [r"config_\w+", "keys", "scan", "scan_iter", "monitor", r"function_\w+",
                     r"fcall\w*", "flushall", "flushdb", r"debug_\w+", "shutdown", "slaveof", "replicaof"]
KEYSPACE_EVENTS = [r"__keyspace@", r"__keyevent@", r"notify.keyspace.events"]

# Commands that Redis 6.2 lacks (7.0+), for the scripts and the client code.
NEWER_THAN_62 = ["LMPOP", "BLMPOP", "ZMPOP", "BZMPOP", "SINTERCARD", "EXPIRETIME", "PEXPIRETIME",
                 "SPUBLISH", "SSUBSCRIBE", "SUNSUBSCRIBE", "FUNCTION", "FCALL", "FCALL_RO",
                 "WAITAOF", "CLIENT NO-TOUCH", "LCS"]
NEWER_METHODS = ["lmpop", "blmpop", "zmpop", "bzmpop", "sintercard", "expiretime", "pexpiretime",
                 "spublish", "ssubscribe", "sunsubscribe", "waitaof", "lcs"]


def test_no_command_that_managed_services_forbid() -> None:
    found = []
    for cmd in FORBIDDEN:
        found += _hits(LUA, CALL.format(cmd)) + _hits(PYTHON, EXECUTE.format(cmd))
    for method in FORBIDDEN_METHODS:
        found += _hits(PYTHON, CLIENT.format(method))
    for pattern in KEYSPACE_EVENTS:
        found += _hits(LUA + PYTHON, pattern)
    assert found == [], "coretask must not use these (see docs/operations.md, ElastiCache):\n" + "\n".join(found)


def test_only_redis_62_commands() -> None:
    found = []
    for cmd in NEWER_THAN_62:
        found += _hits(LUA, CALL.format(cmd)) + _hits(PYTHON, EXECUTE.format(cmd))
    for method in NEWER_METHODS:
        found += _hits(PYTHON, CLIENT.format(method))
    # Redis 7 script flags (a "#!lua" shebang) and EXPIRE's NX/XX/GT/LT options are 7.0+
    found += [f"{p.name}: shebang" for p in LUA if p.read_text().startswith("#!")]
    found += _hits(LUA, r"redis\.p?call\(\s*['\"]P?EXPIRE['\"][^)]*['\"](NX|XX|GT|LT)['\"]")
    assert found == [], "not in Redis 6.2:\n" + "\n".join(found)


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    bad_lua = tmp_path / "bad.lua"
    bad_lua.write_text("local k = redis.call('KEYS', '*')\nredis.call('LMPOP', 1, 'l', 'LEFT')\n")
    bad_py = tmp_path / "bad.py"
    bad_py.write_text("store.redis.config_get('x')\nr.execute_command('CONFIG SET', 'a', 'b')\n"
                      "p.psubscribe('__keyspace@0__:*')\n")
    assert _hits([bad_lua], CALL.format("KEYS")) and _hits([bad_lua], CALL.format("LMPOP"))
    assert _hits([bad_py], CLIENT.format(r"config_\w+")) and _hits([bad_py], EXECUTE.format("CONFIG"))
    assert _hits([bad_py], KEYSPACE_EVENTS[0])


# ------------------------------------------------------------------- the server under test

EXPECTED = {"redis7": ("redis", 7), "redis62": ("redis", 6, 2), "valkey8": ("valkey", 8),
            "cluster": ("redis", 7)}


def test_suite_runs_against_the_server_it_names(server: Target, r) -> None:
    family, *version = EXPECTED[server.kind]
    node = server.handle.nodes[0] if server.cluster else server.handle
    assert node.version[:len(version)] == tuple(version)
    with node.client() as direct:
        info = direct.info("server")
    assert ("valkey_version" in info) == (family == "valkey")
    if server.cluster:
        assert r.cluster_info()["cluster_state"] == "ok" and len(r.get_primaries()) == 3
    else:
        assert server.url.startswith("redis://127.0.0.1:") and not server.url.endswith(":6379/0")


def test_full_workload_on_the_server_under_test(make_processor: Callable[..., TaskProcessor],
                                                embedded_worker: Callable[..., object],
                                                tmp_path: Path) -> None:
    p = make_processor()
    embedded_worker(make_processor())
    exercise(p, tmp_path / "notes")

