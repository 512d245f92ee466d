"""The operators' management commands: test_email, purge_emails, seed_demo."""

import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.files.base import ContentFile
from django.core.management import CommandError, call_command
from django.utils import timezone

from email_service import outbox
from email_service.models import EmailRequest, EmailStatus

from .conftest import ROOT, free_port, service_env, start_worker, wait_for
from .files import pdf_bytes


def manage(*args, env, timeout=90):
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- test_email ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_test_email_waits_for_sent_and_exits_0_with_the_mail_delivered(
    celery_worker, smtp, smtp_server, settings
):
    result = manage(
        "test_email",
        "--email",
        "operator@example.org",
        "--name",
        "Ops Check",
        "--wait",
        "30",
        env=service_env(smtp_server.port),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pk = re.search(r"Created email request ([0-9a-f-]{36})", result.stdout).group(1)
    assert "Final status: SENT" in result.stdout
    [received] = wait_for(lambda: smtp.to(settings.SUPPORT_EMAIL), message="the support mail")
    assert received["message"]["X-Email-Request-ID"] == pk
    assert received["message"]["Reply-To"] == "operator@example.org"
    assert EmailRequest.objects.get(pk=pk).status == EmailStatus.SENT


@pytest.mark.integration
def test_test_email_exits_non_zero_and_prints_the_error_when_smtp_cannot_be_reached(
    smtp_server, transactional_db, tmp_path
):
    # A worker of its own, on a queue of its own, sending to a port where nothing listens.
    dead_port = free_port()
    queue = f"{os.environ.get('CELERY_TASK_DEFAULT_QUEUE', 'emails')}-dead-smtp"
    worker = start_worker(tmp_path, dead_port, name="deadsmtp", CELERY_TASK_DEFAULT_QUEUE=queue)
    try:
        # No retry budget, so the first refused connection is final and the test need not wait for backoff.
        env = service_env(dead_port, CELERY_TASK_DEFAULT_QUEUE=queue, EMAIL_MAX_RETRIES=0)
        result = manage("test_email", "--email", "operator@example.org", "--wait", "30", env=env)
    finally:
        worker.stop()
    assert result.returncode != 0
    # A refused connection is about the server, not the mail: the row waits, sending is paused.
    assert "Final status: PENDING" in result.stdout
    assert "The email was not sent: sending is paused" in result.stderr
    assert "refused" in result.stderr.lower() or "connect" in result.stderr.lower(), result.stderr


def test_test_email_exits_non_zero_with_a_clear_message_when_the_broker_cannot_be_reached(
    smtp_server, transactional_db
):
    env = service_env(smtp_server.port, CELERY_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    result = manage("test_email", "--wait", "5", env=env)
    assert result.returncode != 0
    assert "Could not reach the broker" in result.stderr
    pk = re.search(r"Created email request ([0-9a-f-]{36})", result.stdout).group(1)
    # The row waits for the periodic dispatch; cancelled here so that no other test's worker sends it.
    assert EmailRequest.objects.filter(pk=pk).cancel() == 1


def test_test_email_without_a_worker_says_it_is_still_pending(smtp_server, transactional_db):
    env = service_env(smtp_server.port, CELERY_TASK_DEFAULT_QUEUE="emails-nobody-listens")
    started = time.monotonic()
    result = manage("test_email", "--wait", "2", env=env)
    assert result.returncode != 0
    assert "still PENDING after 2s" in result.stderr
    assert "No worker has tried it" in result.stderr and "emails-nobody-listens" in result.stderr
    assert time.monotonic() - started < 60
    pk = re.search(r"Created email request ([0-9a-f-]{36})", result.stdout).group(1)
    EmailRequest.objects.filter(pk=pk).cancel()


# --- purge_emails ---------------------------------------------------------------------------------


def old_request(status, *, days, attachment=False):
    created = timezone.now() - timedelta(days=days)
    row = outbox.create_email_request(
        data={
            "full_name": "Old Row",
            "email": "old@example.org",
            "created_at": created,
            "next_attempt_at": created,
        },
        upload=ContentFile(pdf_bytes(), name="letter.pdf") if attachment else None,
        content_type="application/pdf" if attachment else "",
        dispatch_on_commit=False,
    )
    if status == EmailStatus.CANCELLED:
        EmailRequest.objects.filter(pk=row.pk).cancel()
    elif status != EmailStatus.PENDING:
        token = EmailRequest.objects.claim(row.pk, worker="test")
        if status == EmailStatus.SENT:
            EmailRequest.objects.complete(row.pk, token)
        else:
            EmailRequest.objects.fail(row.pk, token, error="550")
    return EmailRequest.objects.get(pk=row.pk)


def orphan_file(media_root, name, *, hours_old):
    path = media_root / "email_attachments" / "2020" / "01" / "01" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"left behind")
    stamp = time.time() - hours_old * 3600
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def retention_scene(media_root, settings):
    settings.EMAIL_RETENTION_DAYS = 90
    scene = {
        "old_sent": old_request(EmailStatus.SENT, days=120, attachment=True),
        "old_failed": old_request(EmailStatus.FAILED, days=95),
        "old_cancelled": old_request(EmailStatus.CANCELLED, days=91, attachment=True),
        "old_pending": old_request(EmailStatus.PENDING, days=100),
        "recent_sent": old_request(EmailStatus.SENT, days=10, attachment=True),
    }
    scene["files"] = {
        key: media_root / row.file_attached.name for key, row in scene.items() if row.file_attached
    }
    scene["old_orphan"] = orphan_file(media_root, "orphan.pdf", hours_old=5)
    scene["fresh_orphan"] = orphan_file(media_root, "uploading.pdf", hours_old=0)
    return scene


@pytest.mark.django_db(transaction=True)
def test_purge_emails_removes_old_final_rows_their_files_and_orphans_and_keeps_the_rest(retention_scene):
    out = StringIO()
    call_command("purge_emails", stdout=out)
    assert out.getvalue().strip() == (
        "Deleted 3 request(s) older than 90 days with 2 attachment file(s), and 1 orphaned file(s)."
    )
    remaining = set(EmailRequest.objects.values_list("pk", flat=True))
    assert remaining == {retention_scene["old_pending"].pk, retention_scene["recent_sent"].pk}
    files = retention_scene["files"]
    assert not files["old_sent"].exists() and not files["old_cancelled"].exists()
    assert files["recent_sent"].exists()
    assert not retention_scene["old_orphan"].exists()
    assert retention_scene["fresh_orphan"].exists()


@pytest.mark.django_db(transaction=True)
def test_purge_emails_dry_run_counts_and_changes_nothing(retention_scene):
    out = StringIO()
    call_command("purge_emails", "--dry-run", stdout=out)
    assert out.getvalue().strip() == (
        "Would delete 3 request(s) older than 90 days with 2 attachment file(s), and 1 orphaned file(s)."
    )
    assert EmailRequest.objects.count() == 5
    assert all(path.exists() for path in retention_scene["files"].values())
    assert retention_scene["old_orphan"].exists()


def test_purge_runs_daily_from_beat(settings):
    [entry] = [e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"].endswith(".purge_old_emails")]
    assert entry["schedule"] == 24 * 60 * 60


# --- seed_demo ------------------------------------------------------------------------------------


def test_seed_demo_creates_a_month_of_requests_in_a_mix_of_statuses(db, media_root):
    out = StringIO()
    call_command("seed_demo", "--count", "120", "--force", stdout=out)
    assert out.getvalue().startswith("Created 120 demo email requests:")
    statuses = set(EmailRequest.objects.values_list("status", flat=True))
    assert {EmailStatus.PENDING, EmailStatus.SENT, EmailStatus.FAILED, EmailStatus.CANCELLED} <= statuses
    oldest = EmailRequest.objects.order_by("created_at").first().created_at
    assert timezone.now() - oldest > timedelta(days=14)
    sent = EmailRequest.objects.filter(status=EmailStatus.SENT)
    assert all(row.sent_at > row.created_at and row.attempts.exists() for row in sent)
    with_file = EmailRequest.objects.with_attachment().first()
    assert with_file.file_attached.read().startswith(b"%PDF-")


def test_seed_demo_refuses_to_run_outside_debug_without_force(db, settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DJANGO_DEBUG"):
        call_command("seed_demo")
    assert not EmailRequest.objects.exists()
