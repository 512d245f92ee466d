"""Model fields that keep ciphertext in the column and plaintext in Python (see encryption.py).

The column is TEXT whatever the field: a value grows by about a third plus 44 characters when
sealed, so a length limit applies to the plaintext, as a validator. An empty string is kept as
it is, so blank defaults and forms behave as usual; only whether a field was left empty shows.
A sealed value differs on every save, so the database cannot compare them: only `isnull` is
allowed as a lookup, and any other raises FieldError instead of silently matching nothing.
"""

from django import forms
from django.core import validators
from django.core.exceptions import ValidationError
from django.db import models
from django.utils.functional import cached_property
from django.utils.ipv6 import clean_ipv6_address

from .encryption import decrypt_text, encrypt_text

ALLOWED_LOOKUPS = {"isnull"}


class EncryptedTextField(models.TextField):
    """A TextField stored encrypted under the first of MEDCOR_ENCRYPTION_KEYS."""

    def get_lookup(self, lookup_name):
        return super().get_lookup(lookup_name) if lookup_name in ALLOWED_LOOKUPS else None

    def get_transform(self, lookup_name):
        return None

    def from_db_value(self, value, expression, connection):
        if not value:
            return value
        return decrypt_text(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if not value:
            return value
        return encrypt_text(value)


class EncryptedCharField(EncryptedTextField):
    """A one-line text field stored encrypted, with `max_length` checked on the plaintext."""

    def __init__(self, *args, max_length=None, **kwargs):
        super().__init__(*args, max_length=max_length, **kwargs)

    @cached_property
    def validators(self):
        limit = [validators.MaxLengthValidator(self.max_length)] if self.max_length else []
        return [*super().validators, *limit]

    def formfield(self, **kwargs):
        return super().formfield(**{"form_class": forms.CharField, "widget": None, **kwargs})


class EncryptedEmailField(EncryptedCharField):
    """An email address stored encrypted, validated as EmailField validates it."""

    default_validators = [validators.validate_email]

    def formfield(self, **kwargs):
        return super().formfield(**{"form_class": forms.EmailField, **kwargs})


class EncryptedGenericIPAddressField(EncryptedTextField):
    """An IPv4 or IPv6 address stored encrypted, normalised as GenericIPAddressField does."""

    default_error_messages = {"invalid": "Enter a valid IPv4 or IPv6 address."}

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_length", 39)
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        if kwargs.get("max_length") == 39:
            del kwargs["max_length"]
        return name, path, args, kwargs

    def to_python(self, value):
        if value is None:
            return None
        value = str(value).strip()
        if not value:
            return None if self.null else ""
        try:
            validators.validate_ipv46_address(value)
        except ValidationError:
            raise ValidationError(self.error_messages["invalid"], code="invalid") from None
        return clean_ipv6_address(value) if ":" in value else value

    def formfield(self, **kwargs):
        return super().formfield(**{"form_class": forms.GenericIPAddressField, "widget": None, **kwargs})
