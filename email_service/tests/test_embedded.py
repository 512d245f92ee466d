"""The `make run` stack on embedded defaults: SQLite, the filesystem broker, the SMTP sink."""

import os
import signal
import subprocess
import sys
from email import message_from_bytes
from email.policy import default as default_policy

import pytest
import requests

from .conftest import ROOT, free_port, wait_for
from .files import pdf_bytes

pytestmark = pytest.mark.integration

# Unset as on a fresh machine: the embedded defaults, and development keys made under var/.
SERVICE_VARIABLES = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "REDIS_URL",
    "MEDCOR_ENCRYPTION_KEYS",
    "MEDCOR_INDEX_KEY",
)


@pytest.fixture
def embedded_stack(tmp_path):
    """Run Procfile.dev under honcho, as `make run` does, in a scratch directory."""
    web_port, smtp_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    env.update(
        DJANGO_DEBUG="true",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_port),
        EMAIL_USE_TLS="false",
        WEB_PORT=str(web_port),
        MEDCOR_VAR_DIR=str(tmp_path / "var"),
        MEDIA_ROOT=str(tmp_path / "media"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        PYTHONUNBUFFERED="1",
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    log = open(tmp_path / "honcho.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "honcho", "-f", "Procfile.dev", "start"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{web_port}"

    def up():
        try:
            return requests.get(f"{base}/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return process.poll() is not None

    try:
        wait_for(up, timeout=60, message="the embedded stack to answer /healthz")
        assert process.poll() is None, (tmp_path / "honcho.log").read_text()
        yield {
            "url": base,
            "mailbox": tmp_path / "var" / "mailbox",
            "log": tmp_path / "honcho.log",
            "var": tmp_path / "var",
        }
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does under `make run`
        try:
            process.wait(timeout=20)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            log.close()


def test_make_run_stack_delivers_json_and_multipart_forms_to_the_sink(embedded_stack):
    url = f"{embedded_stack['url']}/api/email/emails/"
    first = requests.post(
        url,
        json={
            "full_name": "John Doe",
            "email": "john.doe@example.com",
            "subject": "General Inquiry",
            "message": "Hello",
        },
        timeout=10,
    )
    second = requests.post(
        url,
        data={
            "full_name": "John Doe",
            "email": "john.doe@example.com",
            "subject": "Document Review",
            "message": "See attached",
        },
        files={"file_attached": ("document.pdf", pdf_bytes(), "application/pdf")},
        timeout=10,
    )
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    ids = {first.json()["email_request_id"], second.json()["email_request_id"]}

    def support_mails():
        mails = [
            message_from_bytes(path.read_bytes(), policy=default_policy)
            for path in embedded_stack["mailbox"].glob("*.eml")
        ]
        found = [m for m in mails if m["X-Email-Request-ID"] in ids and m["To"] == "support@tcall.ai"]
        return found if len(found) == 2 else None

    mails = wait_for(
        support_mails, timeout=20, message=f"two mails in the sink; log: {embedded_stack['log']}"
    )
    by_subject = {m["Subject"]: m for m in mails}
    document = by_subject["[MedCor contact] Document Review"]
    [attachment] = list(document.iter_attachments())
    assert attachment.get_filename() == "document.pdf"
    assert attachment.get_content() == pdf_bytes()
    assert not list(by_subject["[MedCor contact] General Inquiry"].iter_attachments())
    status = requests.get(f"{url}{second.json()['email_request_id']}/", timeout=5).json()["status"]
    assert status == "SENT"
    # `make run` needs no keys: it made its development keys once, under var/
    kept = (embedded_stack["var"] / "dev-keys.env").read_text()
    assert kept.count("MEDCOR_ENCRYPTION_KEYS=") == kept.count("MEDCOR_INDEX_KEY=") == 1
