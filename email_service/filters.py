"""List filters: public ones on status and dates, personal ones for staff only."""

from datetime import UTC

import django_filters
from django import forms
from django_filters.fields import IsoDateTimeField
from rest_framework.exceptions import PermissionDenied

from . import conf
from .models import EmailRequest, EmailStatus
from .permissions import can_view_personal_data


class StrictBooleanField(forms.NullBooleanField):
    """true/false (or 1/0); anything else is an error rather than silently no filter."""

    widget = forms.TextInput

    VALUES = {"true": True, "1": True, "false": False, "0": False}

    def to_python(self, value):
        if value in (None, ""):
            return None
        if str(value).lower() not in self.VALUES:
            raise forms.ValidationError("Enter true or false.", code="invalid")
        return self.VALUES[str(value).lower()]

    def validate(self, value):
        pass


class StrictBooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField


class UTCDateTimeField(IsoDateTimeField):
    """An ISO 8601 date and time, turned into UTC before it reaches the database.

    PostgreSQL refuses offsets beyond about 16 hours that ISO 8601 (and Python) allow, which
    would otherwise surface as a server error.
    """

    def to_python(self, value):
        value = super().to_python(value)
        if value is None:
            return None
        try:
            return value.astimezone(UTC)
        except OverflowError as exc:
            raise forms.ValidationError(
                "Enter a date and time within the years 1 to 9999.", code="invalid"
            ) from exc


class UTCDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UTCDateTimeField


class EmailRequestFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=EmailStatus.choices)
    has_attachment = StrictBooleanFilter(method="filter_has_attachment")
    created_after = UTCDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UTCDateTimeFilter(field_name="created_at", lookup_expr="lte")
    email = django_filters.CharFilter(
        method="filter_email",
        help_text="Staff only: the submitter's address; the same mailbox however it is typed (case, +tag, "
        "Gmail dots).",
    )
    search = django_filters.CharFilter(
        method="filter_search",
        help_text="Staff only: text in name, email, subject or message, case-insensitive. The fields are "
        "encrypted, so only the newest EMAIL_SEARCH_SCAN_LIMIT rows the other filters leave are read; "
        "`search_scan` in the answer says how many and whether the limit was reached.",
    )
    ordering = django_filters.OrderingFilter(fields=(("created_at", "created_at"), ("sent_at", "sent_at")))

    class Meta:
        model = EmailRequest
        fields = ["status", "has_attachment", "created_after", "created_before"]

    # Filters whose empty value is an error rather than "no filter", as the schema says.
    NON_EMPTY = ("status", "has_attachment", "created_after", "created_before", "ordering")

    def is_valid(self):
        valid = super().is_valid()
        for name in self.NON_EMPTY:
            if name in self.data and not self.data.get(name):
                self.form.add_error(name, "This value may not be empty.")
                valid = False
        return valid

    def _require_staff(self):
        if not can_view_personal_data(getattr(self, "request", None)):
            raise PermissionDenied("Filtering by personal fields needs staff permission.")

    def filter_has_attachment(self, queryset, name, value):
        return queryset.with_attachment() if value else queryset.without_attachment()

    def filter_email(self, queryset, name, value):
        self._require_staff()
        return queryset.for_address(value)

    def filter_search(self, queryset, name, value):
        self._require_staff()
        # Deferred to filter_queryset: the search decrypts what the other filters leave, so it
        # runs after all of them (django-filter applies them in declaration order).
        return queryset

    def filter_queryset(self, queryset):
        queryset = super().filter_queryset(queryset)
        text = self.form.cleaned_data.get("search")
        if not text:
            return queryset
        queryset, scanned, limited = queryset.matching_text(text)
        if self.request is not None:
            # The list's answer says how far the search read (pagination.py).
            self.request.search_scan = {
                "scanned": scanned,
                "limit": conf.search_scan_limit(),
                "limit_reached": limited,
            }
        return queryset
