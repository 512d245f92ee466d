"""Encryption at rest, end to end: what a form carries is nowhere in the clear but where staff read it.

Unique markers go in every field and in the file; then the database dump, the stored files (on
disk and in an S3 bucket) and the log lines of the web and worker processes are searched for them,
and the staff API, the admin and the download must still give them back exactly.
"""

import logging
import os
import shutil
import subprocess
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from rest_framework.test import APIClient

from email_service import conf, sending
from email_service.authentication import issue_token
from email_service.models import EmailRequest, EmailStatus

from .conftest import S3_CREDENTIALS, skip_or_fail, wait_for
from .files import pdf_bytes

URL = "/api/email/emails/"
CLIENT_IP = "203.0.113.197"


def markers():
    """Return the form's fields, each holding a marker of its own, and the file's marker."""
    tag = os.urandom(5).hex()
    fields = {
        "full_name": f"Fullname{tag} Marker",
        "email": f"mail{tag}@example.org",
        "phone": f"+1 555 {int(tag[:6], 16) % 10_000_000:07d}",
        "job_profession": f"Profession{tag}",
        "subject": f"Subject{tag}",
        "message": f"Message{tag} about my health.",
    }
    return tag, fields, f"Filecontent{tag}", f"Filename{tag}.pdf"


def found_in(data, needles):
    """Return the needles (str) that occur in `data` (bytes), as UTF-8 or as UTF-16 text."""
    return [n for n in needles if n.encode() in data or n.encode("utf-16-le") in data]


def needles_of(fields, file_marker, file_name):
    # The phone's digits as well: a dump or a log may write them without the spaces.
    return [*fields.values(), fields["phone"].replace(" ", ""), file_marker, file_name, CLIENT_IP]


def pg_dump():
    """Return a plain-SQL dump of the test database, as bytes."""
    if connection.vendor != "postgresql":
        skip_or_fail("the dump test needs PostgreSQL (DATABASE_URL)")
    binary = shutil.which("pg_dump")
    if binary is None:
        skip_or_fail("pg_dump is not installed (Debian: postgresql-client)")
    db = connection.settings_dict
    env = {**os.environ, "PGPASSWORD": db["PASSWORD"] or ""}
    command = [binary, "-h", db["HOST"] or "127.0.0.1", "-p", str(db["PORT"] or 5432), "-U", db["USER"]]
    result = subprocess.run([*command, db["NAME"]], env=env, capture_output=True, timeout=120)
    if result.returncode != 0 and b"server version" in result.stderr:
        skip_or_fail(f"pg_dump does not match the server: {result.stderr.decode(errors='replace')}")
    assert result.returncode == 0, result.stderr
    assert b"email_service_emailrequest" in result.stdout
    return result.stdout


def media_bytes(root):
    """Yield (path, bytes) of every file under `root`."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            yield path, path.read_bytes()


@pytest.fixture
def staff():
    user = User.objects.create_user("reader", password="pw-for-tests-only")
    user.user_permissions.set(Permission.objects.filter(codename="view_emailrequest"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)}")
    return client


def submit(fields, file_marker, file_name):
    data = pdf_bytes(text=f"Referral {file_marker}", padding=300_000)
    upload = SimpleUploadedFile(file_name, data, content_type="application/pdf")
    response = APIClient().post(
        URL, {**fields, "file_attached": upload}, format="multipart", REMOTE_ADDR=CLIENT_IP
    )
    assert response.status_code == 201, response.content
    return response.json()["email_request_id"], data


def assert_staff_read_the_plaintext(staff, admin_client, pk, fields, file_name, data):
    body = staff.get(f"{URL}{pk}/").json()
    assert {name: body[name] for name in fields} == fields
    assert body["attachment_name"] == file_name and body["client_ip"] == CLIENT_IP
    assert staff.get(URL, {"email": fields["email"].upper()}).json()["count"] == 1
    found = staff.get(URL, {"search": fields["message"][:18].lower()}).json()
    assert [row["id"] for row in found["results"]] == [pk] and found["search_scan"]["limit_reached"] is False
    page = admin_client.get(f"/admin/email_service/emailrequest/{pk}/change/").content.decode()
    for value in (*fields.values(), file_name, CLIENT_IP):
        assert value in page, value
    listing = admin_client.get("/admin/email_service/emailrequest/", {"q": fields["email"]}).content.decode()
    assert fields["full_name"] in listing and fields["email"] in listing
    download = staff.get(f"{URL}{pk}/attachment/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == data


@pytest.mark.integration
def test_markers_are_in_no_dump_file_or_log_line_but_staff_read_them(
    celery_worker, smtp, staff, admin_client, caplog
):
    tag, fields, file_marker, file_name = markers()
    needles = needles_of(fields, file_marker, file_name)
    worker_log_start = celery_worker.log_path.stat().st_size
    caplog.set_level(logging.DEBUG)

    pk, data = submit(fields, file_marker, file_name)
    wait_for(
        lambda: EmailRequest.objects.filter(pk=pk, status=EmailStatus.SENT).exists(),
        timeout=60,
        message="the worker to send the request",
    )

    assert found_in(pg_dump(), needles) == []
    row = EmailRequest.objects.get(pk=pk)
    stored = Path(django_settings.MEDIA_ROOT) / row.file_attached.name
    assert stored.is_file()
    for path, content in media_bytes(django_settings.MEDIA_ROOT):
        assert found_in(content, needles) == [], path
    web_lines = caplog.text + "\n".join(str(record.__dict__) for record in caplog.records)
    assert caplog.records and found_in(web_lines.encode(), needles) == []
    worker_lines = celery_worker.log_path.read_bytes()[worker_log_start:]
    assert pk.encode() in worker_lines  # the worker did log about this request
    assert found_in(worker_lines, needles) == []

    assert_staff_read_the_plaintext(staff, admin_client, pk, fields, file_name, data)


@pytest.mark.django_db
def test_on_s3_the_bucket_holds_no_marker_and_staff_read_them(
    settings, s3_endpoint, s3_bucket, smtp, staff, admin_client, dispatched, tmp_path
):
    client, bucket = s3_bucket
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "email_service.encrypted_storage.EncryptedS3Storage",
            "OPTIONS": {
                "bucket_name": bucket,
                "endpoint_url": s3_endpoint,
                "access_key": S3_CREDENTIALS["aws_access_key_id"],
                "secret_key": S3_CREDENTIALS["aws_secret_access_key"],
                "region_name": S3_CREDENTIALS["region_name"],
                "file_overwrite": False,
            },
        },
    }
    _, fields, file_marker, file_name = markers()
    pk, data = submit(fields, file_marker, file_name)
    assert sending.send_email_request(pk) == EmailStatus.SENT

    objects = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert len(objects) == 1
    sealed = client.get_object(Bucket=bucket, Key=objects[0]["Key"])["Body"].read()
    assert sealed.startswith(b"MCEF") and found_in(sealed, needles_of(fields, file_marker, file_name)) == []
    # The mail (full mode here) carries the file as it was sent, read from the bucket as a stream.
    [mail] = smtp.to(conf.support_email())
    [part] = list(mail["message"].iter_attachments())
    assert part.get_content() == data and part.get_filename() == file_name
    assert_staff_read_the_plaintext(staff, admin_client, pk, fields, file_name, data)


@pytest.mark.django_db
def test_in_minimal_mode_the_support_mail_carries_no_marker(settings, media_root, smtp, dispatched):
    settings.EMAIL_NOTIFICATION_MODE = "minimal"
    settings.EMAIL_SEND_CONFIRMATION = False
    _, fields, file_marker, file_name = markers()
    pk, _ = submit(fields, file_marker, file_name)
    assert sending.send_email_request(pk) == EmailStatus.SENT
    [mail] = smtp.to(conf.support_email())
    needles = needles_of(fields, file_marker, file_name)
    assert found_in(mail["raw"], needles) == []
    message = message_from_bytes(mail["raw"], policy=default_policy)
    for part in message.walk():
        payload = part.get_payload(decode=True) or b""
        assert found_in(payload, needles) == [], part.get_content_type()
    headers = "\n".join(f"{name}: {value}" for name, value in message.items())
    assert found_in(headers.encode(), needles) == [] and "Reply-To" not in message
    assert pk[:8] in message["Subject"]


def insert_unencrypted_row(pk, fields, path, file_name):
    """Store a row as it was before 0008_encrypt: plaintext columns, `path` its file."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO email_service_emailrequest (id, full_name, email, phone, job_profession, subject,"
            " message, file_attached, attachment_name, attachment_content_type, status, error_message,"
            " retry_count, max_retries, manual_retries, celery_task_id, message_id, next_attempt_at,"
            " claimed_by, confirmation_error, client_ip, created_at, updated_at, captcha_unverified,"
            " virus_scan, kind) VALUES (%s, %s, %s, %s,"
            " %s, %s, %s, %s, %s, 'application/pdf', 'SENT', '', 0, 3, 0, '', '', now(), '', '', %s,"
            " now(), now(), false, '', 'REQUEST')",
            [pk, *fields.values(), path, file_name, CLIENT_IP],
        )


@pytest.mark.django_db(transaction=True)
def test_the_migration_encrypts_existing_rows_and_files_and_its_reverse_opens_them(media_root):
    from django.core.files.storage import default_storage
    from django.db.migrations.executor import MigrationExecutor

    from email_service.encryption import is_encrypted

    before, after = [("email_service", "0007_notify")], [("email_service", "0008_encrypt")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        _, fields, file_marker, file_name = markers()
        plaintext = pdf_bytes(text=file_marker)
        (media_root / "email_attachments").mkdir(parents=True)
        (media_root / "email_attachments" / "old.pdf").write_bytes(plaintext)
        insert_unencrypted_row(
            "6f1c1f52-0d5e-4a55-9f53-3d3b7c1e0a01", fields, "email_attachments/old.pdf", file_name
        )
        executor = MigrationExecutor(connection)
        executor.migrate(after)
        row = EmailRequest.objects.get()
        assert {name: getattr(row, name) for name in fields} == fields
        assert (row.client_ip, row.attachment_name) == (CLIENT_IP, file_name)
        assert EmailRequest.objects.for_address(fields["email"].upper()).get() == row
        with connection.cursor() as cursor:
            cursor.execute("SELECT full_name, client_ip FROM email_service_emailrequest")
            assert all(is_encrypted(value) for value in cursor.fetchone())
        assert row.file_attached.name != "email_attachments/old.pdf"
        assert not default_storage.exists("email_attachments/old.pdf")
        assert row.file_attached.open("rb").read() == plaintext
        for _, content in media_bytes(media_root):
            assert found_in(content, needles_of(fields, file_marker, file_name)) == []

        executor = MigrationExecutor(connection)
        executor.migrate(before)
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT full_name, email, host(client_ip), file_attached FROM email_service_emailrequest"
            )
            full_name, email, client_ip, name = cursor.fetchone()
        assert (full_name, email, client_ip) == (fields["full_name"], fields["email"], CLIENT_IP)
        assert (media_root / name).read_bytes() == plaintext
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_a_migration_that_fails_midway_keeps_every_original_file_and_a_re_run_seals_them(
    media_root, monkeypatch
):
    from django.db.migrations.executor import MigrationExecutor

    from email_service.encrypted_storage import EncryptedStorage

    before, after = [("email_service", "0007_notify")], [("email_service", "0008_encrypt")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        (media_root / "email_attachments").mkdir(parents=True)
        originals = {}
        for number in (1, 2):
            _, fields, file_marker, file_name = markers()
            path = f"email_attachments/old{number}.pdf"
            originals[path] = pdf_bytes(text=file_marker)
            (media_root / path).write_bytes(originals[path])
            insert_unencrypted_row(f"6f1c1f52-0d5e-4a55-9f53-3d3b7c1e0a0{number}", fields, path, file_name)
        seal, calls = EncryptedStorage.seal, []

        def seals_once_then_fails(storage, name):
            calls.append(name)
            if len(calls) > 1:
                raise OSError("disk full")
            return seal(storage, name)

        monkeypatch.setattr(EncryptedStorage, "seal", seals_once_then_fails)
        with pytest.raises(OSError, match="disk full"):
            MigrationExecutor(connection).migrate(after)
        # Rolled back to the originals, and every one of them is still there.
        with connection.cursor() as cursor:
            cursor.execute("SELECT file_attached FROM email_service_emailrequest ORDER BY id")
            assert [name for (name,) in cursor.fetchall()] == list(originals)
        for path, content in originals.items():
            assert (media_root / path).read_bytes() == content

        monkeypatch.setattr(EncryptedStorage, "seal", seal)
        MigrationExecutor(connection).migrate(after)
        rows = EmailRequest.objects.order_by("id")
        assert len(rows) == 2
        for row, (path, content) in zip(rows, originals.items(), strict=True):
            assert row.file_attached.name != path and not (media_root / path).exists()
            assert row.file_attached.open("rb").read() == content
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db
def test_the_address_index_follows_edits_and_finds_the_mailbox_however_typed(staff, dispatched):
    editor = User.objects.create_user("editor", password="pw-for-tests-only")
    editor.user_permissions.set(
        Permission.objects.filter(codename__in=["view_emailrequest", "change_emailrequest"])
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(editor)}")
    row = EmailRequest.objects.create(full_name="Index Person", email="First.Person+clinic@Gmail.com")
    assert EmailRequest.objects.for_address("firstperson@googlemail.com").get() == row
    assert staff.get(URL, {"email": "first.person@gmail.com"}).json()["count"] == 1
    assert client.patch(f"{URL}{row.pk}/", {"email": "second@example.org"}, format="json").status_code == 200
    assert staff.get(URL, {"email": "first.person@gmail.com"}).json()["count"] == 0
    assert [r["id"] for r in staff.get(URL, {"email": "SECOND@example.org"}).json()["results"]] == [
        str(row.pk)
    ]


@pytest.mark.django_db
def test_search_reads_at_most_the_limit_newest_first_and_says_when_it_stopped(settings, staff, dispatched):
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    old = EmailRequest.objects.create(
        full_name="Needle Old", email="a@example.org", created_at=now - timedelta(days=2)
    )
    new = EmailRequest.objects.create(full_name="needle new", email="b@example.org", created_at=now)
    EmailRequest.objects.create(full_name="Other", email="c@example.org", created_at=now - timedelta(days=1))
    settings.EMAIL_SEARCH_SCAN_LIMIT = 2
    body = staff.get(URL, {"search": "NEEDLE"}).json()
    assert [r["id"] for r in body["results"]] == [str(new.pk)]
    assert body["search_scan"] == {"scanned": 2, "limit": 2, "limit_reached": True}
    # Narrowed by another filter, the older row is within reach.
    body = staff.get(
        URL, {"search": "needle", "created_before": (now - timedelta(hours=1)).isoformat()}
    ).json()
    assert [r["id"] for r in body["results"]] == [str(old.pk)]
    assert body["search_scan"] == {"scanned": 2, "limit": 2, "limit_reached": False}
    settings.EMAIL_SEARCH_SCAN_LIMIT = 5000
    body = staff.get(URL, {"search": "needle", "ordering": "created_at"}).json()
    assert [r["id"] for r in body["results"]] == [str(old.pk), str(new.pk)]
    assert "search_scan" not in staff.get(URL).json()
    assert APIClient().get(URL, {"search": "needle"}).status_code in (401, 403)


def test_the_storage_is_chosen_by_settings_alone():
    import sys

    code = (
        "import django; django.setup(); from django.core.files.storage import storages; "
        "s = storages['default']; print(type(s).__name__, getattr(s, 'bucket_name', ''), "
        "getattr(s, 'endpoint_url', ''))"
    )

    def run(**env):
        return subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert run().stdout.split() == ["EncryptedFileSystemStorage"]
    s3 = run(
        MEDCOR_STORAGE="s3", AWS_STORAGE_BUCKET_NAME="medcor-files", AWS_S3_ENDPOINT_URL="http://127.0.0.1:9"
    )
    assert s3.stdout.split() == ["EncryptedS3Storage", "medcor-files", "http://127.0.0.1:9"], s3.stderr
    missing = run(MEDCOR_STORAGE="s3")
    assert missing.returncode != 0 and "AWS_STORAGE_BUCKET_NAME" in missing.stderr
    assert "filesystem (the default) or s3" in run(MEDCOR_STORAGE="ftp").stderr
