"""Reads for people: the cached statistics of the API and the admin's delivery report and chart."""

from datetime import datetime, time, timedelta

from django.core.cache import cache
from django.utils import timezone

from . import conf
from .decoys import Decoy
from .models import EmailRequest, EmailStatus, success_rate

STATUS_COLOURS = {
    EmailStatus.PENDING: "#b45309",
    EmailStatus.PROCESSING: "#1d4ed8",
    EmailStatus.SENT: "#15803d",
    EmailStatus.FAILED: "#b91c1c",
    EmailStatus.CANCELLED: "#6b7280",
}
REPORT_DAYS = 30
# A due PENDING row is normally claimed within a dispatch interval; this long means nothing consumes.
STUCK_AFTER_SECONDS = 10 * 60

STATISTICS_CACHE_KEY = "email-service:statistics"


def statistics_cache_key(*, public):
    """The cache key of one audience's statistics: the public's and the staff's differ."""
    return f"{STATISTICS_CACHE_KEY}:{'public' if public else 'staff'}"


def cached_statistics(*, public):
    """Return the statistics, computed at most once per EMAIL_STATISTICS_CACHE_SECONDS per audience.

    The aggregate reads the whole table (over a second at a million rows), and the endpoint is
    public: callers within the period share one result, marked with the time it was taken.
    """
    seconds = conf.statistics_cache_seconds()
    key = statistics_cache_key(public=public)
    body = cache.get(key) if seconds else None
    if body is None:
        counts = public_statistics() if public else EmailRequest.objects.submissions().statistics()
        body = {**counts, "as_of": timezone.now().isoformat()}
        if seconds:
            cache.set(key, body, timeout=seconds)
    return body


def public_statistics(now=None):
    """Count the requests as anyone but staff sees them: the honeypot's decoys among them.

    The anonymous list shows the decoys as requests; statistics without them would give their
    number away (the list's count less `total_requests`), and with it which submissions were caught.
    """
    now = now or timezone.now()
    counts = EmailRequest.objects.submissions().statistics(now)
    for name, count in Decoy.objects.statistics(now).items():
        counts[name] += count
    counts["success_rate"] = success_rate(counts["sent_requests"], counts["failed_requests"])
    return counts


def delivery_report(now=None, days=REPORT_DAYS):
    """Gather the statistics page's numbers: all-time counts, the last `days` days, delivery times."""
    now = now or timezone.now()
    first_day = timezone.localdate(now) - timedelta(days=days - 1)
    start = timezone.make_aware(datetime.combine(first_day, time.min))
    window = EmailRequest.objects.submissions().filter(created_at__gte=start)
    series = window.daily_counts(first_day, days)
    sent = sum(day["sent"] for day in series)
    failed = sum(day["failed"] for day in series)
    window_stats = window.statistics(now)
    oldest_due = (
        EmailRequest.objects.due(now)
        .order_by("next_attempt_at")
        .values_list("next_attempt_at", flat=True)
        .first()
    )
    counts = EmailRequest.objects.submissions().statistics(now)
    return {
        "counts": counts,
        "by_status": status_rows(counts),
        "days": days,
        "series": series,
        "chart": chart(series),
        "window_submitted": sum(day["submitted"] for day in series),
        "window_sent": sent,
        "window_failed": failed,
        # The same formula as the API's, over the rows created in the window.
        "success_rate": window_stats["success_rate"],
        "median_delivery_seconds": window_stats["median_delivery_seconds"],
        "p95_delivery_seconds": window_stats["p95_delivery_seconds"],
        "oldest_pending_seconds": EmailRequest.objects.oldest_pending_age(now),
        "overdue_seconds": (now - oldest_due).total_seconds() if oldest_due else None,
    }


def verdict(report):
    """Sum the report up in one sentence: mail is flowing, failing, or not moving."""
    counts, overdue = report["counts"], report["overdue_seconds"]
    if overdue is not None and overdue > STUCK_AFTER_SECONDS:
        return {
            "state": "stuck",
            "title": "Mail is not moving.",
            "text": f"A request has been due for {duration(overdue)} without being sent: check the worker "
            "and the broker (/healthz, celery inspect ping).",
        }
    if counts["failed_last_24h"] and counts["failed_last_24h"] >= counts["sent_last_24h"]:
        return {
            "state": "failing",
            "title": "Mail is failing.",
            "text": "As many requests failed as were sent in the last 24 hours: check the SMTP settings and "
            "the attempt log of a failed request.",
        }
    return {
        "state": "ok",
        "title": "Mail is flowing.",
        "text": "No request is waiting past its time.",
    }


def duration(seconds):
    """Say `seconds` the way a person reads a duration: 4.2 s, 3 min 5 s, 2 h 10 min, 3 d 4 h."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def status_rows(counts):
    """List each status with its count and its colour, in the statuses' order."""
    return [
        {"status": status, "count": counts[f"{status.lower()}_requests"], "colour": STATUS_COLOURS[status]}
        for status in EmailStatus
    ]


def chart(series, width=24, gap=6, height=160):
    """Lay out one bar per day (submissions, with the failed part in red) for an inline SVG."""
    top = max([day["submitted"] for day in series] + [2])
    top += top % 2  # even, so that the middle grid line has a whole number
    bars = []
    for index, day in enumerate(series):
        submitted_height = round(height * day["submitted"] / top, 1)
        failed_height = round(height * day["failed"] / top, 1)
        bars.append(
            {
                **day,
                "x": index * (width + gap),
                "y": round(height - submitted_height, 1),
                "height": submitted_height,
                "failed_y": round(height - failed_height, 1),
                "failed_height": failed_height,
                "label": day["day"].day if index % 5 == 0 or index == len(series) - 1 else "",
            }
        )
    return {
        "bars": bars,
        "bar_width": width,
        "plot_width": len(series) * (width + gap) - gap,
        "height": height,
        "top": top,
        "middle": top // 2,
    }
