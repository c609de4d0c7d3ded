"""Payload signing, and the checks a worker makes before it reads a task.

Why: a worker runs what it finds in Redis. With the JSON serializer that is "import an allowed
module, call a function with plain data"; with a pickle-based serializer (``dill``) loading the
payload alone can run any code. So whoever can write the coretask keys must not be able to
make a worker run something no producer asked for.

* ``Options(signing_key=...)``: every producer signs each task with HMAC-SHA256 over its id,
  tenant, queue, serializer, target and payload (field ``sg`` of the task hash), and workers
  verify it before the payload is decoded or any module imported. A tampered, unsigned or
  re-homed task (copied into another tenant's queue) is dead-lettered with the reason
  (:class:`~coretask.errors.TaskRefused`), never run and never retried. Keys rotate: the first
  key signs, every key verifies.
* A schedule's run gets its task id in Lua at tick time, which a producer cannot sign ahead.
  ``upsert_schedule`` signs the schedule instead - its id, tenant, queue, serializer, target and
  payload - and the tick copies that signature to the run; the worker verifies a run against the
  schedule id written inside the signature. A schedule signature can thus only vouch for a run of
  exactly that schedule's call in that tenant and queue, which is what a tick makes anyway.
* A worker configured with a non-JSON serializer refuses to start without a signing key, and a
  producer refuses to enqueue with one, unless ``Options(allow_unsigned_pickle=True)``.

Signature format (the ``sg`` field): ``t1:<hex>`` for a task, ``s1:<hex>:<schedule id>`` for a
schedule (and the runs it enqueues). The MAC covers a length-prefixed encoding of the fields, so
no two different field tuples can produce the same message.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigurationError, TaskRefused
from .targets import refusal

if TYPE_CHECKING:
    from .encoding import Encoded
    from .options import Options

__all__ = ["Signer", "TaskGuard", "signer_for", "unsigned_pickle_problem", "check_signing_keys",
           "check_allowed_modules"]

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
TASK, SCHEDULE = "t1", "s1"
_DOMAIN = b"coretask-signature-v1"


# ------------------------------------------------------------------------------ options

def check_signing_keys(value: Any) -> tuple[bytes, ...] | None:
    """Options.signing_key as a tuple of keys (the first signs), or ConfigurationError. Never
    puts a key into the message."""
    if value is None:
        return None
    keys = [value] if isinstance(value, (bytes, bytearray, str)) else value
    if not isinstance(keys, (list, tuple)) or not keys:
        raise ConfigurationError("Options.signing_key must be bytes, a str, or a non-empty list of them "
                                 f"(the first signs, all verify), got {type(value).__name__}")
    out = []
    for i, key in enumerate(keys):
        if not isinstance(key, (bytes, bytearray, str)):
            raise ConfigurationError(f"Options.signing_key: key {i} must be bytes or str, got {type(key).__name__}")
        raw = key.encode() if isinstance(key, str) else bytes(key)
        if len(raw) < MIN_KEY_BYTES:
            raise ConfigurationError(
                f"Options.signing_key: key {i} is {len(raw)} bytes; use at least {MIN_KEY_BYTES} "
                "(e.g. secrets.token_hex(32))")
        out.append(raw)
    return tuple(out)


def check_allowed_modules(value: Any) -> tuple[str, ...] | None:
    """Options.allowed_modules as a tuple of module prefixes, or ConfigurationError."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigurationError("Options.allowed_modules must be a list of module name prefixes such as "
                                 f"['myapp.tasks'], got {value!r}")
    for m in value:
        if not isinstance(m, str) or not m.strip(".") or any(c.isspace() or c == ":" for c in m):
            raise ConfigurationError(f"Options.allowed_modules: {m!r} is not a module name prefix")
    return tuple(value)


def unsigned_pickle_problem(options: Options) -> str | None:
    """The reason a non-JSON serializer may not be used as configured, or None."""
    from .encoding import serializer_for

    name = serializer_for(options.serializer).name
    if name == "json" or options.signing_key or options.allow_unsigned_pickle:
        return None
    return (f"Options.serializer={name!r} without Options.signing_key: a worker would load (unpickle) "
            "whatever payload it finds in Redis, so anyone who can write the coretask keys could run any "
            "code on the workers. Set Options(signing_key=...) on producers and workers (payloads are "
            "then signed at enqueue and verified before they are loaded), or Options(allow_unsigned_pickle="
            "True) if whoever can write to this Redis may run code on your workers anyway")


# ------------------------------------------------------------------------------ signing

def _mac(key: bytes, kind: str, ident: str, tenant: str, queue: str, serializer: str, target: str,
         payload: bytes) -> str:
    m = hmac.new(key, digestmod=hashlib.sha256)
    for part in (_DOMAIN, kind.encode(), ident.encode(), tenant.encode(), queue.encode(), serializer.encode(),
                 target.encode(), payload):
        m.update(len(part).to_bytes(8, "big"))
        m.update(part)
    return m.hexdigest()


class Signer:
    """Signs with the first key, verifies with any."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a Signer needs at least one key")
        self._keys = tuple(keys)

    def __repr__(self) -> str:
        return f"<Signer with {len(self._keys)} key(s)>"

    def sign_task(self, task_id: str, tenant: str, queue: str, enc: Encoded) -> str:
        mac = _mac(self._keys[0], TASK, task_id, tenant, queue, enc.serializer, enc.target, enc.payload)
        return f"{TASK}:{mac}"

    def sign_schedule(self, schedule_id: str, tenant: str, queue: str, enc: Encoded) -> str:
        mac = _mac(self._keys[0], SCHEDULE, schedule_id, tenant, queue, enc.serializer, enc.target, enc.payload)
        return f"{SCHEDULE}:{mac}:{schedule_id}"

    def task_moved(self, signature: str, old_id: str, new_id: str, tenant: str, queue: str, serializer: str,
                   target: str, payload: bytes) -> str:
        """The signature of a task that rebalance moves to a new id: verified under the old id
        (TaskRefused when it does not verify: nothing unsigned is ever vouched for), then made
        for the new one. A schedule's signature names the schedule, not the run, and stays."""
        if signature.partition(":")[0] != TASK:
            return signature
        self.verify(signature, old_id, tenant, queue, serializer, target, payload)
        return f"{TASK}:{_mac(self._keys[0], TASK, new_id, tenant, queue, serializer, target, payload)}"

    def verify(self, signature: str, task_id: str, tenant: str, queue: str, serializer: str, target: str,
               payload: bytes) -> None:
        """TaskRefused unless ``signature`` is a valid signature of these fields by one of the keys."""
        if not signature:
            raise TaskRefused(f"task {task_id} is unsigned, and this worker runs only signed tasks "
                              "(Options.signing_key)")
        kind, _, rest = signature.partition(":")
        mac, _, ident = rest.partition(":")
        if kind == TASK and not ident:
            ident = task_id            # a task's signature names no id: it is bound to the fetched one
        elif kind != SCHEDULE or not ident:
            raise TaskRefused(f"task {task_id} has a malformed signature")
        for key in self._keys:      # every key is tried, so the time taken does not tell which matched
            ok = hmac.compare_digest(mac, _mac(key, kind, ident, tenant, queue, serializer, target, payload))
            if ok:
                return
        what = "task" if kind == TASK else f"schedule {ident}"
        raise TaskRefused(
            f"task {task_id}: the signature does not match ({what}, tenant {tenant}, queue {queue}): its payload, "
            "target, serializer, queue or tenant was changed after it was signed, or it was signed with a "
            "key this worker does not have")


def signer_for(options: Options) -> Signer | None:
    keys = options.signing_key
    return Signer(keys) if keys else None   # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the worker

class SignedTask(Protocol):
    """What TaskGuard reads of a fetched task (the gateway's Leased record has it): the stored
    fields the signature covers, and the tenant field of the task's own hash."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def serializer(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def signature(self) -> str: ...
    @property
    def stored_tenant(self) -> str | None: ...


class TaskGuard:
    """What a worker checks for every task before decoding its payload or importing its target."""

    def __init__(self, options: Options) -> None:
        problem = unsigned_pickle_problem(options)
        if problem:
            raise ConfigurationError(f"this worker refuses to start: {problem}")
        self.signer = signer_for(options)
        self.allowed: tuple[str, ...] | None = options.allowed_modules   # type: ignore[assignment]
        name = getattr(options.serializer, "name", options.serializer)
        if self.signer is None and name != "json":
            log.warning("worker runs serializer %r without a signing key (allow_unsigned_pickle=True): "
                        "whoever can write to this Redis can run code here", name)

    def check(self, task: SignedTask) -> None:
        """TaskRefused when the task must not be read at all."""
        if self.signer is not None:
            if task.stored_tenant is not None and task.stored_tenant != task.tenant:
                raise TaskRefused(f"task {task.id} of tenant {task.stored_tenant} was found in tenant "
                                  f"{task.tenant}'s queue")
            self.signer.verify(task.signature, task.id, task.tenant, task.queue, task.serializer, task.target,
                               task.payload)
        if task.serializer != "raw":
            why = refusal(task.target, self.allowed)
            if why:
                raise TaskRefused(why)
