"""The test MTA and the Google stand-ins themselves, driven with plain smtplib."""

import hashlib
import json
import os
import smtplib
import ssl
import subprocess
import sys
from base64 import b64decode
from email.message import EmailMessage
from pathlib import Path

import pytest
import requests

from email_service.tests.conftest import wait_for
from email_service.tests.google import xoauth2_string
from email_service.tests.mta import GMAIL_QUOTA, GMAIL_RATE, GMAIL_THROTTLE, PostfixMTA

SUPPORT = "support@tcall.ai"


def connect(mta, user="sender", password=None, context=None):
    """An SMTP session through STARTTLS, logged in as `user`."""
    client = smtplib.SMTP(mta.host, mta.port, timeout=10)
    client.starttls(context=context or mta.ssl_context())
    client.login(user, mta.users[user] if password is None else password)
    return client


def assert_reply(reply, expected):
    """Assert an SMTP reply has `expected`'s code, enhanced code and text.

    Postfix puts "<key>: ... rejected:" between the enhanced code and an access map's text.
    """
    code, text = reply
    expected_code, enhanced, expected_text = expected.split(" ", 2)
    assert code == int(expected_code), reply
    assert text.startswith(enhanced.encode() + b" ") and text.endswith(expected_text.encode()), reply


def small_message(subject="Hello"):
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = SUPPORT, SUPPORT, subject
    message.set_content("A short test message.\n")
    return message


# --- Postfix ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_starttls_and_auth_plain_deliver_a_3mb_attachment_intact(mta):
    payload = os.urandom(3 * 1024 * 1024)
    message = small_message("With a PDF")
    message.add_attachment(payload, maintype="application", subtype="pdf", filename="report.pdf")

    with connect(mta) as client:
        assert client.sock.version().startswith("TLSv1.")
        client.send_message(message)

    [delivered] = mta.delivered(timeout=30)
    assert delivered.mail_from == SUPPORT and delivered.rcpt_tos == [SUPPORT]
    assert "ESMTPSA" in delivered.message["Received"]  # Postfix saw TLS and an authenticated login
    [attachment] = delivered.message.iter_attachments()
    assert attachment.get_filename() == "report.pdf"
    assert hashlib.sha256(attachment.get_content()).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.integration
def test_no_auth_and_no_mail_before_starttls(mta):
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, reply = client.mail(SUPPORT)
        assert code == 530 and b"5.7.0" in reply


@pytest.mark.integration
def test_mail_without_login_is_refused(mta):
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
        client.starttls(context=mta.ssl_context())
        assert_reply(client.mail(SUPPORT), "530 5.7.0 Authentication Required.")


@pytest.mark.integration
def test_a_context_that_does_not_trust_the_ca_is_refused(mta):
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            client.starttls(context=mta.ssl_context(trust=False))


@pytest.mark.integration
def test_the_certificate_names_localhost_and_127_0_0_1_and_nothing_else(mta):
    with smtplib.SMTP("localhost", mta.port, timeout=10) as client:
        assert client.starttls(context=mta.ssl_context())[0] == 220
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
        client.ehlo()
        assert client.docmd("STARTTLS")[0] == 220
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            mta.ssl_context().wrap_socket(client.sock, server_hostname="smtp.gmail.com")


@pytest.mark.integration
def test_env_lets_a_process_trusting_only_defaults_send_through_the_mta(mta):
    env = mta.env("sender")
    script = (
        "import os, smtplib, ssl\n"
        "with smtplib.SMTP(os.environ['EMAIL_HOST'], int(os.environ['EMAIL_PORT']), timeout=10) as s:\n"
        "    s.starttls(context=ssl.create_default_context())\n"
        "    s.login(os.environ['EMAIL_HOST_USER'], os.environ['EMAIL_HOST_PASSWORD'])\n"
        "    s.sendmail('support@tcall.ai', ['support@tcall.ai'], b'Subject: from a worker\\r\\n\\r\\nhi\\r\\n')\n"
    )
    subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, check=True, timeout=60)
    assert [d.message["Subject"] for d in mta.delivered()] == ["from a worker"]


@pytest.mark.integration
def test_wrong_password_gets_535(mta):
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        connect(mta, password="not-the-password")
    assert refused.value.smtp_code == 535 and b"5.7.8" in refused.value.smtp_error


@pytest.mark.integration
def test_logins_failing_temporarily_get_454_at_auth_until_switched_back(mta):
    mta.fail_logins_temporarily()
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        connect(mta)
    assert refused.value.smtp_code == 454 and b"4.7.0" in refused.value.smtp_error
    mta.fail_logins_temporarily(False)
    connect(mta).quit()


@pytest.mark.integration
def test_quota_user_gets_550_5_4_5_at_mail(mta):
    with connect(mta, "quota") as client:
        assert_reply(client.mail(SUPPORT), GMAIL_QUOTA)


@pytest.mark.integration
def test_throttle_user_gets_421_at_mail_and_the_connection_closes(mta):
    client = connect(mta, "throttle")
    assert_reply(client.mail(SUPPORT), GMAIL_THROTTLE)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    client.close()


@pytest.mark.integration
def test_rate_user_gets_450_4_2_1_at_rcpt_after_mail_is_accepted(mta):
    with connect(mta, "rate") as client:
        assert client.mail(SUPPORT)[0] == 250
        assert_reply(client.rcpt(SUPPORT), GMAIL_RATE)


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["data", "eod"])
def test_a_reply_set_for_data_or_end_of_data_comes_at_that_stage(mta, stage):
    reply = "552 5.3.4 Your message exceeded Google's message size limits."
    mta.set_reply("sender", reply, stage)
    with connect(mta) as client:
        assert client.mail(SUPPORT)[0] == 250
        assert client.rcpt(SUPPORT)[0] == 250
        if stage == "data":
            assert_reply(client.docmd("DATA"), reply)
        else:
            assert_reply(client.data(small_message().as_bytes()), reply)
    assert mta.messages() == []


@pytest.mark.integration
def test_switching_a_reply_at_run_time_takes_effect_at_the_next_command(mta):
    with connect(mta) as client:
        client.send_message(small_message("before"))
        mta.set_reply("sender", GMAIL_QUOTA)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.send_message(small_message("during"))
        assert refused.value.smtp_code == 550
        mta.set_reply("sender", None)
        client.send_message(small_message("after"))
    subjects = [delivered.message["Subject"] for delivered in mta.delivered(count=2)]
    assert subjects == ["before", "after"]


@pytest.mark.integration
def test_reset_restores_the_preset_replies(mta):
    mta.set_reply("quota", None)
    with connect(mta, "quota") as client:
        assert client.mail(SUPPORT)[0] == 250
    mta.reset()
    with connect(mta, "quota") as client:
        assert client.mail(SUPPORT)[0] == 550


@pytest.mark.integration
def test_mail_to_a_domain_not_routed_is_refused_at_rcpt_and_never_leaves(mta):
    with connect(mta) as client:
        client.mail(SUPPORT)
        assert_reply(client.rcpt("someone@gmail.com"), "550 5.7.1 the test MTA relays nowhere")
    assert mta.messages() == []


@pytest.mark.integration
def test_postfix_listens_on_loopback_only(postfix_mta):
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) == postfix_mta.port:  # 0A: LISTEN
                listening.add(address)
    assert listening == {"0100007F"}  # 127.0.0.1, in the kernel's byte order


@pytest.mark.integration
def test_an_instance_of_its_own_starts_beside_the_session_one_and_stops_leaving_no_process(postfix_mta):
    second = PostfixMTA().start()
    try:
        assert second.port != postfix_mta.port
        daemons = second.processes()
        assert daemons and not set(daemons) & set(postfix_mta.processes())
        with connect(second) as client:
            client.send_message(small_message("second"))
        assert [d.message["Subject"] for d in second.delivered()] == ["second"]
    finally:
        second.stop()
    assert second.processes() == []
    assert all(not Path(f"/proc/{pid}/cwd").exists() for pid in daemons)
    assert postfix_mta.processes()  # the session's instance is untouched


# --- Google stand-ins -----------------------------------------------------------------------


def refresh(endpoint, **overrides):
    form = {
        "grant_type": "refresh_token",
        "client_id": endpoint.client_id,
        "client_secret": endpoint.client_secret,
        "refresh_token": endpoint.refresh_token,
        **overrides,
    }
    return requests.post(endpoint.url, data=form, timeout=10)


def google_connect(google_smtp):
    """An SMTP session with the Gmail stand-in, through STARTTLS."""
    client = smtplib.SMTP("127.0.0.1", google_smtp.port, timeout=10)
    client.starttls(context=google_smtp.client_ssl_context())
    return client


def xoauth2_login(client, user, token):
    """Log in with SASL XOAUTH2; after an error challenge, answer with an empty line as clients do."""
    client.ehlo()
    initial = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return client.auth("XOAUTH2", lambda challenge=None: initial if challenge is None else "")


def test_token_endpoint_issues_a_new_bearer_token_per_refresh(google_token_endpoint):
    first, second = refresh(google_token_endpoint), refresh(google_token_endpoint)
    assert first.status_code == second.status_code == 200
    body = first.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3599
    assert body["access_token"] != second.json()["access_token"]
    assert google_token_endpoint.calls == 2
    assert not google_token_endpoint.is_current(body["access_token"])
    assert google_token_endpoint.is_current(second.json()["access_token"])


def test_token_endpoint_refuses_a_bad_refresh_token_or_client(google_token_endpoint):
    bad_grant = refresh(google_token_endpoint, refresh_token="revoked")
    assert bad_grant.status_code == 400 and bad_grant.json()["error"] == "invalid_grant"
    bad_client = refresh(google_token_endpoint, client_secret="wrong")
    assert bad_client.status_code == 401 and bad_client.json()["error"] == "invalid_client"
    assert google_token_endpoint.calls == 2 and google_token_endpoint.issued == []


def test_xoauth2_with_a_fresh_token_sends(google_smtp, google_token_endpoint):
    token = refresh(google_token_endpoint).json()["access_token"]
    with google_connect(google_smtp) as client:
        assert xoauth2_login(client, SUPPORT, token)[0] == 235
        client.send_message(small_message())
    [received] = google_smtp.handler.received()
    assert received["login"] == SUPPORT and received["rcpt_tos"] == [SUPPORT]


def test_xoauth2_with_an_old_token_gets_a_json_challenge_then_535(google_smtp, google_token_endpoint):
    old = refresh(google_token_endpoint).json()["access_token"]
    refresh(google_token_endpoint)
    with google_connect(google_smtp) as client:
        client.ehlo()
        code, challenge = client.docmd("AUTH", "XOAUTH2 " + xoauth2_string(SUPPORT, old))
        assert code == 334 and json.loads(b64decode(challenge))["status"] == "400"
        code, reply = client.docmd("")
        assert code == 535 and reply.startswith(b"5.7.8 Username and Password not accepted")
    assert google_smtp.handler.logins == [("XOAUTH2", SUPPORT, False)]


def test_xoauth2_with_a_token_that_expired_during_the_test_gets_535(google_smtp, google_token_endpoint):
    google_token_endpoint.lifetime = 1
    token = refresh(google_token_endpoint).json()["access_token"]
    with google_connect(google_smtp) as client:
        assert xoauth2_login(client, SUPPORT, token)[0] == 235
    wait_for(lambda: not google_token_endpoint.is_current(token), timeout=10, message="the token to expire")
    with google_connect(google_smtp) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            xoauth2_login(client, SUPPORT, token)
    assert refused.value.smtp_code == 535


def test_password_logins_are_refused_where_oauth2_is_required(google_smtp):
    with google_connect(google_smtp) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(SUPPORT, "an app password")
        assert refused.value.smtp_code == 535
        assert client.mail(SUPPORT)[0] == 530  # nothing is sent without a login
    assert google_smtp.handler.logins[0][2] is False


def test_the_gmail_stand_in_wants_starttls_before_auth(google_smtp, google_token_endpoint):
    token = refresh(google_token_endpoint).json()["access_token"]
    with smtplib.SMTP("127.0.0.1", google_smtp.port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "XOAUTH2 " + xoauth2_string(SUPPORT, token))
        assert code == 530
    assert google_smtp.handler.logins == []


def test_the_gmail_stand_in_env_names_a_working_token_endpoint_and_server(google_smtp):
    env = google_smtp.env()
    answer = requests.post(
        env["EMAIL_OAUTH2_TOKEN_URL"],
        data={
            "grant_type": "refresh_token",
            "client_id": env["EMAIL_OAUTH2_CLIENT_ID"],
            "client_secret": env["EMAIL_OAUTH2_CLIENT_SECRET"],
            "refresh_token": env["EMAIL_OAUTH2_REFRESH_TOKEN"],
        },
        timeout=10,
    )
    with smtplib.SMTP(env["EMAIL_HOST"], int(env["EMAIL_PORT"]), timeout=10) as client:
        client.starttls(context=ssl.create_default_context(cafile=env["SSL_CERT_FILE"]))
        assert xoauth2_login(client, env["EMAIL_HOST_USER"], answer.json()["access_token"])[0] == 235
    assert env["EMAIL_AUTH_METHOD"] == "xoauth2" and env["EMAIL_USE_TLS"] == "true"
