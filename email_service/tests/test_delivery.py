"""Building the mails and classifying what an SMTP server answers."""

import errno
import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from email import message_from_bytes
from email.policy import default as default_policy

import pytest
from django.core.files.base import ContentFile

from email_service import delivery
from email_service.models import EmailRequest
from email_service.outcomes import AttemptOutcome, BrakeKind

from .files import pdf_bytes


@pytest.fixture
def email_request(db):
    return EmailRequest.objects.create(
        full_name="Ana Lima",
        email="ana@example.com",
        phone="+55 11 5555-0000",
        job_profession="Physiotherapist",
        subject="Lab results",
        message="Attached are my results.",
        message_id=delivery.new_message_id(),
    )


def test_support_message_headers(email_request, settings):
    settings.SUPPORT_EMAIL = "help@medcor.example"
    settings.DEFAULT_FROM_EMAIL = "noreply@medcor.example"
    message = delivery.build_support_message(email_request).message()
    assert message["To"] == "help@medcor.example"
    assert message["From"] == "noreply@medcor.example"
    assert message["Reply-To"] == "ana@example.com"
    assert "Lab results" in message["Subject"]
    assert message["X-Email-Request-ID"] == str(email_request.pk)
    assert message["Message-ID"] == email_request.message_id


def test_support_message_carries_every_field_in_both_parts(email_request):
    message = delivery.build_support_message(email_request)
    html = message.alternatives[0].content
    for field in ("full_name", "email", "phone", "job_profession", "subject", "message"):
        assert getattr(email_request, field) in message.body
        assert getattr(email_request, field) in html


def test_html_part_escapes_form_text(db):
    row = EmailRequest.objects.create(
        full_name="<script>x</script>", email="a@example.com", message="<b>bold</b>"
    )
    html = delivery.build_support_message(row).alternatives[0].content
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<b>bold</b>" not in html


def test_attachment_keeps_its_original_name_and_bytes(email_request, settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path)
    pdf = pdf_bytes()
    email_request.file_attached.save("x.pdf", ContentFile(pdf), save=False)
    email_request.attachment_name = "Résultats labo.pdf"
    email_request.attachment_content_type = "application/pdf"
    raw = delivery.message_bytes(delivery.build_support_message(email_request))
    [attachment] = message_from_bytes(raw, policy=default_policy).iter_attachments()
    assert attachment.get_filename() == "Résultats labo.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_payload(decode=True) == pdf


@pytest.mark.parametrize(
    "full_name, address, subject",
    [
        ("Ana Lima", "ana@example.com", "Lab results"),
        ("Zoë Ångström-Łukasiewicz 中文", "zoe@exämple.com", "Ünïcödé words, long enough to be folded " * 3),
        ("A" * 200, "a@b.co", "x " * 100),
        ("Tab\there  and  spaces ", "t@example.com", ""),
        ('O\'Brien; "Quoted", (comment)', "ob@example.com", "=?utf-8?q?not_really_encoded?="),
    ],
)
def test_the_wire_bytes_are_what_the_stdlib_generator_writes(
    db, settings, tmp_path, full_name, address, subject
):
    """The fast header and boundary paths give, byte for byte, what email.generator would."""
    settings.MEDIA_ROOT = str(tmp_path)
    row = EmailRequest.objects.create(
        full_name=full_name, email=address, subject=subject, message="Line one\nFrom the start\n" + "é" * 1200
    )
    row.file_attached.save("x.pdf", ContentFile(pdf_bytes()), save=False)
    row.attachment_name, row.attachment_content_type = "Résultats labo.pdf", "application/pdf"
    for message in (
        delivery.build_support_message(row),
        delivery.build_confirmation_message(row),
        delivery._build_minimal_support_message(row),
    ):
        mime = message.message()
        wire = delivery.wire_bytes(mime)
        # The fast path set every boundary; the stdlib generator keeps boundaries that are set.
        assert wire == mime.as_bytes(linesep="\r\n")
        assert b"\n" not in wire.replace(b"\r\n", b"")


BOUNDARY = re.compile(rb"===============[0-9a-f]{32}==")


def _numbered_boundaries(raw):
    """Replace each boundary by its order of first appearance: two writers' boundaries differ."""
    seen = {}
    return BOUNDARY.sub(lambda found: b"B%d" % seen.setdefault(found.group(), len(seen)), raw)


# Texts that exercise what the direct writer must do as the stdlib does: every kind of line end,
# a line of exactly 998 bytes and one over it, non-ASCII, lines the generator could mangle.
TEXT_PIECES = [
    "plain words",
    "\n",
    "\r\n",
    "\r",
    "\n\n",
    "From the start",
    ".leading dot",
    "é",
    "中文",
    "🙂",
    "x" * 998,
    "y" * 999,
    "é" * 499,
    "\t tab",
    " ",
    "--boundary-like",
    "=?utf-8?q?x?=",
    "\u2028",
    "\x0c",
]


@pytest.mark.parametrize("seed", range(60))
def test_the_direct_writer_gives_the_bytes_django_and_the_stdlib_would(
    db, settings, tmp_path, monkeypatch, seed
):
    import random

    from django.core.mail import message as django_message

    rng = random.Random(seed)
    text = lambda count: "".join(rng.choice(TEXT_PIECES) for _ in range(count))  # noqa: E731
    # The same Date and Message-ID for both writers.
    for module in (delivery, django_message):
        monkeypatch.setattr(module, "formatdate", lambda localtime=False: "Wed, 02 Dec 2026 06:00:00 -0000")
        monkeypatch.setattr(module, "make_msgid", lambda domain=None: "<fixed@example.com>")
    settings.MEDIA_ROOT = str(tmp_path)
    row = EmailRequest.objects.create(
        full_name=rng.choice(["Ana Lima", "Zoë Ångström 中文", "A" * 120, 'O\'Brien, "Q"']),
        email=rng.choice(["ana@example.com", "zoe@exämple.com", "x@[127.0.0.1]"]),
        # With the support mail's "[MedCor contact] " prefix: 76 characters fit one line, 77 do not.
        subject=rng.choice(
            ["", "Lab results", "Ünïcödé " * 12, "x " * 60, "s" * 59, "s" * 60, "Tab\there  two "]
        ),
        message=text(rng.randint(0, 12)),
        message_id="<request@example.com>",
    )
    if rng.random() < 0.5:
        row.file_attached.save("x.pdf", ContentFile(pdf_bytes()), save=False)
        row.attachment_name = rng.choice(["scan.pdf", "Résultats labo.pdf"])
        row.attachment_content_type = "application/pdf"
    messages = [
        delivery.build_support_message(row),
        delivery.build_confirmation_message(row),
        delivery._build_minimal_support_message(row),
        delivery.build_reply_message(EmailRequest(parent=row, message=text(rng.randint(1, 8)))),
    ]
    direct_count = 0
    for message in messages:
        direct = delivery._direct_wire_bytes(message)
        general = delivery.wire_bytes(message.message())
        if direct is None:
            # Only where a part goes quoted-printable: a line over 998 bytes.
            assert b"quoted-printable" in general
            continue
        direct_count += 1
        assert _numbered_boundaries(direct) == _numbered_boundaries(general)
    # The acknowledgement and the minimal notice quote nothing: they always take the direct path.
    assert direct_count >= 2


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"])
def test_the_received_time_is_what_djangos_date_format_writes(settings, zone):
    from datetime import UTC, datetime, timedelta

    from django.utils import dateformat
    from django.utils.timezone import template_localtime

    settings.TIME_ZONE = zone
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for hours in range(0, 24 * 366, 7):
        row = EmailRequest(created_at=start + timedelta(hours=hours, seconds=hours % 60))
        local = template_localtime(row.created_at)
        expected = dateformat.format(local, "Y-m-d H:i:s e")
        if expected.endswith(" "):
            # Django leaves the zone out in the hour that a change of clocks repeats or skips;
            # the mail names it there too, where it tells the two readings apart.
            assert local.fold or local.replace(fold=1).utcoffset() != local.utcoffset()
            expected += local.tzname()
        assert delivery._received(row) == expected


def test_each_multipart_boundary_is_new_and_random(email_request):
    boundaries = set()
    for _ in range(3):
        mime = delivery.build_support_message(email_request).message()
        delivery.wire_bytes(mime)
        boundaries.add(mime.get_boundary())
    assert len(boundaries) == 3
    assert all(len(boundary) == 49 for boundary in boundaries)


def test_confirmation_quotes_nothing_from_the_form(email_request):
    message = delivery.build_confirmation_message(email_request)
    assert message.to == ["ana@example.com"]
    assert str(email_request.pk) in message.body
    text = message.message().as_string()
    for field in ("full_name", "phone", "job_profession", "subject", "message"):
        assert getattr(email_request, field) not in text


@pytest.mark.parametrize(
    ("exc", "outcome", "code"),
    [
        (smtplib.SMTPDataError(421, b"Try again later"), AttemptOutcome.TRANSIENT, 421),
        (smtplib.SMTPDataError(451, b"Local error"), AttemptOutcome.TRANSIENT, 451),
        (smtplib.SMTPDataError(550, b"Mailbox unavailable"), AttemptOutcome.PERMANENT, 550),
        (smtplib.SMTPSenderRefused(553, b"Sender refused", "a@b"), AttemptOutcome.PERMANENT, 553),
        (smtplib.SMTPRecipientsRefused({"x@y": (550, b"No such user")}), AttemptOutcome.PERMANENT, 550),
        (smtplib.SMTPRecipientsRefused({"x@y": (450, b"Greylisted")}), AttemptOutcome.TRANSIENT, 450),
        (smtplib.SMTPConnectError(421, b"Busy"), AttemptOutcome.TRANSIENT, 421),
        (smtplib.SMTPServerDisconnected("gone"), AttemptOutcome.TRANSIENT, None),
        (ConnectionRefusedError(111, "Connection refused"), AttemptOutcome.TRANSIENT, None),
        # A timeout once the connection is open is this mail's (opening: see the tests below).
        (TimeoutError("timed out"), AttemptOutcome.TRANSIENT, None),
        (ValueError("Header values may not contain linefeed"), AttemptOutcome.PERMANENT, None),
    ],
)
def test_classify(exc, outcome, code):
    result = delivery.classify(exc)
    assert (result.outcome, result.smtp_code) == (outcome, code)
    assert result.error_message


def test_authentication_failure_tells_the_operator_what_to_fix():
    result = delivery.classify(
        smtplib.SMTPAuthenticationError(535, b"5.7.8 Username and Password not accepted")
    )
    # About the account, not the mail: the brake holds it, no mail fails for it.
    assert (result.outcome, result.brake) == (AttemptOutcome.TRANSIENT, "credentials")
    assert "535" in result.error_message
    assert "EMAIL_HOST_PASSWORD" in result.error_message


def test_send_over_real_smtp(email_request, smtp):
    result = delivery.send(delivery.build_support_message(email_request))
    assert result.outcome == AttemptOutcome.SENT
    assert len(smtp.messages) == 1


def test_send_reuses_one_connection(email_request, smtp, smtp_server):
    for _ in range(3):
        assert delivery.send(delivery.build_support_message(email_request)).outcome == AttemptOutcome.SENT
    assert len(smtp.messages) == 3
    assert delivery._shared.backend is not None and delivery._shared.backend.connection is not None
    assert smtp.connections == 1


def test_an_idle_connection_the_server_dropped_is_replaced_before_sending(email_request, smtp, monkeypatch):
    monkeypatch.setattr(delivery, "IDLE_CHECK_SECONDS", 0)
    assert delivery.send(delivery.build_support_message(email_request)).outcome == AttemptOutcome.SENT
    assert delivery.send(delivery.build_support_message(email_request)).outcome == AttemptOutcome.SENT
    assert smtp.connections == 1  # NOOP found it alive
    delivery._shared.backend.connection.sock.shutdown(socket.SHUT_RDWR)  # as if the server hung up
    assert delivery.send(delivery.build_support_message(email_request)).outcome == AttemptOutcome.SENT
    assert (smtp.connections, len(smtp.messages)) == (2, 3)


def test_a_failed_send_is_not_repeated_on_a_new_connection(email_request, smtp, settings):
    settings.EMAIL_TIMEOUT = 0.5
    assert delivery.send(delivery.build_support_message(email_request)).outcome == AttemptOutcome.SENT
    smtp.script = [("hang", 1.5)]
    result = delivery.send(delivery.build_support_message(email_request))
    assert result.outcome == AttemptOutcome.TRANSIENT
    assert smtp.data_commands == 2  # the timed-out DATA was not sent again


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ("421 4.7.0 Try again later", AttemptOutcome.TRANSIENT),
        ("550 5.1.1 No such mailbox", AttemptOutcome.PERMANENT),
    ],
)
def test_send_classifies_server_replies(email_request, smtp, reply, outcome):
    smtp.script = [reply]
    result = delivery.send(delivery.build_support_message(email_request))
    assert result.outcome == outcome
    assert result.smtp_code == int(reply[:3])
    assert reply[4:] in result.error_message


def test_send_times_out_as_transient(email_request, smtp, settings):
    settings.EMAIL_TIMEOUT = 0.5
    smtp.script = [("hang", 1.5)]
    result = delivery.send(delivery.build_support_message(email_request))
    assert result.outcome == AttemptOutcome.TRANSIENT


def test_send_to_a_closed_port_is_transient(email_request, smtp, settings):
    from .conftest import free_port

    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_USE_TLS = "127.0.0.1", free_port(), False
    delivery.close_connection()
    result = delivery.send(delivery.build_support_message(email_request))
    assert result.outcome == AttemptOutcome.TRANSIENT
    assert result.error_class == "ConnectionRefusedError"


def test_an_unreadable_reply_is_recorded_without_a_code(email_request):
    from email_service import sending
    from email_service.models import EmailAttempt

    attempt = EmailAttempt.objects.create(
        request=email_request, number=1, started_at=email_request.created_at
    )
    sending._fill_attempt(attempt, delivery.classify(smtplib.SMTPResponseException(-1, b"garbled")))
    attempt.save()
    attempt.refresh_from_db()
    assert attempt.smtp_code is None and attempt.outcome == AttemptOutcome.TRANSIENT


# --- a host that cannot be reached: every failure while opening is the server's, not the mail's ---


class _BrokenServer:
    """A TCP listener that fails an SMTP client while it opens: silent, hanging up, or bad TLS."""

    def __init__(self, mode):
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.stopped = threading.Event()
        if mode != "silent":  # silent: the kernel completes the handshake, nobody ever greets
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                if self.mode == "bad_tls":
                    self._bad_tls(conn.makefile("rwb"))

    def _bad_tls(self, wire):
        wire.write(b"220 broken.example ESMTP\r\n")
        wire.flush()
        wire.readline()  # EHLO
        wire.write(b"250-broken.example\r\n250 STARTTLS\r\n")
        wire.flush()
        wire.readline()  # STARTTLS
        wire.write(b"220 Go ahead\r\n")
        wire.write(b"this is not a TLS handshake\r\n" * 4)
        wire.flush()

    def close(self):
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def broken_server(smtp, settings):
    servers = []

    def start(mode):
        server = _BrokenServer(mode)
        servers.append(server)
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", server.port
        settings.EMAIL_USE_TLS = mode == "bad_tls"
        settings.EMAIL_TIMEOUT = 0.5
        delivery.close_connection()
        return server

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    ("mode", "error_class"),
    # smtplib reports a greeting that never comes as a disconnect ("... timed out").
    [("silent", "SMTPServerDisconnected"), ("close", "SMTPServerDisconnected"), ("bad_tls", "SSLError")],
)
def test_a_failure_while_opening_the_connection_holds_sending_rather_than_failing_the_mail(
    email_request, broken_server, mode, error_class
):
    server = broken_server(mode)
    result = delivery.send(delivery.build_support_message(email_request))
    assert (result.outcome, result.brake) == (AttemptOutcome.TRANSIENT, BrakeKind.CONNECTION)
    # SSLError or its subclass SSLEOFError (the server hung up mid-handshake), by timing.
    assert result.error_class in (error_class, "SSLEOFError" if mode == "bad_tls" else error_class)
    assert mode == "silent" or server.accepted >= 1
    assert mode != "silent" or "timed out" in result.error_text
    assert not delivery.is_connected()


def test_an_unreachable_network_holds_sending(email_request, smtp, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError(errno.EHOSTUNREACH, "No route to host")

    delivery.close_connection()
    monkeypatch.setattr(smtplib.socket, "create_connection", unreachable)
    result = delivery.send(delivery.build_support_message(email_request))
    assert (result.outcome, result.brake, result.error_class) == ("transient", "connection", "OSError")


def test_a_certificate_refused_while_opening_stays_a_tls_brake_for_an_operator():
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    assert delivery._opening_result(error).brake == BrakeKind.TLS


def test_a_closed_port_engages_the_connection_brake(email_request, smtp, settings):
    from .conftest import free_port

    settings.EMAIL_PORT = free_port()
    delivery.close_connection()
    result = delivery.send(delivery.build_support_message(email_request))
    assert result.brake == BrakeKind.CONNECTION


def test_a_timeout_after_the_connection_opened_stays_this_mails(email_request, smtp, settings):
    settings.EMAIL_TIMEOUT = 0.5
    smtp.script = [("hang", 1.5)]
    result = delivery.send(delivery.build_support_message(email_request))
    assert (result.outcome, result.brake) == (AttemptOutcome.TRANSIENT, "")


def test_a_worker_loads_its_mail_templates_and_cache_backend_once_before_it_forks(monkeypatch, caplog):
    from celery.signals import worker_init

    from email_service import tasks

    loader = delivery.mail_engine().template_loaders[0]
    loader.reset()
    made = []
    monkeypatch.setattr(tasks.caches, "create_connection", lambda alias: made.append(alias))
    # Sent once, by the worker's main process before its pool forks (and by no pool process).
    assert tasks._load_ahead in [ref() for _, ref in worker_init.receivers]
    tasks._load_ahead()
    assert made == ["default"]
    # The cached loader holds each compiled mail template: a forked process renders without loading.
    cached = {key.split("-")[0] for key in loader.get_template_cache}
    assert set(delivery.MAIL_TEMPLATES) <= cached

    def broken(alias):
        raise RuntimeError("no such backend")

    # A failure to load ahead leaves it to each process's first mail; the worker still starts.
    monkeypatch.setattr(tasks.caches, "create_connection", broken)
    tasks._load_ahead()
    assert "Could not load the cache backend and mail templates ahead: no such backend" in caplog.text


def test_a_worker_parses_cffi_declarations_once_before_it_forks():
    from email_service import tasks

    if "cffi" not in sys.modules:
        pytest.skip("cffi is not installed: billiard sets the parent-death signal through ctypes")
    tasks._load_ahead()
    # What each pool process's parent-death signal needs (billiard.util.set_pdeathsig) is loaded.
    assert "pycparser" in sys.modules


def test_a_worker_hands_its_first_tasks_to_the_pool_without_waiting_for_another_frame(monkeypatch):
    import functools
    import inspect

    import celery.worker.loops as loops
    from celery.signals import worker_init

    from email_service import tasks

    # Celery's event loop still starts with this read: an upgrade that drops or renames it shows here.
    assert "hub.call_soon(_quick_drain, connection)" in inspect.getsource(loops.asynloop)
    celerys = loops._quick_drain
    if isinstance(celerys, functools.partial):  # a worker started in this process changed it already
        celerys = celerys.func
    monkeypatch.setattr(loops, "_quick_drain", celerys)
    assert tasks._first_read_without_wait in [ref() for _, ref in worker_init.receivers]
    tasks._first_read_without_wait()
    tasks._first_read_without_wait()  # changed once, however often the signal comes

    timeouts = []

    class Connection:
        def drain_events(self, timeout):
            timeouts.append(timeout)
            raise TimeoutError()  # nothing there: the read returns at once, and quietly

    loops._quick_drain(Connection())
    assert timeouts == [0]
    assert loops._quick_drain.func is celerys


WORKER_SETUP = """
import json, sys
from medcor_backend2.celery import app
app.loader.import_default_modules()  # what `celery worker` and `celery beat` do before anything else
loaded = {name: name in sys.modules for name in ("email_service.admin", "rest_framework.serializers", "requests")}
from django.contrib import admin
from django.template import engines
from email_service import delivery, tasks
from email_service.models import EmailRequest
tasks._load_ahead()
loaded["all template engines"] = bool(engines._engines)
row = EmailRequest(pk="6a2d6e1f-6266-47b7-89bd-21430e5f1a5b")
url = delivery.admin_change_url(row)
registered = sorted(type(model_admin).__name__ for model_admin in admin.site._registry.values())
print(json.dumps({"loaded": loaded, "url": url, "registered": registered}))
"""


@pytest.mark.parametrize("skip_checks", [True, False])
def test_a_celery_process_loads_the_admin_only_when_it_links_to_it(skip_checks):
    """The admin's modules (and REST framework's serializers, requests) are no part of a worker's
    start: a link to the admin loads them, with every admin registered as in the web process."""
    import json

    from django.contrib import admin

    env = {key: value for key, value in os.environ.items() if key != "CELERY_SKIP_CHECKS"}
    if skip_checks:
        env["CELERY_SKIP_CHECKS"] = "1"  # what `celery --skip-checks` sets
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SETUP],
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(delivery.__file__))),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Django's checks read the URLconf, and with it the admin: without them nothing loads it.
    assert result["loaded"] == {
        "email_service.admin": not skip_checks,
        "rest_framework.serializers": not skip_checks,
        "requests": not skip_checks,
        "all template engines": not skip_checks,
    }
    assert result["url"].endswith(
        "/admin/email_service/emailrequest/6a2d6e1f-6266-47b7-89bd-21430e5f1a5b/change/"
    )
    # The same admins as this (web-like) process, the staff site's own TOTP device admin among them.
    assert result["registered"] == sorted(
        type(model_admin).__name__ for model_admin in admin.site._registry.values()
    )
    assert "OwnTOTPDeviceAdmin" in result["registered"]


def test_mail_templates_are_found_where_the_projects_templates_are(email_request, settings, tmp_path):
    (tmp_path / "email_service").mkdir()
    (tmp_path / "email_service" / "support_email.txt").write_text(
        "{% load i18n %}{% translate 'Overridden' %} for {{ request.full_name }}\n"
    )
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path]}]
    message = delivery.build_support_message(email_request)
    assert message.body == f"Overridden for {email_request.full_name}\n"
    # The HTML part is not overridden: the app's own template, found after the project's.
    assert "New contact form submission" in message.alternatives[0][0]
    # A change of the setting reaches the mail engine (as Django's own engines are made again).
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": []}]
    assert delivery.build_support_message(email_request).body.startswith("New contact form submission")
