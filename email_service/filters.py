"""List filters: public ones on status and dates, personal ones for staff only."""
import django_filters
from django.db.models import Q
from rest_framework.exceptions import PermissionDenied

from .models import EmailRequest, EmailStatus
from .permissions import can_view_personal_data


class EmailRequestFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=EmailStatus.choices)
    has_attachment = django_filters.BooleanFilter(method="filter_has_attachment")
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lte")
    email = django_filters.CharFilter(
        method="filter_email", help_text="Staff only: the submitter's address, case-insensitive."
    )
    search = django_filters.CharFilter(
        method="filter_search", help_text="Staff only: text in name, email, subject or message."
    )
    ordering = django_filters.OrderingFilter(
        fields=(("created_at", "created_at"), ("sent_at", "sent_at"))
    )

    class Meta:
        model = EmailRequest
        fields = ["status", "has_attachment", "created_after", "created_before"]

    def _require_staff(self):
        if not can_view_personal_data(getattr(self, "request", None)):
            raise PermissionDenied("Filtering by personal fields needs staff permission.")

    def filter_has_attachment(self, queryset, name, value):
        return queryset.with_attachment() if value else queryset.without_attachment()

    def filter_email(self, queryset, name, value):
        self._require_staff()
        return queryset.filter(email__iexact=value)

    def filter_search(self, queryset, name, value):
        self._require_staff()
        return queryset.filter(
            Q(full_name__icontains=value)
            | Q(email__icontains=value)
            | Q(subject__icontains=value)
            | Q(message__icontains=value)
        )
