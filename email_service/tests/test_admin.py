"""The admin as support staff use it: the changelist, the change page, the actions, the statistics page."""

import csv
import io
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.core.files.base import ContentFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from email_service import outbox
from email_service.admin import EmailRequestAdmin
from email_service.models import EmailAttempt, EmailRequest, EmailStatus
from email_service.reports import delivery_report

from .files import pdf_bytes

CHANGELIST = reverse("admin:email_service_emailrequest_changelist")
STATISTICS = reverse("admin:email_service_emailrequest_statistics")

pytestmark = pytest.mark.usefixtures("media_root")


def make_request(
    status=EmailStatus.PENDING, *, created=None, delivery_seconds=2.0, attachment=None, **fields
):
    """Create a request and take it to `status` through the state machine, as a worker would."""
    created = created or timezone.now() - timedelta(minutes=5)
    data = {
        "full_name": "Amelia Hartmann",
        "email": "amelia@example.org",
        "subject": "Referral",
        "message": "Please confirm my ECG appointment.",
        "created_at": created,
        "next_attempt_at": created,
        **fields,
    }
    upload = ContentFile(pdf_bytes(), name=attachment) if attachment else None
    row = outbox.create_email_request(
        data=data, upload=upload, content_type="application/pdf" if upload else "", dispatch_on_commit=False
    )
    if status == EmailStatus.CANCELLED:
        EmailRequest.objects.filter(pk=row.pk).cancel()
    elif status != EmailStatus.PENDING:
        token = EmailRequest.objects.claim(row.pk, worker="test", now=created)
        EmailAttempt.objects.create(
            request=row,
            number=1,
            started_at=created,
            worker="test",
            outcome="sent" if status == EmailStatus.SENT else "permanent",
            smtp_code=None if status == EmailStatus.SENT else 550,
            error_text="" if status == EmailStatus.SENT else "550 No such user",
        )
        if status == EmailStatus.SENT:
            EmailRequest.objects.complete(row.pk, token, now=created + timedelta(seconds=delivery_seconds))
        elif status == EmailStatus.FAILED:
            EmailRequest.objects.fail(row.pk, token, error="550 5.1.1 No such user")
    row.refresh_from_db()
    assert row.status == status
    return row


def run_action(client, action, rows):
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [str(row.pk) for row in rows]}, follow=True
    )


def flash(response):
    return [str(message) for message in get_messages(response.wsgi_request)]


def staff_with(*codenames):
    user = User.objects.create_user("support", "support@example.org", "pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


# --- the changelist -----------------------------------------------------------------------------


def test_changelist_shows_status_submitter_subject_attachment_attempts_and_times(admin_client, db):
    sent = make_request(
        EmailStatus.SENT, full_name="Jonas Okafor", subject="Billing question", attachment="Invoice 2291.pdf"
    )
    failed = make_request(EmailStatus.FAILED, email="priya.nair@example.org")
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    page = response.content.decode()
    for text in (
        "Jonas Okafor",
        "Billing question",
        "priya.nair@example.org",
        ">SENT<",
        ">FAILED<",
        "Invoice 2291.pdf",
        reverse("email-request-attachment", args=[sent.pk]),
        "550 5.1.1 No such user",
        timezone.localtime(sent.sent_at).strftime("%Y-%m-%d %H:%M"),
    ):
        assert text in page
    changelist = response.context["cl"]
    counts = {row.pk: row.attempts_count for row in changelist.result_list}
    assert counts == {sent.pk: 1, failed.pk: 1}
    assert 'class="field-attempts_count">1<' in page


def test_changelist_counts_attempts_in_one_query_whatever_the_number_of_rows(admin_client, db):
    def queries_for_page():
        with CaptureQueriesContext(connection) as queries:
            assert admin_client.get(CHANGELIST).status_code == 200
        return len(queries)

    make_request(EmailStatus.SENT)
    few = queries_for_page()
    for _ in range(10):
        make_request(EmailStatus.SENT)
    assert queries_for_page() == few


def test_search_matches_name_email_subject_and_message(admin_client, db):
    make_request(
        full_name="Chen Wei",
        email="chen@example.org",
        subject="Prescription renewal",
        message="My repeat prescription runs out next week.",
    )
    make_request(full_name="Greta Berg", email="greta@example.org", subject="Feedback", message="Kind staff.")
    for term in ("Chen", "chen@example", "Prescription", "runs out"):
        results = admin_client.get(CHANGELIST, {"q": term}).context["cl"].result_list
        assert [row.full_name for row in results] == ["Chen Wei"], term


def test_filters_by_status_date_and_attachment(admin_client, db):
    old = make_request(EmailStatus.FAILED, created=timezone.now() - timedelta(days=20))
    with_file = make_request(EmailStatus.SENT, attachment="Lab results.pdf")
    pending = make_request()

    def listed(**params):
        return {row.pk for row in admin_client.get(CHANGELIST, params).context["cl"].result_list}

    assert listed(status__exact="FAILED") == {old.pk}
    assert listed(attachment="yes") == {with_file.pk}
    assert listed(attachment="no") == {old.pk, pending.pk}
    week_ago = str(timezone.now() - timedelta(days=7))
    assert listed(created_at__gte=week_ago) == {with_file.pk, pending.pk}


# --- the change page ----------------------------------------------------------------------------


def test_change_page_shows_the_attempt_log_inline(admin_client, db):
    row = make_request(EmailStatus.FAILED)
    response = admin_client.get(reverse("admin:email_service_emailrequest_change", args=[row.pk]))
    assert response.status_code == 200
    page = response.content.decode()
    assert "550 No such user" in page
    assert "Permanent failure" in page
    [inline] = response.context["inline_admin_formsets"]
    assert inline.opts.model is EmailAttempt


def test_contact_fields_are_editable_before_sent_and_read_only_once_sent(admin_client, db):
    pending, sent = make_request(), make_request(EmailStatus.SENT)
    pending_page = admin_client.get(reverse("admin:email_service_emailrequest_change", args=[pending.pk]))
    sent_page = admin_client.get(reverse("admin:email_service_emailrequest_change", args=[sent.pk]))
    assert 'name="full_name"' in pending_page.content.decode()
    assert 'name="full_name"' not in sent_page.content.decode()

    form = {
        "full_name": "Amelia H. Hartmann",
        "email": "amelia.h@example.org",
        "phone": "",
        "job_profession": "",
        "subject": "Referral",
        "message": "Please confirm.",
        "max_retries": 3,
        "attempts-TOTAL_FORMS": 0,
        "attempts-INITIAL_FORMS": 0,
    }
    response = admin_client.post(reverse("admin:email_service_emailrequest_change", args=[pending.pk]), form)
    assert response.status_code == 302
    pending.refresh_from_db()
    assert (pending.full_name, pending.email, pending.status) == (
        "Amelia H. Hartmann",
        "amelia.h@example.org",
        EmailStatus.PENDING,
    )
    admin_client.post(reverse("admin:email_service_emailrequest_change", args=[sent.pk]), form)
    sent.refresh_from_db()
    assert (sent.full_name, sent.email) == ("Amelia Hartmann", "amelia@example.org")


def test_an_edit_never_writes_back_a_status_a_worker_changed_meanwhile(rf, admin_user, db):
    row = make_request()
    model_admin = EmailRequestAdmin(EmailRequest, None)
    request = rf.post("/")
    request.user = admin_user
    stale = EmailRequest.objects.get(pk=row.pk)
    form_class = model_admin.get_form(request, stale)
    form = form_class({"full_name": "Changed", "email": stale.email, "max_retries": 3}, instance=stale)
    assert form.is_valid(), form.errors
    # The worker sends it between the page load and the save.
    token = EmailRequest.objects.claim(row.pk, worker="test")
    EmailRequest.objects.complete(row.pk, token)

    model_admin.save_model(request, form.save(commit=False), form, change=True)
    row.refresh_from_db()
    assert (row.status, row.full_name) == (EmailStatus.SENT, "Amelia Hartmann")
    assert form.instance.edit_refused


def test_requests_cannot_be_added_in_the_admin(admin_client, db):
    assert admin_client.get(reverse("admin:email_service_emailrequest_add")).status_code == 403


def test_attachment_link_downloads_through_the_private_api_with_the_admin_session(admin_client, client, db):
    row = make_request(attachment="Referral letter.pdf")
    url = reverse("email-request-attachment", args=[row.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == pdf_bytes()
    assert 'filename="Referral letter.pdf"' in response["Content-Disposition"]
    assert client.get(url).status_code in (401, 403)


# --- actions ------------------------------------------------------------------------------------


def test_retry_selected_requeues_failed_rows_and_says_what_it_skipped(admin_client, db):
    failed, sent, pending = make_request(EmailStatus.FAILED), make_request(EmailStatus.SENT), make_request()
    response = run_action(admin_client, "retry_selected", [failed, sent, pending])
    assert flash(response) == [
        "1 request(s) requeued; 2 skipped (1 PENDING, 1 SENT): only FAILED requests can be retried."
    ]
    failed.refresh_from_db()
    assert (failed.status, failed.retry_count, failed.manual_retries) == (EmailStatus.PENDING, 0, 1)
    assert EmailRequest.objects.get(pk=sent.pk).status == EmailStatus.SENT


def test_cancel_selected_cancels_pending_rows_and_says_what_it_skipped(admin_client, db):
    pending, waiting, failed = make_request(), make_request(), make_request(EmailStatus.FAILED)
    response = run_action(admin_client, "cancel_selected", [pending, waiting, failed])
    assert flash(response) == [
        "2 request(s) cancelled; 1 skipped (1 FAILED): only PENDING requests can be cancelled."
    ]
    statuses = dict(EmailRequest.objects.values_list("pk", "status"))
    assert statuses == {pending.pk: "CANCELLED", waiting.pk: "CANCELLED", failed.pk: "FAILED"}


def test_an_action_with_nothing_to_skip_says_so(admin_client, db):
    response = run_action(admin_client, "cancel_selected", [make_request()])
    assert flash(response) == ["1 request(s) cancelled; none skipped."]


def test_export_csv_holds_the_selected_rows_and_defuses_formulas(admin_client, db):
    row = make_request(
        EmailStatus.SENT,
        subject='=HYPERLINK("http://evil.example")',
        phone="+49 30 1234",
        attachment="Lab results.pdf",
    )
    make_request(full_name="Not selected")
    response = admin_client.post(CHANGELIST, {"action": "export_csv", "_selected_action": [str(row.pk)]})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"].startswith('attachment; filename="email-requests-')
    [header, line] = list(csv.reader(io.StringIO(response.content.decode())))
    exported = dict(zip(header, line, strict=True))
    assert exported["id"] == str(row.pk)
    assert exported["status"] == "SENT"
    assert exported["full_name"] == "Amelia Hartmann"
    assert exported["attachment_name"] == "Lab results.pdf"
    assert exported["attempts"] == "1"
    assert exported["subject"] == '\'=HYPERLINK("http://evil.example")'
    assert exported["phone"] == "'+49 30 1234"
    assert exported["sent_at"] == row.sent_at.isoformat()


def test_staff_who_may_only_view_can_export_but_not_retry_or_cancel(client, db):
    client.force_login(staff_with("view_emailrequest"))
    row = make_request(EmailStatus.FAILED)
    actions = [name for name, _ in client.get(CHANGELIST).context["action_form"].fields["action"].choices]
    assert "export_csv" in actions
    assert "retry_selected" not in actions and "cancel_selected" not in actions
    run_action(client, "retry_selected", [row])
    assert EmailRequest.objects.get(pk=row.pk).status == EmailStatus.FAILED


# --- the statistics page ------------------------------------------------------------------------


def test_statistics_page_is_linked_from_the_admin_index_and_the_changelist(admin_client, db):
    assert STATISTICS in admin_client.get(reverse("admin:index")).content.decode()
    assert STATISTICS in admin_client.get(CHANGELIST).content.decode()


def test_statistics_page_shows_counts_chart_success_rate_delivery_times_and_oldest_pending(admin_client, db):
    now = timezone.now()
    for seconds in (1, 2, 3, 4, 100):
        make_request(EmailStatus.SENT, created=now - timedelta(days=2), delivery_seconds=seconds)
    make_request(EmailStatus.FAILED, created=now - timedelta(days=1))
    make_request(EmailStatus.CANCELLED)
    make_request(
        created=now - timedelta(minutes=90), next_attempt_at=now + timedelta(minutes=5)
    )  # retry waits
    make_request(EmailStatus.SENT, created=now - timedelta(days=45))  # outside the chart's window

    response = admin_client.get(STATISTICS)
    assert response.status_code == 200
    context = response.context
    assert context["counts"]["sent_requests"] == 6
    assert [(row["status"], row["count"]) for row in context["by_status"]] == [
        ("PENDING", 1),
        ("PROCESSING", 0),
        ("SENT", 6),
        ("FAILED", 1),
        ("CANCELLED", 1),
    ]
    # The API's formula (2 places); the page shows it to 1.
    assert context["success_rate"] == round(100 * 5 / 6, 2)
    assert context["median_delivery_seconds"] == pytest.approx(3)
    # Interpolated between the two slowest (as PostgreSQL's percentile_cont does): 4 + 0.8 * (100 - 4).
    assert context["p95_delivery_seconds"] == pytest.approx(80.8)
    assert context["oldest_pending_seconds"] == pytest.approx(90 * 60, abs=30)
    assert len(context["chart"]["bars"]) == 30
    two_days_ago = context["series"][-3]
    assert (two_days_ago["submitted"], two_days_ago["sent"]) == (5, 5)
    assert context["series"][-2]["failed"] == 1
    page = response.content.decode()
    # In the last 24 hours one request failed and none was sent.
    assert context["verdict"]["state"] == "failing"
    for text in ("Mail is failing.", "83.3%", "3.0 s", "1 min 20 s", "1 h 30 min", "<svg", "</svg>"):
        assert text in page
    assert "<script" not in page.split('id="content-main"')[1]


def test_statistics_page_warns_when_a_due_request_is_not_being_picked_up(admin_client, db):
    make_request(created=timezone.now() - timedelta(hours=2))
    response = admin_client.get(STATISTICS)
    assert response.context["verdict"]["state"] == "stuck"
    assert "Mail is not moving." in response.content.decode()


def test_statistics_page_needs_view_permission(client, db):
    client.force_login(staff_with())
    assert client.get(STATISTICS).status_code == 403
    client.logout()
    assert client.get(STATISTICS).status_code == 302  # to the login page


def test_delivery_report_with_no_rows_has_no_rates_or_times(admin_client, db):
    report = delivery_report()
    assert report["success_rate"] == 0.0  # as the API says it; the page shows a dash
    page = admin_client.get(STATISTICS).content.decode()
    card = page.split('id="mc-success-rate"')[1].split('id="mc-median"')[0]
    assert '<div class="mc-value">–</div>' in card and "%" not in card
    assert report["median_delivery_seconds"] is None and report["p95_delivery_seconds"] is None
    assert report["oldest_pending_seconds"] is None
    assert [day["submitted"] for day in report["series"]] == [0] * 30
