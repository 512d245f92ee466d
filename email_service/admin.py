"""The admin support staff work in: the outbox with its attempt log, operator actions, statistics.

Every write goes through the same functions as the API (`actions`, the QuerySet transitions);
the admin never assigns a status or saves a whole row over a worker's changes.
"""

import tempfile
from collections import Counter
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.db.models import Count
from django.http import FileResponse, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from rest_framework import serializers

from . import actions, audit, csv_export, reports, sending_admin, subjects
from .audit import AuditAction, AuditChannel
from .encryption import normalise_address
from .models import CONTACT_FIELDS, EmailAttempt, EmailRequest, EmailStatus
from .reply_admin import HISTORY_FIELD, RepliesAdminMixin, ReplyForm
from .reports import STATUS_COLOURS
from .serializers import EmailRequestUpdateSerializer

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
# How many of a request's audit entries its change page lists; a link leads to all of them.
ACCESS_HISTORY_ROWS = 25


def _api_rule(name):
    """Return a clean_<name> that runs the API's own field, so the admin refuses what the API refuses."""

    def clean(self):
        field = EmailRequestUpdateSerializer().fields[name]
        try:
            return field.run_validation(self.cleaned_data[name])
        except serializers.ValidationError as error:
            raise ValidationError(
                [ValidationError(str(message), code=message.code) for message in error.detail]
            ) from error

    clean.__name__ = f"clean_{name}"
    return clean


class EmailRequestAdminForm(ReplyForm):
    """The change form: each contact field cleaned by the API's rules (trimming included), and a reply."""

    class Meta:
        model = EmailRequest
        fields = CONTACT_FIELDS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in CONTACT_FIELDS:
            if name in self.fields:
                # The API's field trims, refusing a line break at either end rather than cutting it
                # off, and checks the lengths and shapes itself: it must see the value as typed.
                self.fields[name].strip = False
                self.fields[name].validators = []

    clean_full_name = _api_rule("full_name")
    clean_email = _api_rule("email")
    clean_phone = _api_rule("phone")
    clean_job_profession = _api_rule("job_profession")
    clean_subject = _api_rule("subject")
    clean_message = _api_rule("message")


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
class EmailRequestAdmin(RepliesAdminMixin, admin.ModelAdmin):
    form = EmailRequestAdminForm
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
    list_filter = ("status", "created_at", "sent_at", AttachmentFilter, "captcha_unverified", "virus_scan")
    search_fields = ("full_name", "email", "subject", "message")
    date_hierarchy = "created_at"
    list_per_page = 50
    inlines = [EmailAttemptInline]
    actions = ["retry_selected", "cancel_selected", "export_csv", "export_subject", "erase_subject"]
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
        ("Intake checks", {"fields": ("captcha_unverified", "virus_scan")}),
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
        "captcha_unverified",
        "virus_scan",
        "created_at",
        "updated_at",
        "sent_at",
        "access_history",
        HISTORY_FIELD,
    )

    def get_queryset(self, request):
        # One query for the whole page: the attempts are counted in SQL, not per row.
        return super().get_queryset(request).annotate(attempts_count=Count("attempts"))

    def get_search_results(self, request, queryset, search_term):
        """Find an address by its index; other text by decrypting the newest rows, within a limit."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if _is_address(term):
            return queryset.for_address(term), False
        found, scanned, limited = queryset.matching_text(term)
        if limited:
            self.message_user(
                request,
                f"Searched only the newest {scanned} requests (EMAIL_SEARCH_SCAN_LIMIT): narrow the list "
                "with the filters or dates to search older ones.",
                messages.WARNING,
            )
        return found, False

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

    # No `ordering` on columns of encrypted fields: the database would sort ciphertext.
    @admin.display(description="Submitter")
    def submitter(self, obj):
        return format_html(
            '{}<br><span style="color:var(--body-quiet-color)">{}</span>', obj.full_name, obj.email
        )

    @admin.display(description="Attachment")
    def attachment_link(self, obj):
        if not obj.has_attachment:
            return "-"
        # The API's private download: it checks the view permission, the admin session authenticates it.
        url = reverse("email-request-attachment", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, obj.attachment_name or "attachment")

    @admin.display(description="Attempts", ordering="attempts_count")
    def attempts_count(self, obj):
        return obj.attempts_count

    # --- the audit trail: every page and action that shows or changes personal data -------------
    def changelist_view(self, request, extra_context=None):
        # With the banner that says sending is paused, and its resume button.
        extra_context = {**sending_admin.banner_context(request, self), **(extra_context or {})}
        response = super().changelist_view(request, extra_context)
        changelist = (getattr(response, "context_data", None) or {}).get("cl")
        # An action's POST returns the action's own response, which records itself.
        if request.method == "GET" and changelist is not None:
            action = AuditAction.SEARCH if changelist.query else AuditAction.LIST
            _record(request, action, changelist.result_list)
        return response

    def change_view(self, request, object_id, form_url="", extra_context=None):
        response = super().change_view(request, object_id, form_url, extra_context)
        # A page shown (also one re-shown with a form's errors); saves record their update.
        # The page renders after this, so its access history includes this view.
        shown = (getattr(response, "context_data", None) or {}).get("original")
        if shown is not None:
            _record(request, AuditAction.VIEW, [shown])
        return response

    def delete_model(self, request, obj):
        pk = obj.pk  # deleting sets it to None
        super().delete_model(request, obj)
        _record(request, AuditAction.DELETE, [pk])

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            pks = list(queryset.values_list("pk", flat=True))
            super().delete_queryset(request, queryset)
            _record(request, AuditAction.DELETE, pks, requests=len(pks))

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if obj is not None and request.user.has_perm("email_service.view_auditentry"):
            fieldsets = (*fieldsets, ("Access history", {"fields": ("access_history",)}))
        return fieldsets

    @admin.display(description="Access history")
    def access_history(self, obj):
        entries = audit.entries_about(obj.pk).order_by("-pk")
        shown = list(entries[:ACCESS_HISTORY_ROWS])
        link = reverse("admin:email_service_auditentry_changelist") + "?" + urlencode({"request_id": obj.pk})
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    _short_time(e.time),
                    e.actor or "-",
                    e.get_action_display(),
                    e.get_channel_display(),
                    e.ip or "-",
                )
                for e in shown
            ),
        )
        return format_html(
            "<table><thead><tr><th>Time</th><th>Who</th><th>Action</th><th>Channel</th><th>IP</th></tr>"
            '</thead><tbody>{}</tbody></table><p><a href="{}">All entries about this request in the audit '
            "trail</a></p>",
            rows,
            link,
        )

    # --- saving --------------------------------------------------------------------------------
    def save_model(self, request, obj, form, change):
        # `obj.save()` would write back every column as loaded, status included, undoing whatever a
        # worker did meanwhile. Write only the edited fields, and only while the row is not SENT.
        fields = {name: getattr(obj, name) for name in form.changed_data}
        obj.edit_refused = False
        if fields:
            obj.edit_refused = not EmailRequest.objects.filter(pk=obj.pk).edit_unsent(**fields)
            if not obj.edit_refused:
                # changeform_view is one transaction: the edit and its entry commit together.
                _record(request, AuditAction.UPDATE, [obj], fields=len(fields))

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
        with transaction.atomic():
            requeued = actions.retry_failed_requests(queryset)
            _record(request, AuditAction.RETRY, requeued, requests=len(requeued))
        changed = len(requeued)
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
        cancelled, skipped = [], Counter()
        with transaction.atomic():
            for email_request in queryset.only("pk", "status"):
                try:
                    with transaction.atomic():
                        actions.cancel_email_request(email_request)
                    cancelled.append(email_request.pk)
                except actions.TransitionNotAllowed:
                    # `cancel_email_request` reloaded the status, so the reason is current.
                    skipped[email_request.status] += 1
            _record(request, AuditAction.CANCEL, cancelled, requests=len(cancelled))
        changed = len(cancelled)
        self._report(
            request, f"{changed} request(s) cancelled", skipped, 0, "only PENDING requests can be cancelled"
        )

    @admin.action(description="Export selected as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        filename = f"email-requests-{timezone.now():%Y%m%d-%H%M%S}.csv"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        response["Cache-Control"] = "private, no-store"
        writer = csv_export.writer(response)
        writer.writerow(CSV_COLUMNS)
        exported = []
        for row in queryset.order_by("created_at").iterator():
            writer.writerow(csv_export.safe_row(_csv_value(row, column) for column in CSV_COLUMNS))
            exported.append(row.pk)
        _record(request, AuditAction.EXPORT, exported, requests=len(exported))
        return response

    # --- subject access and erasure ------------------------------------------------------------
    def has_export_subject_permission(self, request):
        return request.user.has_perm("email_service.export_subject")

    def has_erase_subject_permission(self, request):
        return request.user.has_perm("email_service.erase_subject")

    @admin.action(
        description="Export everything kept about the person who sent these (subject access)",
        permissions=["export_subject"],
    )
    def export_subject(self, request, queryset):
        addresses = _addresses(queryset)
        if len(addresses) != 1:
            self.message_user(
                request, "Select requests of one person: an export is per person.", messages.ERROR
            )
            return None
        # Written to an unnamed temporary file, gone once the download closes it.
        archive = tempfile.TemporaryFile()
        try:
            subjects.export_subject(addresses.pop(), archive, channel=AuditChannel.ADMIN, request=request)
        except BaseException:
            archive.close()
            raise
        archive.seek(0)
        filename = f"subject-export-{timezone.now():%Y%m%d-%H%M%S}.zip"
        response = FileResponse(
            archive, as_attachment=True, filename=filename, content_type="application/zip"
        )
        response["Cache-Control"] = "private, no-store"
        return response

    @admin.action(
        description="Erase everything kept about the people who sent these (erasure)",
        permissions=["erase_subject"],
    )
    def erase_subject(self, request, queryset):
        addresses = sorted(_addresses(queryset))
        if request.POST.get("post") != "yes":
            # Nothing is erased before a second, explicit confirmation of what will go.
            found = [subjects.find_subject(address).counts() for address in addresses]
            context = {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "title": "Erase everything kept about these people?",
                "people": len(addresses),
                "totals": {key: sum(counts[key] for counts in found) for key in subjects.COUNT_KEYS},
                "selected": [str(pk) for pk in queryset.values_list("pk", flat=True)],
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/email_service/emailrequest/erase_subject.html", context)
        totals = dict.fromkeys(subjects.COUNT_KEYS, 0)
        with transaction.atomic():
            for address in addresses:
                _, counts = subjects.erase_subject(address, channel=AuditChannel.ADMIN, request=request)
                totals = {key: totals[key] + counts[key] for key in subjects.COUNT_KEYS}
        self.message_user(
            request,
            f"Erased {totals['requests']} request(s), {totals['attempts']} attempt(s), "
            f"{totals['replies']} reply(ies) and {totals['files']} file(s) of {len(addresses)} person(s).",
            messages.SUCCESS,
        )
        return None

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


def _is_address(text):
    try:
        validate_email(text)
    except ValidationError:
        return False
    return True


def _short_time(value):
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M") if value else "-"


def _csv_value(row, column):
    if column == "attempts":
        return row.attempts_count
    value = getattr(row, column)
    return value.isoformat() if hasattr(value, "isoformat") else value


def _record(request, action, request_ids, **detail):
    audit.record(action, request=request, channel=AuditChannel.ADMIN, request_ids=request_ids, detail=detail)


def _addresses(queryset):
    """Return the distinct people (normalised addresses) who sent the selected requests."""
    return {normalise_address(email) for email in queryset.values_list("email", flat=True)}
