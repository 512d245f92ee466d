"""The SMTP connection in delivery.py: one login attempt, stale kept connections, BODY=8BITMIME.

Against an aiosmtpd server that counts the AUTH commands on the wire, can leave 8BITMIME out of
its EHLO, answer MAIL as scripted, and close a connection right after a mail as a server that
drops idle clients does.
"""

import asyncio
import uuid

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult
from django.core.mail import EmailMultiAlternatives

from email_service import delivery, outbox, sending
from email_service.models import EmailAttempt, EmailRequest, EmailStatus
from email_service.outcomes import AttemptOutcome

from .conftest import free_port, wait_for

USER, PASSWORD = "support@tcall.ai", "the-right-password"


class WireHandler:
    """Record AUTH commands, MAIL parameters and mails; misbehave as a test asks."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.auth_commands = []  # the mechanism of every AUTH command received
        self.mail_options = []  # the parameters of every MAIL command received
        self.messages = []
        self.connections = 0
        self.closed_by_server = 0
        self.offer_8bitmime = True
        self.mail_replies = []  # replies to the next MAIL commands (the connection then closes)
        self.close_after_data = False

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        accepted = (auth_data.login, auth_data.password) == (USER.encode(), PASSWORD.encode())
        return AuthResult(success=accepted, handled=False)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.connections += 1
        session.host_name = hostname
        return [line for line in responses if self.offer_8bitmime or line != "250-8BITMIME"]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_options.append(list(mail_options))
        if self.mail_replies:
            self._close_soon(server)  # after the reply has gone out
            return self.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.original_content)
        if self.close_after_data:
            self._close_soon(server)
        return "250 2.0.0 OK"

    def _close_soon(self, server):
        def close():
            self.closed_by_server += 1
            server.transport.close()

        asyncio.get_running_loop().call_soon(close)


class _CountingSMTP(SMTP):
    async def smtp_AUTH(self, arg):
        self.event_handler.auth_commands.append((arg or "").split(" ")[0].upper())
        return await super().smtp_AUTH(arg)


class WireServer(Controller):
    def factory(self):
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture(scope="module")
def wire_server():
    handler = WireHandler()
    server = WireServer(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=handler.authenticate,
        auth_require_tls=False,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def wire(wire_server, settings):
    """The server, emptied, and the mail settings pointed at it with the right password."""
    wire_server.handler.reset()
    delivery.close_connection()
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", wire_server.port
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5
    settings.EMAIL_HOST_USER, settings.EMAIL_HOST_PASSWORD = USER, PASSWORD
    settings.EMAIL_AUTH_METHOD = "password"
    yield wire_server.handler
    delivery.close_connection()


@pytest.fixture
def message():
    return EmailMultiAlternatives("Hello", "Plain words.", USER, [USER])


# --- one login attempt --------------------------------------------------------------------


def test_a_wrong_password_is_one_auth_command_on_the_wire(wire, settings, message):
    settings.EMAIL_HOST_PASSWORD = "not-the-password"
    result = delivery.send(message)
    assert result.outcome != AttemptOutcome.SENT and result.smtp_code == 535
    # smtplib's login() would have gone on with LOGIN after PLAIN was refused.
    assert wire.auth_commands == ["PLAIN"]
    assert wire.messages == []


def test_the_right_password_logs_in_once_and_the_connection_is_kept(wire, message):
    for _ in range(3):
        assert delivery.send(message).outcome == AttemptOutcome.SENT
    assert wire.auth_commands == ["PLAIN"]
    assert (wire.connections, len(wire.messages)) == (1, 3)


def test_login_is_used_when_the_server_offers_no_plain(wire_server, wire, message):
    wire_server.SMTP_kwargs["auth_exclude_mechanism"] = ["PLAIN"]
    try:
        assert delivery.send(message).outcome == AttemptOutcome.SENT
    finally:
        del wire_server.SMTP_kwargs["auth_exclude_mechanism"]
    assert wire.auth_commands == ["LOGIN"]


def test_no_user_means_no_auth(wire, settings, message):
    settings.EMAIL_HOST_USER = ""
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    assert wire.auth_commands == []


# --- a stale kept connection ----------------------------------------------------------------


def test_a_connection_the_server_closed_after_its_last_mail_is_replaced_and_the_mail_sent(wire, message):
    wire.close_after_data = True
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    wait_for(lambda: wire.closed_by_server == 1, timeout=10, message="the server to hang up")
    wire.close_after_data = False

    result = delivery.send(message)

    assert result.outcome == AttemptOutcome.SENT
    assert (wire.connections, len(wire.messages)) == (2, 2)


def test_a_kept_connection_answering_421_to_mail_is_replaced_and_the_mail_sent(wire, message):
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    wire.mail_replies = ["421 4.4.2 Idle timeout, closing connection"]

    result = delivery.send(message)

    assert result.outcome == AttemptOutcome.SENT
    assert (wire.connections, len(wire.mail_options), len(wire.messages)) == (2, 3, 2)


def test_a_new_connection_answering_421_to_mail_is_not_tried_again(wire, message):
    # On a connection just opened a 421 is the server's answer, not staleness: it stands.
    wire.mail_replies = ["421 4.7.0 Try again later, closing connection."]

    result = delivery.send(message)

    assert (result.outcome, result.smtp_code) == (AttemptOutcome.TRANSIENT, 421)
    assert (wire.connections, len(wire.mail_options), wire.messages) == (1, 1, [])


def test_only_one_new_connection_is_tried_for_a_stale_one(wire, message):
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    wire.mail_replies = ["421 4.4.2 Idle timeout", "421 4.7.0 Try again later, closing connection."]

    result = delivery.send(message)

    assert (result.outcome, result.smtp_code) == (AttemptOutcome.TRANSIENT, 421)
    assert (wire.connections, len(wire.mail_options), len(wire.messages)) == (2, 3, 1)


def test_a_stale_connection_spends_no_retry(wire, db, settings):
    settings.EMAIL_SEND_CONFIRMATION = False
    rows = [
        outbox.create_email_request(
            data={"full_name": "A", "email": f"a-{uuid.uuid4().hex[:6]}@example.org", "message": "Hi"},
            dispatch_on_commit=False,
        )
        for _ in range(2)
    ]
    assert sending.send_email_request(rows[0].pk, worker="test") == EmailStatus.SENT
    wire.mail_replies = ["421 4.4.2 Idle timeout, closing connection"]

    assert sending.send_email_request(rows[1].pk, worker="test") == EmailStatus.SENT

    row = EmailRequest.objects.get(pk=rows[1].pk)
    assert (row.status, row.retry_count, row.error_message) == (EmailStatus.SENT, 0, "")
    assert list(EmailAttempt.objects.filter(request=row).values_list("outcome", flat=True)) == [
        AttemptOutcome.SENT
    ]
    assert len(wire.messages) == 2


# --- BODY=8BITMIME ------------------------------------------------------------------------------


def test_8bit_text_is_announced_with_body_8bitmime(wire):
    message = EmailMultiAlternatives("Olá", "Résultats de laboratório.", USER, [USER])
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    assert "BODY=8BITMIME" in wire.mail_options[0]
    assert b"Content-Transfer-Encoding: 8bit" in wire.messages[0]


def test_ascii_mail_goes_without_body_8bitmime(wire, message):
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    assert not any(option.startswith("BODY=") for option in wire.mail_options[0])


def test_body_8bitmime_is_never_sent_to_a_server_that_does_not_offer_it(wire):
    wire.offer_8bitmime = False
    message = EmailMultiAlternatives("Olá", "Résultats de laboratório.", USER, [USER])
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    assert not any(option.startswith("BODY=") for option in wire.mail_options[0])
    assert len(wire.messages) == 1


# --- through the real Postfix ---------------------------------------------------------------------


@pytest.fixture
def postfix(mta, settings, monkeypatch):
    """This process's mail settings pointed at the test Postfix as its `sender` user."""
    env = mta.env("sender")
    settings.EMAIL_HOST, settings.EMAIL_PORT = env["EMAIL_HOST"], int(env["EMAIL_PORT"])
    settings.EMAIL_USE_TLS, settings.EMAIL_USE_SSL = True, False
    settings.EMAIL_TIMEOUT = 10
    settings.EMAIL_HOST_USER, settings.EMAIL_HOST_PASSWORD = (
        env["EMAIL_HOST_USER"],
        env["EMAIL_HOST_PASSWORD"],
    )
    settings.EMAIL_AUTH_METHOD = "password"
    monkeypatch.setenv("SSL_CERT_FILE", env["SSL_CERT_FILE"])
    delivery.close_connection()
    yield mta
    delivery.close_connection()


def failed_logins(log):
    return [line for line in log.splitlines() if "authentication failed" in line]


@pytest.mark.integration
def test_a_wrong_password_is_one_failed_login_at_postfix(postfix, settings, message):
    before = len(failed_logins(postfix.log()))
    settings.EMAIL_HOST_PASSWORD = "not-the-password"

    result = delivery.send(message)

    assert result.smtp_code == 535
    # Postfix logs each refused AUTH once it has answered it, so by now the line is there.
    wait_for(lambda: len(failed_logins(postfix.log())) > before, timeout=10, message="the maillog line")
    new = failed_logins(postfix.log())[before:]
    assert len(new) == 1 and "SASL PLAIN authentication failed" in new[0]


@pytest.mark.integration
def test_8bit_mail_through_postfix_arrives_intact(postfix):
    message = EmailMultiAlternatives("Olá", "Résultats de laboratório: ótimos.", USER, [USER])
    assert delivery.send(message).outcome == AttemptOutcome.SENT
    [delivered] = postfix.delivered()
    assert delivered.message.get_content().strip() == "Résultats de laboratório: ótimos."
