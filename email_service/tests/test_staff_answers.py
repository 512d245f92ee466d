"""Staff answers are never cached, and a user who may change but not view gets nothing personal back."""

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework.test import APIClient

from email_service.authentication import issue_token
from email_service.models import EmailRequest, EmailStatus
from email_service.serializers import EmailRequestPublicSerializer

URL = "/api/email/emails/"

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("dispatched", "media_root")]


def client_with(*codenames):
    user = User.objects.create_user("-".join(codenames) or "nobody", password="pw-for-tests-only")
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user)}")
    return client


@pytest.fixture
def row():
    return EmailRequest.objects.create(
        full_name="Jane Roe", email="jane.roe@example.com", subject="Knee pain", message="Since May."
    )


def vary(response):
    return {part.strip().lower() for part in response.get("Vary", "").split(",")}


@pytest.mark.parametrize(
    "call",
    [
        lambda c, row: c.get(URL),
        lambda c, row: c.get(f"{URL}{row.pk}/"),
        lambda c, row: c.get(f"{URL}statistics/"),
        lambda c, row: c.patch(f"{URL}{row.pk}/", {}, format="json"),
        lambda c, row: c.get(f"{URL}00000000-0000-0000-0000-000000000000/"),
    ],
)
def test_staff_answers_are_not_stored_by_any_cache(row, call):
    response = call(client_with("view_emailrequest", "change_emailrequest"), row)
    assert response.status_code in (200, 404)
    assert "no-store" in response["Cache-Control"]
    assert {"authorization", "cookie"} <= vary(response)


def test_anonymous_answers_vary_by_caller_too(row):
    response = APIClient().get(URL)
    assert {"authorization", "cookie"} <= vary(response)


@pytest.mark.parametrize(
    "method, body",
    [
        ("patch", {}),
        ("patch", {"subject": "Corrected"}),
        ("put", {"full_name": "Jane Doe", "email": "j@example.com"}),
    ],
)
def test_change_without_view_answers_the_public_shape(row, method, body):
    response = getattr(client_with("change_emailrequest"), method)(f"{URL}{row.pk}/", body, format="json")
    assert response.status_code == 200, response.content
    assert set(response.json()) == set(EmailRequestPublicSerializer.Meta.fields)
    assert response.json()["id"] == str(row.pk) and response.json()["status"] == EmailStatus.PENDING
    for value in ("Jane", "jane.roe@example.com", "Knee pain", "Since May."):
        assert value.encode() not in response.content
    row.refresh_from_db()
    if "subject" in body:
        assert row.subject == "Corrected"


def test_change_with_view_answers_the_staff_shape(row):
    response = client_with("view_emailrequest", "change_emailrequest").patch(
        f"{URL}{row.pk}/", {}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["email"] == "jane.roe@example.com"
