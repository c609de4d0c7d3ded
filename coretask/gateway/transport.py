"""Transport: the connection and the running of Lua scripts, by name, with raw KEYS and ARGV.

Only the gateway (coretask/gateway/gateway.py) calls it: that is where each script's KEYS and
ARGV order is written, next to the call. Scripts are loaded from ``lua/`` beside this module
once, called with EVALSHA, and reloaded transparently after a NOSCRIPT reply (server restart,
SCRIPT FLUSH, failover to a replica that never saw them).

A call the server refuses for now (LOADING, BUSY, MISCONF, TRYAGAIN, CLUSTERDOWN: refusals.py)
did not run, so it is sent again with exponential backoff for Options.busy_timeout before
StoreUnavailable is raised. In cluster mode every call also declares the prefix's migration
guard (P:migration-guard, a key nobody writes) as its last KEYS entry: while the prefix's slot
is being migrated, a call whose declared keys all exist would run on the old node, and a write
inside the script to a key that has already moved would fail half-way ("non local key"); with a
key that never exists among its keys, Redis answers ASK or TRYAGAIN to every call instead, for
the whole migration, before the script starts.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..errors import ConfigurationError, ReplicationError, ScriptError, StoreError, StoreFull, StoreUnavailable
from ..options import Options, redact_url
from .refusals import Patience, refusal, refused

log = logging.getLogger(__name__)

try:    # packs a command in C; redis-py's own packer costs ~4x more per call
    from hiredis import pack_command as _pack_one
except ImportError:                     # hiredis is optional
    _pack_one = None


def _packed(conn: Any, commands: list[tuple[Any, ...]]) -> list[bytes]:
    if _pack_one is None:
        return conn.pack_commands(commands)   # type: ignore[no-any-return]
    return [b"".join([_pack_one(c) for c in commands])]

# redis-py 5.x requires a command name to check out a connection; 6.x and later deprecate it
_POOL_WANTS_NAME = (inspect.signature(redis.ConnectionPool.get_connection).parameters["command_name"].default
                    is inspect.Parameter.empty)

_HERE = Path(__file__).resolve().parent
LUA_DIR = _HERE / "lua"     # package data (setup.cfg): found beside this module, installed or not


class Script:
    """One Lua file (with what it uses of lua/_lib.lua prepended), run by SHA with NOSCRIPT
    recovery."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_LIB_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*(?:, *[A-Za-z_][A-Za-z0-9_]*)*)",
                             re.MULTILINE)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT = re.compile(r"--[^\n]*")     # no script has "--" inside a string


def _code_words(text: str) -> set[str]:
    """The names a Lua text uses, comments left out (a comment naming a helper pulls in nothing)."""
    return set(_WORD.findall(_COMMENT.sub("", text)))


def _lib_parts(lib: str) -> list[tuple[set[str], str]]:
    """_lib.lua cut at each top-level ``local`` definition: (names it defines, its text), in
    order (the header comment first, defining nothing)."""
    found = list(_LIB_DEFINITION.finditer(lib))
    parts: list[tuple[set[str], str]] = [(set(), lib[:found[0].start()] if found else lib)]
    for m, end in zip(found, [n.start() for n in found[1:]] + [len(lib)]):
        parts.append(({n.strip() for n in m.group(1).split(",")}, lib[m.start():end]))
    return parts


def _with_lib(parts: list[tuple[set[str], str]], body: str) -> str:
    """``body`` with the _lib.lua definitions it uses, directly or through each other, in their
    order. Every call runs the whole prelude (closures and tables are made per call), so a
    script carries only what it needs: the full library costs ~10 us of server CPU per call,
    paid by every enqueue, fetch and acknowledgement (docs/benchmarks.md)."""
    used = _code_words(body)
    keep = [False] * len(parts)
    changed = True
    while changed:          # until nothing new: a part's text ends with the comment of the next one
        changed = False
        for i in range(len(parts) - 1, 0, -1):
            names, text = parts[i]
            if not keep[i] and names & used:
                keep[i] = changed = True
                used |= _code_words(text)
    return "".join(text for i, (_, text) in enumerate(parts) if i == 0 or keep[i]) + "\n" + body


def _load_scripts() -> dict[str, Script]:
    parts = _lib_parts((LUA_DIR / "_lib.lua").read_text())
    scripts = {}
    for path in sorted(LUA_DIR.glob("*.lua")):
        if not path.name.startswith("_"):
            scripts[path.stem] = Script(path.stem, _with_lib(parts, path.read_text()))
    if not scripts:
        raise RuntimeError(f"no Lua scripts found in {LUA_DIR}: the coretask installation is incomplete")
    return scripts


SCRIPTS = _load_scripts()

# redis-py's, turned into StoreUnavailable (the cluster client's "no node answered" exists in
# some redis-py versions only, and is no RedisError)
UNREACHABLE: tuple[type[Exception], ...] = (
    RedisConnectionError, RedisTimeoutError,
    *((redis.exceptions.RedisClusterUnreachableError,)
      if hasattr(redis.exceptions, "RedisClusterUnreachableError") else ()))
_F = TypeVar("_F", bound=Callable[..., Any])


# what servers answer a client whose credentials are wrong or missing (redis-py raises some as
# AuthenticationError, a ConnectionError, and others as ResponseError, by version and command)
AUTH_REFUSALS = ("WRONGPASS", "NOAUTH", "invalid username-password pair", "invalid password",
                 "must be called with the client already authenticated", "Authentication required")


def unavailable(url: str, exc: BaseException) -> StoreUnavailable:
    """redis-py's connection error as a StoreUnavailable that names the server (password masked)
    and what to check; reason "auth" when the server refused the credentials, which no retry
    mends."""
    text = redact_url(str(exc))
    if isinstance(exc, redis.exceptions.AuthenticationError) or any(s in text for s in AUTH_REFUSALS):
        return StoreUnavailable(
            f"Redis at {url} refused this client's credentials ({type(exc).__name__}: {text}): the user name or "
            "password in the URL (Options.redis) is wrong or missing; they go between the scheme and the host, "
            "as USER:PASSWORD then @ (USER may be left out for the default user)", url=url,
            reason="auth")
    return StoreUnavailable(
        f"Redis at {url} cannot be reached ({type(exc).__name__}: {redact_url(str(exc))}); check that "
        "the server is running and reachable from this machine (host, port, firewall), and the URL's "
        "password, database and TLS settings (Options.redis)", url=url)


def translated(method: _F) -> _F:
    """Decorate a method of an object with a ``url`` (the masked server URL): redis-py's
    ConnectionError / TimeoutError leave it as StoreUnavailable, with the original as cause.
    The one translation of connection errors: the transport's script calls and every public
    method of the gateway (its reads) go through it. A refusal that reaches it (a read met
    LOADING or CLUSTERDOWN: reads are not retried, scripts were for busy_timeout) leaves as
    StoreUnavailable with its reason too, never as a redis-py exception."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (redis.RedisError, *UNREACHABLE) as exc:
            reason = refusal(exc)
            if reason is not None:
                raise refused(reason, self.url, method.__name__, None, exc) from exc
            if isinstance(exc, UNREACHABLE) or any(s in str(exc) for s in AUTH_REFUSALS):
                raise unavailable(self.url, exc) from exc
            raise

    return call  # type: ignore[return-value]


def connect(options: Options, **overrides: Any) -> redis.Redis:
    """A client for the configured server or cluster. Binary replies: payloads are bytes.

    Retries are pinned here rather than left to the redis-py version's default (none in 5.x, ten
    in 8.x): 3 retries after 0.1, 0.2 and 0.4 s, so a call to a server that is down fails with
    redis' ConnectionError in about a second instead of hanging; worker loops retry on their own
    with a capped backoff. URL query options (``?socket_connect_timeout=2``) take precedence."""
    kwargs: dict[str, Any] = dict(socket_connect_timeout=5, socket_timeout=30, socket_keepalive=True,
                                  health_check_interval=15,
                                  retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3))
    kwargs.update(overrides)
    if options.cluster:
        from redis.cluster import RedisCluster
        kwargs.pop("health_check_interval", None)
        try:    # the cluster client reads the slot map as it is made
            return RedisCluster.from_url(options.redis, **kwargs)
        except redis.exceptions.RedisClusterException as exc:
            if "cluster mode is not enabled" in str(exc).lower():
                raise ConfigurationError(
                    f"Options.cluster is True, but the server at {redact_url(options.redis)} is not a Redis "
                    "Cluster node (cluster mode is not enabled): set cluster=False for a single server") from exc
            raise unavailable(redact_url(options.redis), exc) from exc
    return redis.Redis.from_url(options.redis, **kwargs)


class Transport:
    """The connection and the scripts for one prefix. Thread-safe (redis-py pools)."""

    def __init__(self, options: Options, client: redis.Redis | None = None, *, guard: str | None = None) -> None:
        """``guard``: the prefix's migration guard key (Keys.migration_guard), declared by every
        call in cluster mode (see the module docstring); ignored on a standalone server."""
        self.options = options
        self.slot_key = options.prefix      # a call without keys goes to the prefix's slot
        self.redis = client if client is not None else connect(options)
        self.url = redact_url(options.redis)
        self.guard = guard if options.cluster else None
        self.busy_timeout = options.busy_timeout.total_seconds()
        self._idle: list[Any] = []      # see _checkout
        self._pid = os.getpid()

    def _guarded(self, keys: Sequence[str]) -> Sequence[str]:
        """The keys a call declares: in cluster mode, with the migration guard after them (and,
        for a call without keys, the prefix itself before it, so that the call always names two
        distinct keys: Redis answers TRYAGAIN, not "run here", to a call of several keys that
        are not all present on the importing node)."""
        if self.guard is None:
            return keys
        return [*(keys or (self.slot_key,)), self.guard]

    @translated
    def run(self, name: str, keys: Sequence[str], args: Sequence[Any], *, durable: bool = False) -> Any:
        """Run one script. ``durable``: with Options.wait_replicas > 0, WAIT for that many replicas
        to acknowledge the write (ReplicationError when fewer did within wait_timeout). Refusals
        are retried for Options.busy_timeout (module docstring)."""
        if durable and self.options.wait_replicas > 0:
            return self._run_and_wait(name, self._guarded(keys), args)
        return self._run(name, self._guarded(keys), args, Patience(self.busy_timeout))

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any], patience: Patience) -> Any:
        """run() with the keys already guarded and a Patience that may be shared by several calls
        (run_many: one busy_timeout for the whole round trip, not one per call)."""
        script = SCRIPTS[name]
        evalsha = self.redis.evalsha if self.options.cluster else self._evalsha
        noscript = 0
        while True:
            try:
                return evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                # a SCRIPT FLUSH may land between the load and the call: a few times at most
                noscript += 1
                if noscript > 3:
                    raise _translate(name, NoScriptError(f"NOSCRIPT after {noscript - 1} loads")) from None
                log.debug("script %s not loaded on %s; loading it", name, self.url)
                try:
                    self._load(script, keys)
                except Exception as exc:        # the load itself met BUSY, LOADING, ...
                    self._wait_or_raise(name, exc, patience)
            except Exception as exc:
                self._wait_or_raise(name, exc, patience)

    def _wait_or_raise(self, name: str, exc: Exception, patience: Patience) -> None:
        """After a failed attempt: return (having slept) when it was a refusal and there is time
        left, else raise what the caller should see."""
        reason = refusal(exc)
        if reason is None:
            if isinstance(exc, ResponseError):
                raise _translate(name, exc) from exc
            raise exc       # a connection error: @translated makes it StoreUnavailable
        if patience.refusals == 0:
            log.debug("%s on %s refused (%s): retrying for up to %g s", name, self.url, exc, patience.seconds)
        if not patience.wait():
            raise refused(reason, self.url, name, patience, exc) from exc

    # The hot paths (every enqueue, every turn of a worker's loop) talk to a pooled connection
    # directly: redis-py's command and pipeline layers (callbacks, command stacks, event
    # dispatch, observability hooks) cost about as much client CPU as the round trip itself
    # (measured: 137 us per two-command pipeline and 85 us per INCR through them, 69 and 42 us
    # direct). Retries and health checks stay redis-py's: the connection's own Retry policy and
    # send_packed_command's health check. Replies are raw, as no coretask script reply needs a
    # response callback.

    def _evalsha(self, *args: Any) -> Any:
        return self._roundtrip([("EVALSHA", *args)], raise_errors=True)[0]

    def _roundtrip(self, commands: list[tuple[Any, ...]], raise_errors: bool) -> list[Any]:
        """Send commands in one write, read every reply; error replies are returned in place
        (or the first one raised, once all are read, with ``raise_errors``)."""
        conn = self._checkout()

        def send_and_read() -> list[Any]:
            try:
                conn.send_packed_command(_packed(conn, commands))
            except BusyLoadingError as exc:
                # the health check's PING (or the handshake of a new connection) was answered
                # LOADING: nothing was sent; the caller waits it out (see below)
                return [exc] * len(commands)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except (ResponseError, BusyLoadingError) as exc:      # an error reply: the connection is fine
                    # (redis-py's LOADING is a ConnectionError, which the connection's retry would
                    # answer by reconnecting and resending, ~0.7 s each time: the caller waits it out)
                    replies.append(exc)
            return replies

        try:
            replies = conn.retry.call_with_retry(send_and_read, lambda _error: conn.disconnect())
        except BaseException:
            conn.disconnect()       # a half-read reply must never reach the next user
            raise
        finally:
            self._idle.append(conn)
        if raise_errors:
            for reply in replies:
                if isinstance(reply, (ResponseError, BusyLoadingError)):
                    raise reply
        return replies

    def _checkout(self) -> Any:
        """A connection for one round trip. Connections taken from redis-py's pool stay checked
        out and are kept here between calls (list.pop and append are atomic): the pool's own
        bookkeeping (locks, observability hooks) cost ~20 us per call. As many exist as calls
        ever ran at once, as with the pool; the pool still closes them all on disconnect()."""
        if self._pid != os.getpid():            # forked: those connections are the parent's
            self._idle, self._pid = [], os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            pool = self.redis.connection_pool
            return pool.get_connection("EVALSHA") if _POOL_WANTS_NAME else pool.get_connection()

    @translated
    def send(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> InFlight:
        """Send one script call and return without its reply, so that the caller can prepare
        the next call while Redis runs this one (batch staging). Read it with InFlight.result()
        before anything else; the call must be idempotent: after a connection error it is run
        again, synchronously."""
        flight = InFlight(self, name, keys, args)
        if self.options.cluster:
            flight.value = self.run(name, keys, args)
            return flight
        conn = self._checkout()
        command = [("EVALSHA", SCRIPTS[name].sha, len(keys), *keys, *args)]
        try:
            conn.send_packed_command(_packed(conn, command))
        except BaseException as exc:
            conn.disconnect()               # a partly written call must not be completed by another
            self._idle.append(conn)
            if not isinstance(exc, Exception):
                raise
            flight.value = self.run(name, keys, args)       # nothing usable was sent: run it now
            return flight
        flight.conn = conn
        return flight

    @translated
    def run_many(self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Several script calls in one round trip (a pipeline, not a transaction); each call that
        met NOSCRIPT is run again on its own after loading, never the ones that succeeded."""
        patience = Patience(self.busy_timeout)
        if self.options.cluster:
            # redis-py's cluster pipeline refuses EVALSHA: one call after the other instead
            return [self._run(name, self._guarded(keys), args, patience) for name, keys, args in calls]
        while True:
            try:
                results = self._roundtrip([("EVALSHA", SCRIPTS[name].sha, len(keys), *keys, *args)
                                           for name, keys, args in calls], raise_errors=False)
                break
            except Exception as exc:        # LOADING comes as an exception (BusyLoadingError)
                self._wait_or_raise("pipeline of " + ", ".join(c[0] for c in calls), exc, patience)
        for i, (res, (name, keys, args)) in enumerate(zip(results, calls)):
            if isinstance(res, NoScriptError) or (isinstance(res, Exception) and refusal(res)):
                results[i] = self._run(name, keys, args, patience)      # it did not run: run it now
            elif isinstance(res, ResponseError):
                raise _translate(name, res) from res
            elif isinstance(res, Exception):
                raise res
        return results

    def _run_and_wait(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA then WAIT on the same connection (WAIT counts the replicas that acknowledged
        that connection's writes): a two-command pipeline. In a cluster, the pipeline goes to the
        node serving the keys' slot; a MOVED reply (the slot moved: failover, resharding) means
        the script did not run there, so the slot map is refreshed and the call sent again."""
        script = SCRIPTS[name]
        want = self.options.wait_replicas
        timeout_ms = max(int(self.options.wait_timeout.total_seconds() * 1000), 1)
        cluster = self.options.cluster
        rc: Any = self.redis                    # redis.Redis or redis.cluster.RedisCluster
        patience = Patience(self.busy_timeout)
        failures = 0            # NOSCRIPT and lost connections: three attempts, as before
        while failures < 3:
            client = rc
            if cluster:
                node = rc.get_node_from_key(keys[0] if keys else self.slot_key)
                client = rc.get_redis_connection(node)
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", want, timeout_ms)
            try:
                result, acked = pipe.execute(raise_on_error=False)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if refusal(exc):            # LOADING: the script did not run
                    self._wait_or_raise(name, exc, patience)
                    continue
                failures += 1
                if not cluster or failures == 3:
                    raise
                # a node failed (failover): refresh the slot map and try the new owner, as
                # redis-py's cluster client does for every other command
                rc.nodes_manager.initialize()
                continue
            if isinstance(result, NoScriptError):
                failures += 1
                log.debug("script %s not loaded on %s; loading it", name, self.url)
                self._load(script, keys)
                continue
            if isinstance(result, Exception) and refusal(result):
                # the script did not run (this path talks to one node, so redis-py follows no
                # MOVED or ASK here): wait, refresh the map, resend
                self._wait_or_raise(name, result, patience)
                if cluster and refusal(result) in ("moved", "clusterdown"):
                    rc.nodes_manager.initialize()       # the slot map may be stale (failover)
                continue
            if isinstance(result, ResponseError):
                raise _translate(name, result) from result
            if isinstance(result, Exception):
                raise result
            if isinstance(acked, Exception):
                raise acked
            if int(acked) < want:
                raise ReplicationError(
                    f"{name}: written on the master, but only {acked} of the {want} replicas "
                    f"required by Options.wait_replicas acknowledged it within "
                    f"{timeout_ms} ms; it is lost if the master fails before replicating it",
                    acknowledged=int(acked), required=want)
            return result
        raise StoreError(f"{name}: the script could not be run with WAIT after 3 attempts "
                         "(NOSCRIPT or a lost connection each time)")

    def _load(self, script: Script, keys: Sequence[str]) -> None:
        if self.options.cluster:
            # load on the node that serves the slot of the keys (all coretask keys share it) ...
            from redis.cluster import RedisCluster
            assert isinstance(self.redis, RedisCluster)
            node = self.redis.get_node_from_key(keys[0] if keys else self.slot_key)
            # (RedisCluster.script_load takes no target_nodes: give the node to execute_command)
            self.redis.execute_command("SCRIPT LOAD", script.source, target_nodes=node)
            # ... and on every other master, as best it can: a call redirected by ASK (the
            # slot migrating) runs on a node the slot map does not name yet
            for other in self.redis.get_primaries():
                if other.name != node.name:
                    try:
                        self.redis.execute_command("SCRIPT LOAD", script.source, target_nodes=other)
                    except redis.RedisError as exc:
                        log.debug("script %s not loaded on %s: %s", script.name, other.name, exc)
        else:
            self.redis.script_load(script.source)


class InFlight:
    """A script call sent by Transport.send whose reply is still to be read."""

    _UNSET: Any = object()

    def __init__(self, transport: Transport, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        self.transport, self.name, self.keys, self.args = transport, name, keys, args
        self.conn: Any = None
        self.value: Any = self._UNSET

    def result(self) -> Any:
        if self.value is not self._UNSET:
            return self.value
        conn, self.conn = self.conn, None
        try:
            reply: Any = conn.read_response()
        except (ResponseError, BusyLoadingError) as exc:
            reply = exc
        except BaseException as exc:
            conn.disconnect()               # a half-read reply must never reach the next user
            self.transport._idle.append(conn)
            if not isinstance(exc, Exception):
                raise
            log.debug("script %s: reply lost (%s); running it again", self.name, exc)
            self.value = self.transport.run(self.name, self.keys, self.args)
            return self.value
        self.transport._idle.append(conn)
        if isinstance(reply, NoScriptError) or (isinstance(reply, Exception) and refusal(reply)):
            self.value = self.transport.run(self.name, self.keys, self.args)    # it did not run: run it now
        elif isinstance(reply, ResponseError):
            raise _translate(self.name, reply) from reply
        else:
            self.value = reply
        return self.value


def _translate(name: str, exc: ResponseError) -> Exception:
    text = str(exc)
    if text.startswith("OOM") or "maxmemory" in text:
        return StoreFull(f"Redis is out of memory (maxmemory reached) during {name}: {text}")
    return ScriptError(f"Lua script {name} failed: {text}")
