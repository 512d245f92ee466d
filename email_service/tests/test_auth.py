"""Staff authentication: admin lockout, the TOTP second factor, idle sessions, hashed expiring tokens, CSP."""

import json
import re
from datetime import timedelta
from io import StringIO

import axes.attempts
import axes.handlers.proxy
import pytest
from axes.models import AccessAttempt
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import RequestFactory
from django.utils import timezone
from django.utils.html import escape
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice
from django_otp.util import random_hex
from rest_framework.test import APIClient

from email_service import captcha, contact
from email_service.audit import AuditAction, AuditEntry
from email_service.authentication import ApiToken, issue_token, lockout_response

LOGIN = "/admin/login/?next=/admin/"
PASSWORD = "correct horse battery staple"
STAFF_API = "/api/email/emails/"


@pytest.fixture(autouse=True)
def fast_hasher(settings):
    # Dozens of password checks per test: the default hasher is slow by design.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff(db):
    user = User.objects.create_user("nurse.admin", password=PASSWORD, is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_emailrequest"))
    return user


@pytest.fixture
def travel(monkeypatch):
    """Move the clock that sessions, tokens and django-axes read forward by some seconds."""
    real_now = timezone.now
    offset = timedelta()

    def now():
        return real_now() + offset

    for module in (timezone, axes.attempts, axes.handlers.proxy):
        monkeypatch.setattr(module, "now", now)

    def forward(seconds):
        nonlocal offset
        offset += timedelta(seconds=seconds)

    return forward


def log_in(client, username, password, ip="127.0.0.1", **extra):
    return client.post(LOGIN, {"username": username, "password": password, **extra}, REMOTE_ADDR=ip)


def is_logged_in(client):
    return client.get("/admin/").status_code == 200


def login_failures(username=""):
    return AuditEntry.objects.filter(action=AuditAction.LOGIN_FAILED, actor=username).count()


# --- lockout -------------------------------------------------------------------------------------


def test_ten_wrong_passwords_lock_the_account_and_the_right_one_is_refused_until_the_cool_off_ends(
    client, staff, settings, travel
):
    settings.STAFF_LOGIN_COOLOFF_SECONDS = 600
    answers = [log_in(client, staff.username, f"guess {n}").status_code for n in range(10)]
    # The limit's worth of failures answered with the form, every later one with the lockout.
    assert answers == [200] * 4 + [429] * 6

    locked = log_in(client, staff.username, PASSWORD)
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.content.decode()
    assert "script-src 'self'" in locked["Content-Security-Policy"]
    assert not is_logged_in(client)

    travel(599)
    assert log_in(client, staff.username, PASSWORD).status_code == 429
    # A refused attempt during the lockout starts the cool-off again.
    travel(599)
    assert log_in(client, staff.username, PASSWORD).status_code == 429

    travel(601)
    response = log_in(client, staff.username, PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert is_logged_in(client)
    # Each failure and each refusal is on the trail under the user's name; then the login.
    assert login_failures(staff.username) == 13
    assert AuditEntry.objects.filter(action=AuditAction.LOGIN, actor=staff.username).count() == 1
    logins = AuditEntry.objects.filter(action__in=[AuditAction.LOGIN, AuditAction.LOGIN_FAILED])
    assert set(logins.values_list("ip", flat=True)) == {"127.0.0.1"}


def test_failures_from_one_ip_lock_that_ip_for_every_username_but_not_other_ips(client, staff, settings):
    settings.STAFF_LOGIN_FAILURE_LIMIT = 3
    for n in range(3):
        log_in(client, f"someone-{n}", f"my secret password {n}", ip="198.51.100.7")

    assert log_in(client, staff.username, PASSWORD, ip="198.51.100.7").status_code == 429
    assert log_in(client, staff.username, PASSWORD, ip="203.0.113.9").status_code == 302
    # Usernames that are nobody's are not kept: one may be a password typed in the wrong box.
    assert login_failures("") == 3
    assert not AuditEntry.objects.filter(actor__startswith="someone").exists()
    assert not AuditEntry.objects.filter(actor__contains="secret").exists()


def test_the_lockout_answers_json_under_the_api_and_a_page_elsewhere(settings):
    settings.STAFF_LOGIN_COOLOFF_SECONDS = 900
    api = lockout_response(RequestFactory().post("/api/email/emails/"))
    assert api.status_code == 429 and api["Content-Type"] == "application/json"
    assert "15 minutes" in json.loads(api.content)["detail"]
    page = lockout_response(RequestFactory().post("/admin/login/"))
    assert page.status_code == 429 and page["Content-Type"].startswith("text/html")


# --- TOTP ----------------------------------------------------------------------------------------


def current_code(device):
    return f"{totp(device.bin_key, device.step, device.t0, device.digits):0{device.digits}d}"


def test_a_staff_member_with_a_totp_device_needs_its_code_to_log_in(client, staff, travel):
    device = TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)

    without = log_in(client, staff.username, PASSWORD)
    assert without.status_code == 200 and "Please enter your OTP token" in without.content.decode()
    wrong = f"{(int(current_code(device)) + 1) % 10**6:06d}"
    assert log_in(client, staff.username, PASSWORD, otp_token=wrong).status_code == 200
    assert not is_logged_in(client)
    # django-otp makes a device wait after a wrong code (1 s after the first): wait it out.
    assert (
        "Verification temporarily disabled"
        in log_in(client, staff.username, PASSWORD, otp_token="0").content.decode()
    )
    travel(2)
    assert AccessAttempt.objects.get(username=staff.username).failures_since_start == 3

    response = log_in(client, staff.username, PASSWORD, otp_token=current_code(device))
    assert response.status_code == 302
    assert is_logged_in(client)
    # Each attempt without the right code was a failed login on the trail; success resets the count.
    assert login_failures(staff.username) == 3
    assert not AccessAttempt.objects.filter(username=staff.username).exists()


def test_a_password_session_is_refused_once_the_user_has_a_device(client, staff):
    client.force_login(staff)
    assert is_logged_in(client)
    TOTPDevice.objects.create(user=staff, name="phone", confirmed=True)
    assert client.get("/admin/").status_code == 302


def test_without_a_device_the_password_suffices_unless_2fa_is_required(client, staff, settings):
    assert log_in(client, staff.username, PASSWORD).status_code == 302
    client.logout()
    settings.ADMIN_REQUIRE_2FA = True
    refused = log_in(client, staff.username, PASSWORD)
    assert refused.status_code == 200 and "your account has no TOTP device yet" in refused.content.decode()
    assert not is_logged_in(client)


def test_staff_enrol_their_own_device_and_see_its_qr_code_but_not_others(client, staff):
    other = User.objects.create_user("other.admin", password=PASSWORD, is_staff=True)
    others_device = TOTPDevice.objects.create(user=other, name="their phone", confirmed=True)
    for codename in ("add_totpdevice", "change_totpdevice", "view_totpdevice"):
        staff.user_permissions.add(Permission.objects.get(codename=codename))
    client.force_login(staff)

    # The add form comes with a fresh random key filled in; the user scans it afterwards.
    form = {
        "name": "my phone",
        "key": random_hex(20),
        "step": 30,
        "t0": 0,
        "digits": 6,
        "tolerance": 1,
        "confirmed": "on",
    }
    added = client.post(
        "/admin/otp_totp/totpdevice/add/", {**form, "drift": 0, "throttling_failure_count": 0}
    )
    assert added.status_code == 302, re.findall(r"errorlist.*", added.content.decode())
    mine = TOTPDevice.objects.get(name="my phone")
    assert mine.user == staff and mine.confirmed
    # The session that enrolled the device counts as verified by it, so the QR code can be shown.
    config = client.get(f"/admin/otp_totp/totpdevice/{mine.pk}/config/")
    assert escape(mine.config_url) in config.content.decode()
    qrcode = client.get(f"/admin/otp_totp/totpdevice/{mine.pk}/qrcode/")
    assert qrcode["Content-Type"] == "image/svg+xml" and b"<svg" in qrcode.content
    assert client.get(f"/admin/otp_totp/totpdevice/{others_device.pk}/change/").status_code == 302
    assert "their phone" not in client.get("/admin/otp_totp/totpdevice/").content.decode()


# --- sessions ------------------------------------------------------------------------------------


def test_a_staff_session_ends_after_the_idle_period_without_a_request(client, staff, settings, travel):
    assert settings.SESSION_COOKIE_AGE == settings.STAFF_SESSION_IDLE_SECONDS == 1800
    client.force_login(staff)
    response = client.get("/admin/")
    assert response.cookies["sessionid"]["max-age"] == 1800
    # Each request starts the period again, so activity keeps the session well past 1,800 s.
    for _ in range(3):
        travel(1700)
        assert is_logged_in(client)
    travel(1801)
    assert client.get("/admin/").status_code == 302


# --- tokens --------------------------------------------------------------------------------------


def test_a_token_works_until_it_expires_then_gets_401(staff, settings, travel):
    settings.API_TOKEN_TTL = 3600
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(staff)}")
    assert api.get(STAFF_API).status_code == 200
    assert ApiToken.objects.get().last_used_at is not None
    travel(3599)
    assert api.get(STAFF_API).status_code == 200
    travel(2)
    response = api.get(STAFF_API)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert response.json() == {"detail": "Token has expired."}


def test_an_unknown_token_gets_401(staff):
    issue_token(staff)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Token not-a-token-of-ours")
    assert api.get(STAFF_API).status_code == 401


def test_the_default_lifetime_is_api_token_ttl(staff):
    key = issue_token(staff)
    token = ApiToken.objects.get()
    assert token.expires_at - token.created_at == timedelta(days=30)
    assert key.startswith(token.prefix) and len(key) >= 43


def test_a_token_is_not_readable_in_the_database_or_the_admin(client, staff):
    key = issue_token(staff)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiToken._meta.db_table}")
        stored = " ".join(str(value) for row in cursor.fetchall() for value in row)
    assert key not in stored
    assert key[: len(key) // 2] not in stored

    superuser = User.objects.create_superuser("root.admin", password=PASSWORD)
    client.force_login(superuser)
    token = ApiToken.objects.get()
    for page in ("/admin/email_service/apitoken/", f"/admin/email_service/apitoken/{token.pk}/change/"):
        html = client.get(page).content.decode()
        assert f"{token.prefix}…" in html
        assert key not in html and token.digest not in html
    assert client.get("/admin/email_service/apitoken/add/").status_code == 403


def test_create_api_token_prints_a_working_token_as_its_last_line(staff):
    out = StringIO()
    call_command("create_api_token", staff.username, "--days", "2", stdout=out)
    key = out.getvalue().splitlines()[-1]
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert api.get(STAFF_API).status_code == 200
    token = ApiToken.objects.get(user=staff)
    assert token.expires_at - token.created_at == timedelta(days=2)
    with pytest.raises(CommandError, match="No user"):
        call_command("create_api_token", "nobody", stdout=StringIO())


# --- Content-Security-Policy -----------------------------------------------------------------------


def policy(response):
    return dict(part.strip().split(" ", 1) for part in response["Content-Security-Policy"].split(";"))


@pytest.mark.django_db
def test_the_admin_login_page_has_a_policy_without_inline_allowances(client):
    directives = policy(client.get("/admin/login/"))
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in " ".join(directives.values())


@pytest.mark.django_db
def test_an_api_answer_carries_the_policy_django_csp_builds_from_the_settings(client, settings):
    from csp.utils import build_policy

    assert client.get("/api/email/emails/statistics/")["Content-Security-Policy"] == build_policy()
    # Built once and kept (medcor_backend2/middleware.py), but built again when the settings change.
    settings.CONTENT_SECURITY_POLICY = {"DIRECTIVES": {"default-src": ["'self'"]}}
    settings.CONTENT_SECURITY_POLICY_REPORT_ONLY = {
        "EXCLUDE_URL_PREFIXES": ["/admin/"],
        "DIRECTIVES": {"default-src": ["'none'"], "report-uri": "/csp-report/"},
    }
    response = client.get("/api/email/emails/statistics/")
    assert response["Content-Security-Policy"] == "default-src 'self'"
    assert response["Content-Security-Policy-Report-Only"] == build_policy(report_only=True)
    assert "Content-Security-Policy-Report-Only" not in client.get("/admin/login/")


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["/api/docs/", "/api/redoc/"])
def test_the_docs_load_nothing_from_elsewhere_and_their_inline_code_carries_the_nonce(client, page):
    response = client.get(page)
    html = response.content.decode()
    directives = policy(response)
    nonce = re.search(r"'nonce-([^']+)'", directives["script-src"]).group(1)
    assert directives["script-src"] == f"'self' 'nonce-{nonce}'"
    assert "unsafe" not in response["Content-Security-Policy"]
    for tag in re.findall(r"<(?:script|style)\b[^>]*>", html):
        assert "src=" in tag or f'nonce="{nonce}"' in tag, tag
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html), "a resource from another origin"
    assert client.get(page).content.decode() != html, "the nonce is the same twice"


def test_the_contact_page_policy_opens_only_to_the_configured_captcha_provider():
    plain = contact.content_security_policy()
    assert "cloudflare" not in plain and "frame-src" not in plain
    turnstile = dict(
        part.split(" ", 1)
        for part in contact.content_security_policy(captcha.PROVIDERS["turnstile"]).split("; ")
    )
    assert turnstile["script-src"] == "'self' https://challenges.cloudflare.com"
    assert turnstile["frame-src"] == "https://challenges.cloudflare.com"
    assert turnstile["frame-ancestors"] == "'none'"
