"""No address or query string in any log line, whichever logger wrote it and at whatever level."""

import json
import logging
import uuid

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework.test import APIClient

from email_service import acknowledgements
from email_service.models import EmailRequest
from medcor_backend2.logs import scrub


def test_scrub_replaces_addresses_and_query_strings():
    text = (
        "550 <ana.lima+x@clinic.example.org> refused; GET https://h.example/api/e/?email=a%40b.c&search=heart"
    )
    assert scrub(text) == "550 <[address]> refused; GET https://h.example/api/e/?[query]"
    assert scrub("/api/email/emails/?page=2 done") == "/api/email/emails/?[query] done"
    assert scrub("Why? Because.") == "Why? Because."


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR])
def test_every_logger_at_every_level_is_scrubbed(log_output, level):
    tag = uuid.uuid4().hex[:10]
    address = f"p{tag}@example.org"

    class Request:
        def __str__(self):
            return f"<WSGIRequest: GET '/api/email/emails/?email={address}&search=S{tag}'>"

    try:
        raise ValueError(f"Recipient refused: {address}: 550 no such user")
    except ValueError:
        logging.getLogger(f"any.logger.{tag}").log(
            level,
            "refused %s for %r",
            address,
            {"to": address},
            exc_info=True,
            extra={"request": Request(), "note": f"see /x/?q={tag}", "count": 3},
        )
    [line] = log_output.getvalue().splitlines()
    assert address not in line and f"S{tag}" not in line and f"q={tag}" not in line
    entry = json.loads(line)
    assert entry["message"] == "refused [address] for {'to': '[address]'}"
    assert "/api/email/emails/?[query]" in entry["request"]
    assert "ValueError: Recipient refused: [address]" in entry["exc_info"]
    assert entry["count"] == 3


@pytest.mark.django_db
def test_a_staff_4xx_line_carries_no_query_string(log_output):
    user = User.objects.create_user("viewer", password="x")
    user.user_permissions.add(Permission.objects.get(codename="view_emailrequest"))
    client = APIClient()
    client.force_authenticate(user)
    tag = uuid.uuid4().hex[:10]
    response = client.get(f"/api/email/emails/?email=m{tag}@example.org&search=Heart{tag}&created_after=bad")
    assert response.status_code == 400
    output = log_output.getvalue()
    assert "Bad Request" in output
    assert tag not in output


@pytest.mark.django_db
def test_a_refused_acknowledgement_logs_no_address(log_output, smtp, settings):
    settings.EMAIL_CONFIRMATION_INTERVAL = 0
    tag = uuid.uuid4().hex[:10]
    row = EmailRequest.objects.create(full_name="A", email=f"ack{tag}@example.org")
    smtp.rcpt_reply = f"550 5.1.1 <ack{tag}@example.org>: user unknown"
    assert acknowledgements.send_confirmation(row) is False
    output = log_output.getvalue()
    assert "acknowledgement not sent: 550 SMTPRecipientsRefused" in output
    assert tag not in output
