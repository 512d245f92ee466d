"""The CAPTCHA, checked server-side against a local siteverify stand-in on loopback that speaks the
providers' protocol: a form-encoded POST of secret, response and remoteip, answered with JSON
{"success": bool, "error-codes": [...]}."""

import re
import time
from urllib.parse import parse_qs

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from email_service import captcha
from email_service.models import EmailRequest

from .conftest import free_port
from .files import pdf_bytes
from .siteverify import GOOD, SECRET

URL = "/api/email/emails/"
VALID = {"full_name": "Jane Roe", "email": "jane@example.com", "subject": "Hello", "message": "Hi"}

pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


@pytest.fixture(params=sorted(captcha.PROVIDERS))
def provider(request, settings, siteverify):
    """Each provider in turn, its siteverify pointed at the stand-in."""
    settings.EMAIL_CAPTCHA_PROVIDER = request.param
    settings.EMAIL_CAPTCHA_SECRET = SECRET
    settings.EMAIL_CAPTCHA_SITE_KEY = "stand-in-site-key"
    settings.EMAIL_CAPTCHA_VERIFY_URL = siteverify.url
    settings.EMAIL_CAPTCHA_TIMEOUT = 0.5
    return captcha.PROVIDERS[request.param]


@pytest.fixture
def client():
    return APIClient()


@pytest.mark.django_db
def test_a_good_token_in_the_providers_field_is_verified_with_secret_and_client_ip(
    client, provider, siteverify
):
    response = client.post(URL, {**VALID, provider.token_field: GOOD}, format="json")
    assert response.status_code == 201, response.json()
    row = EmailRequest.objects.get(pk=response.json()["email_request_id"])
    assert row.captcha_unverified is False
    [call] = siteverify.calls
    assert call["content_type"] == "application/x-www-form-urlencoded"
    assert parse_qs(call["body"]) == {"secret": [SECRET], "response": [GOOD], "remoteip": ["127.0.0.1"]}


@pytest.mark.django_db
def test_the_token_comes_in_multipart_too(client, provider):
    upload = SimpleUploadedFile("scan.pdf", pdf_bytes(), content_type="application/pdf")
    response = client.post(
        URL, {**VALID, provider.token_field: GOOD, "file_attached": upload}, format="multipart"
    )
    assert response.status_code == 201, response.json()
    assert EmailRequest.objects.get().has_attachment


@pytest.mark.django_db
@pytest.mark.parametrize("token", [None, ""])
def test_a_missing_token_is_a_400_naming_the_providers_field(client, provider, siteverify, token):
    data = VALID if token is None else {**VALID, provider.token_field: token}
    response = client.post(URL, data, format="json")
    assert response.status_code == 400
    assert response.json() == {provider.token_field: ["Please complete the CAPTCHA check."]}
    assert EmailRequest.objects.count() == 0
    assert siteverify.calls == []


@pytest.mark.django_db
@pytest.mark.parametrize("token", ["forged-token", GOOD])
def test_a_refused_or_reused_token_is_a_400_naming_the_field_and_nothing_is_stored(
    client, provider, siteverify, token
):
    if token == GOOD:
        assert client.post(URL, {**VALID, provider.token_field: GOOD}, format="json").status_code == 201
    response = client.post(URL, {**VALID, "subject": "again", provider.token_field: token}, format="json")
    assert response.status_code == 400
    assert list(response.json()) == [provider.token_field]
    assert "CAPTCHA" in response.json()[provider.token_field][0]
    assert EmailRequest.objects.count() == (1 if token == GOOD else 0)


@pytest.mark.django_db
def test_the_provider_is_not_asked_while_a_field_is_invalid(client, provider, siteverify):
    # The token is good for one check only: spending it on a form that fails anyway would make
    # the person solve the CAPTCHA twice.
    response = client.post(URL, {**VALID, "email": "nope", provider.token_field: GOOD}, format="json")
    assert response.status_code == 400 and list(response.json()) == ["email"]
    assert siteverify.calls == []


@pytest.mark.django_db
@pytest.mark.parametrize("outage", ["error", "html", "hang", "closed port", "wrong secret"])
def test_an_unreachable_provider_accepts_the_form_marked_unverified_for_staff_and_statistics(
    client, provider, siteverify, settings, outage
):
    if outage == "closed port":
        settings.EMAIL_CAPTCHA_VERIFY_URL = f"http://127.0.0.1:{free_port()}/siteverify"
    elif outage == "wrong secret":
        # Our own misconfiguration: no token could pass, and no person should lose a message to it.
        settings.EMAIL_CAPTCHA_SECRET = "not-the-secret"
    else:
        siteverify.mode = outage
    started = time.monotonic()
    response = client.post(URL, {**VALID, provider.token_field: GOOD}, format="json")
    assert response.status_code == 201, response.json()
    assert time.monotonic() - started < 30  # the timeout holds (0.5 s here), not the provider
    row = EmailRequest.objects.get()
    assert row.captcha_unverified is True

    staff = User.objects.create_superuser("captcha-staff", "s@example.com", "not-used-password-1")
    client.force_authenticate(staff)
    detail = client.get(f"{URL}{row.pk}/").json()
    assert detail["captcha_unverified"] is True
    client.force_authenticate(None)
    assert client.get(f"{URL}statistics/").json()["unverified_requests"] == 1
    assert "captcha_unverified" not in client.get(f"{URL}{row.pk}/").json()


@pytest.mark.django_db
def test_the_honeypot_answers_a_refused_token_as_a_real_submission_is_answered(client, provider):
    real = client.post(URL, {**VALID, provider.token_field: "forged-token"}, format="json")
    caught = client.post(
        URL, {**VALID, "website": "http://spam.example", provider.token_field: "forged-token"}, format="json"
    )
    assert (caught.status_code, caught.json()) == (real.status_code, real.json())
    assert real.status_code == 400


@pytest.mark.django_db
def test_without_a_provider_no_token_is_asked_for(client, settings, siteverify):
    settings.EMAIL_CAPTCHA_PROVIDER = "none"
    settings.EMAIL_CAPTCHA_VERIFY_URL = siteverify.url
    assert client.post(URL, VALID, format="json").status_code == 201
    assert siteverify.calls == []
    assert EmailRequest.objects.get().captcha_unverified is False


def test_an_unknown_provider_is_a_configuration_error(settings):
    settings.EMAIL_CAPTCHA_PROVIDER = "recaptcha-v3"
    with pytest.raises(ImproperlyConfigured):
        captcha.active_provider()


def test_each_provider_defaults_to_its_own_siteverify(settings):
    settings.EMAIL_CAPTCHA_VERIFY_URL = ""
    assert {name: p.verify_url for name, p in captcha.PROVIDERS.items()} == {
        "turnstile": "https://challenges.cloudflare.com/turnstile/v0/siteverify",
        "hcaptcha": "https://api.hcaptcha.com/siteverify",
        "recaptcha": "https://www.google.com/recaptcha/api/siteverify",
    }


# --- the contact page ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_contact_page_renders_the_providers_widget_and_lets_it_load(client, provider):
    response = client.get("/contact/")
    html = response.content.decode()
    assert f'<script src="{provider.script_url}" async defer></script>' in html
    widget = re.search(r'<div class="mc-field mc-captcha[^"]*" data-mc-captcha="(\w+)">.*?</div>', html, re.S)
    assert widget and widget.group(1) == provider.name
    assert f'<div class="{provider.widget_class}" data-sitekey="stand-in-site-key"></div>' in widget.group(0)
    policy = dict(part.strip().split(" ", 1) for part in response["Content-Security-Policy"].split(";"))
    for directive, sources in provider.sources.items():
        assert set(sources) <= set(policy[directive].split())
    assert policy["script-src"].split()[0] == "'self'" and "unsafe-inline" not in policy["script-src"]
    assert policy["frame-ancestors"] == "'none'"


@pytest.mark.django_db
def test_without_a_provider_the_page_has_no_widget_and_frames_nothing(client, settings):
    settings.EMAIL_CAPTCHA_PROVIDER = "none"
    response = client.get("/contact/")
    assert "data-mc-captcha" not in response.content.decode()
    assert "frame-src" not in response["Content-Security-Policy"]


@pytest.mark.django_db
def test_the_page_without_javascript_shows_a_missing_token_next_to_the_widget(client, provider):
    response = client.post("/contact/", VALID)
    assert response.status_code == 400
    html = response.content.decode()
    error = re.search(
        rf'<p class="mc-error" id="mc-captcha-error" data-error-for="{provider.token_field}">(.*?)</p>', html
    )
    assert error and error.group(1) == "Please complete the CAPTCHA check."
