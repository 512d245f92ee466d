"""Field rules of the contact form."""

import pytest

from email_service.serializers import EmailRequestCreateSerializer

VALID = {"full_name": "Jane Roe", "email": "jane@example.com"}


def errors_for(**data):
    serializer = EmailRequestCreateSerializer(data={**VALID, **data})
    serializer.is_valid()
    return serializer.errors


def test_minimal_form_is_valid():
    assert errors_for() == {}


@pytest.mark.parametrize("field", ["full_name", "email"])
def test_required_fields(field):
    serializer = EmailRequestCreateSerializer(data={k: v for k, v in VALID.items() if k != field})
    assert not serializer.is_valid()
    assert serializer.errors[field][0].code == "required"


@pytest.mark.parametrize("value", ["not-an-email", "a@", "@example.com", "a b@example.com"])
def test_malformed_email_is_refused(value):
    assert "email" in errors_for(email=value)


def test_fields_are_trimmed():
    serializer = EmailRequestCreateSerializer(
        data={"full_name": "  Jane Roe ", "email": " jane@example.com "}
    )
    assert serializer.is_valid(), serializer.errors
    assert serializer.validated_data["full_name"] == "Jane Roe"
    assert serializer.validated_data["email"] == "jane@example.com"


@pytest.mark.parametrize("field", ["full_name", "subject", "phone", "job_profession"])
@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\r"])
def test_line_breaks_in_header_fields_are_refused(field, breaker):
    value = f"Hello{breaker}Bcc: victim@example.com"
    errors = errors_for(**{field: value})
    assert field in errors


@pytest.mark.parametrize("field", ["full_name", "subject", "job_profession"])
@pytest.mark.parametrize("value", ["\f", "Hello\r\n", "\tHello", "\x0bHello"])
def test_control_characters_at_either_end_are_refused_not_trimmed_away(field, value):
    # The schema forbids them anywhere; trimming them silently would accept what it refuses.
    assert field in errors_for(**{field: value})


def test_line_breaks_in_the_message_are_kept():
    serializer = EmailRequestCreateSerializer(data={**VALID, "message": "line one\nline two"})
    assert serializer.is_valid(), serializer.errors
    assert serializer.validated_data["message"] == "line one\nline two"


@pytest.mark.parametrize("phone", ["+1-555-123-4567", "(030) 123 45.67", ""])
def test_valid_phones(phone):
    assert "phone" not in errors_for(phone=phone)


@pytest.mark.parametrize("phone", ["call me", "+1-555-CALL", "---", "123;456"])
def test_invalid_phones(phone):
    assert "phone" in errors_for(phone=phone)


@pytest.mark.parametrize(
    ("field", "limit"),
    [("full_name", 200), ("subject", 200), ("phone", 32), ("job_profession", 200), ("message", 10000)],
)
def test_lengths_follow_the_model(field, limit):
    filler = "1" if field == "phone" else "a"
    assert field not in errors_for(**{field: filler * limit})
    assert field in errors_for(**{field: filler * (limit + 1)})


def test_honeypot_marks_spam():
    serializer = EmailRequestCreateSerializer(data={**VALID, "website": "http://spam.example"})
    assert serializer.is_valid(), serializer.errors
    assert serializer.is_spam()


def test_each_serializer_binds_its_own_copies_of_the_built_fields():
    from email_service.serializers import EmailRequestJSONSerializer

    first, second = EmailRequestJSONSerializer(data={}), EmailRequestJSONSerializer(data={})
    for name in ("full_name", "email", "message"):
        assert first.fields[name] is not second.fields[name]
        assert first.fields[name].parent is first and second.fields[name].parent is second
        # The class's prototype is never bound to a request's serializer.
        assert EmailRequestJSONSerializer._prototype_fields[name].parent is None
    # The multipart serializer builds its own: it has the file field the JSON one lacks.
    assert "file_attached" in EmailRequestCreateSerializer(data={}).fields
    assert "file_attached" not in first.fields


def test_a_serializer_with_a_nested_serializer_does_not_share_its_fields():
    from rest_framework import serializers

    from email_service.serializers import PrototypeFieldsMixin

    class Child(serializers.Serializer):
        name = serializers.CharField()

    class Parent(PrototypeFieldsMixin, serializers.Serializer):
        child = Child()

    with pytest.raises(TypeError, match="child"):
        _ = Parent().fields
