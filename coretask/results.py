"""Results: a task's return value as it is stored (task field rv) and read back by get_result.

A result is written with the processor's serializer: JSON (the default, and for a custom
serializer object, whose protocol carries calls, not values) or dill. JSON needs no trust; a dill
result is unpickled by whoever calls get_result, so with ``Options.signing_key`` it carries an
HMAC of the task id and the bytes, checked before anything is loaded (the same rule as task
payloads: coretask/signing.py). The stored form is one tag byte, then the body:
``j<json>`` or ``d<hex mac>:<dill>`` (an empty mac when no key is configured).
"""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from .encoding import dumps_value
from .errors import PayloadTooLarge, ResultUnavailable, SerializationError
from .options import Options

__all__ = ["encode_result", "decode_result"]

_DOMAIN = b"coretask-result-v1"


def _mac(key: bytes, task_id: str, body: bytes) -> bytes:
    m = hmac.new(key, digestmod=hashlib.sha256)
    for part in (_DOMAIN, task_id.encode(), body):
        m.update(len(part).to_bytes(8, "big"))
        m.update(part)
    return m.hexdigest().encode()


def encode_result(task_id: str, target: str, value: Any, options: Options) -> bytes:
    """The stored form of ``value``; SerializationError or PayloadTooLarge (the task's attempt
    then fails, not retried: running it again would return the same value)."""
    if options.serializer == "dill":
        import dill
        try:
            body = dill.dumps(value, recurse=True)
        except Exception as exc:
            raise SerializationError(f"the return value of task {task_id} ({target}) cannot be pickled by dill: "
                                     f"{exc}") from None
        keys = options.signing_key or ()
        raw = b"d" + (_mac(keys[0], task_id, body) if keys else b"") + b":" + body  # type: ignore[index]
    else:
        try:
            raw = b"j" + dumps_value(value).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"the return value of task {task_id} ({target}) cannot be stored as JSON: {exc}; return plain data "
                "(dicts, lists, strings, numbers, dates), or use Options(serializer='dill', signing_key=...)") from None
    if len(raw) > options.max_payload_bytes:
        raise PayloadTooLarge(f"the return value of task {task_id} ({target}) is {len(raw)} bytes encoded, over "
                              f"max_payload_bytes={options.max_payload_bytes}; store large results elsewhere and "
                              "return a reference, or raise Options.max_payload_bytes")
    return raw


def decode_result(task_id: str, raw: bytes, options: Options) -> Any:
    """The value ``encode_result`` stored. A dill result is loaded only when its mac verifies
    with one of the configured keys (or no key is configured and allow_unsigned_pickle is set)."""
    tag, body = raw[:1], raw[1:]
    if tag == b"j":
        return json.loads(body)
    if tag == b"d":
        mac, _, body = body.partition(b":")
        keys = options.signing_key or ()
        if keys:
            if not any(hmac.compare_digest(mac, _mac(k, task_id, body)) for k in keys):  # type: ignore[union-attr]
                raise ResultUnavailable(f"the result of task {task_id} is not signed by any of this processor's "
                                        "signing keys; it was not loaded")
        elif not options.allow_unsigned_pickle:
            raise ResultUnavailable(f"the result of task {task_id} is pickled (dill) and this processor has no "
                                    "signing_key (nor allow_unsigned_pickle=True); it was not loaded")
        import dill
        return dill.loads(body)
    raise ResultUnavailable(f"the stored result of task {task_id} is in an unknown format (tag {tag!r})")
