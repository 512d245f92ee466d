"""The request's admin page, replies part: the replies sent so far, and a field to write one."""

from django import forms
from django.contrib import admin, messages
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from .audit import AuditChannel
from .replies import BODY_MAX_LENGTH, ReplyNotAllowed, replies_of, reply_create
from .reports import STATUS_COLOURS
from .validators import validate_no_nul

REPLY_FIELD = "reply"
HISTORY_FIELD = "reply_history"


class ReplyForm(forms.ModelForm):
    """The request's change form with a reply to write; the reply is no field of the request."""

    reply = forms.CharField(
        required=False,
        max_length=BODY_MAX_LENGTH,
        validators=[validate_no_nul],
        widget=forms.Textarea(attrs={"rows": 8, "cols": 80}),
        help_text="Sent to the submitter on save, from the support address, threaded under their request.",
    )

    @property
    def changed_data(self):
        # The contact fields' edit writes exactly the changed model fields: the reply is none.
        return [name for name in super().changed_data if name != REPLY_FIELD]

    def reply_body(self):
        return self.cleaned_data.get(REPLY_FIELD, "") if hasattr(self, "cleaned_data") else ""


class RepliesAdminMixin:
    """Replies on EmailRequestAdmin: the list shows requests only, a request's page writes replies."""

    form = ReplyForm

    def get_queryset(self, request):
        return super().get_queryset(request).submissions()

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            return fieldsets
        fields = (
            (HISTORY_FIELD, REPLY_FIELD) if self.has_change_permission(request, obj) else (HISTORY_FIELD,)
        )
        return (*fieldsets, ("Replies to the submitter", {"fields": fields}))

    @admin.display(description="Sent so far")
    def reply_history(self, obj):
        replies = list(replies_of(obj)) if obj is not None and obj.pk else []
        if not replies:
            return "None yet."
        rows = format_html_join(
            "",
            '<tr><td>{}</td><td>{}</td><td><span title="{}" style="background:{};color:#fff;'
            'border-radius:4px;padding:2px 8px">{}</span></td><td>{}</td>'
            '<td style="white-space:pre-wrap">{}</td></tr>',
            (
                (
                    _time(reply.created_at),
                    reply.author.get_username() if reply.author else "(deleted user)",
                    reply.error_message,
                    STATUS_COLOURS.get(reply.status, "#000"),
                    reply.status,
                    _time(reply.sent_at),
                    reply.message,
                )
                for reply in replies
            ),
        )
        return format_html(
            "<table><thead><tr><th>Written</th><th>By</th><th>Status</th><th>Sent</th><th>Reply</th>"
            "</tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    def construct_change_message(self, request, form, formsets, add=False):
        change_message = super().construct_change_message(request, form, formsets, add)
        if isinstance(form, ReplyForm) and form.reply_body():
            change_message = [*change_message, {"added": {"name": "reply", "object": "to the submitter"}}]
        return change_message

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        body = form.reply_body() if isinstance(form, ReplyForm) else ""
        if not body:
            return
        try:
            reply_create(email_request=form.instance, body=body, request=request, channel=AuditChannel.ADMIN)
        except ReplyNotAllowed as exc:
            self.message_user(request, f"Reply not sent: {exc}", messages.ERROR)
            return
        self.message_user(request, "Reply queued: it is sent to the submitter shortly.", messages.SUCCESS)


def _time(value):
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M") if value else "-"
