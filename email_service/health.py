"""GET /healthz: whether the database and the broker answer, for load balancers and operators."""

from celery import current_app
from django.db import connection
from django.http import JsonResponse

from . import brake
from .models import EmailRequest

# Seconds the broker may take to answer before the service is reported unhealthy.
BROKER_TIMEOUT = 2


def healthz(request):
    """Report whether the database and the broker answer, and how old the oldest PENDING row is."""
    checks = {"database": _check_database(), "broker": _check_broker()}
    healthy = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if healthy else "error", **checks}
    if checks["database"] == "ok":
        body["oldest_pending_seconds"] = EmailRequest.objects.oldest_pending_age()
        body.update(_sending())
        if healthy and body["sending"] == "paused":
            # A paused sender still takes requests (the rows wait): 200, degraded.
            body["status"] = "degraded"
    return JsonResponse(body, status=200 if healthy else 503)


def _check_database():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def _check_broker():
    # The current app is the project's (medcor_backend2 sets it up as the package loads), so the
    # check opens the connection a publish would, with its URL and transport options.
    try:
        with current_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT)
        return "ok"
    except Exception as exc:
        return f"error: {type(exc).__name__}"


def _sending():
    try:
        return brake.describe(brake.current(refresh=True))
    except Exception as exc:  # the brake's table missing (migration not run) must not hide the rest
        return {"sending": f"error: {type(exc).__name__}"}
