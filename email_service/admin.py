"""The admin support staff work in: the outbox with its attempt log, operator actions, statistics.

Every write goes through the same functions as the API (`actions`, the QuerySet transitions);
the admin never assigns a status or saves a whole row over a worker's changes.
"""

import csv
from collections import Counter

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from . import actions, reports, sending_admin
from .models import CONTACT_FIELDS, EmailAttempt, EmailRequest, EmailStatus
from .reports import STATUS_COLOURS

CSV_COLUMNS = (
    "id",
    "created_at",
    "status",
    "full_name",
    "email",
    "phone",
    "job_profession",
    "subject",
    "message",
    "attachment_name",
    "attachment_size",
    "attempts",
    "retry_count",
    "manual_retries",
    "sent_at",
    "error_message",
)
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class EmailAttemptInline(admin.TabularInline):
    model = EmailAttempt
    extra = 0
    can_delete = False
    fields = (
        "number",
        "started_at",
        "duration_ms",
        "outcome",
        "smtp_code",
        "error_class",
        "error_text",
        "worker",
    )
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class AttachmentFilter(admin.SimpleListFilter):
    title = "attachment"
    parameter_name = "attachment"

    def lookups(self, request, model_admin):
        return [("yes", "With attachment"), ("no", "Without attachment")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.with_attachment()
        if self.value() == "no":
            return queryset.without_attachment()
        return queryset


@admin.register(EmailRequest)
class EmailRequestAdmin(admin.ModelAdmin):
    list_display = (
        "created",
        "colored_status",
        "submitter",
        "subject",
        "attachment_link",
        "attempts_count",
        "sent",
    )
    list_display_links = ("created",)
    list_filter = ("status", "created_at", "sent_at", AttachmentFilter)
    search_fields = ("full_name", "email", "subject", "message")
    date_hierarchy = "created_at"
    list_per_page = 50
    inlines = [EmailAttemptInline]
    actions = ["retry_selected", "cancel_selected", "export_csv"]
    fieldsets = (
        ("Contact", {"fields": CONTACT_FIELDS}),
        ("Attachment", {"fields": ("attachment_link", "attachment_size", "attachment_content_type")}),
        (
            "Delivery",
            {
                "fields": (
                    "id",
                    "colored_status",
                    "error_message",
                    "retry_count",
                    "max_retries",
                    "manual_retries",
                    "next_attempt_at",
                    "sent_at",
                    "message_id",
                    "celery_task_id",
                    "claimed_by",
                )
            },
        ),
        ("Acknowledgement to the submitter", {"fields": ("confirmation_sent_at", "confirmation_error")}),
        ("Record", {"fields": ("client_ip", "created_at", "updated_at")}),
    )
    readonly_fields = (
        "id",
        "colored_status",
        "attachment_link",
        "attachment_size",
        "attachment_content_type",
        "error_message",
        "retry_count",
        "manual_retries",
        "next_attempt_at",
        "celery_task_id",
        "message_id",
        "claimed_by",
        "confirmation_sent_at",
        "confirmation_error",
        "client_ip",
        "created_at",
        "updated_at",
        "sent_at",
    )

    def get_queryset(self, request):
        # One query for the whole page: the attempts are counted in SQL, not per row.
        return super().get_queryset(request).annotate(attempts_count=Count("attempts"))

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and not obj.is_editable():
            return self.readonly_fields + CONTACT_FIELDS + ("max_retries",)
        return self.readonly_fields

    def has_add_permission(self, request):
        # Requests come from the form or `manage.py test_email`, which also queue them.
        return False

    # --- columns -----------------------------------------------------------------------------
    @admin.display(description="Created", ordering="created_at")
    def created(self, obj):
        return _short_time(obj.created_at)

    @admin.display(description="Sent", ordering="sent_at")
    def sent(self, obj):
        return _short_time(obj.sent_at)

    @admin.display(description="Status", ordering="status")
    def colored_status(self, obj):
        # The last error shows on hover, so a FAILED row explains itself without opening it.
        return format_html(
            '<span title="{}" style="background:{};color:#fff;border-radius:4px;padding:2px 8px;font-weight:600;'
            'font-size:11px;letter-spacing:.03em;white-space:nowrap">{}</span>',
            obj.error_message,
            STATUS_COLOURS.get(obj.status, "#000"),
            obj.status,
        )

    @admin.display(description="Submitter", ordering="full_name")
    def submitter(self, obj):
        return format_html(
            '{}<br><span style="color:var(--body-quiet-color)">{}</span>', obj.full_name, obj.email
        )

    @admin.display(description="Attachment", ordering="attachment_name")
    def attachment_link(self, obj):
        if not obj.has_attachment:
            return "-"
        # The API's private download: it checks the view permission, the admin session authenticates it.
        url = reverse("email-request-attachment", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, obj.attachment_name or "attachment")

    @admin.display(description="Attempts", ordering="attempts_count")
    def attempts_count(self, obj):
        return obj.attempts_count

    # --- saving --------------------------------------------------------------------------------
    def save_model(self, request, obj, form, change):
        # `obj.save()` would write back every column as loaded, status included, undoing whatever a
        # worker did meanwhile. Write only the edited fields, and only while the row is not SENT.
        fields = {name: getattr(obj, name) for name in form.changed_data}
        obj.edit_refused = False
        if fields:
            obj.edit_refused = not EmailRequest.objects.filter(pk=obj.pk).edit_unsent(**fields)

    def response_change(self, request, obj):
        if getattr(obj, "edit_refused", False):
            self.message_user(request, "Not saved: the request was sent in the meantime.", messages.ERROR)
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)

    def construct_change_message(self, request, form, formsets, add=False):
        if getattr(form.instance, "edit_refused", False):
            return "Edit refused: the request had been sent."
        return super().construct_change_message(request, form, formsets, add)

    # --- actions -------------------------------------------------------------------------------
    @admin.action(description="Retry selected failed requests", permissions=["change"])
    def retry_selected(self, request, queryset):
        statuses = Counter(queryset.values_list("status", flat=True))
        changed = actions.retry_failed(queryset)
        skipped = {status: count for status, count in statuses.items() if status != EmailStatus.FAILED}
        self._report(
            request,
            f"{changed} request(s) requeued",
            skipped,
            statuses[EmailStatus.FAILED] - changed,
            "only FAILED requests can be retried",
        )

    @admin.action(description="Cancel selected pending requests", permissions=["change"])
    def cancel_selected(self, request, queryset):
        changed, skipped = 0, Counter()
        for email_request in queryset.only("pk", "status"):
            try:
                actions.cancel_email_request(email_request)
                changed += 1
            except actions.TransitionNotAllowed:
                # `cancel_email_request` reloaded the status, so the reason is current.
                skipped[email_request.status] += 1
        self._report(
            request, f"{changed} request(s) cancelled", skipped, 0, "only PENDING requests can be cancelled"
        )

    @admin.action(description="Export selected as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        filename = f"email-requests-{timezone.now():%Y%m%d-%H%M%S}.csv"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        response["Cache-Control"] = "private, no-store"
        writer = csv.writer(response)
        writer.writerow(CSV_COLUMNS)
        for row in queryset.order_by("created_at").iterator():
            writer.writerow(_csv_cell(_csv_value(row, column)) for column in CSV_COLUMNS)
        return response

    def _report(self, request, done, skipped, lost_races, rule):
        parts = [f"{count} {status}" for status, count in sorted(skipped.items())]
        if lost_races:
            parts.append(f"{lost_races} changed status meanwhile")
        total = sum(skipped.values()) + lost_races
        if total:
            message = f"{done}; {total} skipped ({', '.join(parts)}): {rule}."
        else:
            message = f"{done}; none skipped."
        self.message_user(request, message, messages.WARNING if total else messages.SUCCESS)

    # --- the statistics page -------------------------------------------------------------------
    def get_urls(self):
        statistics = path(
            "statistics/",
            self.admin_site.admin_view(self.statistics_view),
            name="email_service_emailrequest_statistics",
        )
        resume_sending = path(
            "resume-sending/",
            self.admin_site.admin_view(sending_admin.resume_view(self)),
            name="email_service_emailrequest_resume_sending",
        )
        return [statistics, resume_sending, *super().get_urls()]

    def changelist_view(self, request, extra_context=None):
        # The banner that says sending is paused, with its resume button.
        context = {**sending_admin.banner_context(request, self), **(extra_context or {})}
        return super().changelist_view(request, extra_context=context)

    def statistics_view(self, request):
        """Show whether mail is flowing: counts, the last 30 days, delivery times, the oldest PENDING."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        report = reports.delivery_report()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Email delivery statistics",
            **report,
            "verdict": reports.verdict(report),
            "median_delivery": reports.duration(report["median_delivery_seconds"]),
            "p95_delivery": reports.duration(report["p95_delivery_seconds"]),
            "oldest_pending": reports.duration(report["oldest_pending_seconds"]),
            **sending_admin.banner_context(request, self),
        }
        return TemplateResponse(request, "admin/email_service/emailrequest/statistics.html", context)


def _short_time(value):
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M") if value else "-"


def _csv_value(row, column):
    if column == "attempts":
        return row.attempts_count
    value = getattr(row, column)
    return value.isoformat() if hasattr(value, "isoformat") else value


def _csv_cell(value):
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return "" if value is None else value
