"""CSV exports: every cell quoted, and no cell a spreadsheet runs, however it splits the lines."""

import csv
import io
import re

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from email_service import audit, csv_export
from email_service.audit import AuditAction, AuditChannel
from email_service.models import EmailRequest

TRIGGERS = "=+-@\t\r"
HOSTILE = [
    '=HYPERLINK("http://evil.example","click")',
    'x;=HYPERLINK("http://evil.example")',
    "x,=1+2",
    "x\t=1+2",
    "x\t@SUM(A1)",
    "line one\n=cmd|' /C calc'!A0",
    "line one\r\n+1+1",
    "line one\r-1",
    "x; =1",
    "\t=1",
    "@x",
]


def cells(text, delimiter):
    """The cells a spreadsheet makes of `text` split on `delimiter`, quotes ignored, spaces trimmed."""
    return [cell.strip(' "') for line in re.split(r"\r\n|\n|\r", text) for cell in line.split(delimiter)]


def assert_no_formula(text):
    for delimiter in (",", ";", "\t"):
        starting = [cell for cell in cells(text, delimiter) if cell[:1] in set(TRIGGERS) - {"\t", "\r"}]
        assert starting == [], delimiter


@pytest.mark.parametrize("value", HOSTILE)
def test_a_formula_is_defused_at_the_start_and_after_any_delimiter_tab_or_line_break(value):
    safe = csv_export.safe_cell(value)
    assert safe.replace("'", "") == value.replace("'", "")
    assert_no_formula(safe)


@pytest.mark.parametrize("value", ["Jane Roe", "a-b", "2026-01-05T10:00:00+00:00", "x = y", "ok, fine", ""])
def test_ordinary_values_are_kept_as_they_are(value):
    assert csv_export.safe_cell(value) == value


def test_none_is_empty_and_numbers_are_text():
    assert [csv_export.safe_cell(v) for v in (None, 12, -5)] == ["", "12", "'-5"]


def test_every_cell_is_quoted():
    out = io.StringIO()
    csv_export.writer(out).writerow(csv_export.safe_row(["a", 1, None]))
    assert out.getvalue() == '"a","1",""\r\n'


@pytest.fixture
def hostile_request(db, media_root):
    return EmailRequest.objects.create(
        full_name=HOSTILE[1],
        email="jane@example.com",
        phone="+49 30 1234",
        job_profession=HOSTILE[3],
        subject=HOSTILE[2],
        message="\n".join(HOSTILE),
    )


def test_the_requests_export_is_quoted_and_defused(admin_client, hostile_request):
    response = admin_client.post(
        reverse("admin:email_service_emailrequest_changelist"),
        {"action": "export_csv", "_selected_action": [str(hostile_request.pk)]},
    )
    text = response.content.decode()
    assert text.startswith('"id","created_at","status"')
    assert_no_formula(text)
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row["full_name"] == 'x;\'=HYPERLINK("http://evil.example")'
    assert row["phone"] == "'+49 30 1234"
    assert row["message"].replace("'", "") == "\n".join(HOSTILE).replace("'", "")


def test_the_audit_export_uses_the_same_rule(client, db):
    auditor = User.objects.create_superuser("auditor", "a@example.com", "not-used-password-1")
    entry = audit.record(
        AuditAction.LOGIN_FAILED, actor="x;=cmd()\t@SUM(A1)", channel=AuditChannel.ADMIN, detail={"tries": 3}
    )
    client.force_login(auditor)
    response = client.post(
        reverse("admin:email_service_auditentry_changelist"),
        {"action": "export_csv", "_selected_action": [entry.pk]},
    )
    text = b"".join(response.streaming_content).decode()
    assert text.startswith('"id","time","actor"')
    assert_no_formula(text)
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row["actor"] == "x;'=cmd()\t'@SUM(A1)"
