"""API tokens in the admin: who holds one, until when, last used; never the token itself.

Tokens are made with `manage.py create_api_token`, which shows the key once; here staff can see and
revoke them (delete), and nothing on the page could be sent as a token.
"""

from django.contrib import admin

from .authentication import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix_shown", "user", "created_at", "expires_at", "last_used_at")
    list_filter = ("expires_at",)
    search_fields = ("user__username", "prefix")
    list_select_related = ("user",)
    fields = ("prefix_shown", "user", "created_at", "expires_at", "last_used_at")
    readonly_fields = fields

    @admin.display(description="token", ordering="prefix")
    def prefix_shown(self, token):
        return f"{token.prefix}…"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
