"""The honeypot: what it catches (the hidden field, a form sent back too fast or with a forged
stamp), and that everything an anonymous caller can ask later answers as for a real request."""

import re
import time
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from email_service import honeypot, retention
from email_service.models import Decoy, EmailRequest

from .files import pdf_bytes

URL = "/api/email/emails/"
VALID = {"full_name": "Jane Roe", "email": "jane@example.com", "subject": "Hello", "message": "Hi"}
PUBLIC_FIELDS = {"id", "status", "has_attachment", "created_at", "sent_at"}

pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


@pytest.fixture
def client():
    return APIClient()


def page_stamp():
    """The stamp the contact page is served with."""
    html = Client().get("/contact/").content.decode()
    return re.search(r'name="form_stamp" value="([^"]+)"', html).group(1)


def caught(client, **extra):
    response = client.post(URL, {**VALID, "website": "http://spam.example", **extra}, format="json")
    assert response.status_code == 201
    return response.json()


def assert_nothing_stored(media_root):
    assert EmailRequest.objects.count() == 0
    assert not [p for p in media_root.rglob("*") if p.is_file()]


# --- what is caught -------------------------------------------------------------------------


def test_a_stamp_younger_than_the_minimum_fill_time_or_forged_is_too_fast(settings):
    settings.EMAIL_MIN_FILL_SECONDS = 3
    now = time.time()
    assert honeypot.is_filled_too_fast(honeypot.form_stamp(now - 1), now=now)
    assert not honeypot.is_filled_too_fast(honeypot.form_stamp(now - 3.5), now=now)
    stamp = honeypot.form_stamp(now - 60)
    assert honeypot.is_filled_too_fast(stamp[:-1] + ("A" if stamp[-1] != "A" else "B"), now=now)
    assert honeypot.is_filled_too_fast("1700000000", now=now)
    # No stamp is an API post from the website, which never served the page: not caught.
    assert not honeypot.is_filled_too_fast("", now=now)
    assert not honeypot.is_filled_too_fast(None, now=now)
    settings.EMAIL_MIN_FILL_SECONDS = 0
    assert not honeypot.is_filled_too_fast(honeypot.form_stamp(now), now=now)


@pytest.mark.django_db
def test_the_page_stamp_sent_back_at_once_is_caught_and_sent_back_later_is_accepted(
    client, settings, media_root, dispatched
):
    settings.EMAIL_MIN_FILL_SECONDS = 3
    body = client.post(URL, {**VALID, "form_stamp": page_stamp()}, format="json").json()
    assert_nothing_stored(media_root)
    assert dispatched == []
    assert Decoy.objects.filter(pk=body["email_request_id"]).exists()

    patient = honeypot.form_stamp(time.time() - 4)
    response = client.post(URL, {**VALID, "form_stamp": patient}, format="json")
    assert response.status_code == 201
    assert EmailRequest.objects.filter(pk=response.json()["email_request_id"]).exists()


@pytest.mark.django_db
def test_a_forged_stamp_is_caught_and_no_stamp_at_all_is_accepted(client, media_root):
    forged = honeypot.form_stamp(time.time() - 60).replace(":", ":x", 1)
    body = client.post(URL, {**VALID, "form_stamp": forged}, format="json").json()
    assert Decoy.objects.filter(pk=body["email_request_id"]).exists()
    assert_nothing_stored(media_root)
    real = client.post(URL, VALID, format="json").json()
    assert EmailRequest.objects.filter(pk=real["email_request_id"]).exists()


@pytest.mark.django_db
def test_the_contact_page_without_javascript_posted_at_once_is_caught(settings, media_root):
    settings.EMAIL_MIN_FILL_SECONDS = 3
    browser = Client()
    stamp = re.search(r'name="form_stamp" value="([^"]+)"', browser.get("/contact/").content.decode()).group(
        1
    )
    response = browser.post("/contact/", {**VALID, "form_stamp": stamp})
    assert response.status_code == 302
    assert_nothing_stored(media_root)
    thanks = browser.get(response["Location"]).content.decode()
    assert "Queued for delivery" in thanks


@pytest.mark.django_db
def test_the_page_sent_back_with_errors_keeps_its_first_stamp():
    browser = Client()
    stamp = re.search(r'name="form_stamp" value="([^"]+)"', browser.get("/contact/").content.decode()).group(
        1
    )
    again = browser.post("/contact/", {**VALID, "email": "nope", "form_stamp": stamp}).content.decode()
    assert f'name="form_stamp" value="{stamp}"' in again
    forged = browser.post("/contact/", {**VALID, "email": "nope", "form_stamp": "x" + stamp}).content.decode()
    assert f'value="x{stamp}"' not in forged


# --- what a caught submission looks like afterwards -------------------------------------------


@pytest.mark.django_db
def test_a_decoy_reads_like_a_real_request_pending_then_sent_and_keeps_nothing_it_was_sent(client):
    real = client.post(URL, VALID, format="json").json()
    fake = caught(client)
    assert set(fake) == set(real)
    assert (fake["status"], fake["message"]) == (real["status"], real["message"])
    assert len(fake["task_id"]) == len(real["task_id"])

    real_detail = client.get(f"{URL}{real['email_request_id']}/")
    fake_detail = client.get(f"{URL}{fake['email_request_id']}/")
    assert fake_detail.status_code == real_detail.status_code == 200
    assert set(fake_detail.json()) == set(real_detail.json()) == PUBLIC_FIELDS
    assert fake_detail.json()["status"] == "PENDING" and fake_detail.json()["sent_at"] is None
    assert fake_detail["Content-Type"] == real_detail["Content-Type"]

    # After a delay like a real delivery's, it reads as SENT, with a sent_at after its created_at.
    decoy = Decoy.objects.get()
    assert timedelta(seconds=1) < decoy.sent_at - decoy.created_at < timedelta(seconds=10)
    now = timezone.now()
    Decoy.objects.update(created_at=now - timedelta(seconds=10), sent_at=now - timedelta(seconds=6))
    sent = client.get(f"{URL}{fake['email_request_id']}/").json()
    assert sent["status"] == "SENT" and sent["sent_at"] > sent["created_at"]
    assert sent["has_attachment"] is False
    # Only an id and times are kept: the model has no field for anything the bot sent.
    assert {field.name for field in Decoy._meta.get_fields()} == {
        "id",
        "has_attachment",
        "created_at",
        "sent_at",
    }


@pytest.mark.django_db
def test_a_decoy_with_a_file_says_it_has_one_and_the_file_is_not_kept(client, media_root):
    upload = SimpleUploadedFile("scan.pdf", pdf_bytes(), content_type="application/pdf")
    response = client.post(URL, {**VALID, "website": "x", "file_attached": upload}, format="multipart")
    assert response.status_code == 201
    assert client.get(f"{URL}{response.json()['email_request_id']}/").json()["has_attachment"] is True
    assert_nothing_stored(media_root)


@pytest.mark.django_db
def test_staff_never_see_decoys(client):
    fake = caught(client)
    staff = User.objects.create_superuser("decoy-staff", "s@example.com", "not-used-password-1")
    client.force_authenticate(staff)
    assert client.get(f"{URL}{fake['email_request_id']}/").status_code == 404
    assert client.get(URL).json()["count"] == 0


@pytest.mark.django_db
def test_an_unknown_id_is_still_a_404(client):
    caught(client)
    assert client.get(f"{URL}00000000-0000-4000-8000-000000000000/").status_code == 404
    assert client.get(f"{URL}not-a-uuid/").status_code == 404


@pytest.mark.django_db
def test_the_idempotent_repeat_of_a_caught_submission_answers_the_same_decoy(client):
    headers = {"HTTP_IDEMPOTENCY_KEY": str(uuid.uuid4())}  # the cache outlives test runs
    first = client.post(URL, {**VALID, "website": "x"}, format="json", **headers)
    second = client.post(URL, {**VALID, "website": "x"}, format="json", **headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json() == second.json()
    assert Decoy.objects.count() == 1


@pytest.mark.django_db
def test_decoys_go_with_the_retention_period(client, settings):
    settings.EMAIL_RETENTION_DAYS = 90
    caught(client)
    old = Decoy.objects.create(created_at=timezone.now() - timedelta(days=91), sent_at=timezone.now())
    retention.purge_expired()
    assert Decoy.objects.count() == 1 and not Decoy.objects.filter(pk=old.pk).exists()


@pytest.mark.django_db
def test_decoys_are_listed_to_anonymous_callers_among_real_requests_through_the_filters(client):
    upload = SimpleUploadedFile("scan.pdf", pdf_bytes(), content_type="application/pdf")
    first = client.post(URL, VALID, format="json").json()["email_request_id"]
    fake = client.post(URL, {**VALID, "website": "x", "file_attached": upload}, format="multipart").json()
    last = client.post(URL, VALID, format="json").json()["email_request_id"]
    listing = client.get(URL).json()
    assert listing["count"] == 3
    assert [item["id"] for item in listing["results"]] == [last, fake["email_request_id"], first]
    assert all(set(item) == PUBLIC_FIELDS for item in listing["results"])
    assert listing["results"][1] == client.get(f"{URL}{fake['email_request_id']}/").json()

    def ids(**query):
        return [item["id"] for item in client.get(URL, query).json()["results"]]

    assert ids(has_attachment="true") == [fake["email_request_id"]]
    assert fake["email_request_id"] not in ids(has_attachment="false")
    assert ids(status="PENDING", ordering="created_at") == [first, fake["email_request_id"], last]
    now = timezone.now()
    Decoy.objects.update(created_at=now - timedelta(seconds=10), sent_at=now - timedelta(seconds=5))
    assert ids(status="SENT") == [fake["email_request_id"]]
    assert ids(status="PENDING") == [last, first]
    assert ids(ordering="-created_at", page_size="1") == [last]
    assert (
        client.get(URL, {"page": "2", "page_size": "2"}).json()["results"][0]["id"]
        == fake["email_request_id"]
    )


@pytest.mark.django_db
def test_a_decoy_counts_in_the_list_and_the_statistics_alike_for_anonymous_callers_not_for_staff(
    client, settings
):
    from django.core.cache import cache

    from email_service import reports

    settings.EMAIL_STATISTICS_CACHE_SECONDS = 60
    keys = [reports.statistics_cache_key(public=public) for public in (True, False)]
    cache.delete_many(keys)
    staff = APIClient()
    staff.force_authenticate(User.objects.create_superuser("stats-staff", "s@example.com", "not-used-pw-1"))
    try:
        client.post(URL, VALID, format="json")
        upload = SimpleUploadedFile("scan.pdf", pdf_bytes(), content_type="application/pdf")
        client.post(URL, {**VALID, "website": "x", "file_attached": upload}, format="multipart")
        public = client.get(f"{URL}statistics/").json()
        assert client.get(URL).json()["count"] == public["total_requests"] == 2
        assert (public["pending_requests"], public["sent_requests"], public["with_attachments"]) == (2, 0, 1)
        assert public["requests_last_24h"] == 2
        # Staff asking next get their own figures, not the public's from the shared cache.
        real = staff.get(f"{URL}statistics/").json()
        assert staff.get(URL).json()["count"] == real["total_requests"] == 1
        assert (real["pending_requests"], real["with_attachments"]) == (1, 0)

        # Once its planned delivery time has passed, the decoy counts as sent.
        now = timezone.now()
        Decoy.objects.update(created_at=now - timedelta(seconds=10), sent_at=now - timedelta(seconds=5))
        cache.delete_many(keys)
        public = client.get(f"{URL}statistics/").json()
        assert (public["total_requests"], public["pending_requests"], public["sent_requests"]) == (2, 1, 1)
        assert public["sent_last_24h"] == 1 and public["success_rate"] == 100.0
        real = staff.get(f"{URL}statistics/").json()
        assert (real["total_requests"], real["sent_requests"], real["success_rate"]) == (1, 0, 0.0)
    finally:
        cache.delete_many(keys)
