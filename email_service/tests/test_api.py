"""The HTTP API: creating requests, and clear JSON errors that leave nothing behind."""

import json
import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from email_service import outbox, reports
from email_service.models import EmailRequest

from .files import pdf_bytes

URL = "/api/email/emails/"
VALID = {"full_name": "Jane Roe", "email": "jane@example.com", "subject": "Hello", "message": "Hi"}


@pytest.fixture
def client():
    return APIClient()


# Dispatches are recorded instead of published: the integration and browser tests cover the broker.
pytestmark = pytest.mark.usefixtures("dispatched")


def assert_nothing_stored(media_root):
    assert EmailRequest.objects.count() == 0
    assert not [p for p in media_root.rglob("*") if p.is_file()]


@pytest.mark.django_db(transaction=True)
def test_json_create_answers_201_and_dispatches_after_commit(client, media_root, dispatched):
    response = client.post(URL, VALID, format="json")
    assert response.status_code == 201
    assert [row.pk for row in dispatched] == [EmailRequest.objects.get().pk]
    body = response.json()
    assert set(body) == {"message", "email_request_id", "status", "task_id"}
    row = EmailRequest.objects.get(pk=body["email_request_id"])
    assert (row.status, row.full_name, row.celery_task_id) == ("PENDING", "Jane Roe", body["task_id"])
    assert row.message_id.startswith("<") and row.message_id.endswith(">")


@pytest.mark.django_db
def test_multipart_create_stores_the_file_privately(client, media_root):
    upload = SimpleUploadedFile("My scan.pdf", pdf_bytes(), content_type="application/pdf")
    response = client.post(URL, {**VALID, "file_attached": upload}, format="multipart")
    assert response.status_code == 201, response.json()
    row = EmailRequest.objects.get()
    assert row.attachment_name == "My scan.pdf"
    assert row.attachment_content_type == "application/pdf"
    assert row.file_attached.name.startswith("email_attachments/")
    # Sealed on disk (encrypted_storage.py), the plaintext through the storage.
    assert not (media_root / row.file_attached.name).read_bytes().startswith(b"%PDF")
    assert row.file_attached.open("rb").read() == pdf_bytes()


@pytest.mark.django_db
def test_bad_json_is_a_400_naming_the_problem(client, media_root):
    response = client.post(URL, data='{"full_name": "x", "email": ', content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert_nothing_stored(media_root)


@pytest.mark.django_db
@pytest.mark.parametrize("email", [None, "", "not-an-address", "jane@", "jane@@example.com"])
def test_missing_or_malformed_email_is_a_400_on_email(client, media_root, email):
    data = {**VALID}
    if email is None:
        del data["email"]
    else:
        data["email"] = email
    response = client.post(URL, data, format="json")
    assert response.status_code == 400
    assert list(response.json()) == ["email"]
    assert_nothing_stored(media_root)


@pytest.mark.django_db
def test_unsupported_content_type_is_a_415(client, media_root):
    response = client.post(URL, data="<xml/>", content_type="application/xml")
    assert response.status_code == 415
    assert "Unsupported media type" in response.json()["detail"]
    assert_nothing_stored(media_root)


@pytest.mark.django_db
def test_a_refused_file_leaves_no_row_and_no_file(client, media_root):
    upload = SimpleUploadedFile("notes.pdf", b"MZ\x90\x00" + b"\x00" * 200, content_type="application/pdf")
    response = client.post(URL, {**VALID, "file_attached": upload}, format="multipart")
    assert response.status_code == 400
    assert list(response.json()) == ["file_attached"]
    assert_nothing_stored(media_root)


@pytest.mark.django_db
def test_a_rolled_back_create_leaves_no_file(client, media_root, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(EmailRequest, "save", broken_save)
    upload = SimpleUploadedFile("scan.pdf", pdf_bytes(), content_type="application/pdf")
    client.raise_request_exception = False
    response = client.post(URL, {**VALID, "file_attached": upload}, format="multipart")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error."}
    assert_nothing_stored(media_root)


@pytest.mark.django_db
def test_unknown_api_url_is_json_404(client):
    response = client.get("/api/email/nothing-here/")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


@pytest.mark.django_db
def test_honeypot_is_answered_like_success_but_stores_nothing(client, media_root):
    response = client.post(URL, {**VALID, "website": "http://spam.example"}, format="json")
    assert response.status_code == 201
    assert set(response.json()) == {"message", "email_request_id", "status", "task_id"}
    assert_nothing_stored(media_root)


@pytest.mark.django_db
def test_public_list_and_detail_are_redacted(client, media_root):
    created = client.post(URL, VALID, format="json").json()
    listing = client.get(URL).json()
    assert listing["count"] == 1
    assert set(listing["results"][0]) == {"id", "status", "has_attachment", "created_at", "sent_at"}
    detail = client.get(f"{URL}{created['email_request_id']}/").json()
    assert set(detail) == {"id", "status", "has_attachment", "created_at", "sent_at"}
    text = json.dumps(listing) + json.dumps(detail)
    for value in VALID.values():
        assert value not in text


@pytest.mark.django_db
def test_statistics_keys(client, media_root):
    client.post(URL, VALID, format="json")
    stats = client.get(f"{URL}statistics/").json()
    for key in (
        "total_requests",
        "pending_requests",
        "processing_requests",
        "sent_requests",
        "failed_requests",
        "cancelled_requests",
        "with_attachments",
        "success_rate",
    ):
        assert key in stats
    assert stats["total_requests"] == stats["pending_requests"] == 1


@pytest.mark.django_db
def test_statistics_are_shared_for_the_cache_period(client, media_root, settings):
    from django.core.cache import cache

    settings.EMAIL_STATISTICS_CACHE_SECONDS = 60
    cache.delete(reports.statistics_cache_key(public=True))
    try:
        first = client.get(f"{URL}statistics/").json()
        client.post(URL, VALID, format="json")
        second = client.get(f"{URL}statistics/").json()
        assert second == first  # one aggregate per period, whoever asks
        cache.delete(reports.statistics_cache_key(public=True))
        assert client.get(f"{URL}statistics/").json()["total_requests"] == first["total_requests"] + 1
    finally:
        cache.delete(reports.statistics_cache_key(public=True))


@pytest.mark.django_db
def test_a_large_list_count_is_shared_for_the_period_and_a_small_one_is_always_fresh(
    client, media_root, settings, monkeypatch
):
    from email_service.pagination import SharedCountPaginator

    settings.EMAIL_LIST_COUNT_CACHE_SECONDS = 60
    # A filter no other test or earlier run uses (the shared cache outlives a run by up to 60 s),
    # so that the cache key, the count query itself, is this run's own.
    listing = f"{URL}?created_after=2001-02-03T04:05:06.{uuid.uuid4().int % 10**6:06d}Z"
    for _ in range(3):
        client.post(URL, VALID, format="json")
    assert client.get(listing).json()["count"] == 3
    client.post(URL, VALID, format="json")
    assert client.get(listing).json()["count"] == 4  # at or under the floor: counted every time

    monkeypatch.setattr(SharedCountPaginator, "SHARED_COUNT_FLOOR", 3)
    assert client.get(listing).json()["count"] == 4
    client.post(URL, VALID, format="json")
    page = client.get(listing).json()
    assert page["count"] == 4  # above the floor: shared for the period
    assert len(page["results"]) == 5  # the rows themselves are always read fresh

    settings.EMAIL_LIST_COUNT_CACHE_SECONDS = 0
    assert client.get(listing).json()["count"] == 5


@pytest.mark.django_db(transaction=True)
def test_a_failing_dispatch_after_commit_keeps_the_row_and_its_file(client, media_root, monkeypatch):
    def broken_dispatch(email_request):
        raise RuntimeError("broker and database both hiccuped")

    monkeypatch.setattr(outbox, "dispatch", broken_dispatch)
    upload = SimpleUploadedFile("scan.pdf", pdf_bytes(), content_type="application/pdf")
    response = client.post(URL, {**VALID, "file_attached": upload}, format="multipart")
    assert response.status_code == 201
    row = EmailRequest.objects.get()
    # Sealed on disk (encrypted_storage.py), the plaintext through the storage.
    assert not (media_root / row.file_attached.name).read_bytes().startswith(b"%PDF")
    assert row.file_attached.open("rb").read() == pdf_bytes()
