"""The sender-wide brake in the admin: the banner's context and the resume button's view."""

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme

from . import brake, sending
from .audit import AuditChannel


def banner_context(request, model_admin):
    """Return the template context of the banner shown while sending is paused."""
    # Read afresh: one query per page, and an operator sees the state as it is now.
    state = brake.current(refresh=True)
    info = brake.describe(state)
    until = state.until
    info["until_display"] = timezone.localtime(until).strftime("%Y-%m-%d %H:%M:%S %Z") if until else ""
    info["can_resume"] = model_admin.has_change_permission(request)
    return {"sending_brake": info}


def resume_view(model_admin):
    """Build the view behind the banner's button: POST resumes sending, then back to the page."""

    def resume(request):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not model_admin.has_change_permission(request):
            raise PermissionDenied
        was = brake.current(refresh=True)
        sending.resume_sending(channel=AuditChannel.ADMIN, request=request)
        if was.is_engaged:
            model_admin.message_user(
                request, "Sending resumed: the waiting requests go now.", messages.SUCCESS
            )
        else:
            model_admin.message_user(request, "Sending was not paused.", messages.INFO)
        target = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
            target = reverse("admin:email_service_emailrequest_changelist")
        return HttpResponseRedirect(target)

    return resume
