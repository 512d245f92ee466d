"""What operators watch: /healthz, `celery inspect` against a running worker, and the log lines."""

import json
import logging
import subprocess
import sys
from datetime import timedelta

import pytest
from django.utils import timezone

from email_service import actions, outbox, sending
from email_service.models import EmailRequest
from medcor_backend2.logs import JsonFormatter

from .conftest import ROOT, free_port, service_env

PERSONAL = {
    "full_name": "Ingrid Larsen",
    "email": "ingrid.larsen@example.org",
    "phone": "+47 912 34 567",
    "job_profession": "Radiographer",
    "subject": "Sensitive subject line",
    "message": "Body text that must never reach a log.",
}


def test_healthz_is_200_with_database_and_broker_up(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "broker": "ok",
        "oldest_pending_seconds": None,
        "sending": "running",
        "sending_paused_reason": "",
        "sending_paused_until": None,
    }


def test_healthz_is_503_when_the_broker_does_not_answer(client, db, monkeypatch):
    # Celery reads this variable before its configured URL when it opens a connection to publish.
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "error"
    assert body["database"] == "ok"
    assert body["broker"].startswith("error: ")


def test_healthz_reports_the_age_of_the_oldest_pending_request(client, db):
    created = timezone.now() - timedelta(minutes=10)
    outbox.create_email_request(data={**PERSONAL, "created_at": created}, dispatch_on_commit=False)
    body = client.get("/healthz").json()
    assert body["oldest_pending_seconds"] == pytest.approx(600, abs=30)


@pytest.mark.integration
def test_celery_inspect_ping_stats_and_active_are_answered_by_the_running_worker(celery_worker, smtp_server):
    env = service_env(smtp_server.port)

    def inspect(*command):
        # Addressed to the test's worker, inspect returns on its reply instead of waiting out the
        # timeout for other nodes that might answer a broadcast.
        args = ["inspect", *command, "--destination", celery_worker.node, "--timeout", "10"]
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "medcor_backend2", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ping = inspect("ping")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "pong" in ping.stdout
    assert celery_worker.node in ping.stdout

    stats = inspect("stats", "--json")
    assert stats.returncode == 0, stats.stdout + stats.stderr
    [(node, details)] = json.loads(stats.stdout.strip().splitlines()[-1]).items()
    assert node == celery_worker.node
    assert details["pool"]["max-concurrency"] == 2

    active = inspect("active")
    assert active.returncode == 0, active.stdout + active.stderr
    assert celery_worker.node in active.stdout


# --- logs ----------------------------------------------------------------------------------------


def test_every_state_change_and_attempt_logs_one_line_with_the_request_id_and_nothing_personal(
    smtp, db, caplog, settings
):
    settings.EMAIL_SEND_CONFIRMATION = False
    smtp.script = ["421 4.3.2 Try again later"]
    caplog.set_level(logging.INFO, logger="email_service")
    row = outbox.create_email_request(data=PERSONAL, dispatch_on_commit=False)
    sending.send_email_request(row.pk, worker="test")  # deferred by the 421
    EmailRequest.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    sending.send_email_request(row.pk, worker="test")  # sent
    other = outbox.create_email_request(data=PERSONAL, dispatch_on_commit=False)
    actions.cancel_email_request(other)

    records = [r for r in caplog.records if r.name.startswith("email_service")]
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    lines = {"text": [text.format(r) for r in records], "json": [JsonFormatter().format(r) for r in records]}
    for style, formatted in lines.items():
        own = [line for line in formatted if str(row.pk) in line]
        # created, claimed (1), PROCESSING -> PENDING, claimed (2), PROCESSING -> SENT
        assert len(own) == 5, (style, formatted)
        assert sum("PENDING -> PROCESSING (by test)" in line for line in own) == 2, style
        assert any("PROCESSING -> SENT (attempt 2 sent, smtp code 250)" in line for line in own), style
        assert any(str(other.pk) in line and "CANCELLED" in line for line in formatted), style
        for line in formatted:
            for value in PERSONAL.values():
                assert value not in line, (style, line)
    assert all("\n" not in line for line in lines["json"])
    for line in lines["json"]:
        entry = json.loads(line)
        assert entry["email_request_id"] in (str(row.pk), str(other.pk))
        assert {"time", "level", "logger", "process", "message"} <= set(entry)
        assert entry["time"].endswith("+00:00")


def test_json_log_lines_carry_the_exception_on_the_same_line():
    try:
        raise ConnectionRefusedError("broker down")
    except ConnectionRefusedError:
        record = logging.getLogger("email_service").makeRecord(
            "email_service",
            logging.ERROR,
            __file__,
            1,
            "Dispatch failed for %s",
            ("abc",),
            sys.exc_info(),
            extra={"email_request_id": "abc"},
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "Dispatch failed for abc"
    assert entry["email_request_id"] == "abc"
    assert "ConnectionRefusedError: broker down" in entry["exc_info"]
