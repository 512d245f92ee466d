"""Who may do what: anyone submits and reads redacted data; staff act through model permissions."""

from rest_framework.permissions import SAFE_METHODS, BasePermission

VIEW = "email_service.view_emailrequest"
CHANGE = "email_service.change_emailrequest"
DELETE = "email_service.delete_emailrequest"

# The permission each action needs; an action not listed here is open to anyone.
ACTION_PERMISSIONS = {
    "update": CHANGE,
    "partial_update": CHANGE,
    "cancel": CHANGE,
    "retry_failed": CHANGE,
    "destroy": DELETE,
    "attachment": VIEW,
}


# Actions that read with one permission and write with another: what their writes need.
WRITE_PERMISSIONS = {"replies": CHANGE}
ACTION_PERMISSIONS["replies"] = VIEW


def required_permission(action, method="GET"):
    """The model permission an action needs, or None for an action open to anyone."""
    if method not in SAFE_METHODS and action in WRITE_PERMISSIONS:
        return WRITE_PERMISSIONS[action]
    return ACTION_PERMISSIONS.get(action)


def can_view_personal_data(request):
    """Whether the caller may see names, addresses, messages and files."""
    return bool(request and request.user and request.user.has_perm(VIEW))


class EmailRequestPermission(BasePermission):
    """Open actions for anyone, staff actions by Django model permission."""

    def has_permission(self, request, view):
        required = required_permission(view.action, request.method)
        return required is None or bool(request.user and request.user.has_perm(required))
