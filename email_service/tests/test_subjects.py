"""Subject access and erasure: `manage.py subject export|erase` and their admin actions."""

import base64
import io
import json
import os
import stat
import zipfile

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from email_service import outbox, subjects
from email_service.audit import AuditEntry
from email_service.models import EmailAttempt, EmailRequest

from .files import pdf_bytes

CHANGELIST = reverse("admin:email_service_emailrequest_changelist")
# One person, written three ways; then someone else at a look-alike address.
SAME_PERSON = ("Jane.Doe+clinic@Gmail.com", "janedoe@googlemail.com", "JANE.DOE@gmail.com")
LOOK_ALIKE = "jane.doe@example.org"

pytestmark = pytest.mark.usefixtures("media_root")


def make_request(email, *, name="Jane Doe", file_text=None, attempts=0):
    upload = ContentFile(pdf_bytes(file_text), name=f"{file_text}.pdf") if file_text else None
    row = outbox.create_email_request(
        data={"full_name": name, "email": email, "subject": "Results", "message": f"About {file_text}"},
        upload=upload,
        content_type="application/pdf" if upload else "",
        dispatch_on_commit=False,
    )
    for number in range(1, attempts + 1):
        EmailAttempt.objects.create(
            request=row, number=number, started_at=timezone.now(), worker="test", outcome="transient"
        )
    return row


@pytest.fixture
def person(db):
    """Three requests of one person (two with files, three attempts) and one of a look-alike."""
    rows = [
        make_request(SAME_PERSON[0], file_text="Blood panel", attempts=2),
        make_request(SAME_PERSON[1], file_text="ECG trace", attempts=1),
        make_request(SAME_PERSON[2]),
    ]
    other = make_request(LOOK_ALIKE, name="Jane Other", file_text="Not hers")
    return rows, other


def run(*args):
    out = io.StringIO()
    call_command("subject", *args, stdout=out)
    return out.getvalue()


def read_export(path):
    with zipfile.ZipFile(path) as archive:
        document = json.loads(archive.read(subjects.DOCUMENT_NAME))
        files = {name: archive.read(name) for name in archive.namelist() if name.startswith("files/")}
    return document, files


def entries(action):
    return list(AuditEntry.objects.filter(action=action).order_by("pk"))


def test_the_person_is_found_however_the_address_was_written(person):
    rows, other = person
    for written in (*SAME_PERSON, " jane.doe@GOOGLEMAIL.com "):
        assert set(subjects.requests_of(written)) == set(rows), written
    assert list(subjects.requests_of(LOOK_ALIKE)) == [other]
    assert not subjects.requests_of("nobody@example.org").exists()


def test_export_then_erase_round_trip_with_files(person, tmp_path, django_capture_on_commit_callbacks):
    rows, other = person
    out = tmp_path / "jane.zip"

    printed = run("export", "--email", "jane.doe@gmail.com", "--out", str(out))
    assert printed == f"Wrote {out}: 3 request(s), 3 attempt(s), 0 reply(ies) and 2 file(s).\n"
    # Health data: readable by the one who exported it, nobody else.
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    document, files = read_export(out)
    exported = {item["id"]: item for item in document["requests"]}
    assert set(exported) == {str(row.pk) for row in rows}
    first = exported[str(rows[0].pk)]
    assert (first["full_name"], first["email"], first["message"]) == (
        "Jane Doe",
        SAME_PERSON[0],
        "About Blood panel",
    )
    assert [attempt["number"] for attempt in first["attempts"]] == [1, 2]
    assert first["attempts"][0]["request_id"] == str(rows[0].pk)
    assert first["replies"] == [] and document["missing_files"] == 0
    assert first["files"] == [f"files/{rows[0].pk}/Blood panel.pdf"]
    assert files == {
        f"files/{rows[0].pk}/Blood panel.pdf": pdf_bytes("Blood panel"),
        f"files/{rows[1].pk}/ECG trace.pdf": pdf_bytes("ECG trace"),
    }
    assert "Not hers" not in json.dumps(document)

    stored = [row.file_attached.name for row in rows if row.file_attached]
    with django_capture_on_commit_callbacks(execute=True):
        dry = run("erase", "--email", SAME_PERSON[1], "--dry-run")
    assert dry.endswith("Would erase 3 request(s), 3 attempt(s), 0 reply(ies) and 2 file(s).\n")
    assert EmailRequest.objects.count() == 4 and all(default_storage.exists(name) for name in stored)

    with django_capture_on_commit_callbacks(execute=True):
        erased = run("erase", "--email", SAME_PERSON[1])
    lines = erased.splitlines()
    assert lines[-1] == "Erased 3 request(s), 3 attempt(s), 0 reply(ies) and 2 file(s)."
    assert f"Erased request {rows[0].pk} of " in lines[0] and lines[0].endswith(
        "2 attempt(s), 0 reply(ies), 1 file(s)."
    )
    assert list(EmailRequest.objects.all()) == [other]
    assert not EmailAttempt.objects.filter(request_id__in=[row.pk for row in rows]).exists()
    assert not any(default_storage.exists(name) for name in stored)
    assert default_storage.exists(other.file_attached.name)
    # Nothing left to find, and the export of nothing says so.
    again = tmp_path / "again.zip"
    assert "0 request(s)" in run("export", "--email", SAME_PERSON[0], "--out", str(again))
    assert read_export(again)[0]["requests"] == []

    # On the trail: the export, the dry run (a lookup), the erasure; ids and counts, no address.
    ids = sorted(str(row.pk) for row in rows)
    export_entry, empty_export = entries("subject_export")
    [lookup] = entries("search")
    [erasure] = entries("subject_erase")
    assert (
        sorted(export_entry.request_ids) == sorted(lookup.request_ids) == sorted(erasure.request_ids) == ids
    )
    assert erasure.channel == "command" and empty_export.request_ids == []
    assert erasure.detail == {"requests": 3, "attempts": 3, "replies": 0, "files": 2}
    trail = json.dumps(list(AuditEntry.objects.values()), default=str).lower()
    assert "jane" not in trail and "doe" not in trail


def test_export_never_replaces_a_file(person, tmp_path):
    out = tmp_path / "taken.zip"
    out.write_bytes(b"someone else's")
    with pytest.raises(CommandError, match="the file exists"):
        run("export", "--email", SAME_PERSON[0], "--out", str(out))
    assert out.read_bytes() == b"someone else's"
    assert not entries("subject_export") and not list(tmp_path.glob("*.partial"))


def test_a_file_storage_lost_is_counted_not_fatal(person, tmp_path):
    rows, _ = person
    default_storage.delete(rows[1].file_attached.name)
    out = tmp_path / "jane.zip"
    printed = run("export", "--email", SAME_PERSON[0], "--out", str(out))
    assert "1 file(s) were no longer in storage." in printed
    document, files = read_export(out)
    assert document["missing_files"] == 1 and list(files) == [f"files/{rows[0].pk}/Blood panel.pdf"]


def test_files_sealed_at_rest_come_out_decrypted(db, settings, tmp_path):
    settings.MEDCOR_ENCRYPTION_KEYS = [base64.urlsafe_b64encode(os.urandom(32)).decode()]
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "email_service.encrypted_storage.EncryptedFileSystemStorage"},
    }
    row = make_request(SAME_PERSON[0], file_text="Sealed scan")
    on_disk = (tmp_path / "media" / row.file_attached.name).read_bytes()
    assert pdf_bytes("Sealed scan") not in on_disk

    out = tmp_path / "jane.zip"
    run("export", "--email", SAME_PERSON[0], "--out", str(out))
    assert read_export(out)[1] == {f"files/{row.pk}/Sealed scan.pdf": pdf_bytes("Sealed scan")}


# --- the admin actions ------------------------------------------------------------------------------


def staff_with(*codenames):
    user = User.objects.create_user("privacy.officer", password="pw-for-tests-only", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def offered(client):
    return [name for name, _ in client.get(CHANGELIST).context["action_form"].fields["action"].choices]


def test_the_actions_are_offered_only_with_their_own_permissions(client, person):
    client.force_login(staff_with("view_emailrequest", "change_emailrequest", "delete_emailrequest"))
    assert "export_subject" not in offered(client) and "erase_subject" not in offered(client)
    rows, _ = person
    client.post(CHANGELIST, {"action": "erase_subject", "post": "yes", "_selected_action": [str(rows[0].pk)]})
    assert EmailRequest.objects.count() == 4

    User.objects.all().delete()
    client.force_login(staff_with("view_emailrequest", "export_subject", "erase_subject"))
    assert {"export_subject", "erase_subject"} <= set(offered(client))


def test_the_admin_export_downloads_the_persons_zip(client, person, tmp_path):
    rows, other = person
    client.force_login(staff_with("view_emailrequest", "export_subject"))

    response = client.post(CHANGELIST, {"action": "export_subject", "_selected_action": [str(rows[2].pk)]})
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"].startswith('attachment; filename="subject-export-')
    (tmp_path / "download.zip").write_bytes(b"".join(response.streaming_content))
    document, files = read_export(tmp_path / "download.zip")
    assert {item["id"] for item in document["requests"]} == {str(row.pk) for row in rows}
    assert len(files) == 2
    [entry] = entries("subject_export")
    assert (entry.channel, entry.actor) == ("admin", "privacy.officer")

    two_people = {"action": "export_subject", "_selected_action": [str(rows[0].pk), str(other.pk)]}
    refused = client.post(CHANGELIST, two_people, follow=True)
    assert "Select requests of one person" in refused.content.decode()
    assert len(entries("subject_export")) == 1


def test_the_admin_erasure_asks_first_then_erases_every_request_of_the_person(
    client, person, django_capture_on_commit_callbacks
):
    rows, other = person
    client.force_login(staff_with("view_emailrequest", "erase_subject"))
    selected = {"action": "erase_subject", "_selected_action": [str(rows[0].pk)]}

    confirm = client.post(CHANGELIST, selected)
    assert confirm.status_code == 200
    page = confirm.content.decode()
    assert "3 request(s)" in page and "2 file(s)" in page and 'name="post" value="yes"' in page
    assert EmailRequest.objects.count() == 4 and not entries("subject_erase")

    with django_capture_on_commit_callbacks(execute=True):
        done = client.post(CHANGELIST, {**selected, "post": "yes"}, follow=True)
    assert (
        "Erased 3 request(s), 3 attempt(s), 0 reply(ies) and 2 file(s) of 1 person(s)."
        in done.content.decode()
    )
    assert list(EmailRequest.objects.all()) == [other]
    assert not any(default_storage.exists(row.file_attached.name) for row in rows if row.file_attached)
    [entry] = entries("subject_erase")
    assert (entry.channel, sorted(entry.request_ids)) == ("admin", sorted(str(row.pk) for row in rows))
