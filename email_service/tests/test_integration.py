"""End to end over HTTP: a real worker on the configured broker, a real SMTP server."""

import uuid

import pytest
import requests

from email_service.models import EmailRequest, EmailStatus

from .conftest import wait_for
from .files import pdf_bytes

pytestmark = pytest.mark.integration

FORM = {
    "full_name": "Amelia Hartmann",
    "email": "amelia.hartmann@example.org",
    "phone": "+49 (30) 1234-5678",
    "job_profession": "Cardiology nurse",
    "subject": "Question about my referral",
    "message": "My GP referred me for an ECG.\nCould you confirm the appointment date?",
}


def wait_for_status(pk, statuses=(EmailStatus.SENT, EmailStatus.FAILED), timeout=30):
    return wait_for(
        lambda: EmailRequest.objects.filter(pk=pk, status__in=statuses).first(),
        timeout=timeout,
        message=f"request {pk} to reach {statuses}",
    )


def test_multipart_form_with_pdf_reaches_support(celery_worker, live_server, smtp, settings):
    pdf = pdf_bytes()
    response = requests.post(
        f"{live_server.url}/api/email/emails/",
        data=FORM,
        files={"file_attached": ("Referral letter.pdf", pdf, "application/pdf")},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"message", "email_request_id", "status", "task_id"}
    assert body["status"] == "PENDING"

    row = wait_for_status(body["email_request_id"])
    assert row.status == EmailStatus.SENT, row.error_message
    assert row.sent_at is not None and row.sent_at >= row.created_at
    assert row.celery_task_id == body["task_id"]

    [received] = wait_for(lambda: smtp.to(settings.SUPPORT_EMAIL), message="the support mail")
    mail = received["message"]
    assert received["rcpt_tos"] == [settings.SUPPORT_EMAIL]
    assert received["mail_from"] == settings.DEFAULT_FROM_EMAIL
    assert mail["To"] == settings.SUPPORT_EMAIL
    assert mail["From"] == settings.DEFAULT_FROM_EMAIL
    assert mail["Reply-To"] == FORM["email"]
    assert FORM["subject"] in mail["Subject"]
    assert mail["X-Email-Request-ID"] == str(row.pk)
    assert mail["Message-ID"] == row.message_id

    text = mail.get_body(("plain",)).get_content().replace("\r\n", "\n")
    html = mail.get_body(("html",)).get_content()
    for value in FORM.values():
        assert value in text
    for value in (
        "Amelia Hartmann",
        "amelia.hartmann@example.org",
        "+49 (30) 1234-5678",
        "Cardiology nurse",
        "Question about my referral",
        "My GP referred me for an ECG.",
    ):
        assert value in html

    [attachment] = list(mail.iter_attachments())
    assert attachment.get_filename() == "Referral letter.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == pdf


def test_json_form_reaches_support_and_submitter_gets_a_plain_acknowledgement(
    celery_worker, live_server, smtp, settings
):
    form = {**FORM, "email": f"ack-{uuid.uuid4().hex[:8]}@example.org"}
    response = requests.post(f"{live_server.url}/api/email/emails/", json=form, timeout=10)
    assert response.status_code == 201, response.text
    pk = response.json()["email_request_id"]
    assert wait_for_status(pk).status == EmailStatus.SENT

    wait_for(lambda: smtp.to(form["email"]), message="the acknowledgement")
    [support] = smtp.to(settings.SUPPORT_EMAIL)
    assert not list(support["message"].iter_attachments())
    [ack] = smtp.to(form["email"])
    ack_text = ack["message"].get_body(("plain",)).get_content()
    assert pk in ack_text
    # Fixed words only: nothing the form said is repeated to the address it named.
    for value in (FORM["message"], FORM["subject"], FORM["full_name"]):
        assert value not in ack["raw"].decode(errors="replace")
    assert EmailRequest.objects.get(pk=pk).confirmation_sent_at is not None
