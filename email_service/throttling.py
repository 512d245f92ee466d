"""Per-client rate limits as DRF throttles, counted in the shared cache by django-ratelimit's core."""

import ipaddress

from django_ratelimit.core import get_usage
from rest_framework.throttling import BaseThrottle

from . import conf

# An IPv6 client is usually handed a whole /64: counted address by address, one host could
# rotate through 2**64 of them and never be limited.
IPV6_CLIENT_PREFIX = 64


def client_ip(request):
    """Return the caller's address: REMOTE_ADDR, or the X-Forwarded-For entry our own proxy added.

    With RATELIMIT_TRUSTED_PROXIES = N proxies in front of the service, the Nth address from the
    right of X-Forwarded-For is the one the outermost trusted proxy saw; anything left of it
    was written by the client and cannot be trusted.
    """
    trusted = conf.trusted_proxies()
    if trusted:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        forwarded = [part for part in forwarded if part]
        if len(forwarded) >= trusted and _parse_ip(forwarded[-trusted]) is not None:
            return forwarded[-trusted]
    return request.META.get("REMOTE_ADDR", "")


def client_network(request):
    """Return what one client's calls are counted under: its IPv4 address, or its IPv6 /64."""
    address = _parse_ip(client_ip(request))
    if address is None:
        return ""
    if address.version == 6 and address.ipv4_mapped:
        # ::ffff:a.b.c.d is an IPv4 client seen through a dual-stack socket: its own address.
        return str(address.ipv4_mapped)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(address)


def _parse_ip(value):
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


class ClientRateThrottle(BaseThrottle):
    """Refuse a client past get_rate() calls in the group's window; RATELIMIT_ENABLE switches it off.

    django-ratelimit counts with the cache's atomic add and incr, so concurrent calls on every
    process and host are all counted; its windows are fixed, each client's offset by a hash.
    """

    group = None
    seconds_left = None

    def get_rate(self):
        """Return the rate as django-ratelimit reads it: "5/m", "60/h"."""
        raise NotImplementedError

    def allow_request(self, request, view):
        usage = get_usage(request, group=self.group, key=_count_key, rate=self.get_rate(), increment=True)
        self.seconds_left = max(1, usage["time_left"]) if usage else None
        return not (usage and usage["should_limit"])

    def wait(self):
        return self.seconds_left


def _count_key(group, request):
    return client_network(request)


class CreateRateThrottle(ClientRateThrottle):
    """EMAIL_RATELIMIT_CREATE: submissions per client."""

    group = "email-create"

    def get_rate(self):
        return conf.ratelimit_create()


class ReadRateThrottle(ClientRateThrottle):
    """EMAIL_RATELIMIT_READ: list, detail and statistics calls together, per client."""

    group = "email-read"

    def get_rate(self):
        return conf.ratelimit_read()
