"""The audit trail in the admin: read-only, for holders of `email_service.view_auditentry`."""

import json
import uuid

from django.contrib import admin
from django.http import StreamingHttpResponse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import csv_export
from .audit import AuditEntry, entries_about

CSV_COLUMNS = ("id", "time", "actor", "actor_user_id", "ip", "action", "channel", "request_ids", "detail")


class ActorFilter(admin.SimpleListFilter):
    title = _("actor")
    parameter_name = "actor"

    def lookups(self, request, model_admin):
        actors = AuditEntry.objects.order_by("actor").values_list("actor", flat=True).distinct()
        return [(actor, actor) for actor in actors if actor]

    def queryset(self, request, queryset):
        return queryset.filter(actor=self.value()) if self.value() else queryset


class RequestIdFilter(admin.SimpleListFilter):
    """Entries about one email request: `?request_id=<uuid>`, the link from a request's page."""

    title = _("request id")
    parameter_name = "request_id"

    def lookups(self, request, model_admin):
        # Shown only while in use: there are far too many ids to list.
        value = self.value()
        return [(value, value)] if value else []

    def queryset(self, request, queryset):
        request_id = _uuid(self.value())
        if self.value() and request_id is None:
            return queryset.none()
        return _about_request(queryset, request_id) if request_id else queryset


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("time", "actor", "action", "channel", "ip", "request_count")
    list_filter = (ActorFilter, "action", "channel", ("time", admin.DateFieldListFilter), RequestIdFilter)
    search_fields = ("actor",)
    search_help_text = _("A username, or an email request's id.")
    date_hierarchy = "time"
    ordering = ("-pk",)
    actions = ["export_csv"]
    list_per_page = 100
    show_full_result_count = False
    fields = (*CSV_COLUMNS, "prev_hmac", "hmac")
    readonly_fields = fields

    @admin.display(description=_("requests"))
    def request_count(self, entry):
        return len(entry.request_ids)

    def has_view_permission(self, request, obj=None):
        return request.user.has_perm("email_service.view_auditentry")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_search_results(self, request, queryset, search_term):
        request_id = _uuid(search_term)
        if request_id:
            return _about_request(queryset, request_id), False
        return super().get_search_results(request, queryset, search_term)

    @admin.action(description=_("Export selected entries as CSV"), permissions=["view"])
    def export_csv(self, request, queryset):
        rows = queryset.order_by("pk").iterator(chunk_size=2000)
        writer = csv_export.writer(_Echo())
        lines = (writer.writerow(_csv_row(entry)) for entry in rows)
        response = StreamingHttpResponse(_with_header(writer, lines), content_type="text/csv; charset=utf-8")
        filename = f"audit-trail-{timezone.now():%Y%m%d-%H%M%S}.csv"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


class _Echo:
    """A file whose write returns what it was given, so csv.writer yields lines to stream."""

    def write(self, value):
        return value


def _with_header(writer, lines):
    yield writer.writerow(CSV_COLUMNS)
    yield from lines


def _csv_row(entry):
    values = {
        "id": entry.pk,
        "time": entry.time.isoformat(),
        "actor": entry.actor,
        "actor_user_id": entry.actor_user_id if entry.actor_user_id is not None else "",
        "ip": entry.ip,
        "action": entry.action,
        "channel": entry.channel,
        "request_ids": " ".join(entry.request_ids),
        "detail": json.dumps(entry.detail, sort_keys=True) if entry.detail else "",
    }
    return csv_export.safe_row(values[column] for column in CSV_COLUMNS)


def _uuid(value):
    try:
        return str(uuid.UUID(str(value).strip())) if value else None
    except ValueError:
        return None


def _about_request(queryset, request_id):
    return entries_about(request_id, queryset)
