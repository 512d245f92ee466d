"""Gmail's behaviour end to end: a real Celery worker sending through the real Postfix (tests/mta.py).

Each test starts a worker of its own (and beat where the brake must release by itself), logged
in as one of the MTA's users, whose replies are Gmail's.
"""

import hashlib
import io
import os
import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from email_service import brake, outbox
from email_service.models import EmailRequest, EmailStatus
from email_service.outcomes import BrakeKind

from .conftest import start_beat, start_worker, wait_for

pytestmark = pytest.mark.integration

# Short waits, so a throttle's backoff and probe happen within the test.
FAST = {
    "EMAIL_TIMEOUT": "10",
    "EMAIL_SEND_TIME_LIMIT": "30",
    "EMAIL_CLAIM_LEASE": "60",
    "EMAIL_BRAKE_BACKOFF": "1",
    "EMAIL_BRAKE_BACKOFF_MAX": "2",
    "EMAIL_BRAKE_CACHE_SECONDS": "0.2",
    "EMAIL_SEND_CONFIRMATION": "false",
}


@pytest.fixture
def sender(mta, transactional_db, tmp_path, settings):
    """Start a worker (and beat, with `beat=True`) sending through the MTA as `user`."""
    settings.EMAIL_SEND_TIME_LIMIT = float(FAST["EMAIL_SEND_TIME_LIMIT"])
    started = []

    def start(user="sender", beat=False, **env):
        env = {**mta.env(user), **FAST, "MEDIA_ROOT": settings.MEDIA_ROOT, **env}
        name = f"gmail-{user}-{uuid.uuid4().hex[:6]}"
        started.append(start_worker(tmp_path, mta.port, name=name, **env))
        if beat:
            started.append(start_beat(tmp_path, mta.port, **env))
        return started[0]

    yield start
    for process in reversed(started):
        process.stop()


def submit(count=1, **kwargs):
    rows = []
    for number in range(count):
        row = outbox.create_email_request(
            data={
                "full_name": f"Gmail Test {number}",
                "email": f"g{number}-{uuid.uuid4().hex[:6]}@example.org",
                "subject": f"Gmail {number}",
            },
            dispatch_on_commit=False,
            **kwargs,
        )
        outbox.publish(row)
        rows.append(row)
    return rows


def rows_of(rows):
    return list(EmailRequest.objects.filter(pk__in=[r.pk for r in rows]))


def all_in(rows, status):
    found = rows_of(rows)
    return len(found) == len(rows) and all(row.status == status for row in found)


def held(rows):
    """Every row tried at most once and waiting PENDING with an error, none claimed."""
    found = rows_of(rows)
    return all(row.status == EmailStatus.PENDING for row in found) and any(row.error_message for row in found)


def engaged(kind):
    def check():
        state = brake.current(refresh=True)
        return state if state.kind == kind else None

    return check


def postfix_log_since(mta, offset):
    return mta.log("postfix")[offset:]


def test_a_3mb_attachment_arrives_intact(sender, mta, media_root):
    payload = os.urandom(3 * 1024 * 1024)
    sender("sender")
    upload = SimpleUploadedFile("report.pdf", b"%PDF-1.7\n" + payload, content_type="application/pdf")
    [row] = submit(upload=upload, content_type="application/pdf")
    [delivered] = mta.delivered(timeout=60)
    [attachment] = delivered.message.iter_attachments()
    assert attachment.get_filename() == "report.pdf"
    assert (
        hashlib.sha256(attachment.get_content()).digest() == hashlib.sha256(b"%PDF-1.7\n" + payload).digest()
    )
    wait_for(lambda: all_in([row], EmailStatus.SENT), timeout=30, message="SENT")


def test_the_wrong_password_engages_the_brake_after_one_refused_session_and_the_rows_wait(sender, mta):
    offset = len(mta.log("postfix"))
    sender("sender", EMAIL_HOST_PASSWORD="not-the-password")
    rows = submit(3)
    state = wait_for(engaged(BrakeKind.CREDENTIALS), timeout=60, message="the credentials brake")
    wait_for(lambda: held(rows), timeout=30, message="the rows held")
    log = postfix_log_since(mta, offset)
    # One failed login in all: one worker, one AUTH, never one per mail, none after the brake.
    assert log.count("authentication failed") == 1, log
    assert log.count(": connect from") == 1, log
    assert state.needs_operator and "535" in state.reason
    found = rows_of(rows)
    assert all(row.retry_count == 0 and row.status == EmailStatus.PENDING for row in found)
    assert not mta.messages()


def test_an_untrusted_certificate_engages_the_brake_with_the_tls_error(sender, mta):
    sender("sender", SSL_CERT_FILE=str(mta.certificates.other_ca_file))
    rows = submit(2)
    state = wait_for(engaged(BrakeKind.TLS), timeout=60, message="the TLS brake")
    wait_for(lambda: held(rows), timeout=30, message="the rows held")
    assert state.needs_operator and "SSLCertVerificationError" in state.reason
    assert "certificate" in state.reason.lower()
    assert all(row.retry_count == 0 for row in rows_of(rows))
    assert any("certificate" in row.error_message for row in rows_of(rows))


def test_550_5_4_5_holds_the_rows_until_an_operator_resumes(sender, mta):
    sender("quota", beat=True)
    rows = submit(3)
    state = wait_for(engaged(BrakeKind.QUOTA), timeout=60, message="the quota brake")
    wait_for(lambda: held(rows), timeout=30, message="the rows held")
    # Nothing counted by the service: a day's wait, not a throttle's.
    assert not state.needs_operator and (state.until - state.engaged_at).total_seconds() > 23 * 3600
    assert not mta.messages()
    mta.set_reply("quota", None)  # the next day: the account may send again
    out = io.StringIO()
    call_command("sending", "resume", stdout=out)
    assert out.getvalue().strip() == "running"
    wait_for(lambda: all_in(rows, EmailStatus.SENT), timeout=60, message="every row SENT after resume")
    assert all(row.retry_count == 0 for row in rows_of(rows))
    assert len(mta.delivered(count=3)) == 3


def test_a_421_window_releases_by_itself_and_every_mail_goes_with_no_retry_spent(sender, mta):
    sender("throttle", beat=True)
    rows = submit(4)
    wait_for(engaged(BrakeKind.THROTTLE), timeout=60, message="the throttle brake")
    wait_for(lambda: held(rows), timeout=30, message="the rows held")
    # The window closes: Gmail takes mail again, and nobody resumes anything.
    mta.set_reply("throttle", None)
    wait_for(lambda: all_in(rows, EmailStatus.SENT), timeout=90, message="every row SENT")
    assert brake.current(refresh=True).kind == ""
    assert all(row.retry_count == 0 for row in rows_of(rows))
    assert len(mta.delivered(count=4)) == 4


def test_454_4_7_0_at_auth_is_temporary_and_releases_by_itself(sender, mta):
    mta.fail_logins_temporarily()
    sender("sender", beat=True)
    rows = submit(2)
    state = wait_for(engaged(BrakeKind.AUTH_TEMPORARY), timeout=60, message="the auth_temporary brake")
    assert not state.needs_operator and "454" in state.reason
    mta.fail_logins_temporarily(False)
    wait_for(lambda: all_in(rows, EmailStatus.SENT), timeout=90, message="every row SENT")
    assert all(row.retry_count == 0 for row in rows_of(rows))


def test_the_support_mailbox_receiving_too_fast_holds_the_rows_and_releases_by_itself(sender, mta):
    sender("rate", beat=True)
    rows = submit(2)
    state = wait_for(engaged(BrakeKind.THROTTLE), timeout=60, message="the throttle brake")
    assert not state.needs_operator and "450 4.2.1" in state.reason
    wait_for(lambda: held(rows), timeout=30, message="the rows held")
    mta.set_reply("rate", None, "rcpt")
    wait_for(lambda: all_in(rows, EmailStatus.SENT), timeout=90, message="every row SENT")
    assert all(row.retry_count == 0 for row in rows_of(rows))
