"""The OpenAPI document is exact: schemathesis finds no server error, no response outside the
schema, and no invalid input accepted, over every operation, as anonymous caller and as staff."""

import pytest
import schemathesis
from django.contrib.auth.models import User
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=15)
# The coverage phase enumerates its cases while pytest collects (over a minute here); the fuller
# CLI run (`make schemathesis`) has it, the suite keeps the generated examples.
schema.config.phases.coverage.enabled = False


@pytest.fixture
def staff_token(db):
    user = User.objects.create_superuser("schemathesis", "st@example.com", "not-used-password-1")
    return Token.objects.create(user=user).key


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


@pytest.mark.django_db
@schema.parametrize()
# The staff user is made once per operation; the cases only read it.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@pytest.mark.parametrize("caller", ["anonymous", "staff"])
def test_api_conforms_to_its_schema(case, caller, staff_token):
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
