"""The audit trail: recording, the export's shape, the HMAC chain, the trigger, retention, the admin."""

import csv
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import AnonymousUser, Permission, User
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, connections, transaction
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone

from email_service import audit, tasks
from email_service.audit import AuditAction, AuditChannel, AuditEntry
from email_service.models import EmailRequest

from .conftest import ROOT, database_url, require_postgresql

CHANGELIST = reverse("admin:email_service_auditentry_changelist")
TABLE = AuditEntry._meta.db_table


def staff_request(user, ip="203.0.113.7"):
    request = RequestFactory().get("/api/email/emails/", REMOTE_ADDR=ip)
    request.user = user
    return request


def export_lines(*args):
    out = io.StringIO()
    call_command("audit", "export", *args, stdout=out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def run_verify():
    """Run `audit verify` in-process; return its exit code and output."""
    out = io.StringIO()
    try:
        call_command("audit", "verify", stdout=out)
    except CommandError as error:
        return error.returncode, out.getvalue()
    return 0, out.getvalue()


def record_at(moment, monkeypatch, action=AuditAction.VIEW, **kwargs):
    """Record an entry as if the clock said `moment`."""
    with monkeypatch.context() as patch:
        patch.setattr(timezone, "now", lambda: moment)
        return audit.record(action, channel=AuditChannel.COMMAND, **kwargs)


def alter_in_sql(sql, params=()):
    """Run `sql` on the table with its append-only trigger switched off, as a DBA could."""
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER USER")
        try:
            cursor.execute(sql, params)
        finally:
            cursor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER USER")


@pytest.fixture
def staff(db):
    return User.objects.create_user("nurse.ops", password="pw-for-tests-only", is_staff=True)


# --- recording and export ------------------------------------------------------------------------


def test_record_takes_actor_and_ip_from_the_request_and_export_prints_the_contract_shape(staff):
    ids = [uuid.uuid4(), uuid.uuid4()]
    entry = audit.record(
        AuditAction.LIST, request=staff_request(staff), channel=AuditChannel.API, request_ids=ids
    )
    audit.record("login_failed", actor="someone.else", channel="admin", ip="2001:DB8::0:1")

    first, second = export_lines()
    assert set(first) == {"time", "actor", "ip", "action", "channel", "request_ids"}
    assert first == {
        "time": entry.time.astimezone(UTC).isoformat(),
        "actor": "nurse.ops",
        "ip": "203.0.113.7",
        "action": "list",
        "channel": "api",
        "request_ids": [str(i) for i in ids],
    }
    assert datetime.fromisoformat(first["time"]) == entry.time
    # A username tried at a failed login is kept without an id; the IP in its normal form.
    assert second["actor"] == "someone.else" and second["ip"] == "2001:db8::1"
    assert AuditEntry.objects.get(pk=entry.pk).actor_user_id == staff.pk


def test_request_ids_may_be_given_as_rows_strings_or_uuids_and_are_kept_once(db):
    row = EmailRequest.objects.create(full_name="Amelia Hartmann", email="amelia@example.org")
    other = uuid.uuid4()
    entry = audit.record(AuditAction.VIEW, channel=AuditChannel.API, request_ids=[row, str(row.pk), other])
    assert entry.request_ids == [str(row.pk), str(other)]
    assert audit.record(AuditAction.VIEW, channel=AuditChannel.API, request_ids=row).request_ids == [
        str(row.pk)
    ]
    assert audit.verify().ok


def test_anonymous_callers_and_commands_have_no_actor_and_bad_addresses_no_ip(db):
    request = staff_request(AnonymousUser(), ip="not-an-ip")
    audit.record(AuditAction.VIEW, request=request, channel=AuditChannel.API)
    audit.record(AuditAction.PURGE, channel=AuditChannel.COMMAND, detail={"rows": 3})

    lines = export_lines()
    assert [(line["actor"], line["ip"], line["request_ids"]) for line in lines] == [
        (None, None, []),
        (None, None, []),
    ]
    assert AuditEntry.objects.order_by("pk").last().detail == {"rows": 3}


def test_export_since_takes_a_date_or_a_date_time(db, monkeypatch):
    record_at(datetime(2026, 3, 1, 23, 59, tzinfo=UTC), monkeypatch)
    record_at(datetime(2026, 3, 2, 8, 0, tzinfo=UTC), monkeypatch)
    record_at(datetime(2026, 3, 3, 8, 0, tzinfo=UTC), monkeypatch)

    assert len(export_lines()) == 3
    assert [line["time"][:10] for line in export_lines("--since", "2026-03-02")] == [
        "2026-03-02",
        "2026-03-03",
    ]
    assert len(export_lines("--since", "2026-03-02T09:00:00")) == 1
    assert len(export_lines("--since", "2026-03-02T09:00:00+02:00")) == 2
    with pytest.raises(CommandError, match="not an ISO date"):
        export_lines("--since", "yesterday")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"detail": {"subject": "Chest pain"}},
        {"detail": {"attachments": True}},
        {"detail": {"rows": 1.5}},
        {"request_ids": ["amelia@example.org"]},
    ],
)
def test_entries_refuse_anything_but_counts_and_request_ids(db, kwargs):
    with pytest.raises(ValueError):
        audit.record(AuditAction.EXPORT, channel=AuditChannel.ADMIN, **kwargs)
    assert not AuditEntry.objects.exists()


def test_unknown_actions_and_channels_are_refused(db):
    with pytest.raises(ValueError):
        audit.record("read", channel=AuditChannel.API)
    with pytest.raises(ValueError):
        audit.record(AuditAction.VIEW, channel="email")
    assert not AuditEntry.objects.exists()


def test_the_actions_are_exactly_the_issues_names():
    assert set(AuditAction.values) == {
        *("list", "view", "download", "export", "search", "update", "cancel", "retry", "delete"),
        *("purge", "reply", "rotate_keys", "pause", "resume", "login", "login_failed"),
        *("permission_change", "subject_export", "subject_erase"),
    }
    assert set(AuditChannel.values) == {"api", "admin", "command"}


# --- the chain -----------------------------------------------------------------------------------


def test_each_entry_chains_to_the_one_before_it(staff):
    entries = [audit.record(AuditAction.VIEW, actor=staff, channel=AuditChannel.ADMIN) for _ in range(3)]
    assert entries[0].prev_hmac == ""
    assert [e.prev_hmac for e in entries[1:]] == [e.hmac for e in entries[:-1]]
    assert run_verify() == (0, "3 audit entries verified; the chain is intact.\n")


def test_entries_cannot_be_saved_again_or_deleted_through_the_model(staff):
    entry = audit.record(AuditAction.VIEW, actor=staff, channel=AuditChannel.ADMIN)
    entry.actor = "someone.else"
    with pytest.raises(audit.AppendOnlyError):
        entry.save()
    with pytest.raises(audit.AppendOnlyError):
        entry.delete()
    assert AuditEntry.objects.get().actor == "nurse.ops"


def test_another_key_does_not_verify(staff, settings):
    audit.record(AuditAction.VIEW, actor=staff, channel=AuditChannel.ADMIN)
    settings.AUDIT_HMAC_KEY = "a-guessed-key"
    result = audit.verify()
    assert (result.count, result.broken, result.reason) == (1, 1, "its content does not match its hmac")


def test_verify_exits_1_after_a_column_is_changed_in_sql_with_the_trigger_disabled(staff):
    require_postgresql()
    entries = [audit.record(AuditAction.VIEW, actor=staff, channel=AuditChannel.API) for _ in range(4)]
    assert run_verify()[0] == 0

    alter_in_sql(f"UPDATE {TABLE} SET action = 'list' WHERE id = %s", [entries[2].pk])

    code, output = run_verify()
    assert code == 1
    assert f"4 audit entries, 1 broken. First broken: #{entries[2].pk} (list at " in output
    assert "does not match its hmac" in output


def test_removing_an_entry_breaks_the_chain_at_the_next_one(staff):
    require_postgresql()
    entries = [audit.record(AuditAction.VIEW, actor=staff, channel=AuditChannel.API) for _ in range(4)]
    alter_in_sql(f"DELETE FROM {TABLE} WHERE id = %s", [entries[1].pk])

    result = audit.verify()
    assert (result.count, result.broken, result.first_broken.pk) == (3, 1, entries[2].pk)
    assert "does not chain" in result.reason


def test_rewriting_an_entry_and_its_hmac_without_the_key_still_breaks_the_next_link(staff):
    require_postgresql()
    entries = [audit.record(AuditAction.VIEW, actor=staff, channel=AuditChannel.API) for _ in range(3)]
    # Without the key a forger can only write some other hmac; the next entry still names the old one.
    alter_in_sql(
        f"UPDATE {TABLE} SET actor = 'someone.else', hmac = %s WHERE id = %s", ["0" * 64, entries[1].pk]
    )
    result = audit.verify()
    assert result.broken == 2 and result.first_broken.pk == entries[1].pk


# --- the trigger (PostgreSQL) ---------------------------------------------------------------------


def test_the_trigger_refuses_update_and_delete_in_sql_and_through_the_orm(staff):
    require_postgresql()
    entry = audit.record(AuditAction.DELETE, actor=staff, channel=AuditChannel.API)
    attempts = [
        lambda: connection.cursor().execute(f"UPDATE {TABLE} SET actor = 'x' WHERE id = %s", [entry.pk]),
        lambda: connection.cursor().execute(f"DELETE FROM {TABLE} WHERE id = %s", [entry.pk]),
        lambda: AuditEntry.objects.filter(pk=entry.pk).update(action=AuditAction.VIEW),
        lambda: AuditEntry.objects.filter(pk=entry.pk).delete(),
    ]
    for attempt in attempts:
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            attempt()
    assert AuditEntry.objects.get().actor == "nurse.ops"
    assert audit.verify().ok


# --- retention -----------------------------------------------------------------------------------


def test_purge_deletes_only_entries_past_retention_and_the_rest_still_verifies(db, monkeypatch, settings):
    settings.AUDIT_RETENTION_DAYS = 2190
    now = datetime(2032, 6, 1, tzinfo=UTC)
    old = [record_at(now - timedelta(days=2200 - i), monkeypatch) for i in range(3)]
    kept = [record_at(now - timedelta(days=d), monkeypatch) for d in (2000, 10, 0)]

    assert audit.purge_audit(now) == 3

    remaining = list(AuditEntry.objects.order_by("pk"))
    assert [e.pk for e in remaining[:3]] == [e.pk for e in kept]
    assert not AuditEntry.objects.filter(pk__in=[e.pk for e in old]).exists()
    # The purge is on the trail itself, with the count it removed.
    assert (remaining[-1].action, remaining[-1].detail) == ("purge", {"audit_entries": 3})
    assert remaining[0].prev_hmac == old[-1].hmac
    result = audit.verify()
    assert (result.ok, result.count) == (True, 4)
    assert audit.purge_audit(now) == 0


def test_purge_removes_only_a_prefix_even_when_clocks_disagree(db, monkeypatch):
    now = datetime(2032, 6, 1, tzinfo=UTC)
    record_at(now - timedelta(days=3000), monkeypatch)
    inside = record_at(now - timedelta(days=5), monkeypatch)
    # Appended later by a host whose clock was far behind: deleting it would cut the chain.
    record_at(now - timedelta(days=2500), monkeypatch)

    assert audit.purge_audit(now) == 1
    assert AuditEntry.objects.order_by("pk").first().pk == inside.pk
    assert audit.verify().ok


def test_after_a_purge_the_trigger_refuses_deletes_again(db):
    require_postgresql()
    entry = audit.record(AuditAction.VIEW, channel=AuditChannel.COMMAND)
    audit.purge_audit(timezone.now() + timedelta(days=10000))
    assert not AuditEntry.objects.filter(pk=entry.pk).exists()
    survivor = AuditEntry.objects.get()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEntry.objects.filter(pk=survivor.pk).delete()


def test_the_purge_task_runs_daily_from_beat(db, settings, monkeypatch):
    [entry] = [e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"].endswith(".purge_audit_trail")]
    assert entry["schedule"] == 24 * 60 * 60
    record_at(timezone.now() - timedelta(days=3000), monkeypatch)
    assert tasks.purge_audit_trail() == 1
    assert list(AuditEntry.objects.values_list("action", flat=True)) == ["purge"]


# --- concurrency ---------------------------------------------------------------------------------


def test_concurrent_appends_form_one_unbroken_chain(transactional_db):
    per_thread, errors = 20, []
    start = threading.Barrier(2)

    def append():
        try:
            start.wait(timeout=30)
            for _ in range(per_thread):
                audit.record(AuditAction.VIEW, channel=AuditChannel.API, request_ids=[uuid.uuid4()])
        except Exception as error:  # reported below, in the test's own thread
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=append) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    result = audit.verify()
    assert (result.ok, result.count) == (True, 2 * per_thread)
    links = list(AuditEntry.objects.values_list("prev_hmac", flat=True))
    assert len(set(links)) == len(links)


# --- the command as a process --------------------------------------------------------------------


def test_audit_verify_exits_0_then_1_as_a_command(transactional_db):
    require_postgresql()
    entries = [audit.record(AuditAction.VIEW, channel=AuditChannel.COMMAND) for _ in range(2)]
    env = dict(os.environ, DATABASE_URL=database_url())

    def verify():
        return subprocess.run(
            [sys.executable, "manage.py", "audit", "verify"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )

    intact = verify()
    assert (intact.returncode, intact.stdout) == (0, "2 audit entries verified; the chain is intact.\n")

    alter_in_sql(f"UPDATE {TABLE} SET ip = '198.51.100.1' WHERE id = %s", [entries[0].pk])
    broken = verify()
    assert broken.returncode == 1
    assert f"First broken: #{entries[0].pk}" in broken.stdout


# --- the admin -----------------------------------------------------------------------------------


@pytest.fixture
def auditor(staff):
    staff.user_permissions.add(Permission.objects.get(codename="view_auditentry"))
    return User.objects.get(pk=staff.pk)


def test_the_trail_is_hidden_from_staff_without_its_permission(client, staff):
    audit.record(AuditAction.VIEW, actor=staff, channel=AuditChannel.ADMIN)
    client.force_login(staff)
    assert client.get(CHANGELIST).status_code == 403
    assert client.get(reverse("admin:index")).content.count(b"auditentry") == 0


def test_the_trail_is_read_only_for_its_viewers(client, auditor):
    entry = audit.record(AuditAction.VIEW, actor=auditor, channel=AuditChannel.ADMIN)
    client.force_login(auditor)

    assert client.get(CHANGELIST).status_code == 200
    change = reverse("admin:email_service_auditentry_change", args=[entry.pk])
    page = client.get(change)
    assert page.status_code == 200 and b'name="_save"' not in page.content
    assert client.post(change, {"actor": "someone.else"}).status_code == 403
    assert client.get(reverse("admin:email_service_auditentry_add")).status_code == 403
    delete = reverse("admin:email_service_auditentry_delete", args=[entry.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    # (The fixture's grant of the trail's permission, and its login, are on the trail too.)
    assert AuditEntry.objects.get(pk=entry.pk).actor == "nurse.ops"


def test_the_admin_filters_by_actor_action_request_id_and_date(client, auditor, monkeypatch):
    wanted = uuid.uuid4()
    audit.record(AuditAction.DOWNLOAD, actor=auditor, channel=AuditChannel.API, request_ids=[wanted])
    audit.record(AuditAction.LIST, actor="other.staff", channel=AuditChannel.API, request_ids=[uuid.uuid4()])
    record_at(datetime(2026, 1, 5, tzinfo=UTC), monkeypatch, actor="other.staff")
    client.force_login(auditor)

    def shown(**params):
        response = client.get(CHANGELIST, params)
        assert response.status_code == 200
        return sorted((e.actor, e.action) for e in response.context["cl"].result_list)

    assert shown(actor="other.staff") == [("other.staff", "list"), ("other.staff", "view")]
    assert shown(action="download") == [("nurse.ops", "download")]
    assert shown(request_id=str(wanted)) == [("nurse.ops", "download")]
    assert shown(q=str(wanted).upper()) == [("nurse.ops", "download")]
    assert shown(request_id="not-a-uuid") == []
    assert shown(time__year=2026, time__month=1) == [("other.staff", "view")]


def test_the_csv_export_action_writes_every_selected_entry(client, auditor):
    ids = [uuid.uuid4(), uuid.uuid4()]
    first = audit.record(AuditAction.EXPORT, actor=auditor, channel=AuditChannel.ADMIN, request_ids=ids)
    second = audit.record(
        AuditAction.LOGIN_FAILED, actor="=cmd()", channel=AuditChannel.ADMIN, ip="192.0.2.9"
    )
    client.force_login(auditor)

    response = client.post(CHANGELIST, {"action": "export_csv", "_selected_action": [first.pk, second.pk]})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [row["id"] for row in rows] == [str(first.pk), str(second.pk)]
    assert rows[0]["request_ids"] == " ".join(str(i) for i in ids)
    assert rows[0]["actor"] == "nurse.ops" and rows[0]["action"] == "export"
    # A username that a spreadsheet would run as a formula is defused.
    assert rows[1]["actor"] == "'=cmd()" and rows[1]["ip"] == "192.0.2.9"
