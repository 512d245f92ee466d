"""Gmail's reply table, the sender-wide brake and the quotas, in-process.

The sending tests run the real send loop against the session's scripted SMTP server; the
through-Postfix ones with a real worker are in test_gmail.py.
"""

import io
import logging
import smtplib
import socket
import ssl
import time
import uuid
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.db import OperationalError
from django.utils import timezone

from email_service import brake, delivery, outbox, quotas, sending
from email_service.audit import AuditAction, AuditChannel, AuditEntry
from email_service.brake import Gate, SendingBrake
from email_service.models import EmailAttempt, EmailRequest, EmailStatus, RowKind
from email_service.outcomes import AttemptOutcome, BrakeKind
from medcor_backend2.keys import generate_key

# --- the table: every row, in Gmail's words and as Postfix's access map words it -----------


def _gmail_text(row):
    return f"{row.enhanced} {row.words or 'Some words from Gmail'}. Learn more at https://support.google.com"


@pytest.mark.parametrize("row", delivery.GMAIL_REPLIES, ids=lambda r: f"{r.code}-{r.enhanced}-{r.words}")
def test_every_gmail_reply_is_classified_by_its_row(row):
    for text in (_gmail_text(row), f"{row.enhanced} <quota>: SASL login name rejected: {row.words} x"):
        result = delivery.classify(smtplib.SMTPSenderRefused(row.code, text.encode(), "support@tcall.ai"))
        assert (result.outcome, result.brake, result.smtp_code) == (row.outcome, row.brake, row.code)
        # A provider-wide reply never fails a mail.
        assert not (result.brake and result.outcome == AttemptOutcome.PERMANENT)


@pytest.mark.parametrize(
    ("code", "text", "outcome", "kind"),
    [
        (550, "5.4.5 Daily user sending limit exceeded.", AttemptOutcome.TRANSIENT, BrakeKind.QUOTA),
        (421, "4.7.0 Try again later, closing connection.", AttemptOutcome.TRANSIENT, BrakeKind.THROTTLE),
        (
            450,
            "4.2.1 The user you are trying to contact is receiving mail at a rate",
            "transient",
            "throttle",
        ),
        (530, "5.7.0 Must issue a STARTTLS command first.", AttemptOutcome.TRANSIENT, BrakeKind.TLS),
        (530, "5.7.0 Authentication Required.", AttemptOutcome.TRANSIENT, BrakeKind.CREDENTIALS),
        (552, "5.3.4 Your message exceeded Google's message size limits.", AttemptOutcome.PERMANENT, ""),
        (550, "5.1.1 The email account that you tried to reach does not exist.", "permanent", ""),
        (553, "5.1.3 The recipient address is not a valid RFC-5321 address.", "permanent", ""),
        (452, "4.5.3 Your message has too many recipients.", AttemptOutcome.TRANSIENT, ""),
        # Not in the table: the first digit decides, as before, and sending goes on.
        (421, "4.3.2 Service not available", AttemptOutcome.TRANSIENT, ""),
        (554, "5.0.0 Something else", AttemptOutcome.PERMANENT, ""),
        (451, "Local error without an enhanced code", AttemptOutcome.TRANSIENT, ""),
        # The same enhanced code with another basic code is another reply.
        (550, "4.7.0 odd", AttemptOutcome.PERMANENT, ""),
    ],
)
def test_replies_at_data(code, text, outcome, kind):
    result = delivery.classify(smtplib.SMTPDataError(code, text.encode()))
    assert (result.outcome, result.brake) == (outcome, kind)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (smtplib.SMTPAuthenticationError(535, b"5.7.8 Username and Password not accepted."), "credentials"),
        (smtplib.SMTPAuthenticationError(534, b"5.7.9 Application-specific password required."), "credentials"),
        (smtplib.SMTPAuthenticationError(454, b"4.7.0 Too many login attempts, please try later."), "auth_temporary"),
        (smtplib.SMTPAuthenticationError(454, b"4.7.0 Temporary authentication failure"), "auth_temporary"),
        (smtplib.SMTPAuthenticationError(535, b"5.7.8 Error: authentication failed: x"), "credentials"),
        (smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server."), "tls"),
        (ConnectionRefusedError(111, "Connection refused"), "connection"),
        (smtplib.SMTPRecipientsRefused({"support@tcall.ai": (450, b"4.2.1 rate limited")}), "throttle"),
    ],
)  # fmt: skip
def test_logins_tls_and_connections_are_provider_wide(exc, kind):
    result = delivery.classify(exc)
    assert (result.outcome, result.brake) == (AttemptOutcome.TRANSIENT, kind)


def test_a_certificate_that_fails_verification_is_a_tls_brake():
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    result = delivery.classify(error)
    assert (result.brake, result.outcome) == (BrakeKind.TLS, AttemptOutcome.TRANSIENT)
    assert "unable to get local issuer certificate" in result.error_message
    assert "unable to get local issuer certificate" in brake.reason_for(result)


def test_the_brake_reason_holds_codes_not_addresses():
    result = delivery.classify(
        smtplib.SMTPRecipientsRefused({"patient@example.org": (450, b"4.2.1 receiving mail at a rate")})
    )
    reason = brake.reason_for(result)
    assert reason == "450 4.2.1 SMTPRecipientsRefused" and "patient" not in reason


# --- the brake --------------------------------------------------------------------------------


def _row():
    return SendingBrake.objects.get(pk=brake.ROW_ID)


def _expire_wait():
    SendingBrake.objects.filter(pk=brake.ROW_ID).update(until=timezone.now() - timedelta(seconds=1))
    brake.forget()


@pytest.fixture
def short_backoff(settings):
    settings.EMAIL_BRAKE_BACKOFF = 10
    settings.EMAIL_BRAKE_BACKOFF_MAX = 35
    return settings


@pytest.mark.django_db
def test_two_workers_seeing_one_throttle_engage_it_once(short_backoff, caplog):
    caplog.set_level(logging.WARNING, logger="email_service.brake")
    first = brake.engage(BrakeKind.THROTTLE, "421 4.7.0 SMTPSenderRefused")
    second = brake.engage(BrakeKind.THROTTLE, "421 4.7.0 SMTPSenderRefused")
    assert first == second and _row().failures == 1
    assert 9 <= (first.until - timezone.now()).total_seconds() <= 10
    assert first.gate() is Gate.HOLD and brake.take_probe("w") is None
    assert len(caplog.records) == 1 and "Sending paused (throttle, engaged)" in caplog.records[0].message


@pytest.mark.django_db
def test_one_probe_at_a_time_once_the_wait_is_over_and_each_refusal_doubles_it_up_to_the_cap(short_backoff):
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0")
    waits = []
    for _ in range(3):
        _expire_wait()
        assert brake.current().gate() is Gate.PROBE
        probe = brake.take_probe("w1")
        assert probe is not None and brake.take_probe("w2") is None  # one probe at a time
        state = brake.engage(BrakeKind.THROTTLE, "421 4.7.0", probe=probe)
        waits.append(round((state.until - timezone.now()).total_seconds()))
    assert waits == [20, 35, 35]  # 10, then doubled, then capped
    assert _row().failures == 4


@pytest.mark.django_db
def test_a_probe_that_got_through_releases_the_brake(short_backoff, caplog):
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0")
    _expire_wait()
    probe = brake.take_probe()
    caplog.set_level(logging.WARNING, logger="email_service.brake")
    caplog.clear()
    assert brake.release(probe) and not brake.release(probe)
    assert brake.current().gate() is Gate.RUN and _row().failures == 0
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        "Sending resumed (the probe mail went)"
    ]


@pytest.mark.django_db
def test_a_probe_whose_worker_died_can_be_taken_again_after_its_lease(short_backoff):
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0")
    _expire_wait()
    assert brake.take_probe("dead") is not None
    SendingBrake.objects.update(probe_expires_at=timezone.now() - timedelta(seconds=1))
    assert brake.take_probe("alive") is not None


@pytest.mark.django_db
@pytest.mark.parametrize("kind", [BrakeKind.CREDENTIALS, BrakeKind.TLS])
def test_refused_credentials_and_tls_failures_hold_until_an_operator_resumes(kind, short_backoff):
    state = brake.engage(kind, "535 5.7.8")
    assert state.until is None and state.needs_operator
    assert state.gate(timezone.now() + timedelta(days=30)) is Gate.HOLD
    assert brake.take_probe() is None
    assert brake.resume() and brake.current().gate() is Gate.RUN


@pytest.mark.django_db
def test_a_setting_to_fix_takes_over_from_a_throttle_but_not_the_other_way(short_backoff):
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0")
    assert brake.engage(BrakeKind.CREDENTIALS, "535 5.7.8").kind == BrakeKind.CREDENTIALS
    assert brake.engage(BrakeKind.THROTTLE, "421 4.7.0").kind == BrakeKind.CREDENTIALS


@pytest.mark.django_db
def test_the_daily_quota_waits_for_the_window_the_service_counted(settings, short_backoff):
    settings.EMAIL_DAILY_LIMIT = 100
    quotas.reset()
    now = timezone.now()
    quotas.reserve(now=now.timestamp() - 3 * 3600)  # sent three hours ago: frees in 21 h
    result = delivery.classify(
        smtplib.SMTPSenderRefused(550, b"5.4.5 Daily user sending limit exceeded.", "")
    )
    state = brake.engage_for(result)
    hours = (state.until - now).total_seconds() / 3600
    assert state.kind == BrakeKind.QUOTA and 20.8 < hours < 21.2
    quotas.reset()


@pytest.mark.django_db
def test_the_daily_quota_with_nothing_counted_waits_24_hours(short_backoff):
    result = delivery.classify(
        smtplib.SMTPSenderRefused(550, b"5.4.5 Daily user sending limit exceeded.", "")
    )
    state = brake.engage_for(result)
    assert abs((state.until - timezone.now()).total_seconds() - 24 * 3600) < 60


@pytest.mark.django_db
def test_the_state_is_read_once_per_cache_period(settings, django_assert_num_queries):
    settings.EMAIL_BRAKE_CACHE_SECONDS = 60
    brake.current(refresh=True)
    with django_assert_num_queries(0):
        for _ in range(100):
            assert brake.current().gate() is Gate.RUN


@pytest.mark.django_db
def test_pause_and_resume_from_the_command_print_the_state_and_are_audited():
    out = io.StringIO()
    call_command("sending", "status", stdout=out)
    call_command("sending", "pause", "--reason", "rotating the app password", stdout=out)
    call_command("sending", "status", stdout=out)
    call_command("sending", "resume", stdout=out)
    call_command("sending", "status", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "running"
    assert lines[1] == lines[2]
    assert lines[2].startswith("paused: Paused by an operator: rotating the app password")
    assert "until an operator resumes sending" in lines[2]
    assert lines[3:] == ["running", "running"]
    actions = list(AuditEntry.objects.order_by("pk").values_list("action", "channel"))
    assert actions == [(AuditAction.PAUSE, "command"), (AuditAction.RESUME, "command")]


@pytest.mark.django_db
def test_healthz_says_paused_with_reason_and_until_and_stays_200(client, monkeypatch):
    from email_service import health

    monkeypatch.setattr(health, "_check_broker", lambda: "ok")
    body = client.get("/healthz").json()
    assert (body["status"], body["sending"], body["sending_paused_until"]) == ("ok", "running", None)
    state = brake.engage(BrakeKind.THROTTLE, "421 4.7.0 SMTPSenderRefused")
    brake.forget()
    response = client.get("/healthz")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "degraded" and body["sending"] == "paused"
    assert body["sending_paused_reason"] == "Throttled by the server: 421 4.7.0 SMTPSenderRefused"
    assert body["sending_paused_until"] == state.until.isoformat()


# --- the quotas --------------------------------------------------------------------------------


@pytest.fixture
def limits(settings):
    quotas.reset()
    yield settings
    quotas.reset()


def test_the_minute_limit_counts_across_callers_and_says_when_a_slot_frees(limits):
    limits.EMAIL_MINUTE_LIMIT = 3
    at = 1_800_000_030.0  # half a minute into a minute
    for _ in range(3):
        quotas.reserve(now=at)
    with pytest.raises(quotas.QuotaReached) as reached:
        quotas.reserve(now=at)
    assert (reached.value.limit, reached.value.free_at) == ("minute", 1_800_000_060)
    quotas.reserve(now=at + 30)  # the next minute
    cache.delete_many([quotas._minute_key(30_000_000), quotas._minute_key(30_000_001)])


def test_the_daily_limit_is_a_rolling_window_and_unsent_messages_are_given_back(limits):
    limits.EMAIL_DAILY_LIMIT = 2
    start = 1_800_000_000.0
    first = quotas.reserve(now=start)
    quotas.reserve(now=start + 3600)
    with pytest.raises(quotas.QuotaReached) as reached:
        quotas.reserve(now=start + 7200)
    # The oldest bucket leaves the window a day after it ends.
    assert reached.value.free_at == (start // 600 + 1) * 600 + 86400
    quotas.give_back(first)
    quotas.reserve(now=start + 7200)
    assert quotas.sent_today(now=start + 7200) == 2
    # A day later the first two have aged out.
    assert quotas.sent_today(now=start + 86400 + 3600 + 600) == 1
    cache.delete_many([quotas._day_key(int(start // 600) + n) for n in range(0, 20)])


def test_acknowledgements_stop_at_80_percent_of_the_daily_limit(limits):
    limits.EMAIL_DAILY_LIMIT = 10
    for _ in range(7):
        quotas.reserve()
    assert quotas.allows_acknowledgement()
    quotas.reserve()
    assert not quotas.allows_acknowledgement()
    limits.EMAIL_DAILY_LIMIT = 0
    assert quotas.allows_acknowledgement()


def test_no_limits_touch_no_cache(settings, monkeypatch):
    settings.EMAIL_DAILY_LIMIT = settings.EMAIL_MINUTE_LIMIT = 0
    monkeypatch.setattr(quotas, "cache", None)  # any use would raise
    assert quotas.reserve() == quotas.Reservation()
    assert quotas.allows_acknowledgement()


# --- the send loop with the brake and the quotas ------------------------------------------------


def _rows(count):
    return [
        outbox.create_email_request(
            data={"full_name": f"Brake {n}", "email": f"b{n}-{uuid.uuid4().hex[:6]}@example.org"},
            dispatch_on_commit=False,
        )
        for n in range(count)
    ]


def _statuses(rows):
    return dict(EmailRequest.objects.filter(pk__in=[r.pk for r in rows]).values_list("pk", "status"))


@pytest.fixture
def loop(smtp, db, settings, monkeypatch):
    settings.EMAIL_SEND_CONFIRMATION = False
    settings.EMAIL_BRAKE_BACKOFF = 30
    published = []
    monkeypatch.setattr(outbox, "publish_or_forget", lambda pk, task_id, **kwargs: published.append(pk))
    monkeypatch.setattr(outbox, "dispatch_due_soon", lambda: published.append("relay"))
    # A fresh pace: a slow send in one test (a timeout) must not make the next one's batches small.
    monkeypatch.setattr(sending, "send_pace", sending.SendPace())
    return published


def test_a_throttle_holds_the_mail_in_hand_and_its_batch_without_spending_a_retry(smtp, loop):
    rows = _rows(3)
    smtp.script = ["accept", "421 4.7.0 Try again later, closing connection."]

    statuses = sending.send_due_emails(rows[0].pk, worker="test", batch_size=3)

    assert list(statuses.values()) == [EmailStatus.SENT, EmailStatus.PENDING]
    held = EmailRequest.objects.filter(pk__in=[r.pk for r in rows[1:]])
    assert {(r.status, r.retry_count, r.dispatched_at) for r in held} == {(EmailStatus.PENDING, 0, None)}
    state = brake.current()
    assert state.kind == BrakeKind.THROTTLE
    assert all(r.next_attempt_at >= state.until - timedelta(seconds=1) for r in held)
    assert loop == []  # no task published for rows that must wait
    assert rows[2].attempts.count() == 0  # never tried: no attempt kept


def test_while_the_brake_holds_no_connection_is_opened_and_the_relay_publishes_nothing(smtp, loop):
    [row] = _rows(1)
    brake.engage(BrakeKind.CREDENTIALS, "535 5.7.8 SMTPAuthenticationError")
    connections = smtp.connections

    assert sending.send_email_request(row.pk, worker="test") is None
    assert outbox.dispatch_due()["dispatched"] == 0

    assert smtp.connections == connections and smtp.data_commands == 0
    row.refresh_from_db()
    assert (row.status, row.dispatched_at) == (EmailStatus.PENDING, None)  # the relay will publish it


def test_when_the_wait_is_over_one_probe_goes_and_then_the_rest(smtp, loop):
    rows = _rows(3)
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0")
    _expire_wait()
    statuses = sending.send_due_emails(rows[0].pk, worker="test", batch_size=3)
    assert brake.current().gate() is Gate.RUN and "relay" in loop
    assert set(statuses.values()) == set(_statuses(rows).values()) == {EmailStatus.SENT}
    # The probe went alone: the others were claimed only once it had got through.
    probe = EmailAttempt.objects.get(request=rows[0])
    assert all(a.started_at >= probe.finished_at for a in EmailAttempt.objects.filter(request__in=rows[1:]))
    assert all(r.retry_count == 0 for r in EmailRequest.objects.filter(pk__in=[r.pk for r in rows]))


def test_the_daily_limit_stops_before_connecting_and_engages_the_brake(smtp, loop, limits):
    limits.EMAIL_DAILY_LIMIT = 2
    rows = _rows(3)
    sending.send_due_emails(rows[0].pk, worker="test", batch_size=3)
    assert sorted(_statuses(rows).values()) == [EmailStatus.PENDING, EmailStatus.SENT, EmailStatus.SENT]
    assert smtp.data_commands == 2
    state = brake.current()
    assert state.kind == BrakeKind.QUOTA and state.until > timezone.now() + timedelta(hours=23)
    waiting = EmailRequest.objects.get(status=EmailStatus.PENDING, pk__in=[r.pk for r in rows])
    assert waiting.retry_count == 0 and waiting.attempts.count() == 0


def test_the_minute_limit_holds_the_rest_until_the_next_minute_without_the_brake(smtp, loop, limits):
    limits.EMAIL_MINUTE_LIMIT = 1
    rows = _rows(2)
    sending.send_due_emails(rows[0].pk, worker="test", batch_size=2)
    assert sorted(_statuses(rows).values()) == [EmailStatus.PENDING, EmailStatus.SENT]
    assert brake.current().gate() is Gate.RUN
    waiting = EmailRequest.objects.get(status=EmailStatus.PENDING, pk__in=[r.pk for r in rows])
    assert timezone.now() < waiting.next_attempt_at <= timezone.now() + timedelta(seconds=61)


def test_a_provider_wide_outcome_never_fails_a_mail_even_with_no_retries_left(smtp, loop):
    [row] = _rows(1)
    EmailRequest.objects.filter(pk=row.pk).update(max_retries=0)
    smtp.script = ["550 5.4.5 Daily user sending limit exceeded."]
    assert sending.send_email_request(row.pk, worker="test") == EmailStatus.PENDING
    row.refresh_from_db()
    assert (row.status, row.retry_count) == (EmailStatus.PENDING, 0)
    assert "5.4.5" in row.error_message


def test_acknowledgements_wait_while_the_brake_holds(smtp, loop, settings):
    from email_service.acknowledgements import send_confirmation

    settings.EMAIL_SEND_CONFIRMATION = True
    [row] = _rows(1)
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0")
    assert send_confirmation(row) is False and smtp.data_commands == 0


# --- whose trouble a refusal is: the submitter's mailbox, the support mailbox, the server --------

SUPPORT = "support@tcall.ai"


def _support_refused(rows):
    return [address for address in rows if address.strip("<>").lower() == SUPPORT]


def test_a_reply_meeting_450_4_2_1_at_rcpt_is_the_submitters_mailbox_and_never_pauses_sending(smtp, loop):
    [row] = _rows(1)
    assert sending.send_email_request(row.pk, worker="test") == EmailStatus.SENT
    reply = outbox.create_email_request(
        data={"kind": RowKind.REPLY, "parent": row, "message": "We called you."}, dispatch_on_commit=False
    )
    EmailRequest.objects.filter(pk=reply.pk).update(max_retries=1)
    smtp.rcpt_reply = "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages"

    assert sending.send_email_request(reply.pk, worker="test") == EmailStatus.PENDING
    assert row.email in smtp.rcpts_seen  # refused by the server, at RCPT, for the submitter
    assert brake.current(refresh=True).gate() is Gate.RUN
    reply.refresh_from_db()
    assert reply.retry_count == 1 and "4.2.1" in reply.error_message  # its own retry, spent

    EmailRequest.objects.filter(pk=reply.pk).update(next_attempt_at=timezone.now())
    assert sending.send_email_request(reply.pk, worker="test") == EmailStatus.FAILED
    assert brake.current(refresh=True).gate() is Gate.RUN


@pytest.mark.parametrize(
    ("reply", "kind", "self_releasing"),
    [
        ("452 4.2.2 The recipient's inbox is out of storage space.", BrakeKind.THROTTLE, True),
        ("550 5.1.1 The email account that you tried to reach does not exist.", "support_address", False),
        ("550 5.2.1 The email account that you tried to reach is disabled.", "support_address", False),
        ("553 5.1.2 We weren't able to find the recipient domain.", "support_address", False),
    ],
)
def test_the_support_mailbox_refusing_at_rcpt_holds_every_row_and_spends_no_retry(
    smtp, loop, reply, kind, self_releasing
):
    rows = _rows(3)
    EmailRequest.objects.filter(pk__in=[r.pk for r in rows]).update(max_retries=0)
    smtp.rcpt_reply = reply

    statuses = sending.send_due_emails(rows[0].pk, worker="test", batch_size=3)

    assert list(statuses.values()) == [EmailStatus.PENDING]  # the first met it; the rest were held
    assert _support_refused(smtp.rcpts_seen) and smtp.data_commands == 0
    assert set(_statuses(rows).values()) == {EmailStatus.PENDING}
    assert {r.retry_count for r in EmailRequest.objects.filter(pk__in=[r.pk for r in rows])} == {0}
    state = brake.current(refresh=True)
    assert state.kind == kind and (state.until is not None) is self_releasing
    assert reply[:9] in state.reason and "support@" not in state.reason


def test_the_support_address_is_known_by_its_address_whatever_its_name_or_case(settings):
    settings.SUPPORT_EMAIL = "MedCor Support <Help@MedCor.example>"
    refused = b"5.1.1 The email account that you tried to reach does not exist."
    support = delivery.classify(smtplib.SMTPRecipientsRefused({"help@medcor.example": (550, refused)}))
    other = delivery.classify(smtplib.SMTPRecipientsRefused({"helper@medcor.example": (550, refused)}))
    assert (support.brake, support.outcome) == ("support_address", AttemptOutcome.TRANSIENT)
    assert (other.brake, other.outcome, other.recipient_scoped) == ("", AttemptOutcome.PERMANENT, True)


def test_a_421_at_rcpt_is_the_server_closing_whoever_the_recipient(smtp, loop):
    result = delivery.classify(
        smtplib.SMTPRecipientsRefused({"patient@example.org": (421, b"4.7.0 Try again later, closing")})
    )
    assert (result.brake, result.recipient_scoped) == (BrakeKind.THROTTLE, False)


def test_an_unreachable_smtp_host_holds_the_rows_instead_of_failing_them(smtp, loop, settings):
    rows = _rows(2)
    EmailRequest.objects.filter(pk__in=[r.pk for r in rows]).update(max_retries=0)
    # Listening, never answering: the connection opens at TCP level and the greeting never comes.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = silent.getsockname()[1], 0.5
        delivery.close_connection()
        statuses = sending.send_due_emails(rows[0].pk, worker="test", batch_size=2)
    assert list(statuses.values()) == [EmailStatus.PENDING]
    assert set(_statuses(rows).values()) == {EmailStatus.PENDING}
    assert {r.retry_count for r in EmailRequest.objects.filter(pk__in=[r.pk for r in rows])} == {0}
    state = brake.current(refresh=True)
    assert state.kind == BrakeKind.CONNECTION and state.until is not None  # it releases by itself


def _with_file(row, content=b"%PDF-1.4 results"):
    """Store a file for `row` under the first key configured now; only its file fields change."""
    name = default_storage.save("results.pdf", ContentFile(content))
    EmailRequest.objects.filter(pk=row.pk).update(file_attached=name)
    return EmailRequest.objects.get(pk=row.pk)


def test_an_attachment_under_a_key_this_worker_lacks_holds_sending_for_an_operator(
    smtp, loop, settings, media_root
):
    key_a, key_b = generate_key(), generate_key()
    settings.MEDCOR_ENCRYPTION_KEYS = [key_a]
    [row] = _rows(1)
    EmailRequest.objects.filter(pk=row.pk).update(max_retries=0)
    settings.MEDCOR_ENCRYPTION_KEYS = [key_b, key_a]  # another host, with a newer key, stored the file
    _with_file(row)
    settings.MEDCOR_ENCRYPTION_KEYS = [key_a]  # this worker lacks it

    assert sending.send_email_request(row.pk, worker="test") == EmailStatus.PENDING
    row.refresh_from_db()
    assert (row.status, row.retry_count) == (EmailStatus.PENDING, 0)
    state = brake.current(refresh=True)
    assert state.kind == "encryption_keys" and state.needs_operator
    assert "MEDCOR_ENCRYPTION_KEYS" in row.error_message


def test_a_file_that_fails_authentication_still_fails_its_mail(smtp, loop, media_root):
    [row] = _rows(1)
    row = _with_file(row)
    path = media_root / row.file_attached.name
    sealed = bytearray(path.read_bytes())
    sealed[-20] ^= 0xFF
    path.write_bytes(bytes(sealed))
    assert sending.send_email_request(row.pk, worker="test") == EmailStatus.FAILED
    assert brake.current(refresh=True).gate() is Gate.RUN


def test_a_missing_file_is_retried_and_fails_only_once_the_retries_are_spent(smtp, loop, media_root):
    [row] = _rows(1)
    row = _with_file(row)
    EmailRequest.objects.filter(pk=row.pk).update(max_retries=1)
    row.file_attached.storage.delete(row.file_attached.name)

    assert sending.send_email_request(row.pk, worker="test") == EmailStatus.PENDING
    row.refresh_from_db()
    assert row.retry_count == 1 and "missing" in row.error_message
    EmailRequest.objects.filter(pk=row.pk).update(next_attempt_at=timezone.now())
    assert sending.send_email_request(row.pk, worker="test") == EmailStatus.FAILED
    assert brake.current(refresh=True).gate() is Gate.RUN


def test_smtp_relays_daily_limit_is_a_quota_and_other_5_7_1_refusals_are_content():
    relay = delivery.classify(
        smtplib.SMTPDataError(550, b"5.7.1 Daily SMTP relay limit exceeded for customer. Learn more")
    )
    content = delivery.classify(smtplib.SMTPDataError(550, b"5.7.1 Message rejected by policy"))
    assert (relay.outcome, relay.brake) == (AttemptOutcome.TRANSIENT, BrakeKind.QUOTA)
    assert (content.outcome, content.brake) == (AttemptOutcome.PERMANENT, "")


# --- probes and resume --------------------------------------------------------------------------


def test_a_probe_whose_batch_stops_before_any_send_is_dropped_at_once(smtp, loop):
    [row] = _rows(1)
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0")
    _expire_wait()
    probe = brake.take_probe("test")
    token, claimed = EmailRequest.objects.claim_batch(
        worker="test", first=row.pk, limit=1, start_attempts=True
    )
    assert claimed

    # The send window closed before the first mail of a later round: nothing is tried.
    statuses, gave_back = sending._send_batch(
        claimed, token, "test", window_ends=time.monotonic() - 1, started=True, probe=probe
    )

    assert statuses == {} and gave_back
    assert _row().probe_token is None
    assert brake.take_probe("another worker") is not None  # no wait for the lease to run out
    assert smtp.data_commands == 0
    assert not EmailAttempt.objects.filter(request=row).exists()  # the untried attempt went with the row


def test_resume_wakes_the_held_rows_but_not_an_ordinary_retry(smtp, loop, settings):
    settings.EMAIL_RETRY_DELAY = 4  # a retry due within the brake's 30 s
    waiting, held = _rows(2)
    smtp.script = ["452 4.5.3 Your message has too many recipients."]
    assert sending.send_email_request(waiting.pk, worker="test") == EmailStatus.PENDING
    smtp.script = ["421 4.7.0 Try again later, closing connection."]
    assert sending.send_email_request(held.pk, worker="test") == EmailStatus.PENDING
    until = brake.current(refresh=True).until
    waiting.refresh_from_db()
    assert timezone.now() < waiting.next_attempt_at < until
    retry_at = waiting.next_attempt_at

    sending.resume_sending(channel=AuditChannel.COMMAND)

    held.refresh_from_db()
    waiting.refresh_from_db()
    assert held.next_attempt_at <= timezone.now()  # held by the brake: due now
    assert waiting.next_attempt_at == retry_at  # its own backoff stands


def test_an_acknowledgement_that_raises_does_not_stop_the_batch(smtp, loop, settings, monkeypatch):
    from email_service import acknowledgements

    settings.EMAIL_SEND_CONFIRMATION = True

    def broken(*args, **kwargs):
        raise OperationalError("the database went away")

    monkeypatch.setattr(acknowledgements, "_capped_by_rows", broken)
    rows = _rows(3)
    sending.send_due_emails(rows[0].pk, worker="test", batch_size=3)
    assert set(_statuses(rows).values()) == {EmailStatus.SENT}
    assert acknowledgements.send_confirmation(EmailRequest.objects.get(pk=rows[0].pk)) is False


# --- the admin's banner and resume button --------------------------------------------------------

CHANGELIST = "/admin/email_service/emailrequest/"
STATISTICS = "/admin/email_service/emailrequest/statistics/"
RESUME = "/admin/email_service/emailrequest/resume-sending/"


def _staff(client, *codenames):
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user(f"staff-{uuid.uuid4().hex[:6]}", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client.force_login(user)
    return user


@pytest.mark.django_db
@pytest.mark.parametrize("page", [CHANGELIST, STATISTICS])
def test_the_banner_says_why_and_until_when_and_offers_resume_to_who_may_change(client, page):
    _staff(client, "view_emailrequest", "change_emailrequest")
    assert b"mc-sending-paused" not in client.get(page).content
    brake.engage(BrakeKind.CREDENTIALS, "535 5.7.8 SMTPAuthenticationError")
    brake.forget()
    html = client.get(page).content.decode()
    assert "Sending is paused." in html and "535 5.7.8 SMTPAuthenticationError" in html
    assert "resumes only when someone resumes it" in html and 'id="mc-resume-sending"' in html


@pytest.mark.django_db
def test_view_only_staff_see_the_banner_without_the_button_and_cannot_resume(client):
    _staff(client, "view_emailrequest")
    brake.engage(BrakeKind.THROTTLE, "421 4.7.0 SMTPSenderRefused")
    brake.forget()
    html = client.get(CHANGELIST).content.decode()
    assert "Sending is paused." in html and "the next try is at" in html
    assert 'id="mc-resume-sending"' not in html
    assert client.post(RESUME).status_code == 403
    assert brake.current(refresh=True).is_engaged


@pytest.mark.django_db
def test_the_resume_button_resumes_audits_and_goes_back(client, monkeypatch):
    monkeypatch.setattr(outbox, "dispatch_due_soon", lambda: None)
    user = _staff(client, "view_emailrequest", "change_emailrequest")
    brake.pause("maintenance")
    assert client.get(RESUME).status_code == 405
    response = client.post(RESUME, {"next": STATISTICS})
    assert response.status_code == 302 and response["Location"] == STATISTICS
    assert not brake.current(refresh=True).is_engaged
    entry = AuditEntry.objects.get(action=AuditAction.RESUME)
    assert (entry.channel, entry.actor) == ("admin", user.username)
    # Only a path on this site: no open redirect.
    brake.pause("again")
    assert client.post(RESUME, {"next": "https://evil.example/"})["Location"] == CHANGELIST


def test_the_brake_and_quota_checks_cost_no_query_per_mail(smtp, loop, limits, monkeypatch):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    limits.EMAIL_DAILY_LIMIT = 1000
    limits.EMAIL_MINUTE_LIMIT = 1000
    limits.EMAIL_BRAKE_CACHE_SECONDS = 60  # a slow machine must not see a periodic re-read here

    def queries_for(count):
        rows = _rows(count)
        with CaptureQueriesContext(connection) as queries:
            sending.send_due_emails(rows[0].pk, worker="test", batch_size=count)
        assert set(_statuses(rows).values()) == {EmailStatus.SENT}
        return len(queries)

    queries_for(1)  # the connection is open: a new one costs one read of the brake, once
    with_checks = queries_for(10)
    monkeypatch.setattr(brake, "current", lambda refresh=False: brake.RUNNING)
    monkeypatch.setattr(quotas, "reserve", lambda now=None: quotas.Reservation())
    without_checks = queries_for(10)
    assert with_checks == without_checks
