"""The admin's edit form refuses what the API refuses, with the API's own messages."""

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from email_service.models import CONTACT_FIELDS, EmailRequest
from email_service.validators import HEADER_FIELD_MESSAGE

ROW = {
    "full_name": "Amelia Hartmann",
    "email": "amelia@example.org",
    "phone": "+49 30 1234",
    "job_profession": "Nurse",
    "subject": "Referral",
    "message": "Please confirm my ECG appointment.",
}
# (field, value the API refuses)
BAD = [
    ("subject", "Referral\r\nBcc: victim@example.com"),
    ("subject", "Referral\r\n"),
    ("subject", "=?utf-8?q?Hello=0D=0ABcc=3A_x=40attacker.example?="),
    ("subject", "Invoice \u202efdp.exe"),
    ("full_name", "Amelia\nHartmann"),
    ("full_name", "Amelia \u2066Hartmann"),
    ("full_name", "   "),
    ("job_profession", "Nurse\x00"),
    ("email", "amelia@example.org\r\nBcc: victim@example.com"),
    ("email", "=?utf-8?q?x?=@example.org"),
    ("email", "not-an-address"),
    ("phone", "+49 30 1234\nX-Injected: yes"),
    ("phone", "call me"),
    ("message", "Hello\x00"),
    ("subject", "x" * 201),
]

pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


@pytest.fixture
def row(db):
    return EmailRequest.objects.create(**ROW)


def change(admin_client, row, **fields):
    form = {**ROW, **fields, "max_retries": 3, "attempts-TOTAL_FORMS": 0, "attempts-INITIAL_FORMS": 0}
    return admin_client.post(reverse("admin:email_service_emailrequest_change", args=[row.pk]), form)


def api_errors(admin_user, row, field, value):
    api = APIClient()
    api.force_authenticate(admin_user)
    response = api.patch(f"/api/email/emails/{row.pk}/", {field: value}, format="json")
    assert response.status_code == 400, (field, value)
    return response.json()[field]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}:{v[:24]!r}" for f, v in BAD])
def test_the_change_form_refuses_what_the_api_refuses_and_leaves_the_row_unchanged(
    admin_client, admin_user, row, field, value
):
    response = change(admin_client, row, **{field: value})
    assert response.status_code == 200  # the form again, with its errors; no redirect
    errors = response.context["adminform"].form.errors
    assert list(errors) == [field]
    # The same words as the API's answer, where the form's own required check does not come first.
    if value.strip():
        assert errors[field] == api_errors(admin_user, row, field, value)
    stored = EmailRequest.objects.values(*CONTACT_FIELDS).get(pk=row.pk)
    assert stored == ROW


def test_the_header_rule_reads_the_same_in_the_admin(admin_client, row):
    response = change(admin_client, row, subject="Invoice \u202efdp.exe")
    assert response.context["adminform"].form.errors["subject"] == [HEADER_FIELD_MESSAGE]


def test_a_good_edit_is_saved_trimmed_as_the_api_would(admin_client, row):
    response = change(admin_client, row, subject="  New subject  ", email=" amelia.h@example.org ")
    assert response.status_code == 302
    row.refresh_from_db()
    assert (row.subject, row.email) == ("New subject", "amelia.h@example.org")
