"""The support mail in minimal mode: a reference and a link to the admin, nothing the submitter wrote."""

import os
import subprocess
import sys
import uuid
from email import message_from_bytes
from email.header import decode_header, make_header
from email.policy import compat32
from email.policy import default as default_policy

import pytest
from django.core.files.base import ContentFile

from email_service import delivery
from email_service.models import EmailRequest
from email_service.outcomes import AttemptOutcome

from .conftest import contact_markers
from .files import pdf_bytes


@pytest.fixture
def markers():
    """A unique marker for every field a person fills in, and for the file's name and bytes."""
    tag = uuid.uuid4().hex[:12]
    return {**contact_markers(tag), "attachment_name": f"File{tag}.pdf", "file_text": f"Content{tag}"}


@pytest.fixture
def marked_request(db, markers, media_root):
    fields = {key: markers[key] for key in ("full_name", "email", "phone", "job_profession", "subject")}
    row = EmailRequest(
        **fields,
        message=markers["message"],
        message_id=delivery.new_message_id(),
        attachment_name=markers["attachment_name"],
        attachment_content_type="application/pdf",
    )
    row.file_attached.save("upload.pdf", ContentFile(pdf_bytes(markers["file_text"])), save=False)
    row.save()
    return row


def every_text_of(raw):
    """The raw bytes, every header decoded, and every part decoded, as text."""
    texts = [raw.decode("utf-8", "replace")]
    parsed = message_from_bytes(raw, policy=default_policy)
    for part in parsed.walk():
        for name, value in part.items():
            texts.append(f"{name}: {value}")
        payload = part.get_payload(decode=True)
        if payload is not None:
            texts.append(payload.decode("utf-8", "replace"))
    # The headers as their encoded words decode without the modern policy's folding rules too.
    for name, value in message_from_bytes(raw, policy=compat32).items():
        texts.append(f"{name}: {make_header(decode_header(value))}")
    return texts


def marker_values(markers):
    # The phone also as its digits, in case some part reformats it.
    return [*markers.values(), markers["phone"].replace(" ", "")]


def test_minimal_support_mail_carries_no_form_text_header_or_file(marked_request, markers, settings):
    settings.EMAIL_NOTIFICATION_MODE = "minimal"
    settings.EMAIL_ADMIN_BASE_URL = "https://staff.medcor.example/"
    raw = delivery.message_bytes(delivery.build_support_message(marked_request))
    for text in every_text_of(raw):
        for marker in marker_values(markers):
            assert marker not in text
    message = message_from_bytes(raw, policy=default_policy)
    assert message["Reply-To"] is None
    assert message["Subject"] == f"New contact request {str(marked_request.pk)[:8]}"
    assert message["X-Email-Request-ID"] == str(marked_request.pk)
    assert message["Message-ID"] == marked_request.message_id
    assert list(message.iter_attachments()) == []
    link = f"https://staff.medcor.example/admin/email_service/emailrequest/{marked_request.pk}/change/"
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    for body in (text, html):
        assert link in body
        assert str(marked_request.pk) in body
    assert "Attachment: yes" in text
    assert marked_request.created_at.strftime("%Y-%m-%d %H:%M:%S") in text


def test_minimal_mail_says_when_no_file_came(db, settings):
    settings.EMAIL_NOTIFICATION_MODE = "minimal"
    row = EmailRequest.objects.create(full_name="A", email="a@example.com")
    text = delivery.build_support_message(row).body
    assert "Attachment: no" in text


def test_full_mode_is_todays_mail(marked_request, markers, settings):
    settings.EMAIL_NOTIFICATION_MODE = "full"
    raw = delivery.message_bytes(delivery.build_support_message(marked_request))
    message = message_from_bytes(raw, policy=default_policy)
    assert message["Reply-To"] == markers["email"]
    assert markers["subject"] in message["Subject"]
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == markers["attachment_name"]


def test_minimal_mail_over_smtp_carries_nothing_the_submitter_wrote(marked_request, markers, settings, smtp):
    settings.EMAIL_NOTIFICATION_MODE = "minimal"
    result = delivery.send(delivery.build_support_message(marked_request))
    assert result.outcome == AttemptOutcome.SENT
    [received] = smtp.messages
    assert received["rcpt_tos"] == [settings.SUPPORT_EMAIL]
    for text in every_text_of(received["raw"]):
        for marker in marker_values(markers):
            assert marker not in text


def test_an_unknown_mode_stops_start_up():
    env = {
        "EMAIL_NOTIFICATION_MODE": "partial",
        "DJANGO_DEBUG": "true",
        "DJANGO_SETTINGS_MODULE": "medcor_backend2.settings",
    }
    completed = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode != 0
    assert "EMAIL_NOTIFICATION_MODE must be 'full' or 'minimal'" in completed.stderr


@pytest.mark.integration
def test_minimal_mode_end_to_end_leaves_no_marker_in_the_support_mail_or_any_log_line(
    smtp, transactional_db, media_root, dispatched, tmp_path, settings, log_output
):
    """Submit markers in every field and the file, reply, and read every line both processes logged."""
    from celery import current_app
    from django.contrib.auth.models import Permission, User
    from django.core.files.uploadedfile import SimpleUploadedFile
    from rest_framework.test import APIClient

    from email_service import outbox
    from email_service.authentication import issue_token

    from .conftest import start_worker, wait_for

    tag = uuid.uuid4().hex[:12]
    fields = contact_markers(tag)
    file_name, file_text = f"File{tag}.pdf", f"Content{tag}"
    settings.EMAIL_NOTIFICATION_MODE = "minimal"
    queue = f"{os.environ.get('CELERY_TASK_DEFAULT_QUEUE', 'emails')}-minimal-{tag}"
    worker = start_worker(
        tmp_path,
        settings.EMAIL_PORT,
        name="minimal",
        CELERY_TASK_DEFAULT_QUEUE=queue,
        EMAIL_NOTIFICATION_MODE="minimal",
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        MEDIA_ROOT=settings.MEDIA_ROOT,
    )
    try:
        upload = SimpleUploadedFile(file_name, pdf_bytes(file_text), content_type="application/pdf")
        response = APIClient().post(
            "/api/email/emails/", {**fields, "file_attached": upload}, format="multipart"
        )
        assert response.status_code == 201, response.content
        pk = response.json()["email_request_id"]
        current_app.send_task(outbox.SEND_TASK, args=[pk], queue=queue)
        wait_for(lambda: EmailRequest.objects.get(pk=pk).status == "SENT", message="support mail sent")

        user = User.objects.create_user("support", password="pw")
        user.user_permissions.set(
            Permission.objects.filter(codename__in=["view_emailrequest", "change_emailrequest"])
        )
        staff = APIClient()
        staff.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)}")
        assert (
            staff.get(f"/api/email/emails/?email={fields['email']}&search={fields['subject']}").status_code
            == 200
        )
        assert staff.get(f"/api/email/emails/?email={fields['email']}&created_after=x").status_code == 400
        reply = staff.post(f"/api/email/emails/{pk}/replies/", {"body": "We will call you."}, format="json")
        current_app.send_task(outbox.SEND_TASK, args=[reply.json()["id"]], queue=queue)
        wait_for(
            lambda: EmailRequest.objects.get(pk=reply.json()["id"]).status == "SENT", message="reply sent"
        )
    finally:
        worker.stop()

    support = [m for m in smtp.messages if m["rcpt_tos"] == [settings.SUPPORT_EMAIL]]
    assert len(support) == 1
    worker_log, web_log = worker.output(), log_output.getvalue()
    # Both processes logged the request's journey, so the search below looked at real lines.
    assert f"Email request {pk}: PENDING -> PROCESSING" in worker_log
    assert f"Email request {pk} created" in web_log
    markers = [*fields.values(), fields["phone"].replace(" ", ""), file_name, file_text]
    for marker in markers:
        for text in every_text_of(support[0]["raw"]):
            assert marker not in text
        assert marker not in worker_log, marker
        assert marker not in web_log, marker
    # The reply did reach the submitter, who is the one place their address belongs.
    assert any(m["message"]["X-Email-Reply-ID"] for m in smtp.to(fields["email"]))


def test_the_local_sink_names_each_kind_of_mail_in_either_mode(marked_request, settings):
    from email_service.mailsink import _kind
    from email_service.models import RowKind

    reply = EmailRequest.objects.create(kind=RowKind.REPLY, parent=marked_request, message="Hi")
    for mode in ("full", "minimal"):
        settings.EMAIL_NOTIFICATION_MODE = mode
        kinds = [
            _kind(message_from_bytes(delivery.message_bytes(build(row)), policy=default_policy))
            for build, row in (
                (delivery.build_support_message, marked_request),
                (delivery.build_confirmation_message, marked_request),
                (delivery.build_message, reply),
            )
        ]
        assert kinds == ["support", "acknowledgement", "reply"]
