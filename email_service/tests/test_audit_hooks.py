"""What goes on the audit trail by itself: staff reads and actions in the API and the admin,
permission changes, the retention purge; and a request's own access history on its admin page."""

import json
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from email_service import audit, retention
from email_service.audit import AuditAction, AuditChannel, AuditEntry
from email_service.models import EmailRequest, EmailStatus

from .files import pdf_bytes
from .test_audit import TABLE, export_lines, run_verify

API = "/api/email/emails/"
API_IP, ADMIN_IP = "198.51.100.23", "198.51.100.24"
CHANGELIST = reverse("admin:email_service_emailrequest_changelist")
# What the form carried: none of it may reach the trail, in any column.
FORM = {
    "full_name": "Zorblat Quimby",
    "email": "zorblat.quimby@example.org",
    "phone": "+44 20 7946 0958",
    "job_profession": "Xylotherapist",
    "subject": "Quasar rash",
    "message": "Nebulous freckles since the equinox",
}
FILE_NAME = "quimby-dermatology-scan.pdf"
EDITED = {"subject": "Vortex itch", "message": "Edited: comet-shaped blotches"}
MARKERS = [*FORM.values(), FILE_NAME, *EDITED.values(), "Zorblat", "quimby"]

pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


def submit(client, **fields):
    upload = SimpleUploadedFile(FILE_NAME, pdf_bytes(), content_type="application/pdf")
    response = client.post(API, {**FORM, **fields, "file_attached": upload}, format="multipart")
    assert response.status_code == 201, response.content
    return EmailRequest.objects.get(pk=response.json()["email_request_id"])


def grant(user, *codenames):
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return User.objects.get(pk=user.pk)  # a fresh object: permissions are cached per instance


def staff_user(*codenames, username="clerk.ops"):
    return grant(User.objects.create_user(username, password="pw-for-tests-only", is_staff=True), *codenames)


def trail():
    """The export as (actor, action, channel, request ids, ip) per entry, logins aside.

    Logins are recorded by the staff authentication, whatever way a test logs in.
    """
    return [
        (line["actor"], line["action"], line["channel"], line["request_ids"], line["ip"])
        for line in export_lines()
        if line["action"] not in ("login", "login_failed")
    ]


def change_in_sql(pk):
    """Change one entry's column as someone with database access could: past the trigger."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER USER")
        try:
            cursor.execute(f"UPDATE {TABLE} SET channel = 'command' WHERE id = %s", [pk])
        finally:
            if connection.vendor == "postgresql":
                cursor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER USER")


def admin_form(**fields):
    return {
        **FORM,
        "max_retries": 3,
        "attempts-TOTAL_FORMS": 0,
        "attempts-INITIAL_FORMS": 0,
        **fields,
    }


# --- the must-show walk-through ----------------------------------------------------------------------


@pytest.mark.django_db
def test_every_staff_read_and_action_is_on_the_trail_and_no_entry_holds_what_the_form_carried():
    public = APIClient(REMOTE_ADDR="192.0.2.50")
    first, second, third = (submit(public) for _ in range(3))
    # Anonymous reads get the redacted shape and leave nothing.
    assert public.get(API).status_code == 200
    assert public.get(f"{API}{first.pk}/").status_code == 200
    assert not AuditEntry.objects.exists()

    clerk = staff_user("view_emailrequest", "change_emailrequest", "delete_emailrequest")
    api = APIClient(REMOTE_ADDR=API_IP)
    api.force_login(clerk)
    assert api.get(API).status_code == 200
    assert api.get(f"{API}{first.pk}/").json()["full_name"] == FORM["full_name"]
    download = api.get(f"{API}{first.pk}/attachment/")
    assert download.status_code == 200 and b"".join(download.streaming_content) == pdf_bytes()
    assert api.patch(f"{API}{first.pk}/", EDITED, format="json").status_code == 200
    assert api.post(f"{API}{first.pk}/cancel/").status_code == 200
    assert api.delete(f"{API}{second.pk}/").status_code == 204

    admin = Client(REMOTE_ADDR=ADMIN_IP)
    admin.force_login(clerk)
    change = reverse("admin:email_service_emailrequest_change", args=[third.pk])
    assert admin.get(CHANGELIST).status_code == 200
    assert admin.get(CHANGELIST, {"q": "Zorblat"}).status_code == 200
    assert FORM["message"] in admin.get(change).content.decode()
    assert admin.post(change, admin_form(**EDITED)).status_code == 302
    selected = {"_selected_action": [str(first.pk), str(third.pk)]}
    exported = admin.post(CHANGELIST, {"action": "export_csv", **selected})
    assert exported.status_code == 200 and EDITED["subject"] in exported.content.decode()
    cancel = admin.post(CHANGELIST, {"action": "cancel_selected", "_selected_action": [str(third.pk)]})
    assert cancel.status_code == 302
    delete = reverse("admin:email_service_emailrequest_delete", args=[third.pk])
    assert admin.post(delete, {"post": "yes"}).status_code == 302

    assert not EmailRequest.objects.filter(pk__in=[second.pk, third.pk]).exists()
    assert EmailRequest.objects.get(pk=first.pk).status == EmailStatus.CANCELLED
    one, two, three = str(first.pk), str(second.pk), str(third.pk)
    assert trail() == [
        # Granting the clerk the app's permissions, outside any request: a command.
        (None, "permission_change", "command", [], None),
        ("clerk.ops", "list", "api", [three, two, one], API_IP),
        ("clerk.ops", "view", "api", [one], API_IP),
        ("clerk.ops", "download", "api", [one], API_IP),
        ("clerk.ops", "update", "api", [one], API_IP),
        ("clerk.ops", "cancel", "api", [one], API_IP),
        ("clerk.ops", "delete", "api", [two], API_IP),
        ("clerk.ops", "list", "admin", [three, one], ADMIN_IP),
        ("clerk.ops", "search", "admin", [three, one], ADMIN_IP),
        ("clerk.ops", "view", "admin", [three], ADMIN_IP),
        ("clerk.ops", "update", "admin", [three], ADMIN_IP),
        ("clerk.ops", "export", "admin", [one, three], ADMIN_IP),
        ("clerk.ops", "cancel", "admin", [three], ADMIN_IP),
        ("clerk.ops", "delete", "admin", [three], ADMIN_IP),
    ]
    # Nothing the form carried, in any column of any entry (detail and hmacs included).
    stored = json.dumps(list(AuditEntry.objects.values()), default=str).lower()
    exported_text = json.dumps(export_lines()).lower()
    for marker in MARKERS:
        assert marker.lower() not in stored and marker.lower() not in exported_text

    code, output = run_verify()
    # Every entry of the trail, the staff logins recorded beside the ones above included.
    assert (code, output) == (
        0,
        f"{AuditEntry.objects.count()} audit entries verified; the chain is intact.\n",
    )
    assert AuditEntry.objects.exclude(action__in=["login", "login_failed"]).count() == 14
    tampered = AuditEntry.objects.get(action="download")
    change_in_sql(tampered.pk)
    code, output = run_verify()
    assert code == 1 and f"First broken: #{tampered.pk} (download at " in output


# --- the API ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_list_with_a_personal_filter_is_a_search_and_holds_the_page_not_the_terms():
    public = APIClient()
    mine = submit(public)
    submit(public, email="someone.else@example.org")
    api = APIClient()
    api.force_login(staff_user("view_emailrequest"))

    assert api.get(API, {"search": "Quasar", "email": FORM["email"]}).json()["count"] == 1
    assert api.get(API, {"page_size": 1}).json()["count"] == 2

    searched, listed = AuditEntry.objects.exclude(action__in=["permission_change", "login"]).order_by("pk")
    assert (searched.action, searched.request_ids) == ("search", [str(mine.pk)])
    # A list names only the rows on its page.
    assert (listed.action, len(listed.request_ids)) == ("list", 1)
    assert "quasar" not in json.dumps(searched.detail).lower()


@pytest.mark.django_db
def test_staff_without_view_permission_get_the_public_shape_and_leave_no_read_entry():
    row = submit(APIClient())
    api = APIClient()
    api.force_login(staff_user("change_emailrequest"))
    assert "full_name" not in api.get(f"{API}{row.pk}/").json()
    api.get(API)
    assert list(AuditEntry.objects.exclude(action="login").values_list("action", flat=True)) == [
        "permission_change"
    ]


@pytest.mark.django_db
def test_retry_names_exactly_the_requests_it_requeued():
    failed, pending = submit(APIClient()), submit(APIClient())
    token = EmailRequest.objects.claim(failed.pk, worker="test")
    EmailRequest.objects.fail(failed.pk, token, error="550 No such user")
    api = APIClient()
    api.force_login(staff_user("change_emailrequest"))

    assert api.post(f"{API}retry_failed/").json()["count"] == 1
    entry = AuditEntry.objects.get(action="retry")
    assert (entry.channel, entry.request_ids, entry.detail) == ("api", [str(failed.pk)], {"requests": 1})
    assert str(pending.pk) not in entry.request_ids


@pytest.mark.django_db
def test_a_refused_action_leaves_no_entry():
    row = submit(APIClient())
    EmailRequest.objects.filter(pk=row.pk).cancel()
    api = APIClient()
    api.force_login(staff_user("change_emailrequest"))
    assert api.post(f"{API}{row.pk}/cancel/").status_code == 409
    assert not AuditEntry.objects.filter(action="cancel").exists()


@pytest.mark.django_db
def test_an_action_whose_entry_cannot_be_written_is_undone(monkeypatch):
    row = submit(APIClient())
    api = APIClient()
    api.force_login(staff_user("delete_emailrequest"))

    def fail(*args, **kwargs):
        raise RuntimeError("the trail is unavailable")

    monkeypatch.setattr(audit, "record", fail)
    assert api.delete(f"{API}{row.pk}/").status_code == 500
    assert EmailRequest.objects.filter(pk=row.pk).exists()


# --- the admin --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_requests_change_page_shows_its_own_access_history_to_auditors_only(client):
    row, other = submit(APIClient()), submit(APIClient())
    audit.record(AuditAction.VIEW, actor="earlier.reader", channel=AuditChannel.API, request_ids=[row])
    audit.record(AuditAction.VIEW, actor="other.reader", channel=AuditChannel.API, request_ids=[other])
    change = reverse("admin:email_service_emailrequest_change", args=[row.pk])

    clerk = staff_user("view_emailrequest")
    client.force_login(clerk)
    page = client.get(change).content.decode()
    assert "Access history" not in page and "earlier.reader" not in page

    auditor = grant(clerk, "view_auditentry")
    client.force_login(auditor)
    page = client.get(change).content.decode()
    assert "Access history" in page
    assert "earlier.reader" in page and "other.reader" not in page
    # This very view is in it, and a link leads to the whole trail filtered by this request.
    assert page.count("<td>clerk.ops</td>") == 2
    link = f"{reverse('admin:email_service_auditentry_changelist')}?request_id={row.pk}"
    assert f'href="{link}"' in page
    listed = client.get(link).context["cl"].result_list
    assert sorted(entry.actor for entry in listed) == ["clerk.ops", "clerk.ops", "earlier.reader"]


@pytest.mark.django_db
def test_entries_about_a_request_match_whole_ids_only():
    wanted, other = uuid.uuid4(), uuid.uuid4()
    first = audit.record(AuditAction.VIEW, channel=AuditChannel.API, request_ids=[other, wanted])
    audit.record(AuditAction.VIEW, channel=AuditChannel.API, request_ids=[other])
    audit.record(AuditAction.VIEW, channel=AuditChannel.API)
    assert [entry.pk for entry in audit.entries_about(wanted)] == [first.pk]
    assert [entry.pk for entry in audit.entries_about(str(wanted).upper())] == [first.pk]
    with pytest.raises(ValueError):
        audit.entries_about(str(wanted)[:8])


@pytest.mark.django_db
def test_the_admins_bulk_delete_and_retry_name_their_rows():
    rows = [submit(APIClient()) for _ in range(2)]
    admin = Client()
    admin.force_login(staff_user("view_emailrequest", "change_emailrequest", "delete_emailrequest"))
    selected = {"_selected_action": [str(row.pk) for row in rows]}

    admin.post(CHANGELIST, {"action": "retry_selected", **selected})
    admin.post(CHANGELIST, {"action": "delete_selected", "post": "yes", **selected})

    assert not EmailRequest.objects.exists()
    retry, delete = AuditEntry.objects.filter(action__in=["retry", "delete"]).order_by("pk")
    assert (retry.request_ids, retry.detail) == ([], {"requests": 0})
    assert (delete.channel, sorted(delete.request_ids)) == ("admin", sorted(str(row.pk) for row in rows))


# --- permission changes -----------------------------------------------------------------------------


def permission_entries():
    return [
        (entry.channel, entry.actor, entry.detail)
        for entry in AuditEntry.objects.filter(action="permission_change").order_by("pk")
    ]


@pytest.mark.django_db
def test_grants_and_removals_of_the_apps_permissions_are_recorded_and_others_are_not():
    user = User.objects.create_user("new.clerk", is_staff=True)
    view, change = (Permission.objects.get(codename=c) for c in ("view_emailrequest", "change_emailrequest"))
    foreign = Permission.objects.get(codename="add_group")

    user.user_permissions.add(view, change, foreign)
    user.user_permissions.add(foreign)
    user.user_permissions.remove(view)
    user.user_permissions.clear()
    view.user_set.add(user)

    one = {"users": 1, "user_id": user.pk}
    assert permission_entries() == [
        ("command", "", {"added": 2, **one}),
        ("command", "", {"removed": 1, **one}),
        # What the clear took: the one app permission left, not the foreign one.
        ("command", "", {"removed": 1, **one}),
        ("command", "", {"added": 1, **one}),
    ]


@pytest.mark.django_db
def test_group_membership_and_group_permissions_count_as_holding_them():
    members = [User.objects.create_user(f"member{i}") for i in range(2)]
    group = Group.objects.create(name="support")
    group_id = group.pk  # deleting sets it to None
    group.user_set.add(*members)  # the group holds nothing of the app yet
    assert permission_entries() == []

    group.permissions.add(*Permission.objects.filter(codename__in=["view_emailrequest", "add_group"]))
    outsider = User.objects.create_user("outsider")
    outsider.groups.add(group)
    group.user_set.remove(members[0])
    group.delete()

    assert permission_entries() == [
        ("command", "", {"added": 1, "groups": 1, "group_id": group_id}),
        ("command", "", {"added": 1, "users": 1, "user_id": outsider.pk}),
        ("command", "", {"removed": 1, "users": 1, "user_id": members[0].pk}),
        ("command", "", {"removed": 1, "users": 2}),
    ]


@pytest.mark.django_db
def test_becoming_or_ceasing_to_be_superuser_is_recorded_and_a_login_is_not(client):
    user = User.objects.create_user("ops.lead", password="pw-for-tests-only", is_staff=True)
    user.is_superuser = True
    user.save()
    client.force_login(user)  # sends user_logged_in, which saves last_login
    user.is_superuser = False
    user.save()
    app_permissions = Permission.objects.filter(content_type__app_label="email_service").count()
    one = {"users": 1, "user_id": user.pk, "superuser": 1}
    assert permission_entries() == [
        ("command", "", {"added": app_permissions, **one}),
        ("command", "", {"removed": app_permissions, **one}),
    ]


@pytest.mark.django_db
def test_a_grant_made_in_the_admin_names_who_made_it_and_from_where(admin_user):
    admin = Client(REMOTE_ADDR=ADMIN_IP)
    admin.force_login(admin_user)
    perms = Permission.objects.filter(codename__in=["view_emailrequest", "delete_emailrequest"])
    response = admin.post(
        reverse("admin:auth_group_add"), {"name": "readers", "permissions": [p.pk for p in perms]}
    )
    assert response.status_code == 302
    # (The fixture's making of a superuser is on the trail too, as a command.)
    [entry] = AuditEntry.objects.filter(action="permission_change", channel="admin")
    group = Group.objects.get(name="readers")
    assert (entry.channel, entry.actor, entry.ip) == ("admin", admin_user.username, ADMIN_IP)
    assert entry.detail == {"added": 2, "groups": 1, "group_id": group.pk}


# --- the retention purge ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_purge_names_the_requests_it_removed_and_keeps_their_entries(
    settings, django_capture_on_commit_callbacks
):
    settings.EMAIL_RETENTION_DAYS = 30
    old, recent = submit(APIClient()), submit(APIClient())
    EmailRequest.objects.filter(pk=old.pk).cancel()
    EmailRequest.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=31))
    earlier = audit.record(AuditAction.VIEW, channel=AuditChannel.API, request_ids=[old])

    with django_capture_on_commit_callbacks(execute=True):
        assert retention.purge_expired()["rows"] == 1

    assert list(EmailRequest.objects.values_list("pk", flat=True)) == [recent.pk]
    purge = AuditEntry.objects.get(action="purge")
    assert (purge.channel, purge.request_ids) == ("command", [str(old.pk)])
    assert purge.detail == {"requests": 1, "orphan_files": 0}
    assert AuditEntry.objects.filter(pk=earlier.pk).exists()
    assert retention.purge_expired(dry_run=True)["rows"] == 0
    assert AuditEntry.objects.filter(action="purge").count() == 1
