"""Health data stays private: no anonymous answer carries anything a submitter wrote."""

import json
import uuid

import pytest
from rest_framework.test import APIClient

from email_service.models import EmailRequest

from .conftest import contact_markers
from .files import pdf_bytes

URL = "/api/email/emails/"


@pytest.fixture
def markers():
    """A unique marker string for every field a person fills in."""
    return contact_markers(uuid.uuid4().hex[:12])


@pytest.fixture
def submitted(markers, dispatched, media_root):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile(f"File{markers['subject']}.pdf", pdf_bytes(), content_type="application/pdf")
    response = APIClient().post(
        URL, {**markers, "file_attached": upload}, format="multipart", REMOTE_ADDR="203.0.113.77"
    )
    assert response.status_code == 201, response.content
    row = EmailRequest.objects.get(pk=response.json()["email_request_id"])
    EmailRequest.objects.filter(pk=row.pk).update(error_message=f"550 rejected {markers['email']}")
    return row


def anonymous_answers(row, markers):
    """Every answer an anonymous caller can get about the row, as raw bytes."""
    client = APIClient()
    paths = [
        URL,
        f"{URL}?page_size=1",
        f"{URL}?status=PENDING&has_attachment=true&ordering=-created_at",
        f"{URL}{row.pk}/",
        f"{URL}statistics/",
        f"{URL}{row.pk}/attachment/",
        f"{URL}?email={markers['email']}",
        f"{URL}?search={markers['subject']}",
        f"{URL}{row.pk}/cancel/",
        f"{URL}retry_failed/",
        f"{URL}00000000-0000-0000-0000-000000000000/",
        "/api/schema/",
    ]
    answers = {f"GET {path}": client.get(path) for path in paths}
    answers["POST cancel"] = client.post(f"{URL}{row.pk}/cancel/")
    answers["PATCH"] = client.patch(f"{URL}{row.pk}/", {"subject": "x"}, format="json")
    answers["DELETE"] = client.delete(f"{URL}{row.pk}/")
    return answers


@pytest.mark.django_db
def test_no_marker_appears_in_any_anonymous_answer(submitted, markers):
    secrets = [
        *markers.values(),
        submitted.attachment_name,
        submitted.file_attached.name,
        "203.0.113.77",
        "550 rejected",
    ]
    for label, response in anonymous_answers(submitted, markers).items():
        body = b"".join(response.streaming_content) if response.streaming else response.content
        text = body.decode(errors="replace") + json.dumps(dict(response.items()))
        for secret in secrets:
            assert secret not in text, f"{label} leaked {secret!r}"


@pytest.mark.django_db
def test_anonymous_list_items_have_only_the_public_keys(submitted, markers):
    item = APIClient().get(URL).json()["results"][0]
    assert set(item) == {"id", "status", "has_attachment", "created_at", "sent_at"}
    assert item["has_attachment"] is True


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["email=x@example.org", "search=heart"])
def test_anonymous_callers_cannot_filter_by_personal_fields(submitted, query):
    response = APIClient().get(f"{URL}?{query}")
    assert response.status_code == 403
    assert "count" not in response.json()


@pytest.mark.django_db
def test_page_size_has_a_maximum(submitted):
    for _ in range(3):
        EmailRequest.objects.create(full_name="x", email="x@example.org")
    response = APIClient().get(f"{URL}?page_size=100000")
    assert response.status_code == 200
    assert len(response.json()["results"]) == 4
    from email_service.views import EmailRequestPagination

    assert EmailRequestPagination.max_page_size == 100


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("5140-04-03T00:29:43.003738-19:40", 200),  # a legal ISO offset PostgreSQL would refuse raw
        ("2026-01-01T00:00:00+14:00", 200),
        ("9999-12-31T23:59:59-23:00", 400),  # past year 9999 once in UTC
        ("not a date", 400),
    ],
)
def test_date_filters_never_fail_on_odd_offsets(value, status):
    from urllib.parse import quote

    response = APIClient().get(f"{URL}?created_after={quote(value)}")
    assert response.status_code == status, response.content
    if status == 400:
        assert list(response.json()) == ["created_after"]
