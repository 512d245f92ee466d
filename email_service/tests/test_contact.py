"""The /contact/ page, its POST without JavaScript, and cross-origin use of the API from a browser."""

import re
import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from email_service.contact import wait_text
from email_service.models import EmailRequest
from email_service.validators import allowed_extensions

from .files import pdf_bytes

PAGE = "/contact/"
API = "/api/email/emails/"
FORM = {
    "full_name": "Amelia Hartmann",
    "email": "amelia.hartmann@example.org",
    "phone": "+49 (30) 1234-5678",
    "job_profession": "Cardiology nurse",
    "subject": "Question about my referral",
    "message": "Could you confirm the appointment date?",
}
WEBSITE = "https://www.medcor.example"


@pytest.fixture
def client():
    return Client()


# Dispatches are recorded instead of published: the integration and browser tests cover the broker.
pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


def field(html, name):
    """The markup of one field's block on the page."""
    pattern = rf'<div class="mc-field[^"]*">\s*<label class="mc-label" for="mc-{name}">.*?</div>'
    match = re.search(pattern, html, re.S)
    assert match, f"no field {name} on the page"
    return match.group(0)


@pytest.mark.django_db
def test_page_has_every_contract_field_with_labels_and_the_hidden_honeypot(client):
    response = client.get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    for name in ("full_name", "email", "phone", "job_profession", "subject", "message", "file_attached"):
        block = field(html, name)
        assert f'name="{name}"' in block
        assert re.search(rf'aria-describedby="[^"]*mc-{name}-error"', block)
    assert "(required)" in field(html, "full_name") and "(required)" in field(html, "email")
    assert "(required)" not in field(html, "phone")
    assert 'type="email"' in field(html, "email")
    assert 'maxlength="200"' in field(html, "full_name")
    honeypot = re.search(r'<div class="mc-honeypot" aria-hidden="true">.*?</div>', html, re.S).group(0)
    assert 'name="website"' in honeypot and 'tabindex="-1"' in honeypot


@pytest.mark.django_db
def test_page_shows_the_allowed_file_types_and_size_next_to_the_file_input(client, settings):
    settings.EMAIL_ATTACHMENT_MAX_BYTES = 5 * 1024 * 1024
    block = field(client.get(PAGE).content.decode(), "file_attached")
    assert "up to 5.0\xa0MB" in block
    for ext in allowed_extensions():
        assert ext.lstrip(".").upper() in block
    assert f'accept="{",".join(allowed_extensions())}"' in block


@pytest.mark.django_db
def test_page_sends_a_content_security_policy_without_inline_script_and_refuses_framing(client):
    response = client.get(PAGE)
    policy = dict(part.strip().split(" ", 1) for part in response["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'"
    assert policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in response["Content-Security-Policy"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    html = response.content.decode()
    # Every script is an external file: the policy would block an inline one.
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/email_service/contact.js" defer>']
    assert not re.search(r"<[^>]+\son[a-z]+=", html), "an inline event handler"


@pytest.mark.django_db(transaction=True)
def test_post_without_javascript_stores_the_request_and_shows_the_reference(client, dispatched):
    upload = SimpleUploadedFile("Referral.pdf", pdf_bytes(), content_type="application/pdf")
    response = client.post(PAGE, {**FORM, "file_attached": upload, "website": ""})
    row = EmailRequest.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/contact/sent/{row.pk}/"
    assert (row.full_name, row.email) == (FORM["full_name"], FORM["email"])
    assert row.attachment_name == "Referral.pdf"
    assert row.client_ip == "127.0.0.1"
    assert [queued.pk for queued in dispatched] == [row.pk]

    thanks = client.get(response["Location"])
    assert thanks.status_code == 200
    assert str(row.pk) in thanks.content.decode()
    assert "Queued for delivery" in thanks.content.decode()
    assert "frame-ancestors 'none'" in thanks["Content-Security-Policy"]


@pytest.mark.django_db
def test_post_without_javascript_shows_errors_next_to_their_fields_and_keeps_the_values(client):
    upload = SimpleUploadedFile("notes.exe", b"MZ\x90\x00" + bytes(200))
    response = client.post(PAGE, {**FORM, "email": "not-an-address", "file_attached": upload})
    assert response.status_code == 400
    assert EmailRequest.objects.count() == 0
    html = response.content.decode()
    email = field(html, "email")
    assert "Enter a valid email address." in email and 'aria-invalid="true"' in email
    assert "Allowed:" in field(html, "file_attached")
    assert 'value="Amelia Hartmann"' in field(html, "full_name")
    assert "aria-invalid" not in field(html, "full_name")
    assert "Please correct the fields marked below." in html
    assert response["Content-Security-Policy"]


@pytest.mark.django_db
def test_post_without_javascript_twice_with_the_page_key_creates_one_request(client):
    key = str(uuid.uuid4())
    first = client.post(PAGE, {**FORM, "idempotency_key": key})
    second = client.post(PAGE, {**FORM, "idempotency_key": key})
    assert EmailRequest.objects.count() == 1
    assert first["Location"] == second["Location"] == f"/contact/sent/{EmailRequest.objects.get().pk}/"


@pytest.mark.django_db
def test_post_without_javascript_of_an_edited_form_with_a_used_key_asks_to_send_again_with_a_new_key(client):
    key = str(uuid.uuid4())
    client.post(PAGE, {**FORM, "idempotency_key": key})
    response = client.post(PAGE, {**FORM, "subject": "Edited after going back", "idempotency_key": key})
    assert response.status_code == 422
    html = response.content.decode()
    assert "This form was already sent once." in html
    new_key = re.search(r'name="idempotency_key" value="([^"]+)"', html).group(1)
    assert new_key != key
    again = client.post(PAGE, {**FORM, "subject": "Edited after going back", "idempotency_key": new_key})
    assert again.status_code == 302
    assert EmailRequest.objects.count() == 2


@pytest.mark.django_db
def test_contact_page_is_never_cached(client):
    assert "no-store" in client.get(PAGE)["Cache-Control"]


@pytest.mark.django_db
def test_post_without_javascript_with_the_honeypot_filled_stores_nothing_but_thanks(client, dispatched):
    response = client.post(PAGE, {**FORM, "website": "http://spam.example"})
    assert response.status_code == 302
    assert EmailRequest.objects.count() == 0 and dispatched == []
    assert client.get(response["Location"]).status_code == 200


@pytest.mark.django_db
def test_post_without_javascript_is_rate_limited_like_the_api_and_says_how_long_to_wait(client, settings):
    settings.RATELIMIT_ENABLE = True
    # A day-long window, so the limit cannot reset between the two posts below.
    settings.EMAIL_RATELIMIT_CREATE = "1/d"
    client.post(API, FORM, content_type="application/json")
    response = client.post(PAGE, FORM)
    assert response.status_code == 429
    assert EmailRequest.objects.count() <= 1
    wait = int(response["Retry-After"])
    assert 0 < wait <= 24 * 60 * 60
    assert f"Please try again in {wait_text(wait)}." in response.content.decode()


def test_wait_text_uses_the_largest_readable_unit():
    assert wait_text(1) == "1 second"
    assert wait_text(45) == "45 seconds"
    assert wait_text(600) == "10 minutes"
    assert wait_text(86000) == "24 hours"


# --- cross-origin use of the API ------------------------------------------------------------


@pytest.mark.django_db
def test_preflight_from_an_allowed_origin_allows_the_idempotency_key_header(client, settings):
    settings.CORS_ALLOWED_ORIGINS = [WEBSITE]
    response = client.options(
        API,
        HTTP_ORIGIN=WEBSITE,
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="idempotency-key",
    )
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == WEBSITE
    assert "idempotency-key" in [h.strip() for h in response["Access-Control-Allow-Headers"].split(",")]
    assert "POST" in response["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in response


@pytest.mark.django_db
def test_post_from_an_allowed_origin_is_readable_without_credentials(client, settings):
    settings.CORS_ALLOWED_ORIGINS = [WEBSITE]
    response = client.post(API, FORM, content_type="application/json", HTTP_ORIGIN=WEBSITE)
    assert response.status_code == 201
    assert response["Access-Control-Allow-Origin"] == WEBSITE
    assert "Access-Control-Allow-Credentials" not in response
    assert response["Access-Control-Expose-Headers"] == "retry-after"


@pytest.mark.django_db
@pytest.mark.parametrize("allowed", [[], ["https://other.example"]])
def test_a_disallowed_origin_gets_no_cors_headers(client, settings, allowed):
    settings.CORS_ALLOWED_ORIGINS = allowed
    preflight = client.options(
        API,
        HTTP_ORIGIN=WEBSITE,
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="idempotency-key",
    )
    post = client.post(API, FORM, content_type="application/json", HTTP_ORIGIN=WEBSITE)
    for response in (preflight, post):
        assert not [name for name in response.headers if name.lower().startswith("access-control-")]


@pytest.mark.django_db
def test_the_contact_page_itself_is_not_opened_to_other_origins(client, settings):
    settings.CORS_ALLOWED_ORIGINS = [WEBSITE]
    response = client.get(PAGE, HTTP_ORIGIN=WEBSITE)
    assert "Access-Control-Allow-Origin" not in response
