from django.apps import AppConfig


class EmailServiceConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "email_service"
    verbose_name = "Email service"

    def ready(self):
        from django.db.backends.signals import connection_created

        from . import audit_admin, audit_hooks, signals, token_admin  # noqa: F401
        from .aggregates import register_sqlite_functions

        connection_created.connect(register_sqlite_functions)
        audit_hooks.connect()
