"""The OpenAPI document is exact: schemathesis finds no server error, no response outside the
schema, and no invalid input accepted, over every operation, as anonymous caller and as staff,
while requests are being delivered (attempts still running beside finished ones)."""

import uuid
from datetime import timedelta

import jsonschema
import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.utils import timezone
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from email_service.authentication import issue_token
from email_service.models import AttemptOutcome, EmailAttempt, EmailRequest, EmailStatus, RowKind

from .files import pdf_bytes

schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=15)
# The coverage phase enumerates its cases while pytest collects (over a minute here); the fuller
# CLI run (`make schemathesis`) has it, the suite keeps the generated examples.
schema.config.phases.coverage.enabled = False


@pytest.fixture
def staff_token(db):
    user = User.objects.create_superuser("schemathesis", "st@example.com", "not-used-password-1")
    return issue_token(user)


@pytest.fixture(autouse=True)
def keep_test_connection():
    """Keep the test's database connection open across in-process requests, as Django's test
    client does: the WSGI handler would otherwise close it at the end of each request."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


def _attempt(row, number, outcome="", **fields):
    started = timezone.now() - timedelta(seconds=30 - number)
    finished = {"finished_at": started + timedelta(seconds=2), "duration_ms": 2000} if outcome else {}
    return EmailAttempt.objects.create(
        request=row,
        number=number,
        started_at=started,
        worker="worker@web-1",
        outcome=outcome,
        **finished,
        **fields,
    )


@pytest.fixture
def requests_in_flight(db, dispatched, media_root):
    """Requests as a busy service holds them: two being sent right now, one waiting for a retry,
    one SENT, one FAILED, one CANCELLED; the first with a file."""
    contact = {
        "full_name": "Jane Roe",
        "email": "jane.roe@example.com",
        "subject": "Referral",
        "message": "Hi",
    }
    sending = EmailRequest.objects.create(**contact, status=EmailStatus.PROCESSING, claimed_by="worker@web-1")
    sending.file_attached.save("scan.pdf", ContentFile(pdf_bytes()), save=False)
    sending.attachment_name, sending.attachment_size = "scan.pdf", sending.file_attached.size
    sending.attachment_content_type = "application/pdf"
    sending.save()
    _attempt(sending, 1)
    retried = EmailRequest.objects.create(**contact, status=EmailStatus.PROCESSING, retry_count=1)
    _attempt(
        retried, 1, AttemptOutcome.TRANSIENT, smtp_code=451, error_class="SMTPDataError", error_text="4.3.0"
    )
    _attempt(retried, 2)
    waiting = EmailRequest.objects.create(**contact, retry_count=1, error_message="451 4.3.0")
    _attempt(waiting, 1, AttemptOutcome.TRANSIENT, smtp_code=451)
    sent = EmailRequest.objects.create(**contact, status=EmailStatus.SENT, sent_at=timezone.now())
    _attempt(sent, 1, AttemptOutcome.SENT, smtp_code=250)
    failed = EmailRequest.objects.create(**contact, status=EmailStatus.FAILED, error_message="550 5.1.1")
    _attempt(failed, 1, AttemptOutcome.PERMANENT, smtp_code=550)
    cancelled = EmailRequest.objects.create(**contact, status=EmailStatus.CANCELLED)
    # Replies to the SENT one: delivered, and waiting; neither is listed among the requests.
    EmailRequest.objects.create(
        kind=RowKind.REPLY, parent=sent, message="Thanks", status=EmailStatus.SENT, sent_at=timezone.now()
    )
    EmailRequest.objects.create(kind=RowKind.REPLY, parent=sent, message="Also", author=User.objects.first())
    return [sending, retried, waiting, sent, failed, cancelled]


def _real_id_for(case, rows):
    """Return the id of one of `rows` chosen by the generated one, or None if it is no UUID."""
    try:
        generated = uuid.UUID(str((case.path_parameters or {}).get("id")))
    except ValueError:
        return None
    return str(rows[generated.int % len(rows)].pk)


@pytest.mark.django_db
@schema.parametrize()
# The staff user and the rows are made once per operation; the cases only read them, or edit,
# cancel and delete them as a client would.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@pytest.mark.parametrize("caller", ["anonymous", "staff"])
def test_api_conforms_to_its_schema(case, caller, staff_token, requests_in_flight):
    headers = {"Authorization": f"Token {staff_token}"} if caller == "staff" else {}
    excluded = []
    if case.media_type == "multipart/form-data":
        # A multipart body carries every value as text, so a number where the schema wants a
        # string cannot be told apart on the server; and the file's allowed types are decided by
        # its content, which a JSON schema cannot state, so a "valid" zip is rightly refused.
        # Both data checks stay on for JSON bodies and every parameter; server errors, status
        # codes and response schemas are checked for multipart too.
        excluded = [negative_data_rejection, positive_data_acceptance]
    case.call_and_validate(headers=headers, excluded_checks=excluded)
    real_id = _real_id_for(case, requests_in_flight)
    if real_id:
        # A generated id names no row: the same case once more on a real one, so that every
        # answer about a request (detail, edit, cancel, file) is checked against the schema too.
        case.path_parameters["id"] = real_id
        case.call_and_validate(headers=headers, excluded_checks=excluded)


def _as_json_schema(node):
    """Return an OpenAPI 3.0 schema as plain JSON Schema: `nullable: true` becomes "or null"."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _as_json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.mark.django_db
@pytest.mark.parametrize("caller", ["anonymous", "staff"])
def test_every_item_matches_exactly_one_shape_while_attempts_run(
    client, caller, staff_token, requests_in_flight
):
    components = _as_json_schema(client.get("/api/schema/?format=json").json()["components"])
    shapes = [
        jsonschema.Draft4Validator({**shape, "components": components})
        for shape in components["schemas"]["EmailRequestView"]["oneOf"]
    ]
    headers = {"HTTP_AUTHORIZATION": f"Token {staff_token}"} if caller == "staff" else {}
    items = client.get("/api/email/emails/", **headers).json()["results"]
    items += [client.get(f"/api/email/emails/{row.pk}/", **headers).json() for row in requests_in_flight]
    assert len(items) == 2 * len(requests_in_flight)
    if caller == "staff":
        running = [
            attempt for item in items for attempt in item["attempts"] if attempt["finished_at"] is None
        ]
        assert len(running) == 4 and {attempt["outcome"] for attempt in running} == {""}
    expected = [0] if caller == "anonymous" else [1]  # oneOf: [EmailRequestPublic, EmailRequestStaff]
    for item in items:
        assert [index for index, shape in enumerate(shapes) if shape.is_valid(item)] == expected, item


@pytest.mark.django_db
def test_schema_documents_examples_auth_and_tags(client):
    document = client.get("/api/schema/?format=json").json()
    create = document["paths"]["/api/email/emails/"]["post"]
    assert create["tags"] == ["emails"]
    assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    example = create["requestBody"]["content"]["application/json"]["examples"]["ContactForm"]["value"]
    assert example["email"] == "john.doe@example.com"
    assert {} in create["security"]  # anyone may submit
    cancel = document["paths"]["/api/email/emails/{id}/cancel/"]["post"]
    assert {} not in cancel["security"] and {"tokenAuth": []} in cancel["security"]
    assert {"401", "403", "404", "409"} <= set(cancel["responses"])
    assert set(document["components"]["securitySchemes"]) == {"tokenAuth", "cookieAuth"}


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/docs/", "/api/redoc/"])
def test_documentation_pages_answer(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert b"/api/schema/" in response.content
