"""EMAIL_DAILY_LIMIT and EMAIL_MINUTE_LIMIT, counted in the shared cache across every worker.

A message is counted before its connection is opened (`reserve`), and the count is given back
when nothing was sent (`give_back`). The minute limit counts per calendar minute; the daily one
per rolling 24 hours, in ten-minute buckets, the oldest counted whole (so it errs towards
sending less). With both limits 0 nothing touches the cache.
"""

import math
import time
from dataclasses import dataclass

from django.core.cache import cache

from . import conf

BUCKET_SECONDS = 600
DAY_SECONDS = 24 * 3600
DAY_BUCKETS = DAY_SECONDS // BUCKET_SECONDS + 1
_PREFIX = "email-quota"


class QuotaReached(Exception):
    """A limit would be passed by one more message."""

    def __init__(self, limit, free_at):
        super().__init__(f"EMAIL_{limit.upper()}_LIMIT reached")
        self.limit = limit
        self.free_at = free_at  # epoch seconds when one more message fits


@dataclass(frozen=True)
class Reservation:
    """The cache counters one message was counted in."""

    keys: tuple = ()


def _minute_key(minute):
    return f"{_PREFIX}:minute:{minute}"


def _day_key(bucket):
    return f"{_PREFIX}:day:{bucket}"


def _count_in(key, timeout):
    # add() then incr(): atomic in every shared backend, and the key expires on its own.
    cache.add(key, 0, timeout=timeout)
    try:
        return cache.incr(key)
    except ValueError:  # expired between the two calls
        cache.add(key, 1, timeout=timeout)
        return 1


def _uncount(keys):
    for key in keys:
        try:
            cache.decr(key)
        except ValueError:
            pass


def day_counts(now=None):
    """Map each ten-minute bucket of the last 24 hours to the messages counted in it."""
    now = now or time.time()
    current = int(now // BUCKET_SECONDS)
    buckets = range(current - DAY_BUCKETS + 1, current + 1)
    found = cache.get_many([_day_key(bucket) for bucket in buckets])
    return {bucket: found.get(_day_key(bucket), 0) for bucket in buckets if found.get(_day_key(bucket))}


def sent_today(now=None):
    """Messages counted over the last 24 hours (0 when no daily limit is set)."""
    return sum(day_counts(now).values()) if conf.daily_limit() else 0


def daily_frees_at(now=None):
    """Epoch seconds when the rolling window lets one more message go: the oldest bucket ages out."""
    now = now or time.time()
    counts = day_counts(now)
    if not counts:
        return now
    return (min(counts) + 1) * BUCKET_SECONDS + DAY_SECONDS


def reserve(now=None):
    """Count one message against the limits, or raise QuotaReached; return what was counted."""
    daily, per_minute = conf.daily_limit(), conf.minute_limit()
    if not daily and not per_minute:
        return Reservation()
    now = now or time.time()
    keys = []
    if per_minute:
        minute = int(now // 60)
        key = _minute_key(minute)
        keys.append(key)
        if _count_in(key, timeout=120) > per_minute:
            _uncount(keys)
            raise QuotaReached("minute", (minute + 1) * 60)
    if daily:
        key = _day_key(int(now // BUCKET_SECONDS))
        keys.append(key)
        # Count first, then look: two workers racing for the last message cannot both have it.
        _count_in(key, timeout=DAY_SECONDS + 2 * BUCKET_SECONDS)
        if sum(day_counts(now).values()) > daily:
            _uncount(keys)
            raise QuotaReached("daily", daily_frees_at(now))
    return Reservation(tuple(keys))


def give_back(reservation):
    """Uncount a reserved message that was not sent."""
    _uncount(reservation.keys)


def allows_acknowledgement(now=None):
    """Say whether acknowledgements may still go: below EMAIL_ACKNOWLEDGEMENT_SHARE of the daily limit."""
    daily = conf.daily_limit()
    return not daily or sent_today(now) < math.floor(daily * conf.acknowledgement_share())


def reset():
    """Forget every count (for tests and after changing the account)."""
    now = time.time()
    current = int(now // BUCKET_SECONDS)
    minute = int(now // 60)
    cache.delete_many(
        [_day_key(bucket) for bucket in range(current - DAY_BUCKETS, current + 2)]
        + [_minute_key(m) for m in range(minute - 2, minute + 2)]
    )
