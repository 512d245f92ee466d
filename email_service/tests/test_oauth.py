"""Gmail with OAuth2: SASL XOAUTH2 against the Google stand-ins (tests/google.py).

The token endpoint issues a new access token per refresh grant and the SMTP server accepts only
the newest unexpired one, so a token kept too long, or replaced, is refused as Gmail refuses it.
"""

import os
import subprocess
import sys

import pytest
from django.core.mail import EmailMultiAlternatives

from email_service import delivery, oauth
from email_service.outcomes import AttemptOutcome

from .conftest import ROOT, free_port, service_env, start_worker, wait_for

USER = "support@tcall.ai"


@pytest.fixture
def gmail(google_smtp, google_token_endpoint, settings, monkeypatch):
    """This process's mail settings pointed at the Gmail stand-in with XOAUTH2."""
    env = google_smtp.env()
    settings.EMAIL_HOST, settings.EMAIL_PORT = env["EMAIL_HOST"], int(env["EMAIL_PORT"])
    settings.EMAIL_USE_TLS, settings.EMAIL_USE_SSL = True, False
    settings.EMAIL_TIMEOUT = 10
    settings.EMAIL_HOST_USER, settings.EMAIL_HOST_PASSWORD = env["EMAIL_HOST_USER"], ""
    settings.EMAIL_AUTH_METHOD = env["EMAIL_AUTH_METHOD"]
    settings.EMAIL_OAUTH2_CLIENT_ID = env["EMAIL_OAUTH2_CLIENT_ID"]
    settings.EMAIL_OAUTH2_CLIENT_SECRET = env["EMAIL_OAUTH2_CLIENT_SECRET"]
    settings.EMAIL_OAUTH2_REFRESH_TOKEN = env["EMAIL_OAUTH2_REFRESH_TOKEN"]
    settings.EMAIL_OAUTH2_TOKEN_URL = env["EMAIL_OAUTH2_TOKEN_URL"]
    # The default trust store, as a worker started with google_smtp.env() would have it.
    monkeypatch.setenv("SSL_CERT_FILE", env["SSL_CERT_FILE"])
    delivery.close_connection()
    oauth.forget_tokens()
    yield google_smtp.handler
    delivery.close_connection()
    oauth.forget_tokens()


def send_once():
    """Send one mail on a new connection (so it logs in), and return the result."""
    delivery.close_connection()
    return delivery.send(EmailMultiAlternatives("Hello", "Plain words.", USER, [USER]))


def test_a_mail_goes_with_xoauth2_and_a_token_from_the_refresh_grant(gmail, google_token_endpoint):
    result = send_once()
    assert result.outcome == AttemptOutcome.SENT
    assert gmail.logins == [("XOAUTH2", USER, True)]
    [received] = gmail.received()
    assert received["login"] == USER and received["rcpt_tos"] == [USER]
    assert google_token_endpoint.calls == 1


def test_the_token_is_kept_for_the_process_while_it_lives(gmail, google_token_endpoint):
    for _ in range(3):
        assert send_once().outcome == AttemptOutcome.SENT
    assert gmail.logins == [("XOAUTH2", USER, True)] * 3
    assert google_token_endpoint.calls == 1


def test_a_token_about_to_expire_is_renewed_before_it_is_used(gmail, google_token_endpoint):
    google_token_endpoint.lifetime = 3
    assert send_once().outcome == AttemptOutcome.SENT
    [first] = google_token_endpoint.issued
    # Into the last fifth of its life: still accepted by the server, but no longer used here.
    wait_for(lambda: oauth.time.monotonic() > first.expires_at - 0.5, timeout=10, message="the margin")

    assert send_once().outcome == AttemptOutcome.SENT

    assert google_token_endpoint.calls == 2
    assert gmail.logins == [("XOAUTH2", USER, True)] * 2  # never refused: renewed before use


def test_a_kept_token_the_server_refuses_is_replaced_once_and_the_login_succeeds(
    gmail, google_token_endpoint
):
    assert send_once().outcome == AttemptOutcome.SENT
    # Another client of the same OAuth client refreshes: the token kept here is no longer current.
    google_token_endpoint.answer(
        {
            "grant_type": "refresh_token",
            "client_id": google_token_endpoint.client_id,
            "client_secret": google_token_endpoint.client_secret,
            "refresh_token": google_token_endpoint.refresh_token,
        }
    )

    result = send_once()

    assert result.outcome == AttemptOutcome.SENT
    assert gmail.logins == [("XOAUTH2", USER, True), ("XOAUTH2", USER, False), ("XOAUTH2", USER, True)]
    assert google_token_endpoint.calls == 3
    assert len(gmail.received(count=2)) == 2


def test_a_refusal_of_a_new_token_stands_with_the_535(gmail, google_token_endpoint, settings):
    settings.EMAIL_HOST_USER = "someone-else@tcall.ai"  # not the account the token is for

    result = send_once()

    assert result.smtp_code == 535 and "5.7.8" in result.error_message
    assert result.outcome != AttemptOutcome.SENT
    # The token was just issued: a second one would not help, and would be a second failed login.
    assert gmail.logins == [("XOAUTH2", "someone-else@tcall.ai", False)]
    assert google_token_endpoint.calls == 1


def test_a_kept_token_refused_again_after_renewal_gives_the_535(gmail, google_token_endpoint):
    assert send_once().outcome == AttemptOutcome.SENT
    gmail.user = "another-account@tcall.ai"  # the server now refuses this account whatever the token

    result = send_once()

    assert result.smtp_code == 535 and result.outcome != AttemptOutcome.SENT
    assert gmail.logins[1:] == [("XOAUTH2", USER, False)] * 2
    assert google_token_endpoint.calls == 2


def test_a_revoked_refresh_token_says_so_and_no_login_is_tried(gmail, google_token_endpoint, settings):
    settings.EMAIL_OAUTH2_REFRESH_TOKEN = "1//revoked"

    result = send_once()

    # A setting to fix: the sender-wide brake holds every mail until an operator resumes.
    assert (result.outcome, result.brake) == (AttemptOutcome.TRANSIENT, "credentials")
    assert result.error_class == "TokenRefusedError"
    assert "invalid_grant" in result.error_message
    assert "EMAIL_OAUTH2_REFRESH_TOKEN" in result.error_message
    assert gmail.logins == []  # no failed login is spent on a token we do not have


def test_a_token_endpoint_out_of_reach_is_transient(gmail, settings):
    settings.EMAIL_OAUTH2_TOKEN_URL = f"http://127.0.0.1:{free_port()}/token"

    result = send_once()

    assert (result.outcome, result.error_class) == (AttemptOutcome.TRANSIENT, "TokenUnavailableError")
    assert result.brake == "auth_temporary"  # no token, no login for any mail: wait it out
    assert gmail.logins == []


def test_a_password_where_oauth2_is_required_is_one_failed_login(gmail, settings):
    settings.EMAIL_AUTH_METHOD = "password"
    settings.EMAIL_HOST_PASSWORD = "an app password"

    result = send_once()

    assert result.smtp_code == 535
    assert gmail.logins == [("PLAIN", USER, False)]


def test_settings_refuse_to_start_with_an_unknown_method_or_xoauth2_half_configured(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EMAIL_", "GMAIL_"))}
    base.update(DJANGO_DEBUG="true", MEDCOR_VAR_DIR=str(tmp_path / "var"))
    code = (
        "import django; django.setup(); from django.conf import settings; print(settings.EMAIL_AUTH_METHOD)"
    )

    def run(**env):
        return subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=60
        )

    assert run().stdout.strip() == "password"
    unknown = run(EMAIL_AUTH_METHOD="oauth")
    assert unknown.returncode != 0 and "EMAIL_AUTH_METHOD must be password or xoauth2" in unknown.stderr
    half = run(EMAIL_AUTH_METHOD="xoauth2", EMAIL_HOST_USER=USER, EMAIL_OAUTH2_CLIENT_ID="id")
    assert half.returncode != 0
    assert "needs EMAIL_OAUTH2_CLIENT_SECRET, EMAIL_OAUTH2_REFRESH_TOKEN" in half.stderr
    whole = run(
        EMAIL_AUTH_METHOD="XOAuth2",
        EMAIL_HOST_USER=USER,
        EMAIL_OAUTH2_CLIENT_ID="id",
        EMAIL_OAUTH2_CLIENT_SECRET="secret",
        EMAIL_OAUTH2_REFRESH_TOKEN="1//token",
    )
    assert whole.returncode == 0 and whole.stdout.strip() == "xoauth2"


@pytest.mark.integration
def test_a_worker_configured_from_the_environment_sends_with_xoauth2(
    google_smtp, google_token_endpoint, transactional_db, tmp_path
):
    # A worker of its own, on a queue of its own, with only what google_smtp.env() sets.
    queue = f"{os.environ.get('CELERY_TASK_DEFAULT_QUEUE', 'emails')}-xoauth2"
    env = {**google_smtp.env(), "CELERY_TASK_DEFAULT_QUEUE": queue, "EMAIL_TIMEOUT": "10"}
    worker = start_worker(tmp_path, google_smtp.port, name="xoauth2", **env)
    try:
        result = subprocess.run(
            [sys.executable, "manage.py", "test_email", "--email", "operator@example.org", "--wait", "60"],
            cwd=ROOT,
            env=service_env(google_smtp.port, **env),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Final status: SENT" in result.stdout
    received = google_smtp.handler.received()
    assert any(USER in message["rcpt_tos"] for message in received)
    assert all(accepted for mechanism, _, accepted in google_smtp.handler.logins)
    assert {mechanism for mechanism, _, _ in google_smtp.handler.logins} == {"XOAUTH2"}
    assert google_token_endpoint.calls >= 1
