from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from . import services
from .models import EmailAttempt, EmailRequest, EmailStatus

STATUS_COLOURS = {
    EmailStatus.PENDING: "#b45309",
    EmailStatus.PROCESSING: "#1d4ed8",
    EmailStatus.SENT: "#15803d",
    EmailStatus.FAILED: "#b91c1c",
    EmailStatus.CANCELLED: "#6b7280",
}
CONTACT_FIELDS = ("full_name", "email", "phone", "job_profession", "subject", "message")


class EmailAttemptInline(admin.TabularInline):
    model = EmailAttempt
    extra = 0
    can_delete = False
    fields = ("number", "started_at", "duration_ms", "outcome", "smtp_code", "error_class", "error_text", "worker")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(EmailRequest)
class EmailRequestAdmin(admin.ModelAdmin):
    list_display = ("created_at", "colored_status", "full_name", "email", "subject", "has_attachment_flag", "retry_count", "sent_at")
    list_filter = ("status", "created_at", ("file_attached", admin.EmptyFieldListFilter))
    search_fields = ("full_name", "email", "subject", "message")
    date_hierarchy = "created_at"
    inlines = [EmailAttemptInline]
    actions = ["retry_selected", "cancel_selected"]
    readonly_fields = (
        "id", "status", "attachment_link", "attachment_size", "attachment_content_type", "error_message",
        "retry_count", "manual_retries", "next_attempt_at", "celery_task_id", "message_id", "claimed_by",
        "confirmation_sent_at", "confirmation_error", "client_ip", "created_at", "updated_at", "sent_at",
    )
    exclude = ("file_attached", "attachment_name")

    @admin.display(description="Status", ordering="status")
    def colored_status(self, obj):
        return format_html('<b style="color:{}">{}</b>', STATUS_COLOURS.get(obj.status, "#000"), obj.status)

    @admin.display(description="File", boolean=True)
    def has_attachment_flag(self, obj):
        return obj.has_attachment

    @admin.display(description="Attachment")
    def attachment_link(self, obj):
        if not obj.has_attachment:
            return "-"
        url = reverse("email-request-attachment", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, obj.attachment_name)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and not obj.is_editable():
            return self.readonly_fields + CONTACT_FIELDS + ("max_retries",)
        return self.readonly_fields

    @admin.action(description="Retry selected failed requests", permissions=["change"])
    def retry_selected(self, request, queryset):
        selected = queryset.count()
        count = services.retry_failed(queryset)
        self.message_user(request, f"{count} request(s) requeued; {selected - count} skipped (not FAILED).", messages.SUCCESS)

    @admin.action(description="Cancel selected pending requests", permissions=["change"])
    def cancel_selected(self, request, queryset):
        selected = queryset.count()
        count = queryset.cancel()
        self.message_user(request, f"{count} request(s) cancelled; {selected - count} skipped (not PENDING).", messages.SUCCESS)
