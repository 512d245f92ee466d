"""Per-client rate limits on the public endpoints, kept in the shared cache by django-ratelimit."""

import functools
import ipaddress

from django.conf import settings
from django_ratelimit.core import get_usage
from rest_framework.exceptions import Throttled


def client_ip(request):
    """The caller's address: REMOTE_ADDR, or the entry in X-Forwarded-For added by our own proxy.

    With RATELIMIT_TRUSTED_PROXIES = N proxies in front of the service, the Nth address from the
    right of X-Forwarded-For is the one the outermost trusted proxy saw; anything left of it
    was written by the client and cannot be trusted.
    """
    trusted = getattr(settings, "RATELIMIT_TRUSTED_PROXIES", 0)
    if trusted:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        forwarded = [part for part in forwarded if part]
        if len(forwarded) >= trusted and _is_ip(forwarded[-trusted]):
            return forwarded[-trusted]
    return request.META.get("REMOTE_ADDR", "")


def _is_ip(value):
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _client_key(group, request):
    return client_ip(request)


def rate_limited(group, rate):
    """Answer 429 with Retry-After once a client exceeds `rate()` calls to this view method."""

    def decorator(method):
        @functools.wraps(method)
        def wrapper(view, request, *args, **kwargs):
            usage = get_usage(request, group=group, key=_client_key, rate=rate(), increment=True)
            if usage and usage["should_limit"]:
                raise Throttled(wait=max(1, usage["time_left"]))
            return method(view, request, *args, **kwargs)

        return wrapper

    return decorator
