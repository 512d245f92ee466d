"""Who may do what: every operation for every kind of caller."""

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.base import ContentFile
from rest_framework.test import APIClient

from email_service.authentication import issue_token
from email_service.models import EmailRequest, EmailStatus
from email_service.serializers import EmailRequestStaffSerializer
from email_service.views import EmailRequestViewSet

from .files import pdf_bytes

URL = "/api/email/emails/"
ROLES = ["anonymous", "no_permissions", "viewer", "changer", "deleter"]
PERMISSIONS = {
    "no_permissions": [],
    "viewer": ["view_emailrequest"],
    "changer": ["view_emailrequest", "change_emailrequest"],
    "deleter": ["view_emailrequest", "delete_emailrequest"],
}
OPEN = set(ROLES)
# operation -> the roles allowed to perform it
ALLOWED = {
    "create": OPEN,
    "list": OPEN,
    "retrieve": OPEN,
    "statistics": OPEN,
    "update": {"changer"},
    "partial_update": {"changer"},
    "cancel": {"changer"},
    "retry_failed": {"changer"},
    "destroy": {"deleter"},
    "attachment": {"viewer", "changer", "deleter"},
}


pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


def client_for(role):
    client = APIClient()
    if role != "anonymous":
        user = User.objects.create_user(role, password="pw-for-tests-only")
        user.user_permissions.set(Permission.objects.filter(codename__in=PERMISSIONS[role]))
        # Token authentication, as a script would use it; session auth is tested in the admin tests.
        client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)}")
    return client


def perform(client, operation, row):
    detail = f"{URL}{row.pk}/"
    body = {"full_name": "Changed Name", "email": "changed@example.com"}
    return {
        "create": lambda: client.post(URL, {"full_name": "New", "email": "new@example.com"}, format="json"),
        "list": lambda: client.get(URL),
        "retrieve": lambda: client.get(detail),
        "statistics": lambda: client.get(f"{URL}statistics/"),
        "update": lambda: client.put(detail, body, format="json"),
        "partial_update": lambda: client.patch(detail, {"subject": "Changed"}, format="json"),
        "cancel": lambda: client.post(f"{detail}cancel/"),
        "retry_failed": lambda: client.post(f"{URL}retry_failed/"),
        "destroy": lambda: client.delete(detail),
        "attachment": lambda: client.get(f"{detail}attachment/"),
    }[operation]()


@pytest.mark.django_db
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("operation", sorted(ALLOWED))
def test_permission_matrix(role, operation):
    row = EmailRequest.objects.create(full_name="Jane Roe", email="jane@example.com")
    row.file_attached.save("scan.pdf", ContentFile(pdf_bytes()), save=True)
    response = perform(client_for(role), operation, row)
    if role in ALLOWED[operation]:
        assert response.status_code < 300, (response.status_code, getattr(response, "data", None))
    else:
        expected = 401 if role == "anonymous" else 403
        assert response.status_code == expected
        assert "detail" in response.json()
        if expected == 401:
            assert response["WWW-Authenticate"] == "Token"
        row.refresh_from_db()
        assert (row.full_name, row.status) == ("Jane Roe", EmailStatus.PENDING)


@pytest.mark.django_db
def test_update_is_refused_once_sent():
    row = EmailRequest.objects.create(full_name="Jane Roe", email="jane@example.com", status=EmailStatus.SENT)
    response = client_for("changer").patch(f"{URL}{row.pk}/", {"subject": "Late edit"}, format="json")
    assert response.status_code == 409
    row.refresh_from_db()
    assert row.subject == ""


@pytest.mark.django_db
def test_update_goes_through_the_same_field_rules():
    row = EmailRequest.objects.create(full_name="Jane Roe", email="jane@example.com")
    response = client_for("changer").patch(f"{URL}{row.pk}/", {"subject": "a\r\nBcc: x@y.z"}, format="json")
    assert response.status_code == 400
    assert list(response.json()) == ["subject"]


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["put", "patch"])
def test_an_edit_answers_the_staff_shape_of_the_edited_row(method):
    row = EmailRequest.objects.create(
        full_name="Jane Roe", email="jane@example.com", status=EmailStatus.FAILED
    )
    body = {"full_name": "Jane Smith", "email": "jane.smith@example.com", "subject": "Corrected"}
    response = getattr(client_for("changer"), method)(f"{URL}{row.pk}/", body, format="json")
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == set(EmailRequestStaffSerializer.Meta.fields)
    assert (answer["id"], answer["full_name"], answer["subject"]) == (str(row.pk), "Jane Smith", "Corrected")
    assert answer["status"] == EmailStatus.FAILED and answer["attempts"] == []
    row.refresh_from_db()
    assert (row.full_name, row.email, row.subject) == ("Jane Smith", "jane.smith@example.com", "Corrected")


@pytest.mark.django_db
def test_an_edit_racing_the_send_is_409_and_writes_nothing(monkeypatch):
    row = EmailRequest.objects.create(
        full_name="Jane Roe", email="jane@example.com", status=EmailStatus.PROCESSING
    )
    fetch = EmailRequestViewSet.get_object

    def fetch_then_sent(view):
        instance = fetch(view)
        # The worker finishes the send between the read and the write.
        EmailRequest.objects.filter(pk=instance.pk).update(status=EmailStatus.SENT)
        return instance

    monkeypatch.setattr(EmailRequestViewSet, "get_object", fetch_then_sent)
    response = client_for("changer").patch(f"{URL}{row.pk}/", {"subject": "Late edit"}, format="json")
    assert response.status_code == 409
    assert response.json() == {"detail": "A SENT request can no longer be edited."}
    row.refresh_from_db()
    assert (row.status, row.subject) == (EmailStatus.SENT, "")


@pytest.mark.django_db
@pytest.mark.parametrize("status", [EmailStatus.SENT, EmailStatus.CANCELLED, EmailStatus.PROCESSING])
def test_cancel_answers_409_unless_pending(status):
    row = EmailRequest.objects.create(full_name="Jane Roe", email="jane@example.com", status=status)
    response = client_for("changer").post(f"{URL}{row.pk}/cancel/")
    assert response.status_code == 409
    assert status in response.json()["detail"]
    row.refresh_from_db()
    assert row.status == status


@pytest.mark.django_db
def test_cancel_of_an_unknown_id_is_404():
    response = client_for("changer").post(f"{URL}00000000-0000-0000-0000-000000000000/cancel/")
    assert response.status_code == 404


@pytest.mark.django_db
def test_cancel_pending_and_retry_failed():
    pending = EmailRequest.objects.create(full_name="A", email="a@example.com")
    failed = EmailRequest.objects.create(
        full_name="B", email="b@example.com", status=EmailStatus.FAILED, retry_count=3, error_message="550 no"
    )
    client = client_for("changer")
    assert client.post(f"{URL}{pending.pk}/cancel/").json()["status"] == "CANCELLED"
    response = client.post(f"{URL}retry_failed/")
    assert response.json()["count"] == 1
    failed.refresh_from_db()
    assert (failed.status, failed.retry_count, failed.manual_retries) == (EmailStatus.PENDING, 0, 1)


@pytest.mark.django_db(transaction=True)
def test_delete_removes_the_row_and_its_file(media_root):
    row = EmailRequest.objects.create(full_name="Jane Roe", email="jane@example.com")
    row.file_attached.save("scan.pdf", ContentFile(pdf_bytes()), save=True)
    path = media_root / row.file_attached.name
    assert path.exists()
    assert client_for("deleter").delete(f"{URL}{row.pk}/").status_code == 204
    assert not EmailRequest.objects.filter(pk=row.pk).exists()
    assert not path.exists()


@pytest.mark.django_db
def test_staff_download_is_an_attachment_with_nosniff():
    row = EmailRequest.objects.create(
        full_name="Jane Roe",
        email="jane@example.com",
        attachment_name="Lab results.pdf",
        attachment_content_type="application/pdf",
    )
    row.file_attached.save("x.pdf", ContentFile(pdf_bytes()), save=True)
    response = client_for("viewer").get(f"{URL}{row.pk}/attachment/")
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment;")
    assert "Lab results.pdf" in response["Content-Disposition"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert b"".join(response.streaming_content) == pdf_bytes()


@pytest.mark.django_db
def test_staff_see_every_field_and_the_attempt_log():
    row = EmailRequest.objects.create(
        full_name="Jane Roe", email="jane@example.com", error_message="421 busy"
    )
    row.attempts.create(number=1, started_at=row.created_at, outcome="transient", smtp_code=421)
    viewer = client_for("viewer")
    body = viewer.get(f"{URL}{row.pk}/").json()
    assert body["full_name"] == "Jane Roe" and body["error_message"] == "421 busy"
    assert body["attempts"][0]["smtp_code"] == 421
    listing = viewer.get(f"{URL}?search=Jane").json()
    assert listing["count"] == 1 and listing["results"][0]["email"] == "jane@example.com"
