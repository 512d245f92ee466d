"""Virus scanning against a real clamd on loopback, with a signature database written here
(the official databases cannot be downloaded in CI): the EICAR test string as a body signature."""

import io
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from rest_framework import serializers
from rest_framework.test import APIClient

from email_service import scanning
from email_service.models import EmailRequest

from .conftest import free_port, skip_or_fail, wait_for
from .files import pdf_bytes
from .ports import stop_process

# The EICAR anti-virus test string, put together at run time so that no scanner on a
# developer's machine quarantines this source file.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "MedCor.Test.EICAR"


class Clamd:
    """clamd in the foreground with its own config, socket, port and signature database."""

    def __init__(self, directory):
        binary = shutil.which("clamd") or ("/usr/sbin/clamd" if os.path.exists("/usr/sbin/clamd") else None)
        if not binary:
            skip_or_fail("clamd is not installed (apt-get install clamav-daemon)")
        self.directory = directory
        database = directory / "db"
        database.mkdir()
        (directory / "tmp").mkdir()
        # An .ndb body signature: name, any file type, anywhere in the file, the bytes in hex.
        (database / "medcor-test.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        self.port = free_port()
        self.socket_path = directory / "clamd.sock"
        config = directory / "clamd.conf"
        config.write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"LocalSocket {self.socket_path}",
                    "TCPAddr 127.0.0.1",
                    f"TCPSocket {self.port}",
                    f"DatabaseDirectory {database}",
                    f"TemporaryDirectory {directory / 'tmp'}",
                    f"LogFile {directory / 'clamd.log'}",
                    f"PidFile {directory / 'clamd.pid'}",
                    "StreamMaxLength 20M",
                    "",
                ]
            )
        )
        self.output = open(directory / "stdout.log", "wb")
        started = time.monotonic()
        self.process = subprocess.Popen(
            [binary, "-c", str(config)], stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for(lambda: self.answers() or self.process.poll() is not None, timeout=60, message="clamd")
        except BaseException:
            self.stop()
            raise
        if self.process.poll() is not None:
            pytest.fail(f"clamd exited:\n{(directory / 'stdout.log').read_text()}")
        self.startup_seconds = time.monotonic() - started

    def answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"nPING\n")
                return sock.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self):
        stop_process(self.process)
        self.output.close()


@pytest.fixture(scope="module")
def clamd(tmp_path_factory):
    server = Clamd(tmp_path_factory.mktemp("clamd"))
    print(f"\nclamd started in {server.startup_seconds:.2f} s")
    yield server
    server.stop()


def urls(server):
    return {"unix": f"unix://{server.socket_path}", "tcp": f"tcp://127.0.0.1:{server.port}"}


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_eicar_is_found_and_a_clean_file_is_clean(clamd, transport):
    url = urls(clamd)[transport]
    infected = scanning.scan(io.BytesIO(EICAR), url=url)
    assert infected == scanning.ScanResult(scanning.INFECTED, f"{SIGNATURE}.UNOFFICIAL")
    assert infected.is_infected
    clean = scanning.scan(io.BytesIO(b"%PDF-1.4 nothing to see here\n" * 1000), url=url)
    assert clean == scanning.ScanResult(scanning.CLEAN)
    assert clean.is_clean


@pytest.mark.integration
def test_the_whole_file_is_streamed_so_a_virus_at_its_end_is_found(clamd):
    upload = io.BytesIO(os.urandom(3 * 1024 * 1024) + EICAR)
    upload.seek(1000)  # wherever the caller left it: the scan starts at the beginning
    assert scanning.scan(upload, url=urls(clamd)["unix"]).is_infected
    assert upload.tell() == 0  # rewound, so the caller can store what was scanned


@pytest.mark.integration
def test_check_upload_refuses_a_virus_as_a_field_error(clamd, settings):
    settings.EMAIL_CLAMAV_URL = urls(clamd)["tcp"]
    with pytest.raises(serializers.ValidationError) as refused:
        scanning.check_upload(io.BytesIO(b"prefix " + EICAR + b" suffix"))
    assert refused.value.get_codes() == ["infected"]
    assert scanning.check_upload(io.BytesIO(b"a letter")).is_clean
    # What the serializer gets: Django's uploaded files, in memory and on disk.
    on_disk = TemporaryUploadedFile("x.pdf", "application/pdf", 0, None)
    on_disk.write(b"%PDF-1.4\n" + EICAR)
    for upload in (SimpleUploadedFile("x.txt", EICAR), on_disk):
        with pytest.raises(serializers.ValidationError):
            scanning.check_upload(upload)
        upload.close()


@pytest.mark.integration
def test_a_stopped_scanner_is_unavailable(tmp_path, settings):
    server = Clamd(tmp_path)
    settings.EMAIL_CLAMAV_URL = urls(server)["unix"]
    assert scanning.check_upload(io.BytesIO(b"a letter")).is_clean
    server.stop()
    for url in urls(server).values():
        assert scanning.scan(io.BytesIO(b"a letter"), url=url) == scanning.ScanResult(scanning.UNAVAILABLE)
    settings.EMAIL_CLAMAV_REQUIRED = False
    assert scanning.check_upload(io.BytesIO(b"a letter")).status == scanning.UNAVAILABLE
    settings.EMAIL_CLAMAV_REQUIRED = True
    with pytest.raises(scanning.ScannerUnavailable) as refused:
        scanning.check_upload(io.BytesIO(b"a letter"))
    assert refused.value.status_code == 503


def test_a_scanner_that_never_answers_is_unavailable_after_the_timeout(settings):
    settings.EMAIL_CLAMAV_TIMEOUT = 0.5
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        accepted = []
        threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
        url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        assert scanning.scan(io.BytesIO(b"a letter"), url=url).status == scanning.UNAVAILABLE
        for connection, _ in accepted:
            connection.close()


def test_no_url_means_no_scanning(settings):
    settings.EMAIL_CLAMAV_URL = ""
    assert scanning.check_upload(io.BytesIO(EICAR)) is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:3310", "tcp://127.0.0.1", "clamd.sock"])
def test_a_malformed_url_is_refused(url):
    with pytest.raises(ValueError):
        scanning.scanner(url, timeout=1)


# --- through the API: every upload is scanned before its row is stored ------------------------

API = "/api/email/emails/"
FORM = {"full_name": "Jane Roe", "email": "jane@example.com", "subject": "Scan", "message": "See file"}


def _stored_files(root):
    return [path for path in root.rglob("*") if path.is_file()]


@pytest.fixture
def api(db, dispatched, media_root, settings):
    # Every upload goes to a temporary file, so the test can see that none is left behind.
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 0
    return APIClient()


@pytest.mark.integration
@pytest.mark.parametrize("name, content", [("letter.txt", b"Dear team,\n" + EICAR), ("eicar.txt", EICAR)])
def test_eicar_through_the_api_is_refused_naming_the_file_and_nothing_is_kept(
    clamd, api, settings, media_root, name, content
):
    settings.EMAIL_CLAMAV_URL = urls(clamd)["unix"]
    upload = SimpleUploadedFile(name, content, content_type="text/plain")
    response = api.post(API, {**FORM, "file_attached": upload}, format="multipart")
    assert response.status_code == 400
    assert response.json() == {"file_attached": ["The file contains a virus and was refused."]}
    assert EmailRequest.objects.count() == 0
    assert _stored_files(media_root) == []
    assert _stored_files(media_root.parent / "uploads") == []  # the temporary upload went too


@pytest.mark.integration
def test_a_clean_file_through_the_api_is_stored_marked_clean_for_staff(clamd, api, settings, media_root):
    settings.EMAIL_CLAMAV_URL = urls(clamd)["tcp"]
    upload = SimpleUploadedFile("referral.pdf", pdf_bytes(), content_type="application/pdf")
    response = api.post(API, {**FORM, "file_attached": upload}, format="multipart")
    assert response.status_code == 201, response.json()
    row = EmailRequest.objects.get()
    assert row.virus_scan == "clean"
    # Stored sealed (encryption at rest): read back through the storage, it is the file sent.
    assert (media_root / row.file_attached.name).read_bytes() != pdf_bytes()
    with row.file_attached.open("rb") as stored:
        assert stored.read() == pdf_bytes()
    api.force_authenticate(
        User.objects.create_superuser("scan-staff", "s@example.com", "not-used-password-1")
    )
    assert api.get(f"{API}{row.pk}/").json()["virus_scan"] == "clean"


@pytest.mark.parametrize("required", [False, True])
def test_an_unreachable_scanner_refuses_with_503_or_accepts_marked_as_required_says(
    api, settings, media_root, required
):
    settings.EMAIL_CLAMAV_URL = f"tcp://127.0.0.1:{free_port()}"
    settings.EMAIL_CLAMAV_REQUIRED = required
    upload = SimpleUploadedFile("notes.txt", b"A letter with nothing in it.\n", content_type="text/plain")
    response = api.post(API, {**FORM, "file_attached": upload}, format="multipart")
    if required:
        assert response.status_code == 503
        assert response.json() == {"detail": scanning.ScannerUnavailable.default_detail}
        assert EmailRequest.objects.count() == 0 and _stored_files(media_root) == []
    else:
        assert response.status_code == 201, response.json()
        assert EmailRequest.objects.get().virus_scan == "unavailable"
        assert api.get(f"{API}statistics/").json()["unscanned_attachments"] == 1
    # A submission without a file needs no scanner either way.
    assert api.post(API, FORM, format="json").status_code == 201
    assert EmailRequest.objects.filter(virus_scan="").count() == 1


def test_with_scanning_off_files_are_marked_not_scanned(api, settings):
    settings.EMAIL_CLAMAV_URL = ""
    upload = SimpleUploadedFile("notes.txt", b"A letter.\n", content_type="text/plain")
    assert api.post(API, {**FORM, "file_attached": upload}, format="multipart").status_code == 201
    assert EmailRequest.objects.get().virus_scan == "disabled"
