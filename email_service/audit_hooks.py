"""Entries no view writes itself: changes to who holds the email app's permissions.

Permissions change through many doors (the admin's user and group pages, a shell, a data
migration), which end in the m2m_changed signal of one of three relations, in a group's deletion
(which takes its permissions from its members without that signal), or in the superuser flag
(which holds them all). Those signals carry no request, so `AuditContextMiddleware` keeps the
current one in a context variable: a change made while serving a request is recorded with its
user and IP, any other as a command.
"""

from contextvars import ContextVar

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.db.models.signals import m2m_changed, post_save, pre_delete, pre_save

from . import audit
from .audit import AuditAction, AuditChannel

APP_LABEL = "email_service"
_current_request = ContextVar("medcor_audit_request", default=None)


class AuditContextMiddleware:
    """Remember the request being served, for entries recorded where no request is passed."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        token = _current_request.set(request)
        try:
            return self.get_response(request)
        finally:
            _current_request.reset(token)


def current_request():
    """Return the request being served in this context, or None outside one."""
    return _current_request.get()


def channel_of(request):
    """Return the channel a request came through: the admin site, or the API."""
    match = getattr(request, "resolver_match", None)
    return AuditChannel.ADMIN if match is not None and match.app_name == "admin" else AuditChannel.API


def connect():
    """Connect the receivers that record changes to who holds the email app's permissions."""
    user_model = get_user_model()
    for through in (
        user_model.user_permissions.through,
        user_model.groups.through,
        Group.permissions.through,
    ):
        m2m_changed.connect(_relation_changed, sender=through, dispatch_uid=f"audit-{through._meta.label}")
    pre_delete.connect(_group_deleted, sender=Group, dispatch_uid="audit-group-deleted")
    pre_save.connect(_superuser_before, sender=user_model, dispatch_uid="audit-superuser-before")
    post_save.connect(_superuser_after, sender=user_model, dispatch_uid="audit-superuser-after")


def _app_permissions():
    return Permission.objects.filter(content_type__app_label=APP_LABEL)


def _relation_changed(sender, instance, action, reverse, model, pk_set, **kwargs):
    change = _as_add_or_remove(sender, instance, action, model, pk_set)
    if change is None:
        return
    added, pks = change
    user_model = get_user_model()
    if sender is user_model.user_permissions.through:
        if reverse:  # permission.user_set.add(user, ...)
            _on_change(added, _is_app_permission(instance), users=pks)
        else:
            _on_change(added, _app_permissions().filter(pk__in=pks).count(), users={instance.pk})
    elif sender is user_model.groups.through:
        if reverse:  # group.user_set.add(user, ...)
            _on_change(added, _app_permissions().filter(group=instance).count(), users=pks)
        else:
            held = _app_permissions().filter(group__in=pks).distinct().count()
            _on_change(added, held, users={instance.pk})
    elif reverse:  # permission.group_set.add(group, ...)
        _on_change(added, _is_app_permission(instance), groups=pks)
    else:
        _on_change(added, _app_permissions().filter(pk__in=pks).count(), groups={instance.pk})


def _as_add_or_remove(through, instance, action, model, pk_set):
    """Return (added, pks) for a finished add or remove; a clear is a remove of what it held."""
    if action == "pre_clear":
        # After the clear nothing says what was there, so the rows it will remove are read now.
        source, target = _foreign_key(through, type(instance)), _foreign_key(through, model)
        rows = through.objects.filter(**{source.attname: instance.pk})
        instance._audit_cleared = set(rows.values_list(target.attname, flat=True))
        return None
    if action == "post_clear":
        return False, instance.__dict__.pop("_audit_cleared", set())
    if action in ("post_add", "post_remove"):
        return action == "post_add", set(pk_set or ())
    return None


def _foreign_key(through, model):
    return next(field for field in through._meta.fields if field.is_relation and field.related_model is model)


def _is_app_permission(permission):
    return 1 if permission.content_type.app_label == APP_LABEL else 0


def _group_deleted(sender, instance, **kwargs):
    # Deleting a group removes its permissions from its members without any m2m signal.
    members = set(instance.user_set.values_list("pk", flat=True))
    if members:
        _on_change(False, _app_permissions().filter(group=instance).count(), users=members)


def _superuser_before(sender, instance, update_fields=None, raw=False, **kwargs):
    # A superuser holds every permission; most saves (a login's last_login) do not touch the flag.
    if raw or (update_fields is not None and "is_superuser" not in update_fields):
        return
    before = sender._default_manager.filter(pk=instance.pk).values_list("is_superuser", flat=True).first()
    instance._audit_was_superuser = bool(before)


def _superuser_after(sender, instance, update_fields=None, raw=False, **kwargs):
    was = instance.__dict__.pop("_audit_was_superuser", None)
    if was is None or was == bool(instance.is_superuser):
        return
    _on_change(instance.is_superuser, _app_permissions().count(), users={instance.pk}, superuser=1)


def _on_change(added, permissions, *, users=None, groups=None, **extra):
    """Record that `permissions` of the app were granted to or taken from these users or groups."""
    if not permissions or not (users or groups):
        return
    detail = {"added" if added else "removed": permissions, **extra}
    # The staff accounts or groups concerned, by id: the trail names accounts, never the people
    # the service serves.
    for name, pks in (("user", users), ("group", groups)):
        if pks:
            detail[f"{name}s"] = len(pks)
            if len(pks) == 1:
                detail[f"{name}_id"] = next(iter(pks))
    request = current_request()
    if request is None:
        audit.record(AuditAction.PERMISSION_CHANGE, channel=AuditChannel.COMMAND, detail=detail)
    else:
        audit.record(
            AuditAction.PERMISSION_CHANGE, request=request, channel=channel_of(request), detail=detail
        )
