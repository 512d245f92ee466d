"""Staff replies to a submitter: written in the admin or the API, sent through the outbox, threaded."""

from email.utils import parseaddr

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from rest_framework.test import APIClient

from email_service import delivery, outbox, sending
from email_service.audit import AuditEntry
from email_service.authentication import issue_token
from email_service.models import EmailAttempt, EmailRequest, EmailStatus, RowKind
from email_service.outcomes import AttemptOutcome

from .conftest import wait_for

URL = "/api/email/emails/"
SUBMITTER = "patient.reply@example.org"
CONTACT = {
    "full_name": "Rosa Quintero",
    "email": SUBMITTER,
    "subject": "Migraine since March",
    "message": "Could I book a consultation?",
}


def staff(*codenames, username="support"):
    user = User.objects.create_user(username, f"{username}@medcor.example", "pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


def api_client(user=None):
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)}")
    return client


def change_page(row):
    return reverse("admin:email_service_emailrequest_change", args=[row.pk])


@pytest.fixture
def sent_request(db, smtp, dispatched, media_root):
    """A request sent to support over SMTP, and the support mail as received."""
    row = outbox.create_email_request(data=CONTACT, dispatch_on_commit=False)
    assert sending.send_email_request(row.pk, worker="test") == EmailStatus.SENT
    [support_mail] = smtp.to("support@tcall.ai") or smtp.messages[:1]
    row.refresh_from_db()
    smtp.messages.clear()
    return row, support_mail["message"]


def admin_reply_form(row, body):
    return {
        **{name: getattr(row, name) for name in ("full_name", "email", "phone", "job_profession")},
        "subject": row.subject,
        "message": row.message,
        "max_retries": row.max_retries,
        "attempts-TOTAL_FORMS": 0,
        "attempts-INITIAL_FORMS": 0,
        "reply": body,
    }


def test_a_reply_written_in_the_admin_reaches_the_submitter_threaded_and_shows_its_status(
    sent_request, smtp, client, settings
):
    row, support_mail = sent_request
    client.force_login(staff("view_emailrequest", "change_emailrequest"))
    page = client.get(change_page(row)).content.decode()
    assert 'name="reply"' in page and "None yet." in page

    body = "Dear Rosa,\nyes: Tuesday at 10:00 suits us.\n"
    response = client.post(change_page(row), admin_reply_form(row, body), follow=True)
    assert response.status_code == 200
    assert "Reply queued" in response.content.decode()
    [reply] = EmailRequest.objects.replies()
    assert (reply.parent_id, reply.author.username, reply.status) == (row.pk, "support", EmailStatus.PENDING)
    assert reply.message == body.strip()
    entry = AuditEntry.objects.get(action="reply")
    assert (entry.channel, entry.actor, entry.request_ids) == ("admin", "support", [str(row.pk)])

    # The same send loop as every request: claimed, attempted, logged.
    assert sending.send_email_request(reply.pk, worker="test") == EmailStatus.SENT
    [mail] = smtp.messages
    message = mail["message"]
    assert mail["rcpt_tos"] == [SUBMITTER]
    assert parseaddr(message["To"])[1] == SUBMITTER
    assert message["In-Reply-To"] == support_mail["Message-ID"] == row.message_id
    assert message["References"] == row.message_id
    reply.refresh_from_db()
    assert message["Message-ID"] == reply.message_id
    assert parseaddr(message["Reply-To"])[1] == settings.SUPPORT_EMAIL
    assert "Tuesday at 10:00" in message.get_body(("plain",)).get_content()
    # The subject quotes nothing the submitter wrote.
    assert message["Subject"] == f"Re: your message to MedCor ({str(row.pk)[:8]})"
    assert [(a.number, a.outcome) for a in EmailAttempt.objects.filter(request=reply)] == [
        (1, AttemptOutcome.SENT)
    ]
    # No acknowledgement of a reply.
    assert reply.confirmation_sent_at is None

    page = client.get(change_page(row)).content.decode()
    assert "Tuesday at 10:00" in page and ">SENT<" in page and "<td>support</td>" in page


def test_a_reply_goes_through_the_same_retries(sent_request, smtp):
    row, _ = sent_request
    reply = outbox.create_email_request(data={"kind": RowKind.REPLY, "parent": row, "message": "Hello"})
    smtp.script = ["421 4.3.2 Try again later"]
    assert sending.send_email_request(reply.pk, worker="test") == EmailStatus.PENDING
    reply.refresh_from_db()
    assert reply.retry_count == 1 and "421" in reply.error_message
    EmailRequest.objects.filter(pk=reply.pk).update(next_attempt_at=reply.created_at)
    assert sending.send_email_request(reply.pk, worker="test") == EmailStatus.SENT
    outcomes = list(EmailAttempt.objects.filter(request=reply).values_list("outcome", flat=True))
    assert outcomes == [AttemptOutcome.TRANSIENT, AttemptOutcome.SENT]


def test_staff_who_may_only_view_see_the_replies_but_cannot_write_one(sent_request, client):
    row, _ = sent_request
    outbox.create_email_request(data={"kind": RowKind.REPLY, "parent": row, "message": "We called you."})
    client.force_login(staff("view_emailrequest"))
    page = client.get(change_page(row)).content.decode()
    assert "We called you." in page
    assert 'name="reply"' not in page


def test_replies_are_no_requests_in_lists_statistics_or_the_admin(sent_request, admin_client):
    row, _ = sent_request
    reply = outbox.create_email_request(data={"kind": RowKind.REPLY, "parent": row, "message": "Hi"})
    viewer = api_client(staff("view_emailrequest"))
    listing = viewer.get(URL).json()
    assert listing["count"] == 1 and listing["results"][0]["id"] == str(row.pk)
    assert APIClient().get(URL).json()["count"] == 1
    assert viewer.get(f"{URL}{reply.pk}/").status_code == 404
    assert viewer.get(f"{URL}{reply.pk}/replies/").status_code == 404
    stats = APIClient().get(f"{URL}statistics/").json()
    assert stats["total_requests"] == 1 and stats["pending_requests"] == 0
    changelist = admin_client.get(reverse("admin:email_service_emailrequest_changelist")).content.decode()
    assert str(row.pk) in changelist and str(reply.pk) not in changelist
    assert admin_client.get(change_page(reply)).status_code == 302  # "does not exist" redirect


def test_the_api_lists_replies_with_their_status_and_author(sent_request):
    row, _ = sent_request
    changer = staff("view_emailrequest", "change_emailrequest")
    client = api_client(changer)
    response = client.post(f"{URL}{row.pk}/replies/", {"body": "  See you Tuesday.  "}, format="json")
    assert response.status_code == 201, response.content
    created = response.json()
    assert (created["body"], created["author"], created["status"]) == (
        "See you Tuesday.",
        "support",
        "PENDING",
    )
    assert AuditEntry.objects.get(action="reply").channel == "api"
    listing = client.get(f"{URL}{row.pk}/replies/")
    assert listing.status_code == 200
    assert [(r["id"], r["status"]) for r in listing.json()] == [(created["id"], "PENDING")]
    assert "no-store" in listing["Cache-Control"]


@pytest.mark.parametrize(
    "codenames, get_status, post_status",
    [
        (None, 401, 401),
        ((), 403, 403),
        (("view_emailrequest",), 200, 403),
        (("change_emailrequest",), 403, 201),
    ],
)
def test_replies_need_view_to_read_and_change_to_write(sent_request, codenames, get_status, post_status):
    row, _ = sent_request
    client = api_client(None if codenames is None else staff(*codenames))
    assert client.get(f"{URL}{row.pk}/replies/").status_code == get_status
    assert client.post(f"{URL}{row.pk}/replies/", {"body": "Hello"}, format="json").status_code == post_status


@pytest.mark.parametrize(
    "body", [{}, {"body": ""}, {"body": "   "}, {"body": "a\x00b"}, {"body": "x" * 10001}]
)
def test_a_reply_needs_a_body(sent_request, body):
    row, _ = sent_request
    client = api_client(staff("view_emailrequest", "change_emailrequest"))
    response = client.post(f"{URL}{row.pk}/replies/", body, format="json")
    assert response.status_code == 400
    assert list(response.json()) == ["body"]
    assert not EmailRequest.objects.replies().exists()


def test_the_api_and_the_admin_bound_a_reply_as_the_row_stores_it(sent_request):
    from email_service.replies import BODY_MAX_LENGTH
    from email_service.reply_admin import ReplyForm
    from email_service.serializers import EmailReplyCreateSerializer

    limit = EmailRequest._meta.get_field("message").max_length
    assert BODY_MAX_LENGTH == limit == EmailReplyCreateSerializer().fields["body"].max_length
    assert ReplyForm.base_fields["reply"].max_length == limit
    row, _ = sent_request
    client = api_client(staff("view_emailrequest", "change_emailrequest"))
    response = client.post(f"{URL}{row.pk}/replies/", {"body": "x" * limit}, format="json")
    assert response.status_code == 201


def test_an_unknown_request_has_no_replies(db):
    client = api_client(staff("view_emailrequest", "change_emailrequest"))
    missing = f"{URL}00000000-0000-0000-0000-000000000000/replies/"
    assert client.get(missing).status_code == 404
    assert client.post(missing, {"body": "Hi"}, format="json").status_code == 404


def test_a_reply_in_minimal_mode_carries_no_submitter_text_but_their_address(sent_request, settings):
    settings.EMAIL_NOTIFICATION_MODE = "minimal"
    row, _ = sent_request
    reply = outbox.create_email_request(data={"kind": RowKind.REPLY, "parent": row, "message": "Hello"})
    raw = delivery.message_bytes(delivery.build_message(reply)).decode()
    for value in ("Rosa", "Quintero", "Migraine", "consultation"):
        assert value not in raw
    assert SUBMITTER in raw


def test_a_reply_written_through_the_api_reaches_the_submitter_through_the_real_worker(celery_worker, smtp):
    row = outbox.create_email_request(data=CONTACT)
    wait_for(lambda: EmailRequest.objects.get(pk=row.pk).status == EmailStatus.SENT, message="request sent")
    row.refresh_from_db()
    client = api_client(staff("view_emailrequest", "change_emailrequest"))
    response = client.post(f"{URL}{row.pk}/replies/", {"body": "Your results are in."}, format="json")
    assert response.status_code == 201
    reply_id = response.json()["id"]

    def reply_listed_sent():
        [item] = client.get(f"{URL}{row.pk}/replies/").json()
        return item["status"] == "SENT" and item

    item = wait_for(reply_listed_sent, message="reply sent")
    assert item["sent_at"] and item["author"] == "support"
    [mail] = [m for m in smtp.to(SUBMITTER) if m["message"]["X-Email-Reply-ID"] == reply_id]
    assert mail["message"]["In-Reply-To"] == row.message_id
    assert "Your results are in." in mail["message"].get_body(("plain",)).get_content()


def test_a_request_whose_address_was_erased_cannot_be_answered(sent_request, client):
    row, _ = sent_request
    EmailRequest.objects.filter(pk=row.pk).update(email="")
    user = staff("view_emailrequest", "change_emailrequest")
    response = api_client(user).post(f"{URL}{row.pk}/replies/", {"body": "Hello"}, format="json")
    assert response.status_code == 409
    assert response.json() == {"detail": "This request has no address to reply to."}
    client.force_login(user)
    row.refresh_from_db()
    page = client.post(change_page(row), admin_reply_form(row, "Hello"), follow=True).content.decode()
    assert "Reply not sent: This request has no address to reply to." in page
    assert not EmailRequest.objects.replies().exists()
    assert not AuditEntry.objects.filter(action="reply").exists()


def test_a_persons_export_holds_the_replies_and_their_erasure_removes_them(sent_request, tmp_path):
    import json
    import zipfile

    from email_service import subjects

    row, _ = sent_request
    reply = outbox.create_email_request(data={"kind": RowKind.REPLY, "parent": row, "message": "Call us."})
    out = tmp_path / "subject.zip"
    counts = subjects.export_subject_to_path(SUBMITTER, out, channel="command")
    assert (counts["requests"], counts["replies"]) == (1, 1)
    with zipfile.ZipFile(out) as archive:
        text = "".join(archive.read(name).decode("utf-8", "replace") for name in archive.namelist())
    assert "Call us." in text and str(reply.pk) in text
    assert json.dumps(str(row.pk)) in text
    subjects.erase_subject(SUBMITTER, channel="command")
    assert not EmailRequest.objects.filter(pk__in=[row.pk, reply.pk]).exists()


@pytest.mark.parametrize("status", [EmailStatus.PENDING, EmailStatus.PROCESSING])
def test_purging_keeps_a_request_past_retention_while_its_reply_is_still_to_be_sent(
    sent_request, settings, status
):
    from datetime import timedelta

    from django.utils import timezone

    from email_service import retention
    from email_service.replies import reply_create

    settings.EMAIL_RETENTION_DAYS = 30
    row, _ = sent_request
    long_ago = timezone.now() - timedelta(days=31)
    reply = reply_create(email_request=row, body="We can see you on Monday.", channel="admin")
    EmailRequest.objects.filter(pk__in=[row.pk, reply.pk]).update(created_at=long_ago)
    EmailRequest.objects.filter(pk=reply.pk).update(status=status)
    retention.purge_expired()
    assert EmailRequest.objects.filter(pk__in=[row.pk, reply.pk]).count() == 2

    # A reply sent recently keeps its request too: the conversation is as old as its newest mail.
    EmailRequest.objects.filter(pk=reply.pk).update(status=EmailStatus.SENT, created_at=timezone.now())
    retention.purge_expired()
    assert EmailRequest.objects.filter(pk__in=[row.pk, reply.pk]).count() == 2

    EmailRequest.objects.filter(pk=reply.pk).update(created_at=long_ago)
    retention.purge_expired()
    assert not EmailRequest.objects.filter(pk__in=[row.pk, reply.pk]).exists()
