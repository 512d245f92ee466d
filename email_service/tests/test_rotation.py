"""Key rotation: rotate_encryption_keys re-encrypts rows and files, resumes, and reports what it cannot."""

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import connection
from rest_framework.test import APIClient

from email_service import rotation
from email_service.audit import AuditAction, AuditEntry
from email_service.authentication import issue_token
from email_service.encryption import is_encrypted, key_index
from email_service.models import EmailAttempt, EmailRequest
from medcor_backend2.keys import generate_key

from .files import pdf_bytes

KEY_OLD, KEY_NEW, KEY_LOST = generate_key(), generate_key(), generate_key()
URL = "/api/email/emails/"
FIELDS = {
    "full_name": "Ada Rotation",
    "email": "ada.rotation@example.org",
    "phone": "+44 20 7946 0000",
    "job_profession": "Nurse",
    "subject": "Knee pain",
    "message": "It hurts when I climb stairs.",
}
PERSONAL_COLUMNS = (*FIELDS, "attachment_name", "client_ip")

pytestmark = pytest.mark.usefixtures("dispatched")


@pytest.fixture
def staff():
    user = User.objects.create_user("viewer", password="pw-for-tests-only")
    user.user_permissions.set(Permission.objects.filter(codename="view_emailrequest"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)}")
    return client


def submit(**overrides):
    upload = SimpleUploadedFile(
        "Scan results.pdf", pdf_bytes(padding=200_000), content_type="application/pdf"
    )
    response = APIClient().post(
        URL, {**FIELDS, **overrides, "file_attached": upload}, format="multipart", REMOTE_ADDR="198.51.100.7"
    )
    assert response.status_code == 201, response.content
    return EmailRequest.objects.get(pk=response.json()["email_request_id"])


def stored(pk, column, table="email_service_emailrequest", key="id"):
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE {key} = %s", [pk])
        return cursor.fetchone()[0]


def rotate(*args):
    """Run the command; return (its output, the CommandError or None)."""
    from io import StringIO

    out = StringIO()
    try:
        call_command("rotate_encryption_keys", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


@pytest.mark.django_db
def test_rotation_then_removing_the_old_key_still_answers_the_original_text_and_bytes(
    settings, media_root, staff
):
    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_OLD]
    row = submit()
    EmailAttempt.objects.create(
        request=row, number=1, started_at=row.created_at, error_text="550 ada.rotation@example.org unknown"
    )
    EmailRequest.objects.filter(pk=row.pk).update(error_message="550 ada.rotation@example.org unknown")
    old_file = row.file_attached.name

    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_NEW, KEY_OLD]
    output, error = rotate()
    assert error is None, output
    assert "values_rotated: 10" in output and "files_rotated: 1" in output
    for column in (*PERSONAL_COLUMNS, "error_message"):
        assert key_index(stored(row.pk, column)) == 0, column
    assert key_index(stored(row.pk, "error_text", "email_service_emailattempt", "request_id")) == 0
    row.refresh_from_db()
    assert row.file_attached.name != old_file and not row.file_attached.storage.exists(old_file)
    assert row.file_attached.storage.key_index(row.file_attached.name) == 0
    entry = AuditEntry.objects.get(action=AuditAction.ROTATE_KEYS)
    assert entry.detail["values_rotated"] == 10 and entry.detail["files_rotated"] == 1

    # Run again: nothing left to do.
    output, error = rotate()
    assert error is None and "values_rotated: 0" in output and "files_current: 1" in output

    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_NEW]
    body = staff.get(f"{URL}{row.pk}/").json()
    assert {name: body[name] for name in FIELDS} == FIELDS
    assert body["attachment_name"] == "Scan results.pdf"
    assert body["error_message"] == "550 ada.rotation@example.org unknown"
    download = staff.get(f"{URL}{row.pk}/attachment/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == pdf_bytes(padding=200_000)
    assert staff.get(URL, {"email": "Ada.Rotation@Example.org"}).json()["count"] == 1


@pytest.mark.django_db
def test_values_under_a_removed_key_are_listed_by_request_id_not_skipped(settings, media_root):
    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_LOST]
    lost = submit(full_name="Lost Key")
    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_OLD]
    kept = submit()
    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_NEW, KEY_OLD]
    output, error = rotate()
    assert error is not None and "1 request(s)" in str(error)
    assert f"  {lost.pk}: " in output and "emailrequest.full_name" in output
    assert "emailrequest.file_attached" in output.split(str(lost.pk))[1].splitlines()[0]
    assert str(kept.pk) not in output
    assert "values_unknown_key: 8" in output and "files_unknown_key: 1" in output
    entry = AuditEntry.objects.get(action=AuditAction.ROTATE_KEYS)
    assert entry.request_ids == [str(lost.pk)] and entry.detail["values_unknown_key"] == 8
    assert key_index(stored(kept.pk, "full_name")) == 0


@pytest.mark.django_db(transaction=True)
def test_an_interrupted_rotation_resumes_where_it_stopped(settings, media_root, monkeypatch):
    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_OLD]
    rows = [submit(full_name=f"Person {n}") for n in range(3)]
    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_NEW, KEY_OLD]
    real_rotate_row, calls = rotation._rotate_row, []

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_rotate_row(*args, **kwargs)

    monkeypatch.setattr(rotation, "_rotate_row", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        rotate("--batch-size", "1")
    under_new = [key_index(stored(row.pk, "full_name")) == 0 for row in sorted(rows, key=lambda r: str(r.pk))]
    # The first batch committed; the interrupted one rolled back, as did all after it.
    assert under_new == [True, False, False]
    monkeypatch.setattr(rotation, "_rotate_row", real_rotate_row)
    output, error = rotate("--batch-size", "1")
    assert error is None, output
    assert "values_current: 8" in output and "values_rotated: 16" in output
    settings.MEDCOR_ENCRYPTION_KEYS = [KEY_NEW]
    assert sorted(EmailRequest.objects.values_list("full_name", flat=True)) == [
        "Person 0",
        "Person 1",
        "Person 2",
    ]


@pytest.mark.django_db
def test_plaintext_from_before_encryption_is_sealed_by_rotation(settings, media_root):
    row = submit()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE email_service_emailrequest SET subject = %s WHERE id = %s", ["Typed in", row.pk]
        )
    output, error = rotate()
    assert error is None and "values_sealed: 1" in output
    assert is_encrypted(stored(row.pk, "subject"))
    row.refresh_from_db()
    assert row.subject == "Typed in"
