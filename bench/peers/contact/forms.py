"""The contact form's checks: the service's fields, lengths and header safety."""

from django import forms
from django.core.exceptions import ValidationError

from .models import ContactRequest


def reject_line_breaks(value):
    """Refuse CR and LF, which would let a value add mail headers (the service refuses them too)."""
    if "\r" in value or "\n" in value:
        raise ValidationError("Line breaks are not allowed.")


class ContactForm(forms.ModelForm):
    class Meta:
        model = ContactRequest
        fields = ["full_name", "email", "phone", "job_profession", "subject", "message"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("full_name", "email", "phone", "job_profession", "subject"):
            self.fields[name].validators.append(reject_line_breaks)
