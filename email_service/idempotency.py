"""Idempotency-Key on create: a repeated submission answers with the first answer."""

import hashlib
import json
from collections.abc import Mapping
from contextlib import contextmanager

from django.core.cache import cache
from rest_framework import status
from rest_framework.exceptions import APIException

KEY_TTL = 24 * 60 * 60
# How long a key stays reserved while its first request is still being processed.
PENDING_TTL = 300


class IdempotencyKeyReused(APIException):
    """The key was already used with a different request body."""

    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "This Idempotency-Key was already used with a different request."
    default_code = "idempotency_key_reused"


class IdempotencyKeyInProgress(APIException):
    """A request with the same key is still being processed."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "A request with this Idempotency-Key is still being processed; retry shortly."
    default_code = "idempotency_key_in_progress"


def fingerprint(request):
    """Hash the submitted fields and file contents, independent of their order or encoding."""
    digest = hashlib.sha256()
    data = request.data
    if isinstance(data, Mapping):
        fields = {
            key: data.getlist(key) if hasattr(data, "getlist") else data[key]
            for key in data
            if key not in request.FILES
        }
    else:
        fields = data  # not a form at all: the serializer will refuse it
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name in sorted(request.FILES):
        upload = request.FILES[name]
        digest.update(name.encode())
        for chunk in upload.chunks():
            digest.update(chunk)
        upload.seek(0)
    return digest.hexdigest()


class Replay(Exception):
    """The key was seen before with the same body: answer with this stored body."""

    def __init__(self, body):
        self.body = body


@contextmanager
def idempotent(request):
    """Reserve the request's Idempotency-Key while it is processed; yield a function to store the answer.

    Raises Replay with the first answer's body for a repeat, or an APIException for a conflict.
    Without the header, nothing is reserved.
    """
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key:
        yield lambda body: None
        return
    cache_key = "idempotency:" + hashlib.sha256(key.encode()).hexdigest()
    print_ = fingerprint(request)
    if not cache.add(cache_key, {"fingerprint": print_, "body": None}, timeout=PENDING_TTL):
        seen = cache.get(cache_key) or {}
        if seen.get("fingerprint") != print_:
            raise IdempotencyKeyReused()
        if seen.get("body") is None:
            raise IdempotencyKeyInProgress()
        raise Replay(seen["body"])
    stored = False

    def store(body):
        nonlocal stored
        cache.set(cache_key, {"fingerprint": print_, "body": body}, timeout=KEY_TTL)
        stored = True

    try:
        yield store
    finally:
        if not stored:
            # The request failed (a 400, say): the same key may be used again.
            cache.delete(cache_key)
