"""Header fields: encoded words and bidi controls refused, by one rule, wherever a value comes in."""

import re

import pytest
from rest_framework.test import APIClient

from email_service.models import EmailRequest
from email_service.serializers import (
    EmailRequestCreateSerializer,
    EmailRequestJSONSerializer,
    EmailRequestUpdateSerializer,
)
from email_service.validators import HEADER_FIELD_MESSAGE

URL = "/api/email/emails/"
VALID = {"full_name": "Jane Roe", "email": "jane@example.com", "subject": "Results"}
# The issue's subject: mail clients decode it to a line break and a Bcc header.
ISSUE_SUBJECT = "=?utf-8?q?Hello=0D=0ABcc=3A_x=40attacker.example?="
ENCODED_WORDS = [
    ISSUE_SUBJECT,
    "Hi =?UTF-8?B?SGVsbG8NCkJjYzogeEBhdHRhY2tlci5leGFtcGxl?= there",
    "=?iso-8859-1?Q?caf=E9?=",
    "=?utf-8*en?b??=",
]
BIDI_CONTROLS = [chr(code) for code in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]]
TEXT_FIELDS = ["full_name", "job_profession", "subject"]
SERIALIZERS = [EmailRequestCreateSerializer, EmailRequestJSONSerializer, EmailRequestUpdateSerializer]

pytestmark = pytest.mark.usefixtures("dispatched", "media_root")


def errors_for(serializer_class, **data):
    serializer = serializer_class(data={**VALID, **data})
    serializer.is_valid()
    return serializer.errors


@pytest.mark.parametrize("serializer_class", SERIALIZERS)
@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("value", ENCODED_WORDS)
def test_encoded_words_are_refused_in_every_text_field_of_every_serializer(serializer_class, field, value):
    errors = errors_for(serializer_class, **{field: value})
    assert [str(message) for message in errors[field]] == [HEADER_FIELD_MESSAGE]
    assert errors[field][0].code == "header_injection"


@pytest.mark.parametrize("serializer_class", SERIALIZERS)
@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("control", BIDI_CONTROLS, ids=[f"U+{ord(c):04X}" for c in BIDI_CONTROLS])
def test_bidi_controls_are_refused_in_every_text_field_of_every_serializer(serializer_class, field, control):
    assert field in errors_for(serializer_class, **{field: f"Invoice {control}fdp.exe"})


@pytest.mark.parametrize("serializer_class", SERIALIZERS)
@pytest.mark.parametrize("value", ["=?utf-8?q?x?=@example.com", "a=?utf-8?b?eA==?=b@example.com"])
def test_an_address_holding_an_encoded_word_is_refused(serializer_class, value):
    assert "email" in errors_for(serializer_class, email=value)


@pytest.mark.parametrize(
    "value",
    [
        "What? =? is fine",
        "2+2=?",
        "Question ?= answer",
        "שלום, referral for Dr Cohen",
        "مرحبا \u200f(RTL mark, not an override)",
        "Müller–Lüdenscheidt",
    ],
)
@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_ordinary_text_with_question_marks_and_right_to_left_scripts_is_accepted(field, value):
    assert errors_for(EmailRequestCreateSerializer, **{field: value}) == {}


@pytest.mark.django_db
def test_the_api_refuses_the_issues_subject_and_stores_nothing():
    response = APIClient().post(URL, {**VALID, "subject": ISSUE_SUBJECT}, format="json")
    assert response.status_code == 400
    assert response.json() == {"subject": [HEADER_FIELD_MESSAGE]}
    assert EmailRequest.objects.count() == 0


@pytest.mark.django_db
def test_the_contact_page_refuses_a_right_to_left_override_in_the_name(client):
    response = client.post("/contact/", {**VALID, "full_name": "Jane \u202eeoR", "message": "Hi"})
    assert response.status_code == 400
    assert HEADER_FIELD_MESSAGE in response.content.decode()
    assert EmailRequest.objects.count() == 0


@pytest.mark.django_db
def test_the_schema_states_the_rule_in_each_header_fields_pattern(client):
    schema = client.get("/api/schema/?format=json").json()
    properties = schema["components"]["schemas"]["EmailRequestCreateRequest"]["properties"]
    for field in TEXT_FIELDS:
        pattern = properties[field]["pattern"]
        assert re.search(pattern, "Hello") is not None
        assert re.search(pattern, f"Hello {ISSUE_SUBJECT}") is None
        assert re.search(pattern, "Hello \u202e") is None
    assert re.search(properties["email"]["pattern"], "jane@example.com") is not None
    assert re.search(properties["email"]["pattern"], "=?utf-8?q?x?=@example.com") is None
